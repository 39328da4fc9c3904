"""Failures a job stops with, each naming its cause in one line (the CLI prints it, exit 2)."""

from __future__ import annotations


class JobFailed(RuntimeError):
    """The job cannot go on; the message names what failed and why."""


class ProducerFailed(JobFailed):
    """Filling the cache stopped: a work unit failed too often, or no producer is left."""


class TrainingStopped(JobFailed):
    """Training stopped for a reason a restarted worker group would meet again at the same step
    (a damaged shard, NaN or Inf under ``train.nonfinite``): Ray Train does not retry it."""


class EvaluationFailed(JobFailed):
    """The evaluation task was lost (its process or node died) on every attempt."""
