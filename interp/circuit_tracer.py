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

A cross-layer transcoder (one saeforge CLT folder, ``architecture`` ``jumprelu_clt``) becomes
circuit-tracer's ``CrossLayerTranscoder`` files (its ``load_clt`` / ``_load_state_dict``,
``circuit_tracer/transcoder/cross_layer_transcoder.py``): ``config.yaml`` with ``model_kind:
cross_layer_transcoder`` and, for each layer i, ``W_enc_{i}.safetensors`` (``W_enc_{i}`` (n, d),
our ``W_enc[i]`` (d, n) transposed; ``b_enc_{i}``, ``b_dec_{i}``, ``threshold_{i}``) and
``W_dec_{i}.safetensors`` (``W_dec_{i}`` (n, L - i, d), ours as saved). It encodes
``x_i W_enc_i^T + b_enc_i`` masked by ``> threshold_i`` and decodes every layer's features into
the MLP outputs of that layer and later ones, as ours. Its loader counts the ``W_enc_*`` files and
the replacement model feeds file i the model's layer i: a CLT must cover layers 0..n-1 of its model,
all of them (checked against the model's ``config.json`` where the model is found here), read
``mlp_in.i`` and write ``mlp_out.i``. Refused in one line: TopK CLTs (``topk_clt``: its CLT runs
ReLU or JumpReLU), ``d_in != d_out``, a range not starting at layer 0 or short of the model's last
layer, a CLT given together with other folders.

Loading the folder in circuit-tracer: ``load_transcoders(yaml.safe_load(open(".../config.yaml")))``
opens the ``transcoders`` paths as written (``export_circuit_tracer`` writes absolute ones), and
``ReplacementModel.from_pretrained(model, "/absolute/path/to/folder", backend="nnsight")`` or
``circuit-tracer attribute --transcoder_set /absolute/path/to/folder`` find the folder through
circuit-tracer's transcoder cache lookup (``Path(cache_dir) / hf_ref``, which an absolute path
replaces), so no hub download is tried. A relative path is looked up in its cache directory instead.
An exported CLT loads the same two ways, or with ``load_clt("/absolute/path/to/folder")``; its
``config.yaml`` lists no files (``load_transcoders`` on it would download from the hub: it reads a
CLT through ``repo_id`` only).
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

from activation_cache.hooking import resolve_model_source
from interp.loading import DictionaryFolder, read_dictionary_folder
from trainer.dictionary import InputNormalizedCoder

__all__ = [
    "CLT_MODEL_KIND", "CONFIG_FILE", "FEATURE_INPUT_HOOK", "FEATURE_OUTPUT_HOOK", "TRANSCODER_SET_MODEL_KIND",
    "circuit_tracer_files", "clt_decoder_file", "clt_encoder_file", "export_circuit_tracer", "layer_file",
    "transformers4_model_files",
]

CONFIG_FILE = "config.yaml"
"""circuit-tracer's description of a transcoder set (``model_kind``, hooks, layer files)."""
FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "mlp.hook_out"
TRANSCODER_SET_MODEL_KIND = "transcoder_set"
"""``config.yaml`` ``model_kind`` of a per-layer set (``layer_{i}.safetensors``)."""
CLT_MODEL_KIND = "cross_layer_transcoder"
"""``config.yaml`` ``model_kind`` of a cross-layer transcoder (``W_enc_{i}`` / ``W_dec_{i}`` files)."""
_CLT_SUFFIX = "_clt"
"""cfg.json ``architecture`` of a saeforge CLT folder ends so (``jumprelu_clt``, ``topk_clt``)."""
_CLT_ACTIVATIONS = ("jumprelu_clt",)
"""The CLT architectures circuit-tracer's ``CrossLayerTranscoder`` runs (it knows ReLU and JumpReLU)."""
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


def clt_encoder_file(layer: int) -> str:
    """The file circuit-tracer's CLT reads layer ``layer``'s encoder, biases and threshold from."""
    return f"W_enc_{layer}.safetensors"


def clt_decoder_file(layer: int) -> str:
    """The file circuit-tracer's CLT reads layer ``layer``'s decoders (to layers ``layer``..L-1) from."""
    return f"W_dec_{layer}.safetensors"


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
    one per layer, in any order), keyed by file name: ``config.yaml`` and ``layer_{i}.safetensors``;
    for one cross-layer transcoder folder, ``config.yaml``, ``W_enc_{i}`` and ``W_dec_{i}.safetensors``
    (``location`` then unused: circuit-tracer finds a CLT's files beside its ``config.yaml``).

    Each folder's layer is read from its hookpoints (``mlp_in.L`` -> ``mlp_out.L``, or the module
    paths and TransformerLens names of an MLP's input and output). ``model_name`` (default: the
    folders' ``cfg.json`` ``model_name``, which must agree) is what circuit-tracer's command line
    loads when given no ``--model``; ``location`` is the folder the files will lie in, written into
    ``config.yaml``'s ``transcoders`` paths (default: bare file names, which circuit-tracer opens
    relative to its working directory); ``scan`` names the set in the graphs it writes.
    Raises ValueError, in one line, for what circuit-tracer cannot represent (the module docstring).
    """
    if not folders:
        raise ValueError("folders=[]: name one transcoder folder per layer, or one cross-layer transcoder folder")
    read = [read_dictionary_folder(uri, s3_options=s3_options) for uri in folders]
    clt = next((folder for folder in read if _is_clt(folder)), None)
    if clt is not None:
        if len(read) > 1:
            raise ValueError(f"{clt.uri} is a cross-layer transcoder but {len(read)} folders were given: export it "
                             "alone (circuit-tracer replaces the MLPs by one CLT or by one per-layer set)")
        return _clt_files(clt, model_name=model_name, scan=scan)
    layers = sorted((_read_layer(folder) for folder in read), key=lambda layer: layer.layer)
    _check_set(layers)
    names = sorted({layer.model_name for layer in layers})
    if model_name is None and len(names) > 1:
        raise ValueError(f"the transcoders were trained on different models {names}: expected one (or pass model_name)")
    model_name = model_name or names[0]
    paths = [layer_file(layer.layer) if location is None else f"{location.rstrip('/')}/{layer_file(layer.layer)}"
             for layer in layers]
    config = {**_config(TRANSCODER_SET_MODEL_KIND, model_name, scan), "transcoders": paths}
    files = {CONFIG_FILE: yaml.safe_dump(config, sort_keys=False).encode()}
    files.update({layer_file(layer.layer): save_safetensors(layer.weights) for layer in layers})
    return files


def _config(model_kind: str, model_name: str, scan: str | None) -> dict[str, str]:
    return {
        "model_kind": model_kind,
        "model_name": model_name,
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "scan": scan or f"saeforge:{model_name}",
    }


def export_circuit_tracer(
    folders: Sequence[str],
    out: Path,
    *,
    model_name: str | None = None,
    scan: str | None = None,
    s3_options: dict | None = None,
) -> dict[str, bytes]:
    """Write ``circuit_tracer_files`` into the local folder ``out`` (created), with absolute paths in
    its ``config.yaml`` (a per-layer set's); returns the files written. ``config.yaml`` is written
    last, so a folder that has it is complete (circuit-tracer's own cache takes it as that mark).
    Files of an earlier export into ``out`` that this one does not write are removed first
    (circuit-tracer's CLT loader counts the ``W_enc_*`` files it finds)."""
    out = Path(out).resolve()
    files = circuit_tracer_files(folders, model_name=model_name, location=str(out), scan=scan, s3_options=s3_options)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)
    for stale in (*out.glob("layer_*.safetensors"), *out.glob("W_enc_*.safetensors"), *out.glob("W_dec_*.safetensors")):
        if stale.name not in files:
            stale.unlink()
    for name, data in files.items():
        if name != CONFIG_FILE:
            (out / name).write_bytes(data)
    (out / CONFIG_FILE).write_bytes(files[CONFIG_FILE])
    return files


def _read_layer(folder: DictionaryFolder) -> _Layer:
    uri, cfg, sae = folder.uri, folder.cfg, folder.sae
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


def _is_clt(folder: DictionaryFolder) -> bool:
    return str(folder.cfg.get("architecture", "")).endswith(_CLT_SUFFIX)


def _clt_files(folder: DictionaryFolder, *, model_name: str | None, scan: str | None) -> dict[str, bytes]:
    """circuit-tracer's CLT files for a saeforge CLT folder (the module docstring), after its checks."""
    uri, cfg, sae = folder.uri, folder.cfg, folder.sae
    if cfg["architecture"] not in _CLT_ACTIVATIONS:
        raise ValueError(f"{uri}: architecture {cfg['architecture']!r} is TopK; circuit-tracer 0.5.0's "
                         f"CrossLayerTranscoder runs ReLU and JumpReLU only (train sae.architecture=jumprelu)")
    if sae.d_layer_in != sae.d_layer_out:
        raise ValueError(f"{uri}: d_in={sae.d_layer_in} but d_out={sae.d_layer_out} per layer; circuit-tracer's "
                         "CLT reads and writes one d_model")
    layers = _clt_layers(folder)
    n_model_layers = _model_layer_count(folder)
    if n_model_layers is not None and len(layers) != n_model_layers:
        raise ValueError(f"{uri}: covers layers 0..{len(layers) - 1} but its model has {n_model_layers} layers; "
                         "circuit-tracer's CLT replaces every MLP of the model (train model.clt_layers="
                         f"[0, {n_model_layers - 1}])")
    metadata = cfg.get("metadata") or {}
    model_name = model_name or metadata.get("model_name") or cfg.get("model_name") or ""
    files = {}
    for layer, weights in enumerate(_clt_weights(sae)):
        encoder, decoder = weights
        files[clt_encoder_file(layer)] = save_safetensors(encoder)
        files[clt_decoder_file(layer)] = save_safetensors(decoder)
    files[CONFIG_FILE] = yaml.safe_dump(_config(CLT_MODEL_KIND, model_name, scan), sort_keys=False).encode()
    return files


def _clt_layers(folder: DictionaryFolder) -> list[int]:
    """The model layers of the CLT's inputs and targets, checked: MLP input i -> MLP output i, i = 0..L-1."""
    uri, metadata, n_layers = folder.uri, folder.cfg.get("metadata") or {}, folder.sae.n_layers
    hooks_in, hooks_out = metadata.get("hook_names"), metadata.get("hook_names_out")
    if not isinstance(hooks_in, list) or not isinstance(hooks_out, list) or not len(hooks_in) == len(hooks_out) == n_layers:
        raise ValueError(f"{uri}: cfg.json metadata hook_names={hooks_in!r}, hook_names_out={hooks_out!r}: expected "
                         f"{n_layers} input and {n_layers} target hookpoints, one per covered layer")
    layers = [_mlp_layer(uri, hook, _MLP_INPUT, "hook_names", "the MLP's input, e.g. mlp_in.3") for hook in hooks_in]
    layers_out = [_mlp_layer(uri, hook, _MLP_OUTPUT, "hook_names_out", "the MLP's output, e.g. mlp_out.3")
                  for hook in hooks_out]
    if layers_out != layers:
        raise ValueError(f"{uri}: reads layers {layers} but writes layers {layers_out}; circuit-tracer's CLT writes "
                         "each layer's features from the MLP output of their own layer on")
    if layers != list(range(n_layers)):
        raise ValueError(f"{uri}: covers layers {layers}; circuit-tracer's CLT reads its layer i from the model's "
                         "layer i, so it must cover every layer from 0 (train model.clt_layers=[0, last])")
    return layers


def _model_layer_count(folder: DictionaryFolder) -> int | None:
    """The number of decoder layers of the CLT's model (``config.json``), where the model is found
    here (``DictionaryFolder.model_config``'s order); None where it is not: the export then cannot
    check that the CLT covers the last layer, and circuit-tracer's forward fails on a short one."""
    try:
        source = resolve_model_source(folder.model_config())
    except (ValueError, FileNotFoundError):
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    return int(config.num_hidden_layers)


def _clt_weights(sae: torch.nn.Module) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Per layer i, the tensors of ``W_enc_{i}.safetensors`` and of ``W_dec_{i}.safetensors``, from
    the weights that act on raw activations (``folded_weights``: a loaded CLT's as saved)."""
    weights = sae.folded_weights()
    layers = []
    for i in range(sae.n_layers):
        encoder = {f"W_enc_{i}": weights["W_enc"][i].T, f"b_enc_{i}": weights["b_enc"][i],
                   f"b_dec_{i}": weights["b_dec"][i]}
        if "threshold" in weights:
            encoder[f"threshold_{i}"] = weights["threshold"][i]
        decoder = {f"W_dec_{i}": weights[f"W_dec_{i}"]}
        layers.append(tuple({name: t.detach().cpu().contiguous() for name, t in part.items()}
                            for part in (encoder, decoder)))
    return layers


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
