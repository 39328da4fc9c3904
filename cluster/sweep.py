"""Sweeps: several dictionaries trained in one job on the same batches, read once.

``sweep.n_latents``, ``sweep.k``, ``sweep.sparsity_coefficient`` and ``sweep.lr`` each list values
that replace ``sae.*`` / ``train.lr``; the job trains one dictionary per combination (the
cartesian product of the non-empty lists). Every variant is validated as a whole ``SAEConfig``
when the config is composed, so ``sweep.k=[16,5000]`` with 4,608 latents fails before anything
starts. Each variant gets its own wandb run (grouped under the run name) and its own dictionary
under ``<run>/sweep/<variant>/dictionary/<hookpoint>/``.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from trainer.config import SAEConfig


@dataclass
class SweepConfig:
    """Values to sweep; empty lists sweep nothing, and with all empty the job trains one dictionary."""

    n_latents: list[int] = field(default_factory=list)
    """Widths, each replacing ``sae.n_latents``."""
    k: list[int] = field(default_factory=list)
    """Active latents per token (TopK family), each replacing ``sae.k``."""
    sparsity_coefficient: list[float] = field(default_factory=list)
    """L1 / L0 coefficients (penalised architectures), each replacing ``sae.sparsity_coefficient``."""
    lr: list[float] = field(default_factory=list)
    """Learning rates, each replacing ``train.lr``."""

    def __post_init__(self) -> None:
        for name in ("n_latents", "k", "sparsity_coefficient", "lr"):
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise ValueError(f"sweep.{name}={values}: a value is listed twice")
            if any(not v > 0 for v in values) and name != "sparsity_coefficient":
                raise ValueError(f"sweep.{name}={values}: every value must be positive")
            if any(v < 0 for v in values):
                raise ValueError(f"sweep.{name}={values}: every value must be >= 0")

    @property
    def active(self) -> bool:
        return any((self.n_latents, self.k, self.sparsity_coefficient, self.lr))


@dataclass(frozen=True)
class Variant:
    """One dictionary of a job: its name ('' when the job trains one), architecture and lr."""

    name: str
    sae: SAEConfig
    lr: float | None


_SHORT = {"n_latents": "n", "k": "k", "sparsity_coefficient": "c", "lr": "lr"}


def variants(sae: SAEConfig, lr: float | None, sweep: SweepConfig) -> list[Variant]:
    """The dictionaries a job trains, in a stable order; each SAE config is re-validated, so a
    bad combination raises the ``sae.*`` error, naming the variant."""
    if not sweep.active:
        return [Variant("", sae, lr)]
    axes = [(name, list(getattr(sweep, name))) for name in _SHORT if getattr(sweep, name)]
    result = []
    for values in itertools.product(*(vals for _, vals in axes)):
        chosen = dict(zip((name for name, _ in axes), values, strict=True))
        name = "-".join(f"{_SHORT[key]}{value:g}" if isinstance(value, float) else f"{_SHORT[key]}{value}"
                        for key, value in chosen.items())
        variant_lr = chosen.pop("lr", lr)
        try:
            variant_sae = dataclasses.replace(sae, **chosen)
        except ValueError as err:
            raise ValueError(f"sweep variant {name}: {err}") from None
        result.append(Variant(name, variant_sae, variant_lr))
    return result
