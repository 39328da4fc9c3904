"""Run inside circuit-tracer's own venv (.venv-circuit-tracer, transformers 4.57) by
tests/interp/test_circuit_tracer.py: ``python circuit_tracer_probe.py JOB.json``.

JOB.json names ``model_dir`` (a Hugging Face folder 4.57 reads), ``sets`` ({name: a folder of
per-layer transcoders that ``saeforge export circuit-tracer`` wrote}), ``clts`` (the same for
cross-layer transcoders, optional), ``inputs`` (safetensors: ``ids`` of the prompt, ``x.{layer}``
rows of each layer's MLP input) and ``out``. Writes ``out``.safetensors with what
circuit-tracer computed (keys prefixed by the set's name) and ``out``.json with the graphs' token
targets, or why a step failed. Nothing of saeforge is
imported here: everything is circuit-tracer's and transformers' own.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
job = json.loads(Path(sys.argv[1]).read_text())
inputs = load_file(job["inputs"])
ids = inputs["ids"]
out: dict[str, torch.Tensor] = {}
report: dict = {}
cpu = torch.device("cpu")


def step(label, fn, *args):
    """Run one part; a failure is recorded (its last line and traceback), the next parts still run."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - the test reports exactly what failed
        report[f"{label}_error"] = f"{type(err).__name__}: {err}"
        report[f"{label}_traceback"] = traceback.format_exc()[-4000:]


def hf_logits():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out["hf_logits"] = model(ids[None]).logits[0].contiguous()
    report["hf_rope_theta"] = float(model.config.rope_theta)


def transcoders(name, export_dir):
    from circuit_tracer.utils.hf_utils import load_transcoders

    config = yaml.safe_load((export_dir / "config.yaml").read_text())
    report[f"{name}.config"] = config
    # The paths as written (absolute), lazy decoder as circuit-tracer defaults to: W_dec read from the file.
    transcoder_set = load_transcoders(config, device=cpu, dtype=torch.float32)
    report[f"{name}.n_layers"] = transcoder_set.n_layers
    report[f"{name}.skip_connection"] = bool(transcoder_set.skip_connection)
    with torch.no_grad():
        for layer, transcoder in enumerate(transcoder_set):
            x = inputs[f"x.{layer}"]
            acts = transcoder.encode(x)
            out[f"{name}.encode.{layer}"] = acts
            out[f"{name}.decode.{layer}"] = transcoder.decode(acts, x)
            out[f"{name}.forward.{layer}"] = transcoder(x)


def clt(name, export_dir):
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    report[f"{name}.config"] = yaml.safe_load((export_dir / "config.yaml").read_text())
    # The route ReplacementModel.from_pretrained takes: an absolute folder is found by the cache
    # lookup and read by load_clt, the decoders lazily from the W_dec_{i} files.
    transcoder, _ = load_transcoder_from_hub(str(export_dir), device=cpu, dtype=torch.float32)
    report[f"{name}.is_clt"] = isinstance(transcoder, CrossLayerTranscoder)
    report[f"{name}.jump_relu"] = isinstance(transcoder.activation_function, JumpReLU)
    report[f"{name}.shape"] = [transcoder.n_layers, transcoder.d_transcoder, transcoder.d_model]
    x = torch.stack([inputs[f"x.{layer}"] for layer in range(transcoder.n_layers)])  # (L, rows, d)
    with torch.no_grad():
        acts = transcoder.encode(x)
        out[f"{name}.encode"] = acts
        out[f"{name}.decode"] = transcoder.decode(acts)
        out[f"{name}.forward"] = transcoder(x)


def graph(name, export_dir):
    from circuit_tracer import ReplacementModel, attribute

    # An absolute folder is found by circuit-tracer's cache lookup: no hub download is tried.
    model = ReplacementModel.from_pretrained(
        job["model_dir"], str(export_dir), backend="nnsight", device=cpu, dtype=torch.float32
    )
    logits, activations = model.get_activations(ids)
    out[f"{name}.rm_logits"] = logits[0].contiguous()
    out[f"{name}.rm_activations"] = activations.contiguous()
    result = attribute(ids, model, max_n_logits=4, desired_logit_prob=0.99, batch_size=64)
    out[f"{name}.active_features"] = result.active_features.contiguous()
    out[f"{name}.activation_values"] = result.activation_values.contiguous()
    out[f"{name}.adjacency_matrix"] = result.adjacency_matrix.contiguous()
    out[f"{name}.logit_probabilities"] = result.logit_probabilities.contiguous()
    out[f"{name}.input_tokens"] = result.input_tokens.clone()
    report[f"{name}.logit_targets"] = [int(target.vocab_idx) for target in result.logit_targets]
    report[f"{name}.n_pos"] = int(result.n_pos)


step("hf", hf_logits)
for name, folder in job["sets"].items():
    step(f"{name}.transcoders", transcoders, name, Path(folder))
    step(f"{name}.graph", graph, name, Path(folder))
for name, folder in job.get("clts", {}).items():
    step(f"{name}.clt", clt, name, Path(folder))
    step(f"{name}.graph", graph, name, Path(folder))
save_file(out, job["out"] + ".safetensors")
Path(job["out"] + ".json").write_text(json.dumps(report, indent=2))
