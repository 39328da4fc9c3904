"""Dead-latent statistics and reconstruction metrics. Pure torch; the caller does any all-reduce."""

from __future__ import annotations

import torch
from torch import Tensor


def latent_fire_counts(latent_indices: Tensor, latent_acts: Tensor, n_latents: int) -> Tensor:
    """(n_latents,) int64 on the indices' device: how many tokens each latent fired on (selected
    with a positive value).

    A latent TopK selected with activation 0 (fewer than k positive pre-activations) did not fire.
    """
    fired = latent_indices[latent_acts > 0]
    return torch.bincount(fired.flatten().long(), minlength=n_latents)


class DeadLatentTracker:
    """Tokens since each latent last fired, and how often each fired, over a stream of batches.

    Counts are per latent and additive over batches; in data-parallel training the caller sums the
    per-batch ``fire_counts`` across ranks before ``update_counts`` so every rank holds the same state.
    """

    def __init__(self, n_latents: int) -> None:
        if n_latents <= 0:
            raise ValueError(f"n_latents={n_latents} must be positive")
        self.n_latents = n_latents
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.int64)
        self.fire_counts = torch.zeros(n_latents, dtype=torch.int64)
        self.n_tokens = 0

    def update_counts(self, fire_counts: Tensor, *, n_tokens: int) -> None:
        """Account for ``n_tokens`` tokens on which latent i fired ``fire_counts[i]`` times."""
        if fire_counts.shape != (self.n_latents,):
            raise ValueError(
                f"fire_counts shape {tuple(fire_counts.shape)} must be (n_latents={self.n_latents},)"
            )
        fire_counts = fire_counts.to(device="cpu", dtype=torch.int64)
        self.tokens_since_fired += n_tokens
        # Within one batch the order of tokens is unknown: a latent that fired counts as just fired.
        self.tokens_since_fired[fire_counts > 0] = 0
        self.fire_counts += fire_counts
        self.n_tokens += n_tokens

    def dead_mask(self, threshold_tokens: int) -> Tensor:
        """(n_latents,) bool: latents that have not fired in the last ``threshold_tokens`` tokens."""
        return self.tokens_since_fired >= threshold_tokens

    def dead_fraction(self, threshold_tokens: int) -> float:
        """Fraction of latents that have not fired in the last ``threshold_tokens`` tokens."""
        return self.dead_mask(threshold_tokens).float().mean().item()

    def frequencies(self) -> Tensor:
        """(n_latents,) float32: fraction of all tokens seen on which each latent fired."""
        return self.fire_counts.float() / max(self.n_tokens, 1)

    def state_dict(self) -> dict[str, Tensor]:
        """Counters for a checkpoint."""
        return {
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "fire_counts": self.fire_counts.clone(),
            "n_tokens": torch.tensor(self.n_tokens, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore counters saved by ``state_dict``."""
        if state["fire_counts"].shape != (self.n_latents,):
            raise ValueError(
                f"checkpointed dead-latent counters have {state['fire_counts'].shape[0]} latents, "
                f"tracker has n_latents={self.n_latents}"
            )
        self.tokens_since_fired = state["tokens_since_fired"].clone().to(torch.int64)
        self.fire_counts = state["fire_counts"].clone().to(torch.int64)
        self.n_tokens = int(state["n_tokens"])


class PooledReconstructionStats:
    """Reconstruction figures over many batches as if they were one: FVU is the total squared error
    over the total variance around the pooled mean, not an average of per-batch FVUs.

    The variance is merged batch by batch (Chan et al.'s parallel update) in float64, so it neither
    needs the whole set in memory nor loses precision to ``sum(x^2) - n mean^2`` cancellation.
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self.n_elements = 0
        self.squared_error = 0.0
        self.firing_latents = 0
        self.cosine_sum = 0.0
        self.mean: Tensor | None = None
        self.m2 = 0.0

    @torch.no_grad()
    def update(self, x: Tensor, reconstruction: Tensor, latent_acts: Tensor) -> None:
        """Add a batch: inputs and reconstructions (B, d_in), latent values (B, k)."""
        x64 = x.double()
        n_batch = x64.shape[0]
        batch_mean = x64.mean(dim=0)
        batch_m2 = (x64 - batch_mean).pow(2).sum().item()
        if self.mean is None:
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            n_total = self.n_tokens + n_batch
            delta = batch_mean - self.mean
            self.m2 += batch_m2 + delta.pow(2).sum().item() * self.n_tokens * n_batch / n_total
            self.mean = self.mean + delta * (n_batch / n_total)
        self.n_tokens += n_batch
        self.n_elements += x64.numel()
        self.squared_error += (reconstruction.double() - x64).pow(2).sum().item()
        self.firing_latents += int((latent_acts > 0).sum().item())
        self.cosine_sum += torch.cosine_similarity(reconstruction.double(), x64, dim=-1).sum().item()

    def result(self) -> dict[str, float]:
        """mse (per element), fvu (pooled), l0, cosine (mean per token), n_tokens."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were evaluated: the held-out batches were empty")
        return {
            "fvu": self.squared_error / self.m2 if self.m2 > 0 else float("nan"),
            "mse": self.squared_error / self.n_elements,
            "l0": self.firing_latents / self.n_tokens,
            "cosine": self.cosine_sum / self.n_tokens,
            "n_tokens": self.n_tokens,
        }


def output_fire_counts(latent_acts: Tensor, latent_indices: Tensor | None, n_latents: int) -> Tensor:
    """``latent_fire_counts`` for any architecture's output: (B, k) acts with (B, k) indices, or
    (B, n_latents) dense acts with ``latent_indices=None`` (ReLU, JumpReLU, BatchTopK)."""
    if latent_indices is not None:
        return latent_fire_counts(latent_indices, latent_acts, n_latents)
    if latent_acts.shape[-1] != n_latents:
        raise ValueError(
            f"dense latent_acts shape {tuple(latent_acts.shape)} must end in n_latents={n_latents}"
        )
    return (latent_acts > 0).reshape(-1, n_latents).sum(dim=0, dtype=torch.int64)


def dense_fraction(frequencies: Tensor, threshold: float = 0.1) -> float:
    """Fraction of latents firing on more than ``threshold`` of tokens (dense latents)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in [0, 1]")
    if frequencies.numel() == 0:
        raise ValueError("frequencies is empty")
    return (frequencies > threshold).float().mean().item()


# SAELens logs firing frequencies as log10(frequency + 1e-10): never-firing latents land at -10.
_LOG_FREQUENCY_EPS = 1e-10


def firing_histogram(frequencies: Tensor, bins: int | Tensor = 50) -> tuple[Tensor, Tensor]:
    """Histogram of log10(frequency + 1e-10) over latents: (counts, edges), as ``torch.histogram``.

    ``bins`` is a number of equal bins between the smallest and largest value, or the edges
    (e.g. ``torch.linspace(-10, 0, 51)``). Latents that never fired count at -10.
    """
    if frequencies.numel() == 0:
        raise ValueError("frequencies is empty")
    if isinstance(bins, int) and bins <= 0:
        raise ValueError(f"bins={bins} must be positive")
    values = torch.log10(frequencies.detach().double().cpu().flatten() + _LOG_FREQUENCY_EPS).float()
    edges = bins.detach().float().cpu() if isinstance(bins, Tensor) else bins
    counts, edges = torch.histogram(values, bins=edges)
    return counts, edges
