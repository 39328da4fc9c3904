"""A set of per-layer transcoders as the files circuit-tracer (PyPI ``circuit-tracer`` 0.5.0) reads.

circuit-tracer builds attribution graphs over a replacement model whose MLPs are transcoders. It
reads a per-layer set from a folder holding ``config.yaml`` and ``layer_{i}.safetensors`` for
layers 0..n-1 (its ``load_transcoder_set`` / ``load_transcoders``;
``circuit_tracer/transcoder/single_layer_transcoder.py``, ``utils/hf_utils.py``). Each layer file
holds its ``SingleLayerTranscoder`` state, which differs from ours in layout only:

| circuit-tracer                            | ours (a loaded ``trainer.sae.SparseCoder``)      |
| ----------------------------------------- | ------------------------------------------------ |
| ``W_enc`` (d_sae, d_model)                | ``W_enc`` (d_in, d_sae), transposed              |
| ``W_dec`` (d_sae, d_model), ``b_enc``, ``b_dec`` | the same                                  |
| ``activation_function.threshold`` (d_sae) | a JumpReLU's (and a saved BatchTopK's) threshold |
| ``W_skip`` (d_model, d_model), ``x @ W_skip.T`` | ``W_skip`` (d_in, d_out), transposed       |

Its encoder never subtracts ``b_dec`` (``F.linear(x, W_enc, b_enc)``), as a transcoder's does not;
a file without a threshold runs a ReLU, one with it ``x * (x > threshold)``. It reads the MLP's
input (``mlp.hook_in``, on a Hugging Face Llama the output of ``post_attention_layernorm``) and
writes the MLP's output (``mlp.hook_out``), our ``mlp_in.L`` and ``mlp_out.L``.

What it cannot represent is refused in one line: TopK transcoders (its loader knows ReLU and
JumpReLU only; a BatchTopK one is saved with its threshold, a JumpReLU, and passes), ``d_in !=
d_out`` (one ``d_model`` for both sides), a set whose layers are not exactly 0..n-1 or whose widths
or skip connections differ (``TranscoderSet`` asserts one ``d_transcoder``; its skip handling
asks the first layer only), dictionaries that are not transcoders, hookpoints other than an MLP's
input and output, and per-token input normalisation (``normalize_activations`` ``layer_norm`` /
``constant_norm_rescale``), which its transcoders do not run.

Loading the folder in circuit-tracer: ``load_transcoders(yaml.safe_load(open(".../config.yaml")))``
opens the ``transcoders`` paths as written (``export_circuit_tracer`` writes absolute ones), and
``ReplacementModel.from_pretrained(model, "/absolute/path/to/folder", backend="nnsight")`` or
``circuit-tracer attribute --transcoder_set /absolute/path/to/folder`` find the folder through
circuit-tracer's transcoder cache lookup (``Path(cache_dir) / hf_ref``, which an absolute path
replaces), so no hub download is tried. A relative path is looked up in its cache directory instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save as save_safetensors
from torch import Tensor

from interp.loading import read_dictionary_folder
from trainer.dictionary import InputNormalizedCoder

__all__ = [
    "CONFIG_FILE", "FEATURE_INPUT_HOOK", "FEATURE_OUTPUT_HOOK", "circuit_tracer_files", "export_circuit_tracer",
    "layer_file", "transformers4_model_files",
]

CONFIG_FILE = "config.yaml"
"""circuit-tracer's description of a transcoder set (``model_kind``, hooks, layer files)."""
FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "mlp.hook_out"
_ACTIVATIONS = ("relu_l1", "jumprelu")
"""The registered architectures ``load_dictionary`` rebuilds that circuit-tracer runs: ReLU and JumpReLU."""

_LAYER = r"(\d+)"
_MLP_INPUT = (
    re.compile(rf"mlp_in\.{_LAYER}"),
    re.compile(rf"(?:.+\.)?{_LAYER}\.(?:mlp|feed_forward|ffn):input"),
    re.compile(rf"blocks\.{_LAYER}\.(?:ln2\.hook_normalized|mlp\.hook_in)"),
)
_MLP_OUTPUT = (
    re.compile(rf"mlp_out\.{_LAYER}"),
    re.compile(rf"(?:.+\.)?{_LAYER}\.(?:mlp|feed_forward|ffn)"),
    re.compile(rf"blocks\.{_LAYER}\.(?:hook_mlp_out|mlp\.hook_out)"),
)


def layer_file(layer: int) -> str:
    """The file circuit-tracer reads layer ``layer``'s transcoder from."""
    return f"layer_{layer}.safetensors"


@dataclass(frozen=True)
class _Layer:
    layer: int
    uri: str
    weights: dict[str, Tensor]
    model_name: str
    d_sae: int
    skip: bool


def circuit_tracer_files(
    folders: Sequence[str],
    *,
    model_name: str | None = None,
    location: str | None = None,
    scan: str | None = None,
    s3_options: dict | None = None,
) -> dict[str, bytes]:
    """circuit-tracer's files for the per-layer transcoders in ``folders`` (dictionary folder URIs,
    one per layer, in any order), keyed by file name: ``config.yaml`` and ``layer_{i}.safetensors``.

    Each folder's layer is read from its hookpoints (``mlp_in.L`` -> ``mlp_out.L``, or the module
    paths and TransformerLens names of an MLP's input and output). ``model_name`` (default: the
    folders' ``cfg.json`` ``model_name``, which must agree) is what circuit-tracer's command line
    loads when given no ``--model``; ``location`` is the folder the files will lie in, written into
    ``config.yaml``'s ``transcoders`` paths (default: bare file names, which circuit-tracer opens
    relative to its working directory); ``scan`` names the set in the graphs it writes.
    Raises ValueError, in one line, for what circuit-tracer cannot represent (the module docstring).
    """
    if not folders:
        raise ValueError("folders=[]: name one transcoder folder per layer")
    layers = sorted((_read_layer(uri, s3_options) for uri in folders), key=lambda layer: layer.layer)
    _check_set(layers)
    names = sorted({layer.model_name for layer in layers})
    if model_name is None and len(names) > 1:
        raise ValueError(f"the transcoders were trained on different models {names}: expected one (or pass model_name)")
    model_name = model_name or names[0]
    paths = [layer_file(layer.layer) if location is None else f"{location.rstrip('/')}/{layer_file(layer.layer)}"
             for layer in layers]
    config = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "scan": scan or f"saeforge:{model_name}",
        "transcoders": paths,
    }
    files = {CONFIG_FILE: yaml.safe_dump(config, sort_keys=False).encode()}
    files.update({layer_file(layer.layer): save_safetensors(layer.weights) for layer in layers})
    return files


def export_circuit_tracer(
    folders: Sequence[str],
    out: Path,
    *,
    model_name: str | None = None,
    scan: str | None = None,
    s3_options: dict | None = None,
) -> dict[str, bytes]:
    """Write ``circuit_tracer_files`` into the local folder ``out`` (created), with absolute paths in
    its ``config.yaml``; returns the files written. ``config.yaml`` is written last, so a folder
    that has it is complete (circuit-tracer's own cache takes it as that mark)."""
    out = Path(out).resolve()
    files = circuit_tracer_files(folders, model_name=model_name, location=str(out), scan=scan, s3_options=s3_options)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)
    for name, data in files.items():
        if name != CONFIG_FILE:
            (out / name).write_bytes(data)
    (out / CONFIG_FILE).write_bytes(files[CONFIG_FILE])
    return files


def _read_layer(uri: str, s3_options: dict | None) -> _Layer:
    folder = read_dictionary_folder(uri, s3_options=s3_options)
    cfg, sae = folder.cfg, folder.sae
    metadata = cfg.get("metadata") or {}
    hook_in, hook_out = folder.hook_name, metadata.get("hook_name_out")
    if not hook_out:
        raise ValueError(f"{uri}: not a transcoder (cfg.json metadata names no hook_name_out): circuit-tracer "
                         "replaces each MLP by a transcoder of its input to its output")
    if isinstance(sae, InputNormalizedCoder):
        raise ValueError(f"{uri}: normalize_activations={cfg['normalize_activations']!r} normalises each token "
                         "before encoding; circuit-tracer's transcoders run on raw activations")
    if sae.architecture not in _ACTIVATIONS:
        raise ValueError(f"{uri}: architecture {cfg['architecture']!r} is TopK; circuit-tracer 0.5.0 loads ReLU and "
                         "JumpReLU transcoders only (train BatchTopK, saved as a JumpReLU, or JumpReLU)")
    if sae.d_in != sae.d_out:
        raise ValueError(f"{uri}: d_in={sae.d_in} but d_out={sae.d_out}; circuit-tracer's transcoders read and "
                         "write one d_model")
    layer = _mlp_layer(uri, hook_in, _MLP_INPUT, "hook_name", "the MLP's input, e.g. mlp_in.3")
    layer_out = _mlp_layer(uri, hook_out, _MLP_OUTPUT, "hook_name_out", "the MLP's output, e.g. mlp_out.3")
    if layer_out != layer:
        raise ValueError(f"{uri}: reads layer {layer} ({hook_in!r}) but writes layer {layer_out} ({hook_out!r}); "
                         "circuit-tracer's per-layer transcoders replace one MLP each")
    if sae.apply_b_dec_to_input:  # a transcoder folder never does; circuit-tracer's encoder cannot
        raise ValueError(f"{uri}: apply_b_dec_to_input=true; circuit-tracer's encoder does not subtract b_dec")
    return _Layer(layer, uri, _layer_weights(sae), metadata.get("model_name") or "", sae.n_latents,
                  getattr(sae, "W_skip", None) is not None)


def _mlp_layer(uri: str, hook: str, patterns: tuple[re.Pattern, ...], key: str, expected: str) -> int:
    for pattern in patterns:
        match = pattern.fullmatch(hook)
        if match:
            return int(match.group(1))
    raise ValueError(f"{uri}: {key}={hook!r} is not an MLP's input or output with a layer number "
                     f"(expected {expected}): circuit-tracer hooks mlp.hook_in and mlp.hook_out")


@torch.no_grad()
def _layer_weights(sae: torch.nn.Module) -> dict[str, Tensor]:
    """``sae``'s parameters in circuit-tracer's names and layouts (the module docstring's table)."""
    weights = {
        "W_enc": sae.W_enc.T,
        "W_dec": sae.W_dec,
        "b_enc": sae.b_enc,
        "b_dec": sae.b_dec,
    }
    threshold = sae.inference_threshold()
    if threshold is not None:
        weights["activation_function.threshold"] = threshold
    if getattr(sae, "W_skip", None) is not None:
        weights["W_skip"] = sae.W_skip.T
    return {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}


def _check_set(layers: list[_Layer]) -> None:
    found = [layer.layer for layer in layers]
    if found != list(range(len(layers))):
        duplicates = sorted({n for n in found if found.count(n) > 1})
        if duplicates:
            raise ValueError(f"layer {duplicates[0]} is given twice ({[x.uri for x in layers if x.layer == duplicates[0]]}): "
                             "expected one transcoder per layer")
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise ValueError(f"no transcoder for layer {missing[0]} (layers given: {found}): circuit-tracer needs "
                         "one for every layer from 0")
    widths = sorted({layer.d_sae for layer in layers})
    if len(widths) > 1:
        raise ValueError(f"the transcoders have different widths d_sae={widths}: circuit-tracer's set needs one")
    skips = {layer.skip for layer in layers}
    if len(skips) > 1:
        with_skip = [layer.layer for layer in layers if layer.skip]
        raise ValueError(f"only layers {with_skip} have a skip connection: circuit-tracer needs all or none")


def transformers4_model_files(model_dir: Path) -> dict[str, bytes]:
    """``config.json`` and ``tokenizer_config.json`` of the Hugging Face folder ``model_dir`` as
    transformers 4.57 (circuit-tracer's pin) reads them, to write over a copy of the folder.

    transformers 5 keeps ``rope_theta`` only under ``rope_parameters``, where 4.57 does not look:
    it would silently rotate with its default (10000). And it names its tokenizer class
    ``TokenizersBackend``, which 4.57 does not know; ``PreTrainedTokenizerFast`` is the same
    ``tokenizer.json`` in 4.57's words. Files already in 4.57's form come back unchanged."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        config["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    files = {"config.json": json.dumps(config, indent=2).encode()}
    tokenizer_path = model_dir / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tokenizer = json.loads(tokenizer_path.read_text())
        if tokenizer.get("tokenizer_class") == "TokenizersBackend":
            tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
        files["tokenizer_config.json"] = json.dumps(tokenizer, indent=2).encode()
    return files
