"""A metric logger that keeps what the training loop logs, for tests to read back."""

from __future__ import annotations

from trainer.loggers import NullLogger


class RecordingLogger(NullLogger):
    """Keeps each ``log`` call as ``(step, metrics)`` in ``records``; drops the rest."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))

    def losses(self) -> list[float]:
        """The logged loss of each logged step."""
        return [metrics["loss"] for _, metrics in self.records]
