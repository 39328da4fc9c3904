"""Metric loggers. Rank-0 gating lives in ``make_logger`` only; call sites never branch on it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Protocol

from torch import Tensor

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    """Where training and evaluation figures go."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at optimizer step ``step``."""
        ...

    def log_histogram(self, name: str, values: Tensor, step: int) -> None:
        """Record the distribution of ``values`` (e.g. log10 firing frequencies) at ``step``."""
        ...

    def log_artifact(self, name: str, files: dict[str, bytes], *, type: str = "report") -> None:
        """Upload ``files`` (name -> bytes) as a new version of artifact ``name``."""
        ...

    def finish(self) -> None:
        """Flush and close; no ``log`` after this."""
        ...


class NullLogger:
    """Drops everything: the logger of every rank but 0, and of runs without wandb."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_histogram(self, name: str, values: Tensor, step: int) -> None:
        pass

    def log_artifact(self, name: str, files: dict[str, bytes], *, type: str = "report") -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """Logs to wandb. ``mode="offline"`` writes under ``dir`` without any network access
    (``wandb sync`` uploads later); ``"disabled"`` makes every call a no-op inside wandb
    (``make_logger`` gives a ``NullLogger`` instead: no run at all)."""

    def __init__(
        self,
        project: str,
        run_name: str,
        config: dict[str, Any],
        dir: str,
        mode: Literal["offline", "online", "disabled"],
        group: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb mode={mode!r}: expected 'offline', 'online' or 'disabled'")
        import wandb  # lazily: importing wandb costs about a second and most ranks never need it

        self._wandb = wandb
        # wandb looks for the git repository holding ``dir`` and, where ``dir`` does not exist
        # yet, warns "git root ... does not exist" on the console.
        Path(dir).mkdir(parents=True, exist_ok=True)
        # create_new: a sweep holds one run per dictionary open at once in this process.
        self._run = wandb.init(
            project=project, name=run_name, config=config, dir=dir, mode=mode, group=group, reinit="create_new"
        )
        where = self._run.url if mode == "online" else self._run.dir
        log.info("wandb run %s (%s): %s", run_name, mode, where)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def log_histogram(self, name: str, values: Tensor, step: int) -> None:
        self._run.log({name: self._wandb.Histogram(values.detach().float().cpu().numpy(), num_bins=64)}, step=step)

    def log_artifact(self, name: str, files: dict[str, bytes], *, type: str = "report") -> None:
        artifact = self._wandb.Artifact(name, type=type)
        for file_name, data in sorted(files.items()):
            with artifact.new_file(file_name, mode="wb") as f:
                f.write(data)
        self._run.log_artifact(artifact)

    def finish(self) -> None:
        self._run.finish()


def make_logger(
    *,
    rank: int,
    wandb_mode: Literal["offline", "online", "disabled"] | None,
    project: str = "saeforge",
    run_name: str = "",
    config: dict[str, Any] | None = None,
    dir: str = ".",
    group: str | None = None,
) -> MetricLogger:
    """The metric logger for this rank: wandb on rank 0 when ``wandb_mode`` is ``offline`` or
    ``online``, else NullLogger (``disabled`` starts no wandb run, which would still look for a git
    repository and print about it)."""
    if rank != 0 or wandb_mode in (None, "disabled"):
        return NullLogger()
    return WandbLogger(project, run_name, config or {}, dir, wandb_mode, group=group)
