"""Typed configuration of the SAE and its training. YAML lives in ``conf/``; these are the schemas.

Closed choices are typed ``str`` and checked in ``__post_init__``: OmegaConf 2.3, which
Hydra uses to type-check the YAML, cannot represent ``Literal``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SAEConfig:
    """The sparse autoencoder's architecture."""

    architecture: str = "topk"
    """Activation function family. ``topk``: keep the k largest pre-activations per token."""
    n_latents: int = 4608
    """Number of dictionary features (the SAE's width, ``d_sae`` in SAELens)."""
    k: int = 32
    """Active latents per token for TopK-family SAEs."""
    normalize_activations: bool = True
    """Scale inputs so their mean norm is sqrt(d_model) (statistics from the cache manifest);
    the factor is folded into the saved weights, so the dictionary works on raw activations."""

    def __post_init__(self) -> None:
        if self.n_latents <= 0:
            raise ValueError(f"sae.n_latents={self.n_latents} must be positive")
        if not 0 < self.k <= self.n_latents:
            raise ValueError(f"sae.k={self.k} must be in [1, sae.n_latents={self.n_latents}]")
        if self.architecture != "topk":
            raise ValueError(f"sae.architecture={self.architecture!r}: expected one of ['topk']")


@dataclass
class TrainConfig:
    """How the SAE is trained."""

    batch_size: int = 1024
    """Tokens per optimizer step, summed over all data-parallel ranks."""
    lr: float | None = None
    """Adam learning rate; ``None`` picks 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024 scaling)."""
    epochs: int = 2
    """Passes over the training shards of the cache."""
    max_tokens: int | None = None
    """Stop after this many training tokens (all ranks together); ``None`` means all epochs."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage for data parallelism (optimizer state / gradients partitioned)."""
    precision: str = "fp32"
    """Compute precision; bf16 keeps fp32 master weights."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value before each step; 0 disables clipping."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    shuffle_buffer_rows: int = 16384
    """Rows held in each rank's shuffle buffer."""
    dead_after_tokens: int = 200_000
    """A latent that has not fired for this many tokens counts as dead."""
    log_every_steps: int = 10
    """Metrics are logged every this many optimizer steps."""
    holdout_fraction: float = 0.1
    """Fraction of the cache's shards held out for evaluation (at least one shard)."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"train.batch_size={self.batch_size} must be positive")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"train.lr={self.lr} must be positive")
        if self.epochs <= 0:
            raise ValueError(f"train.epochs={self.epochs} must be positive")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"train.max_tokens={self.max_tokens} must be positive or null")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"train.zero_stage={self.zero_stage} must be 0, 1 or 2")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision={self.precision!r}: expected 'fp32' or 'bf16'")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"train.max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables)")
        if self.shuffle_buffer_rows <= 0:
            raise ValueError(f"train.shuffle_buffer_rows={self.shuffle_buffer_rows} must be positive")
        if self.dead_after_tokens <= 0:
            raise ValueError(f"train.dead_after_tokens={self.dead_after_tokens} must be positive")
        if self.log_every_steps <= 0:
            raise ValueError(f"train.log_every_steps={self.log_every_steps} must be positive")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"train.holdout_fraction={self.holdout_fraction} must be in (0, 1)")

    def learning_rate(self, n_latents: int) -> float:
        """The configured lr, or the width-scaled default."""
        return self.lr if self.lr is not None else 2e-4 / (n_latents / 2**14) ** 0.5
