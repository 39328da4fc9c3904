"""Producer actors: model replicas that turn work units into shards, and the loop that feeds them.

The driver holds the only copy of the manifest and commits it after every finished shard, so
a shard is visible exactly once, in the order work completes. Units already listed in the
manifest (a resumed cache) are skipped; units whose producer died are redone (``fill_cache``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from tqdm import tqdm

from activation_cache.config import ModelConfig
from activation_cache.hooking import MultiHarvester, load_model, resolve_model_source
from activation_cache.manifest import Manifest, commit_manifest
from activation_cache.producing import ShardResult, ShardTarget, WorkUnit, produce_shards
from activation_cache.schema import ShardMeta
from activation_cache.store import StoreFull, open_store
from cluster.errors import ProducerFailed

log = logging.getLogger(__name__)


class Producer:
    """One model replica. Ray wraps it as an actor in :func:`producer_factory`.

    ``caches`` maps each canonical hookpoint to the cache its shards go to (uri and shard
    metadata); one forward pass feeds them all."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        caches: dict[str, tuple[str, ShardMeta]],
        s3_options: dict,
        excluded_token_ids: frozenset[int],
        num_threads: int,
        compression: str | None = None,
    ):
        torch.set_num_threads(num_threads)
        self.model_cfg = model_cfg
        self.targets = {
            hookpoint: ShardTarget(open_store(uri, s3_options=s3_options), meta)
            for hookpoint, (uri, meta) in caches.items()
        }
        self.excluded = excluded_token_ids
        self.compression = compression
        model = load_model(resolve_model_source(model_cfg), dtype=model_cfg.dtype, device_map=model_cfg.device_map)
        self.harvester = MultiHarvester(model, list(caches))

    def ping(self) -> bool:
        """Answers once the actor is up (after a restart: once the model is loaded again)."""
        return True

    def produce(self, unit: WorkUnit, hookpoints: list[str]) -> dict[str, ShardResult]:
        """Write ``unit``'s shard to the cache of each of ``hookpoints`` (those still lacking it)."""
        return produce_shards(
            unit, harvester=self.harvester, targets={h: self.targets[h] for h in hookpoints},
            excluded_token_ids=self.excluded, batch_size=self.model_cfg.batch_size,
            compression=self.compression,
        )


@dataclass
class ProductionReport:
    """What one cache-filling pass did."""

    manifests: dict[str, Manifest]
    """The complete manifest of each hookpoint's cache."""
    units_produced: int
    tokens_forwarded: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_forwarded / self.seconds if self.seconds else 0.0


def producer_factory(
    *, num_cpus: float, max_restarts: int, num_gpus: float = 0, **producer_kwargs
) -> Callable[[], Any]:
    """A function that starts one producer actor, holding ``num_gpus`` GPUs (a replica split
    over several with ``model.device_map``) and ``num_cpus`` CPUs. Ray restarts a dead actor (killed, out of
    memory, node lost) up to ``max_restarts`` times, running ``__init__`` (the model load) again;
    tasks in flight when it died fail and are resubmitted by :func:`fill_cache`."""
    actor_cls = ray.remote(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=0
    )(Producer)
    threads = max(1, int(num_cpus))
    return lambda: actor_cls.remote(num_threads=threads, **producer_kwargs)


def _one_line_cause(err: Exception) -> str:
    """``StoreError: s3://b/k: put failed ...``: what the task raised (a RayTaskError's own first
    line is only ``ray::Producer.produce() (pid=...)``), or what killed the actor."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    shown = cause if isinstance(cause, BaseException) else err
    return f"{type(shown).__name__}: {next(iter(str(shown).strip().splitlines()), '')}"


def _alive(actor: Any, timeout_s: float) -> bool:
    """Whether ``actor`` answers, waiting out a restart (Ray reports a restarting actor as
    unavailable); False once it is dead for good or has not come back within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return bool(ray.get(actor.ping.remote(), timeout=max(deadline - time.monotonic(), 0.001)))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False


def fill_cache(
    *,
    producers: list,
    units: list[WorkUnit],
    manifests: dict[str, Manifest],
    cache_uris: dict[str, str],
    s3_options: dict,
    units_per_producer: int,
    make_producer: Callable[[], Any] | None = None,
    max_replacements: int = 0,
    max_unit_attempts: int = 3,
    restart_timeout_s: float = 600.0,
    log_every_s: float = 30.0,
    on_commit: Callable[[dict[str, Manifest], list], None] | None = None,
    before_commit: Callable[[str], None] | None = None,
) -> ProductionReport:
    """Hand ``units`` to ``producers`` (at most ``units_per_producer`` queued at each, which
    bounds memory) and commit each finished shard to its cache's manifest; mark the caches
    complete. ``manifests`` and ``cache_uris`` are keyed by hookpoint: one forward pass of a unit
    writes its shard to every cache whose manifest lacks it.

    A unit whose producer died, or whose task raised, goes back on the queue and is redone (its
    shard name is deterministic, so a shard written before the death is overwritten, and the
    manifest commits each unit once): every (sequence_id, position) ends up in the cache exactly
    once. A producer that Ray restarts keeps its slots; one dead for good is replaced by
    ``make_producer()``, at most ``max_replacements`` times. A unit that fails
    ``max_unit_attempts`` times (once, when the store is full), or running out of producers, stops the fill with
    ``ProducerFailed`` naming the unit and the cause; what was committed stays committed, so a
    rerun resumes. The replacements are killed on the way out, whatever the outcome; the caller
    owns ``producers``. ``on_commit(manifests, producers)`` runs after each unit's commits
    (progress, tests; an exception it raises stops the fill). ``before_commit(hookpoint)`` runs
    before each manifest write (the writer lease's check: an exception stops the fill uncommitted).
    Progress (shards, rows cached, tokens/s, ETA) goes to a tqdm bar and, every ``log_every_s``,
    to the log.
    """
    manifests = dict(manifests)
    stores = {h: open_store(uri, s3_options=s3_options) for h, uri in cache_uris.items()}
    done = {h: {s.name for s in m.shards} for h, m in manifests.items()}
    needs = {u.shard_name: [h for h in manifests if u.shard_name not in done[h]] for u in units}
    todo = [u for u in units if needs[u.shard_name]]
    start, forwarded = time.perf_counter(), 0
    producers = list(producers)
    pending: dict = {}
    idle = [actor for _ in range(units_per_producer) for actor in producers]
    busy: dict = {}
    attempts: Counter[str] = Counter()
    progress = tqdm(total=len(units), initial=len(units) - len(todo), desc="caching", unit="shard")
    queue = list(reversed(todo))
    next_log = time.monotonic() + log_every_s
    replacements: list = []  # started here, killed here
    try:
        while queue or pending:
            while queue and idle:
                actor, unit = idle.pop(), queue.pop()
                ref = actor.produce.remote(unit, needs[unit.shard_name])
                pending[ref], busy[ref] = unit, actor
            if not pending:
                raise ProducerFailed(f"no producer left to run {len(queue)} work units (all died; "
                                     f"{len(replacements)} replacements started)")
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            unit, actor = pending.pop(ref), busy.pop(ref)
            try:
                results: dict[str, ShardResult] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                attempts[unit.shard_name] += 1
                cause = _one_line_cause(err)
                if isinstance(getattr(err, "cause", None), StoreFull):  # no retry can help until space is freed
                    raise ProducerFailed(f"work unit {unit.shard_name}: {cause}") from err
                if attempts[unit.shard_name] >= max_unit_attempts:
                    raise ProducerFailed(
                        f"work unit {unit.shard_name} failed {attempts[unit.shard_name]} times; last cause {cause}"
                    ) from err
                log.warning("work unit %s failed (%s): queued again", unit.shard_name, cause)
                queue.append(unit)
                if isinstance(err, ray.exceptions.RayTaskError) or _alive(actor, restart_timeout_s):
                    idle.append(actor)
                    continue
                # Dead for good: its other queued tasks fail too and come back here; drop its slots.
                idle = [a for a in idle if a is not actor]
                if actor in producers:
                    ray.kill(actor, no_restart=True)  # were it only slow to come back: free its resources
                    producers.remove(actor)
                    if make_producer is not None and len(replacements) < max_replacements:
                        replacement = make_producer()
                        replacements.append(replacement)
                        producers.append(replacement)
                        idle += [replacement] * units_per_producer
                        log.warning("a producer died for good: started replacement %d of %d",
                                    len(replacements), max_replacements)
                continue
            idle.append(actor)
            for hookpoint, result in results.items():
                manifests[hookpoint] = manifests[hookpoint].with_shard(result.entry, result.stats)
                if before_commit is not None:
                    before_commit(hookpoint)
                commit_manifest(stores[hookpoint], manifests[hookpoint])
            forwarded += next(iter(results.values())).tokens_forwarded
            progress.update(1)
            elapsed = time.perf_counter() - start
            rate = forwarded / elapsed
            progress.set_postfix(tokens=forwarded, tokens_per_s=f"{rate:.0f}")
            if time.monotonic() >= next_log or not queue and not pending:  # for logs that are not a terminal
                left = sum(u.tokens.size for u in queue) + sum(u.tokens.size for u in pending.values())
                log.info("cache: %d of %d units, %d rows cached per hookpoint, %.0f tokens/s, ETA %.0f s",
                         len(units) - len(queue) - len(pending), len(units),
                         min(m.rows for m in manifests.values()), rate, left / rate if rate else float("nan"))
                next_log = time.monotonic() + log_every_s
            if on_commit is not None:
                on_commit(manifests, producers)
    finally:
        progress.close()
        for actor in replacements:
            ray.kill(actor)
    for hookpoint, manifest in manifests.items():
        manifest.complete = True
        if before_commit is not None:
            before_commit(hookpoint)
        commit_manifest(stores[hookpoint], manifest)
    return ProductionReport(manifests, len(todo), forwarded, time.perf_counter() - start)
