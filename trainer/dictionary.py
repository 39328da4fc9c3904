"""The trained dictionary as files in the layout SAELens 6 loads (``SAE.load_from_disk``).

Bytes in, bytes out: the caller owns object storage and writes ``<run>/dictionary/<hookpoint>/``.
The layout follows SAELens 6's config ``to_dict`` / ``SAE.save_model`` (``sae_lens/saes/sae.py``,
``topk_sae.py``, ``standard_sae.py``, ``jumprelu_sae.py``, ``transcoder.py``) and the sparsity
file of its training runner (``sae_lens/llm_sae_training_runner.py``:
``{"sparsity": log10(frequency + 1e-10)}``).

Each training architecture saves as the SAELens inference architecture that computes the same
function on raw activations:

| training (``sae.architecture``)             | SAELens ``architecture`` | weights                     |
| ------------------------------------------- | ------------------------ | --------------------------- |
| ``topk``                                    | ``topk``                 | W_enc, b_enc, W_dec, b_dec  |
| ``relu_l1``, ``relu_l1_unitnorm``           | ``standard``             | the same                    |
| ``jumprelu``                                | ``jumprelu``             | + ``exp(log_threshold)``    |
| ``batchtopk``, ``matryoshka_batchtopk``     | ``jumprelu``             | + the learned threshold     |

Any other architecture (``trainer.registry``) saves as the SAELens architecture its class names
(``saelens_architecture``). The Anthropic ReLU variant differs from the plain one only in
training (its L1 is weighted by decoder norms): at inference both are a plain ReLU, which is what
``standard`` runs.

A transcoder (``hookpoint_out`` given) saves with ``d_out``, ``apply_b_dec_to_input=false`` and
``metadata.hook_name_out``; a skip transcoder adds ``W_skip`` in SAELens's layout (d_out, d_in),
the transpose of ``SparseCoder.W_skip``:

| inference of the training architecture      | transcoder               | skip transcoder              |
| ------------------------------------------- | ------------------------ | ---------------------------- |
| ReLU (``relu_l1``, ``relu_l1_unitnorm``)    | ``transcoder``           | ``skip_transcoder``          |
| JumpReLU (``jumprelu``, ``batchtopk``)      | ``jumprelu_transcoder``  | ``jumprelu_skip_transcoder`` |
| TopK (``topk``), ``d_out == d_in``          | ``topk``                 | ``topk_skip_transcoder`` *   |
| TopK (``topk``), ``d_out != d_in``          | ``topk_transcoder`` *    | ``topk_skip_transcoder`` *   |

SAELens 6 has no TopK transcoder class: its ``topk`` SAE computes a TopK transcoder without a skip
whose widths agree (it subtracts ``b_dec`` only where ``apply_b_dec_to_input``, and adds it after
decoding), so that one saves as ``topk``. The names marked * are saeforge's own: SAELens refuses
them (no such architecture) and ``load_dictionary`` reads them. ``load_dictionary`` rebuilds
each saved architecture as the registered architecture that runs it (``INFERENCE_ARCHITECTURES``).

A cross-layer transcoder (``trainer.clt.CrossLayerTranscoder``, ``dictionary_files(...,
hookpoints=, hookpoints_out=)``) saves as saeforge's own ``jumprelu_clt`` or ``topk_clt``: SAELens
6 has no CLT class and refuses the folder by name; ``load_dictionary`` reads it. ``cfg.json`` gives
the widths PER LAYER (``d_in``, ``d_out``, ``d_sae``), ``n_layers``, ``k`` and ``clt_topk`` for
TopK, ``apply_b_dec_to_input=false``, ``metadata.hook_name`` / ``hook_name_out`` the first layer's
input and target and ``metadata.hook_names`` / ``hook_names_out`` every covered layer's, in order.
The weights are circuit-tracer's CLT layout with our encoder transposed: ``W_enc`` (L, d_in, d_sae),
``b_enc`` (L, d_sae), ``b_dec`` (L, d_out), ``threshold`` (L, d_sae) for JumpReLU and ``W_dec_{l}``
(d_sae, L - l, d_out) for each layer l, every layer's scales folded in (``CrossLayerTranscoder.folded_weights``).

``load_dictionary`` also reads the folders SAELens itself writes (``SAE.save_model``), with the
encodings SAELens computes after ``SAE.load_from_disk`` (``tests/interp/test_saelens_folders.py``):

* ``topk`` with ``rescale_acts_by_decoder_norm=true``: SAELens multiplies the pre-activations by the
  decoder row norms ``n`` before the top-k and divides the activations by them before decoding.
  The norms are folded into the weights on loading (``W_enc * n``, ``b_enc * n``, ``W_dec / n``),
  which computes the same activations and reconstruction with the plain TopK.
* ``normalize_activations`` as SAELens runs it at inference (``SAE._setup_activation_normalization``):
  ``constant_norm_rescale`` and ``layer_norm`` normalise each token before encoding and undo it on
  the reconstruction, with that token's own statistics: the SAE comes wrapped in
  ``InputNormalizedCoder``. ``expected_average_only_in`` and ``covariance_whitening`` hold their
  statistic outside the folder (SAELens's trainer folds it into the weights before its final save
  and writes ``none``); SAELens runs a folder that still names them on raw activations, without
  scaling or whitening, and so does ``load_dictionary`` (it logs a warning).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from trainer.clt import CrossLayerTranscoder, clt_saved_architecture
from trainer.config import CLT_TOPK_MODES
from trainer.layout import CONFIG_FILE, EVAL_FILE, SPARSITY_FILE, WEIGHTS_FILE, eval_json
from trainer.losses import reconstruction_error
from trainer.registry import architecture_class
from trainer.sae import Code, ForwardOutput, SparseCoder

__all__ = [
    "InputNormalizedCoder", "clt_config", "dictionary_files", "dictionary_hook_name", "load_dictionary",
    "sae_config", "saelens_architecture",
]

log = logging.getLogger(__name__)

# SAELens runs its pre-6.0 config migration on any cfg.json whose metadata.sae_lens_version is
# missing or older than 6.0.0 (``handle_config_defaulting``); this file is written in the 6.x format.
SAELENS_FORMAT_VERSION = "6.0.0"
# SAELens stores log10 of firing frequencies with this epsilon (``_log_feature_sparsity``).
_LOG_SPARSITY_EPS = 1e-10

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_RESERVED_METADATA = {
    "model_name", "hook_name", "hook_name_out", "sae_lens_version", "sae_lens_training_version",
    "training_architecture", "hook_names", "hook_names_out",
}
# SAELens inference architecture of the SAE -> (transcoder, skip transcoder) names; a TopK
# transcoder whose widths agree is SAELens's own topk (``saelens_architecture``).
_TRANSCODER_ARCHITECTURES = {
    "standard": ("transcoder", "skip_transcoder"),
    "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "topk": ("topk_transcoder", "topk_skip_transcoder"),
}
INFERENCE_ARCHITECTURES = {
    "topk": "topk", "topk_transcoder": "topk", "topk_skip_transcoder": "topk",
    "standard": "relu_l1", "transcoder": "relu_l1", "skip_transcoder": "relu_l1",
    "jumprelu": "jumprelu", "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu",
}
"""Architecture of a saved dictionary (SAELens 6's, or saeforge's ``topk_transcoder`` and
``topk_skip_transcoder``) -> the registered architecture that computes it on raw activations
(with a free decoder, so the folded rows are used as saved; ``W_skip`` for the skip transcoders)."""
CLT_ARCHITECTURES = ("jumprelu_clt", "topk_clt")
"""Saved architectures of cross-layer transcoders (``trainer.clt``); ``load_dictionary`` reads them."""
SAEFORGE_ONLY_ARCHITECTURES = ("topk_transcoder", "topk_skip_transcoder", *CLT_ARCHITECTURES)
"""Saved architectures SAELens has no class for (it refuses the folder); ``load_dictionary`` reads them."""
_TOPK_ARCHITECTURES = ("topk", "topk_transcoder", "topk_skip_transcoder")
_JUMPRELU_ARCHITECTURES = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")
_SKIP_ARCHITECTURES = ("skip_transcoder", "jumprelu_skip_transcoder", "topk_skip_transcoder")
NORMALIZE_ACTIVATIONS = (
    "none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening",
)
"""The ``normalize_activations`` values SAELens 6 accepts (``SAEConfig.__post_init__``); all load."""
# Modes whose statistic SAELens keeps outside the folder: at inference it runs them as 'none'.
_IDENTITY_AT_INFERENCE = ("expected_average_only_in", "covariance_whitening")


def dictionary_files(
    sae: SparseCoder,
    *,
    hookpoint: str,
    model_name: str,
    scale: float,
    extra_metadata: dict[str, Any],
    sparsity: Tensor | None,
    eval_metrics: dict[str, Any],
    hookpoint_out: str | None = None,
    target_scale: float | None = None,
    hookpoints: Sequence[str] | None = None,
    hookpoints_out: Sequence[str] | None = None,
) -> dict[str, bytes]:
    """The dictionary's files, keyed by file name, with the input ``scale`` folded into the weights.

    ``sae`` (any ``trainer.sae.SparseCoder``) was trained on ``x * scale``; the saved weights
    act on raw ``x`` (``SparseCoder.folded_weights``). A transcoder names its output hookpoint in
    ``hookpoint_out`` and, if its target was scaled differently, gives ``target_scale``.
    ``sparsity`` is each latent's firing frequency (n_latents,), stored as SAELens does (log10);
    ``None`` omits ``sparsity.safetensors``. ``extra_metadata`` (JSON values: e.g.
    ``context_size``, ``prepend_bos``, ``dataset_path``, ``neuronpedia_id``) goes into
    ``cfg.json``'s ``metadata``.

    A cross-layer transcoder (``trainer.clt.CrossLayerTranscoder``) names every covered layer's
    input and target in ``hookpoints`` and ``hookpoints_out`` (in layer order; ``hookpoint`` and
    ``hookpoint_out`` are the first of each) and saves as ``jumprelu_clt`` / ``topk_clt`` (the
    module docstring); its per-layer scales are folded in by the CLT itself, on top of ``scale``
    and ``target_scale`` (1 from the trainer).
    """
    clash = _RESERVED_METADATA & extra_metadata.keys()
    if clash:
        raise ValueError(f"extra_metadata may not set {sorted(clash)}: they are written from the arguments")
    if isinstance(sae, CrossLayerTranscoder):
        layer_hooks = _clt_hookpoints(sae, hookpoint, hookpoint_out, hookpoints, hookpoints_out)
    elif hookpoints is not None or hookpoints_out is not None:
        raise ValueError("hookpoints and hookpoints_out name a cross-layer transcoder's layers, but the "
                         f"dictionary is a {type(sae).__name__}")
    transcoder = hookpoint_out is not None
    if sae.W_skip is not None and not transcoder:
        raise ValueError("the SAE has a skip connection (W_skip): a skip transcoder needs hookpoint_out, its target")
    if transcoder and sae.apply_b_dec_to_input:
        raise ValueError(
            f"hookpoint_out={hookpoint_out!r} makes this a transcoder, but the SAE subtracts b_dec "
            "from its input (apply_b_dec_to_input=True); build it with transcoder=True"
        )
    folded = sae.folded_weights(scale, target_scale=target_scale)
    if "W_skip" in folded:
        folded["W_skip"] = folded["W_skip"].T  # SAELens's layout: (d_out, d_in)
    weights = {name: tensor.cpu().contiguous() for name, tensor in folded.items()}
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "hook_name": hookpoint,
        "hook_head_index": None,
        "training_architecture": sae.architecture,
        "saeforge_input_scale_folded": scale,
        **({"hook_name_out": hookpoint_out, "saeforge_target_scale_folded": target_scale or scale}
           if transcoder else {}),
        **extra_metadata,
    }
    if isinstance(sae, CrossLayerTranscoder):
        cfg = clt_config(sae, metadata, hookpoints=layer_hooks[0], hookpoints_out=layer_hooks[1])
    else:
        cfg = sae_config(sae, metadata, transcoder=transcoder)
    files = {
        WEIGHTS_FILE: save_safetensors(weights),
        CONFIG_FILE: json.dumps(cfg, indent=2, sort_keys=True, allow_nan=False).encode(),
        EVAL_FILE: eval_json(eval_metrics),
    }
    if sparsity is not None:
        if sparsity.shape != (sae.n_latents,):
            raise ValueError(
                f"sparsity shape {tuple(sparsity.shape)} must be (n_latents={sae.n_latents},)"
            )
        log_sparsity = torch.log10(sparsity.detach().float().cpu() + _LOG_SPARSITY_EPS)
        files[SPARSITY_FILE] = save_safetensors({"sparsity": log_sparsity.contiguous()})
    return files


def saelens_architecture(sae: SparseCoder, *, transcoder: bool = False) -> str:
    """The architecture ``sae`` saves as (see the module docstring's tables): SAELens 6's, or one
    of ``SAEFORGE_ONLY_ARCHITECTURES`` for a TopK transcoder SAELens cannot run."""
    base = sae.saelens_architecture
    if not transcoder:
        return base
    plain, skip = _TRANSCODER_ARCHITECTURES[base]
    if sae.W_skip is not None:
        return skip
    return "topk" if base == "topk" and sae.d_out == sae.d_in else plain


def sae_config(sae: SparseCoder, metadata: dict[str, Any], *, transcoder: bool = False) -> dict[str, Any]:
    """``cfg.json`` content: the fields of the matching SAELens 6 config's ``to_dict()``
    (``TopKSAEConfig``, ``StandardSAEConfig``, ``JumpReLUSAEConfig``, ``TranscoderConfig``,
    ``JumpReLUTranscoderConfig``)."""
    architecture = saelens_architecture(sae, transcoder=transcoder)
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": _DTYPE_NAMES[sae.W_enc.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if architecture in _TOPK_ARCHITECTURES:
        cfg["k"] = sae.k
        # Our TopK selects on raw pre-activations; SAELens must not rescale them by decoder norms
        # (the folded decoder rows have norm 1 / scale).
        cfg["rescale_acts_by_decoder_norm"] = False
    if transcoder or sae.d_out != sae.d_in:
        cfg["d_out"] = sae.d_out
    return cfg


def clt_config(
    clt: CrossLayerTranscoder, metadata: dict[str, Any], *, hookpoints: Sequence[str], hookpoints_out: Sequence[str]
) -> dict[str, Any]:
    """``cfg.json`` content of a cross-layer transcoder: ``architecture`` ``jumprelu_clt`` or
    ``topk_clt`` (with ``k`` per layer and ``clt_topk``), the widths PER LAYER (``d_in``, ``d_out``,
    ``d_sae``) and ``n_layers``; ``metadata.hook_names`` / ``hook_names_out`` every covered layer's
    input and target in order, and the per-layer scales folded into the weights."""
    cfg: dict[str, Any] = {
        "architecture": clt_saved_architecture(clt.activation),
        "n_layers": clt.n_layers,
        "d_in": clt.d_layer_in,
        "d_out": clt.d_layer_out,
        "d_sae": clt.n_per_layer,
        "dtype": _DTYPE_NAMES[clt.W_enc.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            **metadata,
            "hook_names": list(hookpoints),
            "hook_names_out": list(hookpoints_out),
            "saeforge_input_scales_folded": [float(value) for value in clt.input_scales.tolist()],
            "saeforge_target_scales_folded": [float(value) for value in clt.target_scales.tolist()],
        },
    }
    if clt.activation == "topk":
        cfg["k"] = clt.k
        cfg["clt_topk"] = clt.clt_topk
    return cfg


def _clt_hookpoints(
    clt: CrossLayerTranscoder, hookpoint: str, hookpoint_out: str | None, hookpoints: Sequence[str] | None,
    hookpoints_out: Sequence[str] | None,
) -> tuple[list[str], list[str]]:
    """The CLT's (inputs, targets), one per covered layer, checked against its layers and the
    first pair ``hookpoint`` / ``hookpoint_out``."""
    inputs, targets = list(hookpoints or []), list(hookpoints_out or [])
    if len(inputs) != clt.n_layers or len(targets) != clt.n_layers:
        raise ValueError(
            f"hookpoints={inputs} and hookpoints_out={targets} must each name the CLT's n_layers={clt.n_layers} layers"
        )
    if (hookpoint, hookpoint_out) != (inputs[0], targets[0]):
        raise ValueError(
            f"hookpoint={hookpoint!r} and hookpoint_out={hookpoint_out!r} must be the first layer's, "
            f"{inputs[0]!r} and {targets[0]!r}"
        )
    return inputs, targets


def load_dictionary(
    files: dict[str, bytes],
) -> tuple[SparseCoder | InputNormalizedCoder | CrossLayerTranscoder, dict[str, Any]]:
    """Rebuild the SAE (acting on raw activations) and its config from a dictionary folder's files:
    ``dictionary_files`` output, or a folder SAELens wrote (``SAE.save_model``).

    ``topk`` / ``topk_transcoder`` / ``topk_skip_transcoder`` give a ``TopKSAE``, ``standard`` /
    ``transcoder`` / ``skip_transcoder`` a ``ReLUSAE``, ``jumprelu`` / ``jumprelu_transcoder`` /
    ``jumprelu_skip_transcoder`` a ``JumpReLUSAE`` (``log_threshold = log(threshold)``), all with
    a free decoder so the folded rows are used as saved (``INFERENCE_ARCHITECTURES``); the skip
    transcoders with ``W_skip`` (saved (d_out, d_in), transposed back). A TopK saved with
    ``rescale_acts_by_decoder_norm=true`` has its decoder norms folded into the weights; a per-token
    ``normalize_activations`` (``constant_norm_rescale``, ``layer_norm``) wraps the SAE in
    ``InputNormalizedCoder``; the other modes run as SAELens runs them (the module docstring).
    ``jumprelu_clt`` / ``topk_clt`` give a ``trainer.clt.CrossLayerTranscoder`` (free decoders,
    scales 1). Raises ValueError naming the first mismatch between ``cfg.json`` and the weights.
    """
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise ValueError(f"dictionary has no {name} (files: {sorted(files)})")
    cfg = json.loads(files[CONFIG_FILE])
    if cfg.get("architecture") in CLT_ARCHITECTURES:
        return _load_clt(cfg, files[WEIGHTS_FILE]), cfg
    _check_config(cfg)
    weights = _read_weights(files[WEIGHTS_FILE])
    architecture = cfg["architecture"]
    _check_weights(
        weights, d_in=cfg["d_in"], d_sae=cfg["d_sae"], d_out=cfg.get("d_out", cfg["d_in"]),
        with_threshold=architecture in _JUMPRELU_ARCHITECTURES, with_skip=architecture in _SKIP_ARCHITECTURES,
    )
    dtype = _DTYPES_BY_NAME[cfg["dtype"].removeprefix("torch.")]
    if architecture in _TOPK_ARCHITECTURES and cfg.get("rescale_acts_by_decoder_norm", False):
        weights = _fold_decoder_norms(weights)
    state = {name: tensor.to(dtype) for name, tensor in weights.items()}
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"].T.contiguous()
    sae = architecture_class(INFERENCE_ARCHITECTURES[architecture]).for_inference(cfg, dtype)
    if "threshold" in state:
        # A zero threshold (an untrained BatchTopK estimate) becomes log 0 = -inf, whose exp is 0.
        # A negative one acts as 0 after SAELens's ReLU; clamping keeps the log defined.
        state["log_threshold"] = state.pop("threshold").clamp_min(0).log()
    sae.load_state_dict(state)
    mode = cfg.get("normalize_activations", "none")
    if mode in _IDENTITY_AT_INFERENCE:
        log.warning(
            "%s normalize_activations=%r: its statistic is not in the folder; SAELens runs such a folder "
            "on raw activations after load_from_disk, and so does saeforge", CONFIG_FILE, mode,
        )
    if mode in _PER_TOKEN_NORMALIZATION:
        return InputNormalizedCoder(sae, mode), cfg
    return sae, cfg


def _read_weights(data: bytes) -> dict[str, Tensor]:
    try:
        return load_safetensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError; it never unpickles
        raise ValueError(f"{WEIGHTS_FILE}: not a safetensors file ({err})") from None


def _load_clt(cfg: dict[str, Any], data: bytes) -> CrossLayerTranscoder:
    """A saved cross-layer transcoder (``jumprelu_clt`` / ``topk_clt``), acting on raw activations:
    free decoders, scales 1, ``log_threshold = log(threshold)``."""
    _check_clt_config(cfg)
    weights = _read_weights(data)
    n_layers, d_in, d_out, n = cfg["n_layers"], cfg["d_in"], cfg["d_out"], cfg["d_sae"]
    expected = {"W_enc": (n_layers, d_in, n), "b_enc": (n_layers, n), "b_dec": (n_layers, d_out)}
    expected |= {f"W_dec_{layer}": (n, n_layers - layer, d_out) for layer in range(n_layers)}
    if cfg["architecture"] == clt_saved_architecture("jumprelu"):
        expected["threshold"] = (n_layers, n)
    _check_shapes(weights, expected, f"n_layers={n_layers}, d_in={d_in}, d_out={d_out}, d_sae={n}")
    dtype = _DTYPES_BY_NAME[cfg["dtype"].removeprefix("torch.")]
    clt = CrossLayerTranscoder.for_inference(cfg, dtype)
    state = {name: tensor.to(dtype) for name, tensor in weights.items()}
    for layer in range(n_layers):
        state[f"W_dec.{layer}"] = state.pop(f"W_dec_{layer}")
    if "threshold" in state:
        state["log_threshold"] = state.pop("threshold").clamp_min(0).log()  # as load_dictionary's JumpReLU
    clt.load_state_dict({**state, "input_scales": clt.input_scales, "target_scales": clt.target_scales})
    return clt


def _check_clt_config(cfg: dict[str, Any]) -> None:
    architecture = cfg["architecture"]
    for key in ("n_layers", "d_in", "d_out", "d_sae", *(("k",) if architecture == "topk_clt" else ())):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ValueError(f"{CONFIG_FILE} {key}={cfg.get(key)!r} must be a positive integer")
    if architecture == "topk_clt":
        if cfg["k"] > cfg["d_sae"]:
            raise ValueError(f"{CONFIG_FILE} k={cfg['k']} exceeds d_sae={cfg['d_sae']}")
        if cfg.get("clt_topk", "layer") not in CLT_TOPK_MODES:
            raise ValueError(f"{CONFIG_FILE} clt_topk={cfg.get('clt_topk')!r}: expected one of {list(CLT_TOPK_MODES)}")
    if cfg.get("dtype", "").removeprefix("torch.") not in _DTYPES_BY_NAME:
        raise ValueError(f"{CONFIG_FILE} dtype={cfg.get('dtype')!r}: expected one of {sorted(_DTYPES_BY_NAME)}")
    if cfg.get("apply_b_dec_to_input", False) or cfg.get("normalize_activations", "none") != "none":
        raise ValueError(
            f"{CONFIG_FILE} architecture={architecture!r} with apply_b_dec_to_input="
            f"{cfg.get('apply_b_dec_to_input')!r} and normalize_activations={cfg.get('normalize_activations')!r}: "
            "a cross-layer transcoder expects false and 'none'"
        )


def dictionary_hook_name(cfg: dict[str, Any]) -> str:
    """Where the dictionary reads, as its ``cfg.json`` names it: ``metadata.hook_name`` (SAELens 6,
    and ours), else a top-level ``hook_name`` or ``hook_point`` (files written before SAELens 6)."""
    metadata = cfg.get("metadata") or {}
    for name in (metadata.get("hook_name"), cfg.get("hook_name"), cfg.get("hook_point")):
        if isinstance(name, str) and name:
            return name
    raise ValueError(
        f"{CONFIG_FILE} names no hook: expected metadata.hook_name (SAELens 6) or a top-level hook_name "
        "or hook_point (older files)"
    )


def _fold_decoder_norms(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens's ``rescale_acts_by_decoder_norm`` TopK, ``topk(z * n)`` decoded as ``(a / n) W_dec``
    with ``n`` the decoder row norms, as a plain TopK: ``W_enc * n``, ``b_enc * n``, ``W_dec / n``.
    Norms are clamped as SAELens's own fold clamps them (``get_W_dec_norm``)."""
    dtype = weights["W_dec"].dtype
    wide = torch.promote_types(dtype, torch.float32)  # bf16 norms would round the fold twice
    norms = weights["W_dec"].to(wide).norm(dim=-1).clamp_min(1e-8)
    return {
        **weights,
        "W_enc": (weights["W_enc"].to(wide) * norms).to(dtype),
        "b_enc": (weights["b_enc"].to(wide) * norms).to(dtype),
        "W_dec": (weights["W_dec"].to(wide) / norms[:, None]).to(dtype),
    }


# --------------------------------------------------------------------------- run-time normalisation

_Stats = tuple[Tensor, ...]
_LAYER_NORM_EPS = 1e-5  # SAELens's run_time_activation_ln_in default


def _constant_norm_in(x: Tensor) -> tuple[Tensor, _Stats]:
    coefficient = (x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True)
    return x * coefficient, (coefficient,)


def _constant_norm_out(y: Tensor, stats: _Stats) -> Tensor:
    (coefficient,) = stats
    return y / coefficient


def _layer_norm_in(x: Tensor) -> tuple[Tensor, _Stats]:
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    std = centred.std(dim=-1, keepdim=True)
    return centred / (std + _LAYER_NORM_EPS), (mean, std)


def _layer_norm_out(y: Tensor, stats: _Stats) -> Tensor:
    mean, std = stats
    return y * std + mean  # without the eps, exactly as SAELens undoes it


_NORMALIZERS: dict[str, tuple[Callable[[Tensor], tuple[Tensor, _Stats]], Callable[[Tensor, _Stats], Tensor]]] = {
    "constant_norm_rescale": (_constant_norm_in, _constant_norm_out),
    "layer_norm": (_layer_norm_in, _layer_norm_out),
}
_PER_TOKEN_NORMALIZATION = tuple(_NORMALIZERS)


class InputNormalizedCoder(nn.Module):
    """A saved SAE that SAELens runs on per-token normalised inputs (``normalize_activations``
    ``constant_norm_rescale``: ``x * sqrt(d_in) / |x|``; ``layer_norm``: ``(x - mean) / (std + 1e-5)``),
    with the ``SparseCoder`` calls that use a dictionary: ``encode``, ``decode``, ``reconstruct``,
    ``skip_output``, ``forward``, and ``d_in``, ``d_out``, ``n_latents``, ``W_enc``, ``b_enc``,
    ``W_dec``, ``b_dec``, ``W_skip`` (``None``).

    It takes raw activations and gives reconstructions in raw space: each token is normalised
    before ``coder`` encodes it and the reconstruction is mapped back with that token's statistics,
    the operations of SAELens's ``run_time_activation_norm_fn_in`` / ``_out``. Only loaded
    dictionaries are wrapped; training never is, so its TopK path is untouched.
    """

    def __init__(self, coder: SparseCoder, normalize_activations: Literal["constant_norm_rescale", "layer_norm"]):
        super().__init__()
        if normalize_activations not in _NORMALIZERS:
            raise ValueError(
                f"normalize_activations={normalize_activations!r}: expected one of {list(_NORMALIZERS)}"
            )
        self.coder = coder
        self.normalize_activations = normalize_activations
        self._normalize, self._denormalize = _NORMALIZERS[normalize_activations]
        self.d_in, self.d_out, self.n_latents = coder.d_in, coder.d_out, coder.n_latents

    @property
    def W_enc(self) -> Tensor:
        return self.coder.W_enc

    @property
    def b_enc(self) -> Tensor:
        return self.coder.b_enc

    @property
    def W_dec(self) -> Tensor:
        return self.coder.W_dec

    @property
    def b_dec(self) -> Tensor:
        return self.coder.b_dec

    W_skip = None
    """Never a skip transcoder: ``load_dictionary`` refuses per-token normalisation for transcoders."""

    def skip_output(self, x: Tensor) -> None:
        """No skip term (see ``W_skip``): as ``SparseCoder.skip_output`` without one."""
        return None

    def normalize(self, x: Tensor) -> tuple[Tensor, _Stats]:
        """(B, d_in) raw -> (the normalised tokens ``coder`` reads, the per-token statistics)."""
        return self._normalize(x.to(self.coder.W_enc.dtype))  # SAELens casts before normalising

    def encode(self, x: Tensor) -> Code:
        """(B, d_in) raw activations -> the latents of their normalised tokens."""
        return self.coder.encode(self.normalize(x)[0])

    def decode(self, acts: Tensor, indices: Tensor | None = None, *, x: Tensor) -> Tensor:
        """Latents -> (B, d_out) reconstruction in raw space. ``x`` is the raw input the latents
        belong to: its per-token statistics undo the normalisation."""
        return self._denormalize(self.coder.decode(acts, indices), self.normalize(x)[1])

    def reconstruct(self, x: Tensor) -> tuple[Code, Tensor]:
        """``encode`` then ``decode``, the reconstruction in raw space."""
        normalized, stats = self.normalize(x)
        code = self.coder.encode(normalized)
        return code, self._denormalize(self.coder.decode(code.acts, code.indices), stats)

    def forward(self, x: Tensor, *, target: Tensor | None = None) -> ForwardOutput:
        """As ``SparseCoder.forward`` (without AuxK: this is inference), the error in raw space."""
        target = x if target is None else target
        code, reconstruction = self.reconstruct(x)
        error = reconstruction_error(reconstruction, target)
        fit = self.coder.fit_loss(code, reconstruction, target, error)
        sparsity = self.coder.sparsity_loss(code)
        aux = torch.zeros((), device=reconstruction.device)
        l0 = (code.acts > 0).sum(dim=-1).float().mean().detach()
        return ForwardOutput(
            code.acts, code.indices, reconstruction, error.mse, error.fvu, sparsity, aux, fit + sparsity + aux, l0
        )


def _check_config(cfg: dict[str, Any]) -> None:
    architecture = cfg.get("architecture")
    if architecture not in INFERENCE_ARCHITECTURES:
        raise ValueError(
            f"{CONFIG_FILE} architecture={architecture!r} is not supported "
            f"(expected one of {list(INFERENCE_ARCHITECTURES)})"
        )
    if cfg.get("normalize_activations", "none") not in NORMALIZE_ACTIVATIONS:
        raise ValueError(
            f"{CONFIG_FILE} normalize_activations={cfg['normalize_activations']!r} is not supported "
            f"(expected one of {list(NORMALIZE_ACTIVATIONS)})"
        )
    if not isinstance(cfg.get("rescale_acts_by_decoder_norm", False), bool):
        raise ValueError(
            f"{CONFIG_FILE} rescale_acts_by_decoder_norm={cfg['rescale_acts_by_decoder_norm']!r}: expected true or false"
        )
    if cfg.get("dtype", "").removeprefix("torch.") not in _DTYPES_BY_NAME:
        raise ValueError(f"{CONFIG_FILE} dtype={cfg.get('dtype')!r}: expected one of {sorted(_DTYPES_BY_NAME)}")
    integer_keys = ("d_in", "d_sae", "k") if architecture in _TOPK_ARCHITECTURES else ("d_in", "d_sae")
    integer_keys += ("d_out",) if "d_out" in cfg else ()
    for key in integer_keys:
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ValueError(f"{CONFIG_FILE} {key}={cfg.get(key)!r} must be a positive integer")
    if architecture in _TOPK_ARCHITECTURES and cfg["k"] > cfg["d_sae"]:
        raise ValueError(f"{CONFIG_FILE} k={cfg['k']} exceeds d_sae={cfg['d_sae']}")
    if cfg.get("apply_b_dec_to_input", True) and cfg.get("d_out", cfg["d_in"]) != cfg["d_in"]:
        raise ValueError(
            f"{CONFIG_FILE} d_out={cfg['d_out']} differs from d_in={cfg['d_in']} with apply_b_dec_to_input=true"
        )
    if architecture in _SKIP_ARCHITECTURES and cfg.get("apply_b_dec_to_input", True):
        raise ValueError(f"{CONFIG_FILE} architecture={architecture!r} needs apply_b_dec_to_input=false")
    if architecture.endswith("transcoder") and cfg.get("normalize_activations", "none") in _PER_TOKEN_NORMALIZATION:
        # SAELens normalises a transcoder's input per token but never maps its output back (its
        # Transcoder.decode skips run_time_activation_norm_fn_out): not a function saeforge runs.
        raise ValueError(
            f"{CONFIG_FILE} architecture={architecture!r} with normalize_activations="
            f"{cfg['normalize_activations']!r} is not supported: expected 'none' for a transcoder"
        )


def _check_weights(
    weights: dict[str, Tensor], *, d_in: int, d_sae: int, d_out: int, with_threshold: bool = False,
    with_skip: bool = False,
) -> None:
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if with_threshold:
        expected["threshold"] = (d_sae,)
    if with_skip:
        expected["W_skip"] = (d_out, d_in)
    _check_shapes(weights, expected, f"d_in={d_in}, d_sae={d_sae}" + (f", d_out={d_out}" if d_out != d_in else ""))


def _check_shapes(weights: dict[str, Tensor], expected: dict[str, tuple[int, ...]], widths: str) -> None:
    if weights.keys() != expected.keys():
        raise ValueError(
            f"{WEIGHTS_FILE} holds {sorted(weights)}, expected {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"{WEIGHTS_FILE} {name} shape {tuple(weights[name].shape)} but {CONFIG_FILE} {widths} expects {shape}"
            )
