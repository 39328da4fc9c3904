"""Failures a job stops with, each naming its cause in one line (the CLI prints it, exit 2)."""

from __future__ import annotations

import re
from collections.abc import Mapping


class JobFailed(RuntimeError):
    """The job cannot go on; the message names what failed and why."""


class ProducerFailed(JobFailed):
    """Filling the cache stopped: a work unit failed too often, or no producer is left."""


class TrainingStopped(JobFailed):
    """Training stopped for a reason a restarted worker group would meet again at the same step
    (a damaged shard, NaN or Inf under ``train.nonfinite``): Ray Train does not retry it."""


class EvaluationFailed(JobFailed):
    """The evaluation task was lost (its process or node died) on every attempt, or found no room
    on the cluster to start."""


def resources_text(resources: Mapping[str, float]) -> str:
    """"1 CPU", "2 CPUs and 1 GPU"."""
    return " and ".join(f"{n:g} {name}{'s' if n != 1 else ''}" for name, n in resources.items())


def no_room(what: str, timeout_s: float, resources: Mapping[str, float]) -> str:
    """One line on a wait for room that ran out: "no room on the cluster for the evaluation task
    (2 CPUs) in 600 s (cluster.placement_timeout_s=600); the cluster has 0 of 2 CPUs free now".
    ``what`` names the waiter and what it needs; ``resources`` are the kinds the line counts."""
    import ray  # here, not at the top: the CLI's help and config errors import this module without Ray

    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        have = " and ".join(f"{free.get(name, 0):g} of {total.get(name, 0):g} {name}s" for name in resources)
        now = f"the cluster has {have} free now"
    except Exception as err:  # noqa: BLE001 - the line is the failure's; what the cluster has is a detail
        now = f"what the cluster has free is unknown ({type(err).__name__})"
    return f"no room on the cluster for {what} in {timeout_s:.0f} s (cluster.placement_timeout_s={timeout_s:g}); {now}"


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


def one_line_cause(err: BaseException) -> str:
    """``StoreError: s3://b/k: put failed ...``: what a task raised (a RayTaskError's own first line
    is only ``ray::Producer.produce() (pid=...)``), what killed an actor (``lost_actor_reason``), or
    the first line of any other error (``WorkerCrashedError: ...``)."""
    import ray  # here, not at the top: the CLI's help and config errors import this module without Ray

    if isinstance(err, ray.exceptions.RayActorError):
        return lost_actor_reason(err)
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    shown = cause if isinstance(cause, BaseException) else err
    return f"{type(shown).__name__}: {next(iter(str(shown).strip().splitlines()), '')}"
