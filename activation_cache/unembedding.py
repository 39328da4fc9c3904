"""A language model's unembedding (W_U), read for the feature report's promoted tokens, and the
tokens a decoder direction promotes through it (``logit_tokens``: the report's cards, the steer audit's
default targets).

``load_unembedding`` reads only the unembedding and final-norm tensors from a model's GGUF or
safetensors files where it can, which is far cheaper than loading the whole model, and loads the
model (``hooking.load_model``) only when the tensors are not stored under the names it expects.
The final norm's gain is folded into W_U; its normalisation (a per-token rescaling) is left out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from activation_cache.hooking import ModelSource, load_model

log = logging.getLogger(__name__)

LogitIds = tuple[tuple[list[int], list[float]], tuple[list[int], list[float]]]
"""((promoted ids, logits), (suppressed ids, logits)) of one feature."""

_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                "model.final_layernorm")


def load_unembedding(source: ModelSource) -> tuple[Tensor | None, str]:
    """W_U (vocab, d_model) of the model at ``source`` and a note for the report saying how it was
    obtained; (None, why) when it cannot be read."""
    try:
        found = _unembedding_from_gguf(source) if source.gguf_file else _unembedding_from_safetensors(source)
        if found is not None:
            return found
        model = load_model(source)
        try:
            return unembedding_of(model)
        finally:
            del model
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        log.warning("report: unembedding of %s not read: %s", source.model_id, err)
        return None, f"the unembedding of {source.model_id} could not be read: {err}"


@torch.no_grad()
def logit_tokens(W_dec: Tensor, unembedding: Tensor, features: Sequence[int], n: int) -> list[LogitIds]:
    """Per feature, ((promoted ids, logits), (suppressed ids, logits)): the top and bottom ``n``
    entries of ``unembedding @ W_dec[feature]``."""
    directions = W_dec.detach()[list(features)].float().cpu()
    # In vocabulary slices: a float32 copy of a large W_U (128k x 8192) would be 4 GB.
    logits = torch.cat([directions @ part.float().T for part in unembedding.split(16384)], dim=1)
    k = min(n, logits.shape[1])
    top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    return [((top.indices[i].tolist(), top.values[i].tolist()), (bottom.indices[i].tolist(), bottom.values[i].tolist()))
            for i in range(len(features))]


def unembedding_of(model: nn.Module) -> tuple[Tensor | None, str]:
    """(W_U (vocab, d_model) on the CPU, a note for the report) of a loaded causal LM; W_U is None
    when the model has no output embedding. The final norm's gain is folded into W_U; its
    normalisation (a per-token rescaling) is left out."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return None, f"{type(model).__name__} has no output embedding (unembedding)"
    weight = head.weight.detach().float().cpu()
    norm = _final_norm(model)
    return _with_gain(weight, _norm_gain(norm[1], weight.shape[1]) if norm else None, type(norm[1]).__name__)


def _final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    modules = dict(model.named_modules())
    return next(((name, modules[name]) for name in _FINAL_NORMS if name in modules), None)


@torch.no_grad()
def _norm_gain(norm: nn.Module, d_model: int) -> Tensor | None:
    """The elementwise gain of a final norm, measured rather than read, as conventions differ
    (Gemma's RMSNorm scales by 1 + weight): for x of zero mean and unit RMS, RMSNorm and
    LayerNorm alike give (norm(x) - norm(-x)) / 2 = x * gain, the bias cancelling."""
    param = next(norm.parameters(), None)
    if param is None or d_model % 2:
        return None
    x = torch.ones(1, d_model, dtype=param.dtype, device=param.device)
    x[:, 1::2] = -1
    return ((norm(x) - norm(-x)) / (2 * x))[0].float().cpu()


def _with_gain(weight: Tensor, gain: Tensor | None, norm_name: str) -> tuple[Tensor, str]:
    lens = ("Promoted tokens are the top entries of W_U · W_dec[feature]: the decoder direction read "
            "directly by the unembedding, skipping every layer after the hookpoint (a logit lens); "
            "values are logits per unit of feature activation.")
    if gain is None or gain.shape != weight.shape[1:]:
        return weight, f"{lens} No final-norm gain was found; the final norm is ignored."
    return weight * gain, (f"{lens} The gain of the final norm ({norm_name}) is folded into W_U; its "
                           "normalisation (a per-token rescaling, and the centring and bias of a "
                           "LayerNorm) is ignored.")


def _unembedding_from_safetensors(source: ModelSource) -> tuple[Tensor, str] | None:
    """W_U without loading the model: the names come from an empty (meta-device) model, the
    tensors from the safetensors files. None when they are not stored under those names."""
    files = sorted(source.directory.glob("*.safetensors"))
    if not files:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source.directory))
    head = empty.get_output_embeddings()
    if head is None:
        return None
    # Every name of the head's weight: a tied one is stored once, often as the input embedding.
    wanted = [n for n, p in empty.named_parameters(remove_duplicate=False) if p is head.weight]
    found = _final_norm(empty)
    norm_keys = [f"{found[0]}.{k}" for k in found[1].state_dict()] if found else []
    tensors = _read_tensors(files, [*wanted, *norm_keys])
    weight = next((tensors[n] for n in wanted if n in tensors), None)
    if weight is None:
        return None
    gain, norm_name = None, "none"
    if found and all(k in tensors for k in norm_keys):
        name, norm = found
        norm.to_empty(device="cpu")
        norm.load_state_dict({k.removeprefix(f"{name}."): tensors[k] for k in norm_keys})
        gain, norm_name = _norm_gain(norm, weight.shape[1]), type(norm).__name__
    return _with_gain(weight.float(), gain, norm_name)


def _unembedding_from_gguf(source: ModelSource) -> tuple[Tensor, str] | None:
    """W_U from a GGUF file's tensors by llama.cpp's standard names (``output``, else the tied
    ``token_embd``; ``output_norm``, stored as the gain itself: llama.cpp's converter adds
    Gemma's 1), dequantised without building the model."""
    import gguf

    reader = gguf.GGUFReader(source.directory / source.gguf_file)
    tensors = {t.name: t for t in reader.tensors}
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if head is None:
        return None

    def dequantized(tensor: Any) -> Tensor:
        # A copy: an unquantised tensor comes back as a read-only view of the memory-mapped file.
        return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))

    norm = tensors.get("output_norm.weight")
    return _with_gain(dequantized(head), None if norm is None else dequantized(norm), "output_norm")


def _read_tensors(files: list[Path], names: list[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    found: dict[str, Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in set(names) & set(f.keys()) - found.keys():
                found[name] = f.get_tensor(name)
    return found
