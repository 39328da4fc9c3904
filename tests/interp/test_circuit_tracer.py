"""circuit-tracer (0.5.0, its own venv: scripts/setup_circuit_tracer.sh) loads the per-layer
transcoders and the cross-layer transcoders ``saeforge export circuit-tracer`` writes, computes what
ours compute, and builds an attribution graph with them over a tiny Llama.

Two sets, trained here for a few steps on the tiny Llama's MLP inputs and outputs (2 layers): BatchTopK
transcoders (saved as JumpReLU) and ReLU skip transcoders; and a JumpReLU CLT over all 4 layers of
a 4-layer tiny Llama. circuit-tracer runs in a subprocess of
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
from trainer.clt import CrossLayerTranscoder
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


def tiny_llama(root: Path, n_layers: int = N_LAYERS) -> tuple[Path, Path]:
    """The tiny Llama as transformers 5 writes it (rope_theta ROPE_THETA), and a copy in 4.57's words."""
    model_dir = build_tiny_model(root / "model", n_layers=n_layers, hidden=D_MODEL)
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
    outputs, report = run_probe(python, root, {"model_dir": str(legacy_dir),
                                               "sets": {name: str(folder) for name, folder in sets.items()}})
    return {"outputs": outputs, "report": report, "inputs": inputs, "logits": logits, "model": model,
            "folders": folders, "sets": sets}


def run_probe(python: Path, root: Path, job: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """circuit_tracer_probe.py on ``job`` (the inputs at ``root``/inputs.safetensors) in circuit-tracer's venv."""
    job = {**job, "inputs": str(root / "inputs.safetensors"), "out": str(root / "probe")}
    (root / "job.json").write_text(json.dumps(job))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([str(python), str(PROBE), str(root / "job.json")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return load_file(str(root / "probe.safetensors")), json.loads((root / "probe.json").read_text())


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


# ----------------------------------------------------------------------------- cross-layer transcoders

CLT_LAYERS, CLT_LATENTS = 4, 48  # every layer of a 4-layer tiny Llama; latents per layer
CLT_NAME = "jumprelu_clt"


def clt_hookpoints(n_layers: int) -> tuple[list[str], list[str]]:
    return [f"mlp_in.{layer}" for layer in range(n_layers)], [f"mlp_out.{layer}" for layer in range(n_layers)]


def build_clt(architecture: str, n_layers: int, *, d_out: int = D_MODEL, x=None, y=None, steps: int = 0):
    """A CLT over ``n_layers`` layers; trained ``steps`` steps on the flat rows ``x``, ``y`` with
    each layer's own scales (the trainer's), folded on saving."""
    scales = {}
    if x is not None:
        per_layer = lambda rows, d: [scale_of(part) for part in rows.split(d, dim=1)]  # noqa: E731
        scales = {"input_scales": per_layer(x, D_MODEL), "target_scales": per_layer(y, d_out)}
    clt = CrossLayerTranscoder.from_config(SAEConfig(architecture=architecture, n_latents=CLT_LATENTS, k=4),
                                           layers=n_layers, d_in=D_MODEL, d_out=d_out, seed=0, **scales)
    return fit_transcoder(clt, x, y, steps) if steps else clt.eval()


def write_clt(folder: Path, clt, first_layer: int, model_name: str) -> str:
    hooks_in, hooks_out = clt_hookpoints(first_layer + clt.n_layers)
    hooks_in, hooks_out = hooks_in[first_layer:], hooks_out[first_layer:]
    files = dictionary_files(clt, hookpoint=hooks_in[0], hookpoint_out=hooks_out[0], hookpoints=hooks_in,
                             hookpoints_out=hooks_out, model_name=model_name, scale=1.0, extra_metadata={},
                             sparsity=None, eval_metrics={})
    write_dictionary(open_store(str(folder)), files)
    return str(folder)


@pytest.fixture(scope="module")
def clt_traced(tmp_path_factory) -> dict:
    """A JumpReLU CLT over all 4 layers of a 4-layer tiny Llama trained a few steps on its MLP
    inputs and outputs, written as our folder, exported with ``saeforge export circuit-tracer`` and
    run through circuit-tracer; with our own outputs on the same inputs."""
    python = circuit_tracer_python()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("circuit-tracer-clt")
    model_dir, legacy_dir = tiny_llama(root, CLT_LAYERS)
    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    model, tokenizer = load_model(source), load_tokenizer(source)
    hooks_in, hooks_out = clt_hookpoints(CLT_LAYERS)
    harvester = MultiHarvester(model, hooks_in + hooks_out)
    corpus = write_corpus(root / "corpus", n_docs=3, repeats=10)
    tokens = torch.from_numpy(pack_sequences(DataConfig(source=str(corpus), context_length=32, max_tokens=32 * 24), tokenizer))
    rows = {h: acts[:, 1:].reshape(-1, D_MODEL) for h, acts in zip(hooks_in + hooks_out, harvester(tokens).values(), strict=True)}
    ids = torch.tensor([tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    prompt_rows = {h: acts[0] for h, acts in zip(hooks_in + hooks_out, harvester(ids[None]).values(), strict=True)}
    with torch.no_grad():
        logits = model(ids[None]).logits[0]

    x = torch.cat([rows[h][:-40] for h in hooks_in], dim=1)  # (B, L * d): the layers side by side
    y = torch.cat([rows[h][:-40] for h in hooks_out], dim=1)
    clt = build_clt("jumprelu", CLT_LAYERS, x=x, y=y, steps=80)
    folder = write_clt(root / "run" / "dictionary" / "clt", clt, 0, str(legacy_dir))
    export = root / "clt-circuit-tracer"
    assert saeforge(["export", "circuit-tracer", folder, "--out", str(export)]) == 0

    inputs = {"ids": ids}
    for layer, hook in enumerate(hooks_in):  # the prompt's positions, then held-out rows of the corpus
        inputs[f"x.{layer}"] = torch.cat([prompt_rows[hook], rows[hook][-40:]]).contiguous()
    save_file(inputs, str(root / "inputs.safetensors"))
    outputs, report = run_probe(python, root, {"model_dir": str(legacy_dir), "sets": {}, "clts": {CLT_NAME: str(export)}})
    return {"outputs": outputs, "report": report, "inputs": inputs, "logits": logits, "model": model,
            "sae": read_dictionary_folder(folder).sae, "export": export}


def _ours(clt, inputs: dict, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Our loaded CLT on the probe's rows: activations (L, rows, n) and prediction (L, rows, d), in
    circuit-tracer's layout."""
    x = torch.cat([inputs[f"x.{layer}"][rows] for layer in range(clt.n_layers)], dim=1)
    with torch.no_grad():
        code, prediction = clt.reconstruct(x)
    acts = code.acts.view(len(x), clt.n_layers, clt.n_per_layer).transpose(0, 1)
    return acts, prediction.view(len(x), clt.n_layers, clt.d_layer_out).transpose(0, 1)


def test_circuit_tracer_loads_our_clt_and_computes_what_ours_compute(clt_traced):
    """Its own loader (the cache lookup ReplacementModel.from_pretrained takes -> ``load_clt``, the
    decoders read lazily from our ``W_dec_{i}`` files) makes a JumpReLU ``CrossLayerTranscoder`` whose
    encode, decode and forward equal our loaded CLT's on the same rows of every layer."""
    report, outputs = clt_traced["report"], clt_traced["outputs"]
    _no_error(report, f"{CLT_NAME}.clt")
    assert report[f"{CLT_NAME}.config"]["model_kind"] == "cross_layer_transcoder"
    assert report[f"{CLT_NAME}.is_clt"] and report[f"{CLT_NAME}.jump_relu"]
    assert report[f"{CLT_NAME}.shape"] == [CLT_LAYERS, CLT_LATENTS, D_MODEL]
    acts, prediction = _ours(clt_traced["sae"], clt_traced["inputs"])
    assert 0 < (acts > 0).sum() < acts.numel() // 2, "the test needs features that fire and ones that do not"
    assert (acts[:, -1] > 0).any(), "circuit-tracer's decode stops at the last position where a feature fires"
    torch.testing.assert_close(outputs[f"{CLT_NAME}.encode"], acts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[f"{CLT_NAME}.decode"], prediction, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[f"{CLT_NAME}.forward"], prediction, rtol=1e-5, atol=1e-6)


def test_circuit_tracer_builds_an_attribution_graph_with_our_clt(clt_traced):
    """ReplacementModel (nnsight, the local model folder, our exported CLT) and ``attribute()``: the
    graph's active features are the ones our CLT fires on the prompt (BOS left out) with our
    activations; with its error terms it gives the model's logits; and the edge from a feature at the
    last position to a logit is worked out by hand: for a last-layer feature its decoder times its
    activation through the frozen final norm onto the demeaned unembedding; for a feature of the
    layer before, its two decoders (into that layer's MLP output and the last one's) plus what the
    last layer's attention, pattern and norm frozen, carries of the first."""
    report, outputs, model, clt = clt_traced["report"], clt_traced["outputs"], clt_traced["model"], clt_traced["sae"]
    _no_error(report, f"{CLT_NAME}.graph")
    ids = clt_traced["inputs"]["ids"]
    n_pos = len(ids)
    ours, _ = _ours(clt, clt_traced["inputs"], slice(0, n_pos))
    ours[:, 0] = 0  # BOS: circuit-tracer zeroes the first position
    torch.testing.assert_close(outputs[f"{CLT_NAME}.rm_activations"], ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[f"{CLT_NAME}.rm_logits"], clt_traced["logits"], rtol=1e-5, atol=1e-5)
    expected = ours.nonzero()
    assert outputs[f"{CLT_NAME}.active_features"].tolist() == expected.tolist()
    torch.testing.assert_close(outputs[f"{CLT_NAME}.activation_values"], ours[tuple(expected.T)], rtol=1e-5, atol=1e-6)
    targets = report[f"{CLT_NAME}.logit_targets"]
    probabilities = clt_traced["logits"][-1].softmax(-1)
    assert targets == probabilities.argsort(descending=True)[: len(targets)].tolist()

    last = CLT_LAYERS - 1
    residual, pattern = _last_layer_inputs(model, ids)
    block, norm = model.model.layers[last], model.model.norm
    final_scale = _frozen_rms(norm, residual["final"])
    unembedding = model.lm_head.weight
    demeaned = unembedding[targets] - unembedding.mean(dim=0)
    logit_rows = outputs[f"{CLT_NAME}.adjacency_matrix"][-len(targets):]
    checked = {last: 0, last - 1: 0}
    for i, (layer, pos, feature) in enumerate(expected.tolist()):
        if pos != n_pos - 1 or layer not in checked:
            continue
        decoders = clt.W_dec[layer][feature]  # (L - layer, d): into MLP outputs layer..L-1
        written = decoders.sum(dim=0)
        if layer == last - 1:
            written = written + _attention_path(block, pattern, residual["last"], decoders[0])
        edge = ours[layer, pos, feature] * (written * final_scale) @ demeaned.T
        torch.testing.assert_close(logit_rows[:, i], edge.detach(), rtol=1e-4, atol=1e-6)
        checked[layer] += 1
    assert all(checked.values()), f"features at the last position checked per layer: {checked}"


def _frozen_rms(norm, residual: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's scale at one position, frozen (circuit-tracer detaches the mean of squares)."""
    return norm.weight * torch.rsqrt(residual.pow(2).mean() + norm.variance_epsilon)


def _last_layer_inputs(model, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """At the last position, the residual entering the last layer and the final norm's input, by
    hooks of our own; and the last layer's attention pattern (heads, query, key)."""
    seen = {}
    handles = [
        model.model.layers[-1].register_forward_pre_hook(lambda module, args: seen.update(last=args[0][0, -1])),
        model.model.norm.register_forward_pre_hook(lambda module, args: seen.update(final=args[0][0, -1])),
    ]
    model.set_attn_implementation("eager")  # the pattern itself, as circuit-tracer freezes it
    try:
        with torch.no_grad():
            attentions = model(ids[None], output_attentions=True).attentions
    finally:
        for handle in handles:
            handle.remove()
    return seen, attentions[-1][0]


def _attention_path(block, pattern: torch.Tensor, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What ``block``'s attention, its pattern and input norm frozen, writes at the last position for
    ``delta`` added to the residual there: the last query's weight on its own key times the value of
    the normed delta, per head (grouped key/value heads shared), through the output projection."""
    attention, config = block.self_attn, block.self_attn.config
    values = attention.v_proj(delta * _frozen_rms(block.input_layernorm, residual))
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    values = values.view(n_kv, -1).repeat_interleave(n_heads // n_kv, dim=0)  # (heads, head_dim)
    return attention.o_proj((pattern[:, -1, -1, None] * values).reshape(-1))


def test_what_circuit_tracer_cannot_run_of_a_clt_is_refused_in_one_line(tmp_path):
    """A TopK CLT, a range not from layer 0, a range short of the model's last layer, widths in and
    out that differ, a CLT given with another folder: refused before anything is written."""
    model_dir = build_tiny_model(tmp_path / "model", n_layers=CLT_LAYERS, hidden=D_MODEL)
    model = str(model_dir)
    good = write_clt(tmp_path / "good", build_clt("jumprelu", CLT_LAYERS), 0, model)
    cases = [
        ([write_clt(tmp_path / "topk", build_clt("topk", CLT_LAYERS), 0, model)],
         r"architecture 'topk_clt' is TopK; circuit-tracer 0.5.0's CrossLayerTranscoder runs ReLU and JumpReLU"),
        ([write_clt(tmp_path / "late", build_clt("jumprelu", 3), 1, model)],
         r"covers layers \[1, 2, 3\]; .* must cover every layer from 0"),
        ([write_clt(tmp_path / "short", build_clt("jumprelu", 3), 0, model)],
         r"covers layers 0..2 but its model has 4 layers"),
        ([write_clt(tmp_path / "wide", build_clt("jumprelu", CLT_LAYERS, d_out=16), 0, model)],
         r"d_in=32 but d_out=16 per layer"),
        ([good, good], r"is a cross-layer transcoder but 2 folders were given"),
    ]
    for folders, message in cases:
        with pytest.raises(ValueError, match=message) as refusal:
            circuit_tracer_files(folders)
        assert "\n" not in str(refusal.value)
    out = tmp_path / "refused"
    assert saeforge(["export", "circuit-tracer", cases[1][0][0], "--out", str(out)]) == 2
    assert not out.exists()
