"""Failures a job stops with, each naming its cause in one line (the CLI prints it, exit 2)."""

from __future__ import annotations

import re


class JobFailed(RuntimeError):
    """The job cannot go on; the message names what failed and why."""


class ProducerFailed(JobFailed):
    """Filling the cache stopped: a work unit failed too often, or no producer is left."""


class TrainingStopped(JobFailed):
    """Training stopped for a reason a restarted worker group would meet again at the same step
    (a damaged shard, NaN or Inf under ``train.nonfinite``): Ray Train does not retry it."""


class EvaluationFailed(JobFailed):
    """The evaluation task was lost (its process or node died) on every attempt."""


def lost_actor_reason(err: BaseException) -> str:
    """One short line on why an actor (a producer, a trainer worker) was lost, from Ray's error,
    whose own text runs to several lines of ids and RPC codes: "its node has died, ActorDiedError",
    "its process died, out of memory, ActorDiedError", "process or node lost, ActorUnavailableError",
    "its start failed: ValueError: ..." (its ``__init__`` raised)."""
    import ray  # here, not at the top: the CLI's help and config errors import this module without Ray

    if isinstance(err, ray.exceptions.ActorDiedError) and "error raised in its creation task" in str(err):
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"its start failed: {lines[-1]}"  # __init__'s exception, last of Ray's traceback
    if isinstance(err, ray.exceptions.ActorDiedError):
        died = re.search(r"(?:died|is dead) because (its [^.]+)", str(err))
        memory = ", out of memory" if "low on memory" in str(err) else ""
        return f"{died[1] if died else 'its process died'}{memory}, {type(err).__name__}"
    return f"process or node lost, {type(err).__name__}"
