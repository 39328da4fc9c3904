"""Synthetic activations with a known dictionary.

Sparse superposition: many more unit feature directions than dimensions, each firing independently
with a power-law frequency and a nonnegative magnitude; a token is the sum of its firing features,
plus a constant offset and optional Gaussian noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor


class SyntheticBatch(NamedTuple):
    """Tokens and the ground truth that produced them."""

    x: Tensor
    """(N, d_in) float32 activations."""
    coefficients: Tensor
    """(N, n_features) float32 magnitude of each feature in each token (0 where it did not fire)."""


class SparseFeatureData:
    """A generator of tokens from ``n_features`` ground-truth directions in ``d_in`` dimensions.

    Feature i fires on a token with probability ``p_i ∝ (i + 1) ** -frequency_exponent``, scaled
    so that ``mean_active`` features fire per token on average (probabilities capped at 1, which
    lowers the mean if the scaling would exceed it). A firing feature has a magnitude uniform in
    ``magnitude_range``. ``offset_norm`` sets the norm of a constant random offset added to every
    token (something for ``b_dec`` to learn); ``noise_std`` adds isotropic Gaussian noise.

    All randomness comes from one ``torch.Generator`` seeded from a hash of ``seed``, never
    ``seed`` itself: ``torch.Generator().manual_seed(s)`` gives the same stream as an SAE
    initialised with seed s, which would start the SAE at the true directions.
    """

    def __init__(
        self,
        *,
        d_in: int,
        n_features: int,
        mean_active: float,
        seed: int,
        frequency_exponent: float = 0.5,
        magnitude_range: tuple[float, float] = (0.5, 1.5),
        offset_norm: float = 0.0,
        noise_std: float = 0.0,
    ) -> None:
        if d_in <= 0 or n_features <= 0:
            raise ValueError(f"d_in={d_in} and n_features={n_features} must be positive")
        if not 0 < mean_active <= n_features:
            raise ValueError(f"mean_active={mean_active} must be in (0, n_features={n_features}]")
        low, high = magnitude_range
        if not 0 <= low <= high:
            raise ValueError(f"magnitude_range={magnitude_range} must satisfy 0 <= low <= high")
        if noise_std < 0 or offset_norm < 0:
            raise ValueError(f"noise_std={noise_std} and offset_norm={offset_norm} must be >= 0")
        self.d_in = d_in
        self.n_features = n_features
        self.magnitude_range = (float(low), float(high))
        self.noise_std = noise_std
        self.generator = torch.Generator().manual_seed(_data_seed(seed))

        features = torch.randn(n_features, d_in, generator=self.generator)
        self.features = features / features.norm(dim=1, keepdim=True)
        """(n_features, d_in) the true unit directions."""
        weights = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-frequency_exponent)
        self.frequencies = (weights * mean_active / weights.sum()).clamp(max=1.0).float()
        """(n_features,) each feature's firing probability per token."""
        offset = torch.randn(d_in, generator=self.generator)
        self.offset = offset * (offset_norm / offset.norm())
        """(d_in,) the constant added to every token."""

    def sample(self, n_tokens: int) -> SyntheticBatch:
        """``n_tokens`` fresh tokens and their feature coefficients."""
        fires = torch.rand(n_tokens, self.n_features, generator=self.generator) < self.frequencies
        low, high = self.magnitude_range
        magnitudes = low + (high - low) * torch.rand(
            n_tokens, self.n_features, generator=self.generator
        )
        coefficients = magnitudes * fires
        x = coefficients @ self.features + self.offset
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(n_tokens, self.d_in, generator=self.generator)
        return SyntheticBatch(x, coefficients)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Endless batches of (batch_size, d_in) tokens."""
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        while True:
            yield self.sample(batch_size).x


def _data_seed(seed: int) -> int:
    digest = hashlib.sha256(f"saeforge.synthetic:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
