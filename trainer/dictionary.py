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
(``saelens_architecture``). A transcoder (``hookpoint_out`` given) saves ReLU as ``transcoder``
and JumpReLU-style as ``jumprelu_transcoder`` (both with ``d_out`` and
``metadata.hook_name_out``); SAELens has no TopK transcoder, so a TopK one saves as ``topk`` with
``apply_b_dec_to_input=false``. The Anthropic ReLU variant differs from the plain one only in
training (its L1 is weighted by decoder norms): at inference both are a plain ReLU, which is what
``standard`` runs. ``load_dictionary`` rebuilds each SAELens architecture as the registered
architecture that runs it (``INFERENCE_ARCHITECTURES``).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from trainer.layout import CONFIG_FILE, EVAL_FILE, SPARSITY_FILE, WEIGHTS_FILE, eval_json
from trainer.registry import architecture_class
from trainer.sae import SparseCoder

__all__ = ["dictionary_files", "load_dictionary", "sae_config", "saelens_architecture"]

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
    "training_architecture",
}
_TRANSCODER_ARCHITECTURES = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder", "topk": "topk"}
INFERENCE_ARCHITECTURES = {
    "topk": "topk", "standard": "relu_l1", "transcoder": "relu_l1",
    "jumprelu": "jumprelu", "jumprelu_transcoder": "jumprelu",
}
"""SAELens 6 architecture of a saved dictionary -> the registered architecture that computes it
on raw activations (with a free decoder, so the folded rows are used as saved)."""
_JUMPRELU_ARCHITECTURES = ("jumprelu", "jumprelu_transcoder")


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
) -> dict[str, bytes]:
    """The dictionary's files, keyed by file name, with the input ``scale`` folded into the weights.

    ``sae`` (any ``trainer.sae.SparseCoder``) was trained on ``x * scale``; the saved weights
    act on raw ``x`` (``SparseCoder.folded_weights``). A transcoder names its output hookpoint in
    ``hookpoint_out`` and, if its target was scaled differently, gives ``target_scale``.
    ``sparsity`` is each latent's firing frequency (n_latents,), stored as SAELens does (log10);
    ``None`` omits ``sparsity.safetensors``. ``extra_metadata`` (JSON values: e.g.
    ``context_size``, ``prepend_bos``, ``dataset_path``, ``neuronpedia_id``) goes into
    ``cfg.json``'s ``metadata``.
    """
    clash = _RESERVED_METADATA & extra_metadata.keys()
    if clash:
        raise ValueError(f"extra_metadata may not set {sorted(clash)}: they are written from the arguments")
    transcoder = hookpoint_out is not None
    if transcoder and sae.apply_b_dec_to_input:
        raise ValueError(
            f"hookpoint_out={hookpoint_out!r} makes this a transcoder, but the SAE subtracts b_dec "
            "from its input (apply_b_dec_to_input=True); build it with transcoder=True"
        )
    folded = sae.folded_weights(scale, target_scale=target_scale)
    weights = {name: tensor.cpu() for name, tensor in folded.items()}
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
    files = {
        WEIGHTS_FILE: save_safetensors(weights),
        CONFIG_FILE: json.dumps(
            sae_config(sae, metadata, transcoder=transcoder), indent=2, sort_keys=True, allow_nan=False
        ).encode(),
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
    """The SAELens 6 inference architecture ``sae`` saves as (see the module docstring's table)."""
    base = sae.saelens_architecture
    return _TRANSCODER_ARCHITECTURES[base] if transcoder else base


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
    if architecture == "topk":
        cfg["k"] = sae.k
        # Our TopK selects on raw pre-activations; SAELens must not rescale them by decoder norms
        # (the folded decoder rows have norm 1 / scale).
        cfg["rescale_acts_by_decoder_norm"] = False
    if architecture in ("transcoder", "jumprelu_transcoder") or sae.d_out != sae.d_in:
        cfg["d_out"] = sae.d_out  # a TopK transcoder to another width: beyond what SAELens's topk loads
    return cfg


def load_dictionary(files: dict[str, bytes]) -> tuple[SparseCoder, dict[str, Any]]:
    """Rebuild the SAE (acting on raw activations) and its config from ``dictionary_files`` output.

    ``topk`` gives a ``TopKSAE``, ``standard`` / ``transcoder`` a ``ReLUSAE``, ``jumprelu`` /
    ``jumprelu_transcoder`` a ``JumpReLUSAE`` (``log_threshold = log(threshold)``), all with a free
    decoder so the folded rows are used as saved (``INFERENCE_ARCHITECTURES``). Raises ValueError
    naming the first mismatch between ``cfg.json`` and the weights.
    """
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise ValueError(f"dictionary has no {name} (files: {sorted(files)})")
    cfg = json.loads(files[CONFIG_FILE])
    _check_config(cfg)
    try:
        weights = load_safetensors(files[WEIGHTS_FILE])
    except Exception as err:  # safetensors raises its own SafetensorError; it never unpickles
        raise ValueError(f"{WEIGHTS_FILE}: not a safetensors file ({err})") from None
    architecture = cfg["architecture"]
    _check_weights(
        weights, d_in=cfg["d_in"], d_sae=cfg["d_sae"], d_out=cfg.get("d_out", cfg["d_in"]),
        with_threshold=architecture in _JUMPRELU_ARCHITECTURES,
    )
    dtype = _DTYPES_BY_NAME[cfg["dtype"].removeprefix("torch.")]
    state = {name: tensor.to(dtype) for name, tensor in weights.items()}
    sae = architecture_class(INFERENCE_ARCHITECTURES[architecture]).for_inference(cfg, dtype)
    if "threshold" in state:
        # A zero threshold (an untrained BatchTopK estimate) becomes log 0 = -inf, whose exp is 0.
        # A negative one acts as 0 after SAELens's ReLU; clamping keeps the log defined.
        state["log_threshold"] = state.pop("threshold").clamp_min(0).log()
    sae.load_state_dict(state)
    return sae, cfg


def _check_config(cfg: dict[str, Any]) -> None:
    architecture = cfg.get("architecture")
    if architecture not in INFERENCE_ARCHITECTURES:
        raise ValueError(
            f"{CONFIG_FILE} architecture={architecture!r} is not supported "
            f"(expected one of {list(INFERENCE_ARCHITECTURES)})"
        )
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(
            f"{CONFIG_FILE} normalize_activations={cfg['normalize_activations']!r} is not supported "
            "(expected 'none')"
        )
    if cfg.get("rescale_acts_by_decoder_norm", False):
        raise ValueError(f"{CONFIG_FILE} rescale_acts_by_decoder_norm=true is not supported")
    if cfg.get("dtype", "").removeprefix("torch.") not in _DTYPES_BY_NAME:
        raise ValueError(f"{CONFIG_FILE} dtype={cfg.get('dtype')!r}: expected one of {sorted(_DTYPES_BY_NAME)}")
    integer_keys = ("d_in", "d_sae", "k") if architecture == "topk" else ("d_in", "d_sae")
    integer_keys += ("d_out",) if "d_out" in cfg else ()
    for key in integer_keys:
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ValueError(f"{CONFIG_FILE} {key}={cfg.get(key)!r} must be a positive integer")
    if architecture == "topk" and cfg["k"] > cfg["d_sae"]:
        raise ValueError(f"{CONFIG_FILE} k={cfg['k']} exceeds d_sae={cfg['d_sae']}")
    if cfg.get("apply_b_dec_to_input", True) and cfg.get("d_out", cfg["d_in"]) != cfg["d_in"]:
        raise ValueError(
            f"{CONFIG_FILE} d_out={cfg['d_out']} differs from d_in={cfg['d_in']} with apply_b_dec_to_input=true"
        )


def _check_weights(
    weights: dict[str, Tensor], *, d_in: int, d_sae: int, d_out: int, with_threshold: bool = False
) -> None:
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if with_threshold:
        expected["threshold"] = (d_sae,)
    if weights.keys() != expected.keys():
        raise ValueError(
            f"{WEIGHTS_FILE} holds {sorted(weights)}, expected {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            widths = f"d_in={d_in}, d_sae={d_sae}" + (f", d_out={d_out}" if d_out != d_in else "")
            raise ValueError(
                f"{WEIGHTS_FILE} {name} shape {tuple(weights[name].shape)} but {CONFIG_FILE} {widths} expects {shape}"
            )
