"""Learning-rate, sparsity-coefficient and k schedules."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from trainer.schedules import k_at, lr_at, sparsity_coefficient_at


def _lr(step: int, **overrides) -> float:
    arguments = dict(
        base_lr=1e-3, warmup_steps=10, total_steps=110, decay="cosine", min_lr_fraction=0.1
    )
    arguments.update(overrides)
    return lr_at(step, **arguments)


def test_warmup_rises_linearly_and_never_starts_at_zero() -> None:
    assert _lr(0) == pytest.approx(1e-4)
    assert _lr(4) == pytest.approx(5e-4)
    assert _lr(9) == pytest.approx(1e-3)
    assert lr_at(0, base_lr=1e-3, warmup_steps=0, total_steps=10, decay="constant") == 1e-3


def test_cosine_decay_runs_from_base_to_the_minimum_over_the_remaining_steps() -> None:
    assert _lr(10) == pytest.approx(1e-3)
    assert _lr(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway: cos(pi / 2) = 0
    assert _lr(35) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert _lr(110) == pytest.approx(1e-4)
    assert _lr(500) == pytest.approx(1e-4)
    steps = [_lr(step) for step in range(10, 111)]
    assert all(a >= b for a, b in pairwise(steps))


def test_linear_and_constant_decay() -> None:
    assert _lr(60, decay="linear") == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert _lr(85, decay="linear") == pytest.approx(1e-4 + 0.9e-3 * 0.25)
    assert _lr(109, decay="constant") == 1e-3
    assert _lr(5, decay="constant") == pytest.approx(6e-4)  # warmup still applies


def test_decay_window_covers_only_the_last_steps() -> None:
    # Anthropic April 2024: constant, then linear decay to 0 over the last 20% of steps.
    def lr(step: int) -> float:
        return lr_at(
            step,
            base_lr=1.0,
            warmup_steps=0,
            total_steps=100,
            decay="linear",
            min_lr_fraction=0.0,
            decay_steps=20,
        )

    assert lr(0) == lr(79) == lr(80) == 1.0
    assert lr(90) == pytest.approx(0.5)
    assert lr(100) == 0.0


def test_lr_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="decay='step': expected 'cosine', 'linear' or 'constant'"):
        _lr(0, decay="step")
    with pytest.raises(ValueError, match=r"warmup_steps=200 must be in \[0, total_steps=110\]"):
        _lr(0, warmup_steps=200)
    with pytest.raises(ValueError, match=r"min_lr_fraction=1.5 must be in \[0, 1\]"):
        _lr(0, min_lr_fraction=1.5)
    with pytest.raises(
        ValueError, match=r"decay_steps=101 must be in \[0, total_steps - warmup_steps = 100\]"
    ):
        _lr(50, decay_steps=101)
    with pytest.raises(ValueError, match="step=-1 must be >= 0"):
        _lr(-1)


def test_sparsity_coefficient_warms_up_linearly_from_zero() -> None:
    assert sparsity_coefficient_at(0, final=5.0, warmup_steps=100) == 0.0
    assert sparsity_coefficient_at(25, final=5.0, warmup_steps=100) == pytest.approx(1.25)
    assert sparsity_coefficient_at(100, final=5.0, warmup_steps=100) == 5.0
    assert sparsity_coefficient_at(7, final=5.0, warmup_steps=0) == 5.0
    with pytest.raises(ValueError, match="final=-1 must be >= 0"):
        sparsity_coefficient_at(0, final=-1, warmup_steps=10)


def test_k_anneals_linearly_from_start_to_final_in_integers() -> None:
    ks = [k_at(step, k_start=128, k_final=32, anneal_steps=96) for step in range(0, 120, 12)]
    assert ks[0] == 128
    assert k_at(48, k_start=128, k_final=32, anneal_steps=96) == 80
    assert k_at(96, k_start=128, k_final=32, anneal_steps=96) == 32
    assert all(isinstance(k, int) for k in ks)
    assert all(a >= b for a, b in pairwise(ks)) and ks[-1] == 32
    assert k_at(0, k_start=32, k_final=32, anneal_steps=0) == 32
    with pytest.raises(ValueError, match=r"k_final=64 must be in \[1, k_start=32\]"):
        k_at(0, k_start=32, k_final=64, anneal_steps=10)
