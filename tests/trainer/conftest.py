"""Shared helpers for the trainer tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# DeepSpeed picks its accelerator on first use; the trainer tests run on CPU with gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def sparse_feature_batches(
    *, d_in: int, n_features: int, active: int, batch_size: int, seed: int, offset: float = 0.3
) -> Iterator[torch.Tensor]:
    """Endless batches of tokens that are each a positive mix of ``active`` of ``n_features``
    random unit directions, plus a constant offset (something for ``b_dec`` to learn).

    Seed this differently from the SAE: the same seed would hand the SAE the true directions.
    """
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d_in, generator=generator)
    features /= features.norm(dim=1, keepdim=True)
    while True:
        chosen = torch.rand(batch_size, n_features, generator=generator).argsort(dim=1)[:, :active]
        coefficients = torch.rand(batch_size, active, generator=generator) + 0.5
        yield (coefficients.unsqueeze(-1) * features[chosen]).sum(dim=1) + offset


@pytest.fixture
def sparse_batches():
    """The ``sparse_feature_batches`` factory (a fixture, so test modules need not import conftest)."""
    return sparse_feature_batches
