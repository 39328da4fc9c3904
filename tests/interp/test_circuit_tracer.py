"""circuit-tracer (0.5.0, its own venv: scripts/setup_circuit_tracer.sh) loads the per-layer
transcoders ``saeforge export circuit-tracer`` writes, computes what ours compute, and builds an
attribution graph with them over a tiny Llama.

Two sets, trained here for a few steps on the tiny Llama's MLP inputs and outputs (2 layers): BatchTopK
transcoders (saved as JumpReLU) and ReLU skip transcoders. circuit-tracer runs in a subprocess of
its venv (tests/interp/circuit_tracer_probe.py, nothing of saeforge imported there); its results come
back as files and are compared here with ours, with transformers 5's forward and with the graph's
edges worked out by hand. Without that venv the tests skip (fail under ``CI=true``): ``make setup``
builds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from dictionary_folders import fit_transcoder
from safetensors.torch import load, load_file, save_file
from tiny_model import build_tiny_model, write_corpus

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.hooking import (
    MultiHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.store import open_store
from activation_cache.text import pack_sequences
from cluster.cli import main as saeforge
from interp.circuit_tracer import circuit_tracer_files, transformers4_model_files
from interp.loading import read_dictionary_folder
from trainer.architectures import build_sae
from trainer.config import SAEConfig
from trainer.dictionary import dictionary_files
from trainer.layout import write_dictionary

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("circuit_tracer_probe.py")
N_LAYERS, D_MODEL, N_LATENTS = 2, 32, 64
ROPE_THETA = 100_000.0  # not transformers' default (10000), so a 4.57 that missed it would show in the logits
PROMPT = "To be, or not to be, that is the question"
SETS = {  # name: (architecture, skip connection, L1 coefficient)
    "batchtopk": ("batchtopk", False, None),
    "relu_skip": ("relu_l1", True, 1.0),  # lighter than the default 5: more features fire on the prompt
}


def circuit_tracer_python() -> Path:
    """The circuit-tracer venv's python; skips without it (fails under CI=true: CI must check this)."""
    venv = Path(os.environ.get("CIRCUIT_TRACER_VENV", sys.prefix + "-circuit-tracer"))
    python = (venv if venv.is_absolute() else REPO / venv) / "bin" / "python"
    if not python.exists():
        reason = f"circuit-tracer's venv {python.parent.parent} is missing: run `make setup` (scripts/setup.sh with the test extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def tiny_llama(root: Path) -> tuple[Path, Path]:
    """The tiny Llama as transformers 5 writes it (rope_theta ROPE_THETA), and a copy in 4.57's words."""
    model_dir = build_tiny_model(root / "model", n_layers=N_LAYERS, hidden=D_MODEL)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = ROPE_THETA  # rotary frequencies are computed on load, not saved
    (model_dir / "config.json").write_text(json.dumps(config))
    legacy_dir = root / "model-transformers4"
    shutil.copytree(model_dir, legacy_dir)
    for name, data in transformers4_model_files(model_dir).items():
        (legacy_dir / name).write_bytes(data)
    return model_dir, legacy_dir


def mlp_hookpoints(layer: int) -> tuple[str, str]:
    return f"mlp_in.{layer}", f"mlp_out.{layer}"


def scale_of(rows: torch.Tensor) -> float:
    """What the trainer scales activations by: to mean norm sqrt(d) (the tiny Llama's MLP outputs are ~0.005)."""
    return float(rows.shape[1] ** 0.5 / rows.norm(dim=1).mean())


def train_transcoder(x: torch.Tensor, y: torch.Tensor, architecture: str, skip: bool, l1: float | None, seed: int):
    """A transcoder trained a few steps on the scaled rows, as a job trains it (the scales are folded on saving)."""
    x, y = x * scale_of(x), y * scale_of(y)
    sae = build_sae(SAEConfig(architecture=architecture, n_latents=N_LATENTS, k=4, skip_connection=skip,
                              sparsity_coefficient=l1),
                    d_in=x.shape[1], d_out=y.shape[1], transcoder=True, seed=seed)
    return fit_transcoder(sae, x, y, 80, seed=seed)


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> dict:
    """Both transcoder sets trained, written as dictionary folders, exported with ``saeforge export
    circuit-tracer``, and run through circuit-tracer; with our own outputs on the same inputs."""
    python = circuit_tracer_python()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("circuit-tracer")
    model_dir, legacy_dir = tiny_llama(root)
    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    model, tokenizer = load_model(source), load_tokenizer(source)
    hookpoints = [h for layer in range(N_LAYERS) for h in mlp_hookpoints(layer)]
    harvester = MultiHarvester(model, hookpoints)
    corpus = write_corpus(root / "corpus", n_docs=3, repeats=10)
    tokens = torch.from_numpy(pack_sequences(DataConfig(source=str(corpus), context_length=32, max_tokens=32 * 24), tokenizer))
    rows = {h: acts[:, 1:].reshape(-1, D_MODEL) for h, acts in zip(hookpoints, harvester(tokens).values(), strict=True)}

    ids = torch.tensor([tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    prompt_rows = {h: acts[0] for h, acts in zip(hookpoints, harvester(ids[None]).values(), strict=True)}
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    inputs = {"ids": ids}
    for layer in range(N_LAYERS):  # the prompt's positions, then held-out rows of the corpus
        inputs[f"x.{layer}"] = torch.cat([prompt_rows[mlp_hookpoints(layer)[0]], rows[mlp_hookpoints(layer)[0]][-40:]]).contiguous()

    sets, folders = {}, {}
    for name, (architecture, skip, l1) in SETS.items():
        folders[name] = []
        for layer in range(N_LAYERS):
            hook_in, hook_out = mlp_hookpoints(layer)
            x, y = rows[hook_in][:-40], rows[hook_out][:-40]
            sae = train_transcoder(x, y, architecture, skip, l1, seed=layer)
            files = dictionary_files(sae, hookpoint=hook_in, hookpoint_out=hook_out, model_name=str(legacy_dir),
                                     scale=scale_of(x), target_scale=scale_of(y), extra_metadata={}, sparsity=None,
                                     eval_metrics={})
            folder = root / name / "run" / "dictionary" / f"{hook_in}-to-{hook_out}"
            write_dictionary(open_store(str(folder)), files)
            folders[name].append(str(folder))
        sets[name] = root / f"{name}-circuit-tracer"
        assert saeforge(["export", "circuit-tracer", *reversed(folders[name]), "--out", str(sets[name])]) == 0

    save_file(inputs, str(root / "inputs.safetensors"))
    job = {"model_dir": str(legacy_dir), "sets": {name: str(folder) for name, folder in sets.items()},
           "inputs": str(root / "inputs.safetensors"), "out": str(root / "probe")}
    (root / "job.json").write_text(json.dumps(job))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([str(python), str(PROBE), str(root / "job.json")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return {
        "outputs": load_file(str(root / "probe.safetensors")),
        "report": json.loads((root / "probe.json").read_text()),
        "inputs": inputs, "logits": logits, "model": model, "folders": folders, "sets": sets,
    }


def _no_error(report: dict, step: str) -> None:
    assert f"{step}_error" not in report, f"circuit-tracer's {step} failed: {report[f'{step}_error']}\n" \
                                          f"{report.get(f'{step}_traceback', '')}"


def test_transformers_4_57_reads_the_tiny_llama_as_transformers_5_runs_it(traced):
    _no_error(traced["report"], "hf")
    assert traced["report"]["hf_rope_theta"] == ROPE_THETA
    torch.testing.assert_close(traced["outputs"]["hf_logits"], traced["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SETS))
def test_circuit_tracer_loads_our_transcoders_and_computes_what_ours_compute(traced, name):
    """Its own loader (``load_transcoders`` on our config.yaml): encode, decode with the skip, and
    forward equal our loaded dictionaries' on the same rows; our layers come back in layer order."""
    report, outputs = traced["report"], traced["outputs"]
    _no_error(report, f"{name}.transcoders")
    assert report[f"{name}.config"]["model_kind"] == "transcoder_set"
    assert report[f"{name}.n_layers"] == N_LAYERS
    assert report[f"{name}.skip_connection"] == SETS[name][1]
    for layer in range(N_LAYERS):
        sae = read_dictionary_folder(traced["folders"][name][layer]).sae
        x = traced["inputs"][f"x.{layer}"]
        with torch.no_grad():
            code, reconstruction = sae.reconstruct(x)
        assert 0 < (code.acts > 0).sum() < code.acts.numel() // 2, "the test needs features that fire and ones that do not"
        torch.testing.assert_close(outputs[f"{name}.encode.{layer}"], code.acts, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outputs[f"{name}.decode.{layer}"], reconstruction, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outputs[f"{name}.forward.{layer}"], reconstruction, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SETS))
def test_circuit_tracer_builds_an_attribution_graph_with_our_transcoders(traced, name):
    """ReplacementModel (nnsight backend, the local model folder, our exported folder) and
    ``attribute()``: the graph's active features are the ones our transcoders fire on the prompt
    (circuit-tracer leaves out BOS), with our activations; the replacement model, with its error
    terms, gives the model's logits; and each last-layer feature's edge to a logit is its decoder
    row times its activation through the frozen final norm onto the demeaned unembedding."""
    report, outputs, model = traced["report"], traced["outputs"], traced["model"]
    _no_error(report, f"{name}.graph")
    n_pos = len(traced["inputs"]["ids"])
    ours = []
    for layer in range(N_LAYERS):
        sae = read_dictionary_folder(traced["folders"][name][layer]).sae
        with torch.no_grad():
            ours.append(sae.encode(traced["inputs"][f"x.{layer}"][:n_pos]).acts)
    ours = torch.stack(ours)
    ours[:, 0] = 0  # BOS: circuit-tracer zeroes the first position
    torch.testing.assert_close(outputs[f"{name}.rm_activations"], ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[f"{name}.rm_logits"], traced["logits"], rtol=1e-5, atol=1e-5)

    expected = ours.nonzero()
    assert len(expected) > 0
    assert outputs[f"{name}.active_features"].tolist() == expected.tolist()
    torch.testing.assert_close(outputs[f"{name}.activation_values"], ours[tuple(expected.T)], rtol=1e-5, atol=1e-6)

    targets = report[f"{name}.logit_targets"]
    probabilities = traced["logits"][-1].softmax(-1)
    assert targets == probabilities.argsort(descending=True)[: len(targets)].tolist()
    torch.testing.assert_close(outputs[f"{name}.logit_probabilities"], probabilities[targets], rtol=1e-5, atol=1e-6)

    last_layer = read_dictionary_folder(traced["folders"][name][-1]).sae
    residual = _final_residual(model, traced["inputs"]["ids"])[-1]
    norm = model.model.norm
    scale = norm.weight * torch.rsqrt(residual.pow(2).mean() + norm.variance_epsilon)  # the frozen RMS
    unembedding = model.lm_head.weight
    demeaned = unembedding[targets] - unembedding.mean(dim=0)
    adjacency = outputs[f"{name}.adjacency_matrix"]
    logit_rows = adjacency[-len(targets):]
    last = [i for i, (layer, pos, _) in enumerate(expected.tolist()) if layer == N_LAYERS - 1 and pos == n_pos - 1]
    assert last, "no last-layer feature fires on the last token"
    for i in last:
        feature = int(expected[i, 2])
        edge = ours[N_LAYERS - 1, n_pos - 1, feature] * (last_layer.W_dec[feature] * scale) @ demeaned.T
        torch.testing.assert_close(logit_rows[:, i], edge.detach(), rtol=1e-4, atol=1e-6)
    earlier = [i for i, (layer, pos, _) in enumerate(expected.tolist()) if layer == N_LAYERS - 1 and pos < n_pos - 1]
    assert earlier and logit_rows[:, earlier].abs().max() == 0, "no later layer carries them to the last token"


def _final_residual(model, ids: torch.Tensor) -> torch.Tensor:
    """(n_pos, d_model): the residual stream the final norm reads, by a hook of our own."""
    seen = []
    handle = model.model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0][0]))
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        handle.remove()
    return seen[0]


def test_what_circuit_tracer_cannot_run_is_refused_in_one_line(tmp_path):
    """TopK, different widths in and out, a missing layer, an SAE and a hookpoint that is not an
    MLP's: each refused before anything is written."""

    def folder(name, architecture="jumprelu", *, hook_in="mlp_in.0", hook_out="mlp_out.0", d_out=8, transcoder=True):
        sae = build_sae(SAEConfig(architecture=architecture, n_latents=16, k=4), d_in=8, d_out=d_out,
                        transcoder=transcoder, seed=0)
        files = dictionary_files(sae, hookpoint=hook_in, hookpoint_out=hook_out if transcoder else None,
                                 model_name="tiny", scale=1.0, extra_metadata={}, sparsity=None, eval_metrics={})
        write_dictionary(open_store(str(tmp_path / name)), files)
        return str(tmp_path / name)

    good = folder("good")
    cases = [
        ([folder("topk", "topk")], r"architecture 'topk' is TopK; circuit-tracer 0.5.0 loads ReLU and JumpReLU"),
        ([folder("wide", d_out=12)], r"d_in=8 but d_out=12"),
        ([good, folder("layer2", hook_in="mlp_in.2", hook_out="mlp_out.2")], r"no transcoder for layer 1 \(layers given: \[0, 2\]\)"),
        ([good, good], r"layer 0 is given twice"),
        ([folder("sae", transcoder=False)], r"not a transcoder"),
        ([folder("resid", hook_in="resid_post.0", hook_out="mlp_out.0")], r"hook_name='resid_post.0' is not an MLP's input"),
        ([folder("across", hook_in="mlp_in.0", hook_out="mlp_out.1")], r"reads layer 0 .* but writes layer 1"),
    ]
    for folders, message in cases:
        with pytest.raises(ValueError, match=message) as refusal:
            circuit_tracer_files(folders)
        assert "\n" not in str(refusal.value)
    files = circuit_tracer_files([folder("paths", "relu_l1")], location="/data/set")
    assert yaml.safe_load(files["config.yaml"])["transcoders"] == ["/data/set/layer_0.safetensors"]
    assert set(load(files["layer_0.safetensors"])) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    out = tmp_path / "refused"
    assert saeforge(["export", "circuit-tracer", good, good, "--out", str(out)]) == 2
    assert not out.exists()
