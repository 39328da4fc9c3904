"""Training schedules as pure functions of the optimizer step (0-based: the step about to be taken).

The loop evaluates them each step and sets the optimizer's lr, the SAE's ``sparsity_coefficient``
and its ``k``; nothing here holds state, so resuming from a checkpoint needs only the step.
"""

from __future__ import annotations

import math
from typing import Literal


def lr_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay: Literal["cosine", "linear", "constant"],
    min_lr_fraction: float = 0.0,
    decay_steps: int | None = None,
) -> float:
    """Learning rate for optimizer step ``step`` in ``[0, total_steps)``.

    Linear warmup ``base_lr * (step + 1) / warmup_steps`` over the first ``warmup_steps`` steps (so
    the first step is not wasted at lr 0, as SAELens's ``LinearLR(start_factor=1/warmup)``), then
    ``base_lr`` until the decay window, the last ``decay_steps`` steps (default: every step after
    the warmup; Anthropic's April 2024 recipe decays over the last 20%, ``decay_steps = total / 5``).
    Over the window the lr falls to ``min_lr_fraction * base_lr`` by a half cosine or a straight
    line, reaching it at step ``total_steps``; past ``total_steps`` it stays there. ``constant``
    never decays.
    """
    _check_schedule(step, base_lr, warmup_steps, total_steps, min_lr_fraction)
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay={decay!r}: expected 'cosine', 'linear' or 'constant'")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    window = total_steps - warmup_steps if decay_steps is None else decay_steps
    if not 0 <= window <= total_steps - warmup_steps:
        raise ValueError(
            f"decay_steps={decay_steps} must be in [0, total_steps - warmup_steps = "
            f"{total_steps - warmup_steps}]"
        )
    decay_start = total_steps - window
    if step < decay_start:
        return base_lr
    progress = min((step - decay_start) / max(window, 1), 1.0)
    remaining = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    min_lr = min_lr_fraction * base_lr
    return min_lr + (base_lr - min_lr) * remaining


def sparsity_coefficient_at(step: int, *, final: float, warmup_steps: int) -> float:
    """Sparsity coefficient rising linearly from 0 at step 0 to ``final`` at ``warmup_steps``
    (Anthropic April 2024: over the first 5% of training; SAELens ``l1_warm_up_steps``)."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if final < 0:
        raise ValueError(f"final={final} must be >= 0")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if step >= warmup_steps:
        return final
    return final * step / warmup_steps


def k_at(step: int, *, k_start: int, k_final: int, anneal_steps: int) -> int:
    """TopK ``k`` falling linearly from ``k_start`` at step 0 to ``k_final`` at ``anneal_steps``,
    rounded to an integer (sparsify's ``Trainer.get_current_k``)."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if not 0 < k_final <= k_start:
        raise ValueError(f"k_final={k_final} must be in [1, k_start={k_start}]")
    if anneal_steps < 0:
        raise ValueError(f"anneal_steps={anneal_steps} must be >= 0")
    if step >= anneal_steps:
        return k_final
    progress = step / anneal_steps
    return round(k_start * (1 - progress) + k_final * progress)


def _check_schedule(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_fraction: float
) -> None:
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if not base_lr > 0:
        raise ValueError(f"base_lr={base_lr} must be positive")
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    if not 0 <= min_lr_fraction <= 1:
        raise ValueError(f"min_lr_fraction={min_lr_fraction} must be in [0, 1]")
