"""Loss terms shared by SAE architectures. Pure torch.

``reconstruction_error`` is the one MSE / FVU of every forward pass (``trainer.sae``).
``auxk_loss`` is the auxiliary loss of Gao et al. 2024 ("Scaling and evaluating sparse
autoencoders", section 2.4 and appendix A.2), as OpenAI's reference code computes it
(``openai/sparse_autoencoder``: ``train.py`` main loss lambda, ``kernels.py normalized_mse``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

AUXK_COEFFICIENT = 1 / 32
"""The paper's weight of the auxiliary loss (alpha = 1/32, section 2.4)."""


class ReconstructionError(NamedTuple):
    """How far a batch's reconstruction is from its target, in fp32 (sums over B * d_out elements)."""

    mse: Tensor
    """Scalar: mean squared error over all B * d_out elements."""
    fvu: Tensor
    """Scalar: fraction of variance unexplained, the squared error summed over the batch over the
    target's total squared deviation from its own batch mean (1.0: no better than the mean)."""
    squared_l2: Tensor
    """Scalar: squared error summed over features, averaged over tokens (``mse * d_out``)."""


def reconstruction_error(reconstruction: Tensor, target: Tensor) -> ReconstructionError:
    """The reconstruction figures of one batch: (B, d_out) ``reconstruction`` against ``target``.

    In fp32 even when the model runs in bf16: the sums run over B * d_out elements.
    """
    target = target.float()
    squared = (reconstruction.float() - target).pow(2)
    total_variance = (target - target.mean(dim=0)).pow(2).sum()
    return ReconstructionError(squared.mean(), squared.sum() / total_variance, squared.sum(dim=-1).mean())


def auxk_loss(
    residual: Tensor,
    pre_acts: Tensor,
    decoder_weight: Tensor,
    dead_mask: Tensor,
    *,
    k_aux: int | None = None,
    coefficient: float = AUXK_COEFFICIENT,
) -> Tensor:
    """The AuxK loss: the top ``k_aux`` dead latents reconstruct the main model's error.

    ``residual`` (B, d_out) is ``target - reconstruction`` of the main forward pass (detached here:
    the auxiliary loss trains only the dead latents' encoder and decoder rows). ``pre_acts`` (B, m)
    are the encoder pre-activations (before ReLU / TopK) of m latents, ``decoder_weight`` (m, d_out)
    their decoder rows as the forward pass uses them (unit-norm ones where the model normalises),
    and ``dead_mask`` (m,) bool marks those that count as dead. ``k_aux`` defaults to
    ``d_out // 2`` (appendix B.1 uses a power of two near d_model / 2).

    The auxiliary reconstruction is ``ê = relu(topk_dead(pre_acts)) @ W_dec`` WITHOUT ``b_dec``:
    the residual already has the bias removed, so adding it again would double-count it (OpenAI's
    code cancels the bias its ``decode_sparse`` adds with ``+ pre_bias`` on the target; sparsify's
    ``decode`` adds it uncancelled). The squared error is divided by the residual's own total
    variance, ``sum((e - mean(e))^2)``, as OpenAI's ``normalized_mse`` does, so the term is
    scale-free (sparsify divides by the input's variance instead). Returns
    ``coefficient * sum((ê - e)^2) / sum((e - mean(e))^2)``, and exactly 0 (with zero gradients,
    never NaN) when no latent is dead or the residual has no variance.

    Without a host sync: the top-k runs over all m latents with live ones masked to -inf, which
    the ReLU turns into zero weights.
    """
    n_latents = pre_acts.shape[-1]
    if dead_mask.shape != (n_latents,):
        raise ValueError(
            f"dead_mask shape {tuple(dead_mask.shape)} must be (n_latents={n_latents},)"
        )
    if decoder_weight.shape != (n_latents, residual.shape[-1]):
        raise ValueError(
            f"decoder_weight shape {tuple(decoder_weight.shape)} must be "
            f"(n_latents={n_latents}, d_out={residual.shape[-1]})"
        )
    k_aux = residual.shape[-1] // 2 if k_aux is None else k_aux
    if k_aux <= 0:
        raise ValueError(f"k_aux={k_aux} must be positive")
    k_aux = min(k_aux, n_latents)
    dead_mask = dead_mask.to(device=pre_acts.device, dtype=torch.bool)

    candidates = torch.where(dead_mask, pre_acts, torch.full_like(pre_acts, float("-inf")))
    values, indices = candidates.topk(k_aux, dim=-1, sorted=False)
    values = torch.relu(values)  # -inf (a live latent picked when few are dead) and negatives -> 0
    e_hat = decode_rows(values, indices, decoder_weight).float()

    residual = residual.detach().float()
    squared_error = (e_hat - residual).pow(2).sum()
    variance = (residual - residual.mean(dim=0)).pow(2).sum()
    valid = dead_mask.any() & (variance > 0)
    # Dividing by a placeholder 1 where invalid keeps the untaken branch of the where finite: a
    # 0/0 there would still send NaN into the gradient.
    safe_variance = torch.where(valid, variance, torch.ones_like(variance))
    normalised = torch.where(valid, squared_error / safe_variance, torch.zeros_like(variance))
    return coefficient * normalised


def decode_rows(values: Tensor, indices: Tensor, decoder_weight: Tensor) -> Tensor:
    """(..., k) values at (..., k) latent indices times the (n, d) decoder rows -> (..., d), no bias.

    ``embedding_bag`` gathers only the k rows per token (the (B, n) dense matrix of the slow twin,
    ``decode_rows_dense``, is never built) and is differentiable in both values and rows.
    """
    flat_indices = indices.reshape(-1, indices.shape[-1])
    flat_values = values.reshape(-1, values.shape[-1]).to(decoder_weight.dtype)
    out = F.embedding_bag(flat_indices, decoder_weight, per_sample_weights=flat_values, mode="sum")
    return out.reshape(*indices.shape[:-1], decoder_weight.shape[-1])


def decode_rows_dense(values: Tensor, indices: Tensor, decoder_weight: Tensor) -> Tensor:
    """The plain-PyTorch twin of ``decode_rows``: scatter into (..., n) and multiply."""
    dense = values.new_zeros(*values.shape[:-1], decoder_weight.shape[0])
    return dense.scatter(-1, indices, values) @ decoder_weight
