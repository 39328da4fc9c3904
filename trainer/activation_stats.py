"""The held-out statistics a dictionary folder records: the mean and variance of a hookpoint's
activations, per dimension (what a token's relative error is measured against), and each feature's
largest activation (what a steer's ``--value 10x`` is a multiple of).

The training job accumulates them over every held-out row it evaluates on and writes them into the
dictionary folder (``trainer.layout.ACTIVATION_STATS_FILE``); ``observe`` divides a token's squared
reconstruction error by their ``total_variance``. With that denominator the mean of the tokens'
relative errors over the held-out rows is the pooled FVU that ``trainer.loop.evaluate`` reports.

The file is safetensors: ``mean`` and ``variance`` (d,) in float32, raw activation units (not
multiplied by the training's input scale), the variance the population one (divided by
``n_tokens``), and ``metadata["n_tokens"]`` as a decimal string.

The feature maxima (``trainer.layout.FEATURE_STATS_FILE``) are collected by the same evaluation
(``FeatureMaxima``, through ``evaluate(..., feature_max=)``). They are in the units of the saved
dictionary's feature activations on raw activations, what ``observe`` shows and a steer's clamp
value means. The evaluation encodes ``x * scale`` with the unfolded SAE, and the fold leaves the
pre-activations unchanged (``(x s - b_dec) W_enc + b_enc == (x - b_dec / s)(s W_enc) + b_enc``,
``SparseCoder.folded_weights``), so its activations are already those units: nothing is divided.
The file is safetensors: ``max_activation`` (n_latents,) float32, 0 for a feature that never
fired, and ``metadata["n_tokens"]``, the rows it was taken over.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

__all__ = [
    "ActivationStats",
    "FeatureMaxima",
    "FeatureStats",
    "RunningMoments",
    "activation_stats_file",
    "feature_stats_file",
    "load_activation_stats",
    "load_feature_stats",
]


@dataclass(frozen=True)
class ActivationStats:
    """Per-dimension moments of a set of activation rows."""

    mean: Tensor
    """(d,) float64: the mean row, in raw activation units."""
    variance: Tensor
    """(d,) float64: each dimension's population variance (divided by ``n_tokens``)."""
    n_tokens: int
    """How many rows they were computed on (rows with NaN or Inf left out)."""

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.variance.shape != self.mean.shape:
            raise ValueError(f"mean shape {tuple(self.mean.shape)} and variance shape "
                             f"{tuple(self.variance.shape)} must be the same (d,)")
        if self.n_tokens <= 0:
            raise ValueError(f"n_tokens={self.n_tokens} must be positive")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.variance).all()):
            raise ValueError("mean and variance must be finite, but hold NaN or Inf")
        if (self.variance < 0).any():
            raise ValueError(f"variance must be >= 0, but its smallest value is {self.variance.min().item():.6g}")

    @property
    def d_model(self) -> int:
        """The width of a row."""
        return self.mean.shape[0]

    @property
    def total_variance(self) -> float:
        """``variance.sum()``: a row's mean squared distance to the mean row, the pooled FVU's
        denominator per token."""
        return self.variance.double().sum().item()

    def relative_error(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        """Each row's squared error ``||x - reconstruction||^2`` over ``total_variance``; (..., d)
        rows in, (...) float64 out. Averaged over the rows these stats describe, it is their FVU."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"rows of width {x.shape[-1]} but the activation stats have d={self.d_model}")
        squared_error = (x.double() - reconstruction.double()).pow(2).sum(dim=-1)
        return squared_error / self.total_variance

    @classmethod
    def of(cls, rows: Tensor) -> ActivationStats:
        """The stats of (..., d) ``rows`` at once (rows with NaN or Inf left out), for a dictionary
        whose folder has none."""
        moments = RunningMoments()
        moments.update(rows)
        return moments.result()


class RunningMoments:
    """Per-dimension mean and variance over many batches of rows as if they were one.

    Merged batch by batch in float64 with Chan et al.'s parallel update (the same as
    ``trainer.metrics.PooledReconstructionStats`` does for the pooled variance), so neither the
    whole set in memory nor ``E[x^2] - E[x]^2`` cancellation. Rows holding NaN or Inf are left out
    and counted, as ``trainer.loop.evaluate`` leaves them out of its figures.
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self.nonfinite_rows_skipped = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None  # per dimension: sum of squared deviations from the mean

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Add a batch of (..., d) rows."""
        x = rows.detach().reshape(-1, rows.shape[-1]).double()
        finite = torch.isfinite(x).all(dim=-1)
        if not finite.all():
            self.nonfinite_rows_skipped += int((~finite).sum().item())
            x = x[finite]
        n_batch = x.shape[0]
        if n_batch == 0:
            return
        if self._mean is not None and x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"rows of width {x.shape[1]} after rows of width {self._mean.shape[0]}")
        batch_mean = x.mean(dim=0)
        batch_m2 = (x - batch_mean).pow(2).sum(dim=0)
        if self._mean is None:
            self._mean, self._m2 = batch_mean, batch_m2
        else:
            n_total = self.n_tokens + n_batch
            delta = batch_mean - self._mean
            self._m2 = self._m2 + batch_m2 + delta.pow(2) * (self.n_tokens * n_batch / n_total)
            self._mean = self._mean + delta * (n_batch / n_total)
        self.n_tokens += n_batch

    def pass_through(self, batches: Iterable[Tensor]) -> Iterator[Tensor]:
        """Yield each of ``batches`` unchanged, having added it: the rows another consumer reads
        (the held-out evaluation) are counted here without being read twice."""
        for batch in batches:
            self.update(batch)
            yield batch

    def result(self) -> ActivationStats:
        """The stats of every finite row added so far."""
        if self._mean is None:
            raise ValueError(f"no finite rows to compute activation stats on "
                             f"({self.nonfinite_rows_skipped} rows with NaN or Inf skipped)")
        return ActivationStats(self._mean.clone(), self._m2 / self.n_tokens, self.n_tokens)


def activation_stats_file(stats: ActivationStats) -> bytes:
    """The activation stats file's bytes (see the module docstring)."""
    tensors = {"mean": stats.mean.float().cpu().contiguous(), "variance": stats.variance.float().cpu().contiguous()}
    return save_safetensors(tensors, metadata={"n_tokens": str(stats.n_tokens)})


def load_activation_stats(data: bytes) -> ActivationStats:
    """The stats an activation stats file holds (float64 in memory); a one-line ValueError says
    what is wrong with a malformed one."""
    try:
        tensors = load_safetensors(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"activation stats: {len(data)} bytes that are not a safetensors file ({e})") from None
    missing = sorted({"mean", "variance"} - tensors.keys())
    if missing:
        raise ValueError(f"activation stats: no tensor {missing[0]!r} (it holds {sorted(tensors)})")
    n_tokens = metadata.get("n_tokens", "")
    if not n_tokens.isdecimal():
        raise ValueError(f"activation stats: metadata n_tokens={n_tokens!r}, expected a positive integer")
    try:
        return ActivationStats(tensors["mean"].double(), tensors["variance"].double(), int(n_tokens))
    except ValueError as e:
        raise ValueError(f"activation stats: {e}") from None


@dataclass(frozen=True)
class FeatureStats:
    """Each feature's largest activation over a set of rows."""

    max_activation: Tensor
    """(n_latents,) float32: each feature's largest activation, in the saved dictionary's units on
    raw activations; 0 for a feature that never fired."""
    n_tokens: int
    """How many rows they were taken over (rows with NaN or Inf left out)."""

    def __post_init__(self) -> None:
        if self.max_activation.ndim != 1:
            raise ValueError(f"max_activation shape {tuple(self.max_activation.shape)} must be (n_latents,)")
        if self.n_tokens <= 0:
            raise ValueError(f"n_tokens={self.n_tokens} must be positive")
        if not torch.isfinite(self.max_activation).all():
            raise ValueError("max_activation must be finite, but holds NaN or Inf")
        if (self.max_activation < 0).any():
            raise ValueError(f"max_activation must be >= 0, but its smallest value is "
                             f"{self.max_activation.min().item():.6g}")

    @property
    def n_latents(self) -> int:
        return self.max_activation.shape[0]


class FeatureMaxima:
    """Each latent's largest activation over many batches of codes, kept on the codes' device so
    the evaluation it rides along never waits on the host."""

    def __init__(self, n_latents: int) -> None:
        if n_latents <= 0:
            raise ValueError(f"n_latents={n_latents} must be positive")
        self.n_latents = n_latents
        self.n_tokens = 0
        self._max: Tensor | None = None  # allocated on the first batch's device

    @torch.no_grad()
    def update(self, acts: Tensor, indices: Tensor | None) -> None:
        """Add one batch's code (``trainer.sae.Code`` / ``ForwardOutput``): (..., k) ``acts`` at
        (..., k) ``indices``, or dense (..., n_latents) ``acts`` with ``indices=None``."""
        if self._max is None:
            self._max = torch.zeros(self.n_latents, dtype=torch.float32, device=acts.device)
        values = acts.detach().float()
        if indices is not None:
            if indices.shape != acts.shape:
                raise ValueError(f"indices shape {tuple(indices.shape)} differs from acts shape {tuple(acts.shape)}")
            self._max.scatter_reduce_(0, indices.reshape(-1), values.reshape(-1), reduce="amax")
        else:
            if acts.shape[-1] != self.n_latents:
                raise ValueError(f"dense acts shape {tuple(acts.shape)} must end in n_latents={self.n_latents}")
            values = values.reshape(-1, self.n_latents)
            if len(values):
                torch.maximum(self._max, values.amax(dim=0), out=self._max)
        self.n_tokens += acts.numel() // acts.shape[-1]

    def result(self) -> FeatureStats:
        """The maxima over every row added so far."""
        if self._max is None or self.n_tokens == 0:
            raise ValueError("no rows to take feature maxima over")
        return FeatureStats(self._max.cpu().clone(), self.n_tokens)


def feature_stats_file(stats: FeatureStats) -> bytes:
    """The feature stats file's bytes (see the module docstring)."""
    tensors = {"max_activation": stats.max_activation.float().cpu().contiguous()}
    return save_safetensors(tensors, metadata={"n_tokens": str(stats.n_tokens)})


def load_feature_stats(data: bytes) -> FeatureStats:
    """The maxima a feature stats file holds; a one-line ValueError says what is wrong with a
    malformed one."""
    try:
        tensors = load_safetensors(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"feature stats: {len(data)} bytes that are not a safetensors file ({e})") from None
    if "max_activation" not in tensors:
        raise ValueError(f"feature stats: no tensor 'max_activation' (it holds {sorted(tensors)})")
    n_tokens = metadata.get("n_tokens", "")
    if not n_tokens.isdecimal():
        raise ValueError(f"feature stats: metadata n_tokens={n_tokens!r}, expected a positive integer")
    try:
        return FeatureStats(tensors["max_activation"].float(), int(n_tokens))
    except ValueError as e:
        raise ValueError(f"feature stats: {e}") from None


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # safetensors reads metadata from files only: the header is an 8-byte little-endian length,
    # then that many bytes of JSON whose "__metadata__" holds the string map.
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_size])
    return header.get("__metadata__") or {}
