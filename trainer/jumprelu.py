"""JumpReLU's straight-through autograd functions (Rajamanoharan et al. 2024, "Jumping Ahead",
section 4), shared by ``trainer.architectures.JumpReLUSAE`` and ``trainer.clt.CrossLayerTranscoder``
(a module of their own so that neither imports the other: ``trainer.architectures`` builds CLTs).

Pure torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["JumpReLUFunction", "StepFunction", "rectangle"]


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u): 1 where -1/2 < u < 1/2, else 0 (Rajamanoharan et al. 2024, sec. 4)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``z * H(z - theta)`` with the paper's pseudo-derivative in theta (section 4):
    ``d/dtheta := -(theta / eps) K((z - theta) / eps)``. In z the gradient is the true one,
    ``H(z - theta)``, plus the same kernel term when ``ste_to_input`` (Anthropic, Jan 2025)."""

    @staticmethod
    def forward(
        ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool
    ) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre_acts * (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None]:
        pre_acts, threshold = ctx.saved_tensors
        kernel = rectangle((pre_acts - threshold) / ctx.bandwidth) / ctx.bandwidth
        ste = threshold * kernel * grad_out
        grad_threshold = -ste.reshape(-1, ste.shape[-1]).sum(dim=0).to(threshold.dtype)
        grad_pre = (pre_acts > threshold).to(grad_out.dtype) * grad_out
        if ctx.ste_to_input:
            grad_pre = grad_pre + ste
        return grad_pre, grad_threshold, None, None


class StepFunction(torch.autograd.Function):
    """``H(z - theta)`` with the pseudo-derivative ``d/dtheta := -(1 / eps) K((z - theta) / eps)``
    (section 4); in z zero, or ``+(1 / eps) K((z - theta) / eps)`` when ``ste_to_input``."""

    @staticmethod
    def forward(
        ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool
    ) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        pre_acts, threshold = ctx.saved_tensors
        ste = rectangle((pre_acts - threshold) / ctx.bandwidth) / ctx.bandwidth * grad_out
        grad_threshold = -ste.reshape(-1, ste.shape[-1]).sum(dim=0).to(threshold.dtype)
        return (ste if ctx.ste_to_input else None), grad_threshold, None, None
