"""The trained dictionary as files in the layout SAELens 6 loads (``SAE.load_from_disk``).

Bytes in, bytes out: the caller owns object storage and writes ``<run>/dictionary/<hookpoint>/``.
The layout follows SAELens 6's ``TopKSAEConfig.to_dict`` / ``SAE.save_model``
(``sae_lens/saes/sae.py``, ``sae_lens/saes/topk_sae.py``) and the sparsity file of its training
runner (``sae_lens/llm_sae_training_runner.py``: ``{"sparsity": log10(frequency + 1e-10)}``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from trainer.sae import TopKSAE

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"
EVAL_FILE = "eval.json"

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
_RESERVED_METADATA = {"model_name", "hook_name", "sae_lens_version", "sae_lens_training_version"}


def dictionary_files(
    sae: TopKSAE,
    *,
    hookpoint: str,
    model_name: str,
    scale: float,
    extra_metadata: dict[str, Any],
    sparsity: Tensor | None,
    eval_metrics: dict[str, Any],
) -> dict[str, bytes]:
    """The dictionary's files, keyed by file name, with the input ``scale`` folded into the weights.

    ``sae`` was trained on ``x * scale``; the saved weights act on raw ``x``. ``sparsity`` is each
    latent's firing frequency (n_latents,), stored as SAELens does (log10); ``None`` omits
    ``sparsity.safetensors``. ``extra_metadata`` (JSON values: e.g. ``context_size``,
    ``prepend_bos``, ``dataset_path``, ``neuronpedia_id``) goes into ``cfg.json``'s ``metadata``.
    """
    clash = _RESERVED_METADATA & extra_metadata.keys()
    if clash:
        raise ValueError(f"extra_metadata may not set {sorted(clash)}: they are written from the arguments")
    weights = {name: tensor.cpu() for name, tensor in sae.folded_weights(scale).items()}
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "hook_name": hookpoint,
        "hook_head_index": None,
        "saeforge_input_scale_folded": scale,
        **extra_metadata,
    }
    files = {
        WEIGHTS_FILE: save_safetensors(weights),
        CONFIG_FILE: _json_bytes(sae_config(sae, metadata)),
        EVAL_FILE: _json_bytes(_finite_or_none(eval_metrics)),
    }
    if sparsity is not None:
        if sparsity.shape != (sae.n_latents,):
            raise ValueError(
                f"sparsity shape {tuple(sparsity.shape)} must be (n_latents={sae.n_latents},)"
            )
        log_sparsity = torch.log10(sparsity.detach().float().cpu() + _LOG_SPARSITY_EPS)
        files[SPARSITY_FILE] = save_safetensors({"sparsity": log_sparsity.contiguous()})
    return files


def sae_config(sae: TopKSAE, metadata: dict[str, Any]) -> dict[str, Any]:
    """``cfg.json`` content: the fields of SAELens 6's ``TopKSAEConfig.to_dict()``."""
    return {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        # Our TopK selects on raw pre-activations; SAELens must not rescale them by decoder norms
        # (the folded decoder rows have norm 1 / scale).
        "rescale_acts_by_decoder_norm": False,
        "dtype": _DTYPE_NAMES[sae.W_enc.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }


def load_dictionary(files: dict[str, bytes]) -> tuple[TopKSAE, dict[str, Any]]:
    """Rebuild the SAE (acting on raw activations) and its config from ``dictionary_files`` output.

    Raises ValueError naming the first mismatch between ``cfg.json`` and the weights.
    """
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise ValueError(f"dictionary has no {name} (files: {sorted(files)})")
    cfg = json.loads(files[CONFIG_FILE])
    _check_config(cfg)
    weights = load_safetensors(files[WEIGHTS_FILE])
    _check_weights(weights, d_in=cfg["d_in"], d_sae=cfg["d_sae"])

    dtype = _DTYPES_BY_NAME[cfg["dtype"].removeprefix("torch.")]
    sae = TopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"], dtype=dtype, unit_norm_decoder=False)
    sae.load_state_dict({name: tensor.to(dtype) for name, tensor in weights.items()})
    return sae, cfg


def _check_config(cfg: dict[str, Any]) -> None:
    expected = {"architecture": "topk", "apply_b_dec_to_input": True, "normalize_activations": "none"}
    for key, value in expected.items():
        if cfg.get(key, value) != value:
            raise ValueError(f"cfg.json {key}={cfg[key]!r} is not supported (expected {value!r})")
    if cfg.get("rescale_acts_by_decoder_norm", False):
        raise ValueError("cfg.json rescale_acts_by_decoder_norm=true is not supported")
    if cfg.get("dtype", "").removeprefix("torch.") not in _DTYPES_BY_NAME:
        raise ValueError(f"cfg.json dtype={cfg.get('dtype')!r}: expected one of {sorted(_DTYPES_BY_NAME)}")
    for key in ("d_in", "d_sae", "k"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ValueError(f"cfg.json {key}={cfg.get(key)!r} must be a positive integer")
    if cfg["k"] > cfg["d_sae"]:
        raise ValueError(f"cfg.json k={cfg['k']} exceeds d_sae={cfg['d_sae']}")


def _check_weights(weights: dict[str, Tensor], *, d_in: int, d_sae: int) -> None:
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if weights.keys() != expected.keys():
        raise ValueError(
            f"{WEIGHTS_FILE} holds {sorted(weights)}, expected {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"{WEIGHTS_FILE} {name} shape {tuple(weights[name].shape)} but cfg.json "
                f"d_in={d_in}, d_sae={d_sae} expects {shape}"
            )


def _finite_or_none(metrics: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN or infinity; json.dumps would write the non-standard tokens NaN/Infinity.
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in metrics.items()
    }


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()
