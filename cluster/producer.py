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
from dataclasses import dataclass, field
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
from cluster.timing import process_started

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
        start = time.time()
        model = load_model(resolve_model_source(model_cfg), dtype=model_cfg.dtype, device_map=model_cfg.device_map)
        self.harvester = MultiHarvester(model, list(caches))
        self.loaded = ProducerLoad(process_started(), start, time.time())

    def ping(self) -> bool:
        """Answers once the actor is up (after a restart: once the model is loaded again)."""
        return True

    def load_times(self) -> ProducerLoad:
        return self.loaded

    def produce(self, unit: WorkUnit, hookpoints: list[str]) -> dict[str, ShardResult]:
        """Write ``unit``'s shard to the cache of each of ``hookpoints`` (those still lacking it)."""
        return produce_shards(
            unit, harvester=self.harvester, targets={h: self.targets[h] for h in hookpoints},
            excluded_token_ids=self.excluded, batch_size=self.model_cfg.batch_size,
            compression=self.compression,
        )


@dataclass
class ProducerLoad:
    """When a producer's process started, its model load began and ended (``time.time()``)."""

    process_started: float
    load_started: float
    ready: float


@dataclass
class ProductionReport:
    """What one cache-filling pass did."""

    manifests: dict[str, Manifest]
    """The complete manifest of each hookpoint's cache."""
    units_produced: int
    tokens_forwarded: int
    seconds: float
    loads: list[ProducerLoad] = field(default_factory=list)
    """The model loads of the producers the fill started with (those that answered)."""
    started: float = 0.0
    """When the producers were created (``time.time()``)."""
    finished: float = 0.0

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


class _Caches:
    """The manifest of each hookpoint's cache, held here only, committed after every finished unit."""

    def __init__(self, manifests: dict[str, Manifest], cache_uris: dict[str, str], s3_options: dict,
                 before_commit: Callable[[str], None] | None):
        self.manifests = dict(manifests)
        self.stores = {h: open_store(uri, s3_options=s3_options) for h, uri in cache_uris.items()}
        self.before_commit = before_commit
        self.committed = {h: {s.name for s in m.shards} for h, m in self.manifests.items()}

    def lacking(self, unit: WorkUnit) -> list[str]:
        """The hookpoints whose cache does not list ``unit``'s shard yet."""
        return [h for h in self.manifests if unit.shard_name not in self.committed[h]]

    def commit(self, results: dict[str, ShardResult]) -> None:
        for hookpoint, result in results.items():
            self.manifests[hookpoint] = self.manifests[hookpoint].with_shard(result.entry, result.stats)
            self._write(hookpoint)

    def mark_complete(self) -> None:
        for hookpoint, manifest in self.manifests.items():
            manifest.complete = True
            self._write(hookpoint)

    def rows_per_hookpoint(self) -> int:
        return min(m.rows for m in self.manifests.values())

    def _write(self, hookpoint: str) -> None:
        if self.before_commit is not None:
            self.before_commit(hookpoint)
        commit_manifest(self.stores[hookpoint], self.manifests[hookpoint])


class _ProducerPool:
    """The producers and their free task slots (``units_per_producer`` each). A producer dead for
    good loses its slots and is replaced, at most ``max_replacements`` times; the replacements
    are this pool's to kill (``kill_replacements``), the producers it was given the caller's."""

    def __init__(self, producers: list, *, units_per_producer: int, make_producer: Callable[[], Any] | None,
                 max_replacements: int, restart_timeout_s: float):
        self.producers = list(producers)
        self.units_per_producer = units_per_producer
        self.make_producer = make_producer
        self.max_replacements = max_replacements
        self.restart_timeout_s = restart_timeout_s
        self.free_slots = [actor for _ in range(units_per_producer) for actor in self.producers]
        self.replacements: list = []

    def release(self, actor: Any) -> None:
        self.free_slots.append(actor)

    def after_failure(self, actor: Any, err: Exception) -> None:
        """Give the slot back if ``actor`` still answers (its task raised, or Ray restarted it);
        otherwise retire it."""
        if isinstance(err, ray.exceptions.RayTaskError) or _alive(actor, self.restart_timeout_s):
            self.free_slots.append(actor)
        else:
            self._retire(actor)

    def _retire(self, actor: Any) -> None:
        # Dead for good: its other queued tasks fail too and come back here; drop its slots.
        self.free_slots = [a for a in self.free_slots if a is not actor]
        if actor not in self.producers:  # retired already, by one of its other tasks
            return
        ray.kill(actor, no_restart=True)  # were it only slow to come back: free its resources
        self.producers.remove(actor)
        if self.make_producer is not None and len(self.replacements) < self.max_replacements:
            replacement = self.make_producer()
            self.replacements.append(replacement)
            self.producers.append(replacement)
            self.free_slots += [replacement] * self.units_per_producer
            log.warning("a producer died for good: started replacement %d of %d",
                        len(self.replacements), self.max_replacements)

    def kill_replacements(self) -> None:
        for actor in self.replacements:
            ray.kill(actor)


class _WorkQueue:
    """Units waiting, units in flight (with the producer running each), and the failures of each."""

    def __init__(self, todo: list[WorkUnit], caches: _Caches, max_unit_attempts: int):
        self.waiting = list(reversed(todo))  # popped from the end: the first unit goes first
        self.in_flight: dict[Any, tuple[WorkUnit, Any]] = {}  # task ref -> (unit, producer)
        self.hookpoints = {u.shard_name: caches.lacking(u) for u in todo}
        self.attempts: Counter[str] = Counter()
        self.max_unit_attempts = max_unit_attempts

    def __bool__(self) -> bool:
        return bool(self.waiting or self.in_flight)

    def dispatch(self, pool: _ProducerPool) -> None:
        """Hand waiting units to free slots; ``ProducerFailed`` when nothing is left to run them."""
        while self.waiting and pool.free_slots:
            actor, unit = pool.free_slots.pop(), self.waiting.pop()
            self.in_flight[actor.produce.remote(unit, self.hookpoints[unit.shard_name])] = (unit, actor)
        if not self.in_flight:
            raise ProducerFailed(f"no producer left to run {len(self.waiting)} work units (all died; "
                                 f"{len(pool.replacements)} replacements started)")

    def next_finished(self) -> tuple[Any, WorkUnit, Any]:
        """(task ref, unit, producer) of the first task to end, well or not."""
        [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
        unit, actor = self.in_flight.pop(ref)
        return ref, unit, actor

    def retry(self, unit: WorkUnit, err: Exception) -> None:
        """Queue ``unit`` again after ``err``; ``ProducerFailed`` at once for a full store (no
        retry helps until space is freed) and after ``max_unit_attempts`` failures."""
        self.attempts[unit.shard_name] += 1
        cause = _one_line_cause(err)
        if isinstance(getattr(err, "cause", None), StoreFull):
            raise ProducerFailed(f"work unit {unit.shard_name}: {cause}") from err
        if self.attempts[unit.shard_name] >= self.max_unit_attempts:
            raise ProducerFailed(
                f"work unit {unit.shard_name} failed {self.attempts[unit.shard_name]} times; last cause {cause}"
            ) from err
        log.warning("work unit %s failed (%s): queued again", unit.shard_name, cause)
        self.waiting.append(unit)

    def tokens_left(self) -> int:
        return sum(u.tokens.size for u in self.waiting) + sum(u.tokens.size for u, _ in self.in_flight.values())

    def units_left(self) -> int:
        return len(self.waiting) + len(self.in_flight)


class _Progress:
    """The tqdm bar, and a log line every ``log_every_s`` and at the end (for logs that are not a terminal)."""

    def __init__(self, n_units: int, n_done: int, log_every_s: float):
        self.start = time.perf_counter()
        self.n_units = n_units
        self.tokens_forwarded = 0
        self.bar = tqdm(total=n_units, initial=n_done, desc="caching", unit="shard")
        self.log_every_s = log_every_s
        self.next_log = time.monotonic() + log_every_s

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def unit_done(self, tokens_forwarded: int, work: _WorkQueue, caches: _Caches) -> None:
        self.tokens_forwarded += tokens_forwarded
        rate = self.tokens_forwarded / self.seconds
        self.bar.update(1)
        self.bar.set_postfix(tokens=self.tokens_forwarded, tokens_per_s=f"{rate:.0f}")
        if time.monotonic() >= self.next_log or not work:
            log.info("cache: %d of %d units, %d rows cached per hookpoint, %.0f tokens/s, ETA %.0f s",
                     self.n_units - work.units_left(), self.n_units, caches.rows_per_hookpoint(), rate,
                     work.tokens_left() / rate if rate else float("nan"))
            self.next_log = time.monotonic() + self.log_every_s

    def close(self) -> None:
        self.bar.close()


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
    caches = _Caches(manifests, cache_uris, s3_options, before_commit)
    todo = [u for u in units if caches.lacking(u)]
    work = _WorkQueue(todo, caches, max_unit_attempts)
    pool = _ProducerPool(producers, units_per_producer=units_per_producer, make_producer=make_producer,
                         max_replacements=max_replacements, restart_timeout_s=restart_timeout_s)
    progress = _Progress(len(units), len(units) - len(todo), log_every_s)
    try:
        while work:
            work.dispatch(pool)
            ref, unit, actor = work.next_finished()
            try:
                results: dict[str, ShardResult] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                work.retry(unit, err)
                pool.after_failure(actor, err)
                continue
            pool.release(actor)
            caches.commit(results)
            progress.unit_done(next(iter(results.values())).tokens_forwarded, work, caches)
            if on_commit is not None:
                on_commit(caches.manifests, pool.producers)
    finally:
        progress.close()
        pool.kill_replacements()
    caches.mark_complete()
    return ProductionReport(caches.manifests, len(todo), progress.tokens_forwarded, progress.seconds)
