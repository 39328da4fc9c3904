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
from cluster.errors import ProducerFailed, one_line_cause
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
    faults: list[ProducerFault] = field(default_factory=list)
    """The producers lost during the fill, in the order seen."""

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


@dataclass
class ProducerFault:
    """A producer lost during a fill: what was lost, and what it cost."""

    producer: str
    """``producer 2`` (numbered in the order the fill started them, replacements after)."""
    cause: str
    """One line: what killed it (``ActorDiedError: ... node ... died``)."""
    at: float
    """When the fill saw it (``time.time()``)."""
    units_redone: int = 0
    """Its units in flight, handed to the live producers."""
    work_redone_s: float = 0.0
    """Producer seconds of work redone: the units redone, at the fill's mean seconds per unit."""
    back_after_s: float | None = None
    """Seconds until it answered again (Ray restarted it, model loaded), or None: it did not
    come back before the fill ended, or was given up and replaced."""
    replaced: bool = False

    def line(self) -> str:
        if self.back_after_s is not None:
            fate = f"back after {self.back_after_s:.1f} s"
        else:
            fate = "replaced" if self.replaced else "not back when the fill ended"
        return (f"{self.producer} lost ({self.cause}): {self.units_redone} units redone "
                f"({self.work_redone_s:.1f} s of producer work), {fate}")


@dataclass
class _Recovery:
    """A producer the pool waits for in the background: a ping answers once Ray has restarted
    a lost one, or started a replacement, and its model is loaded."""

    name: str
    fault: ProducerFault | None  # None for a replacement starting
    since: float  # time.monotonic()
    ping: Any = None  # the ping in flight, or None between tries
    next_try: float = 0.0


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
    """The producers and their free task slots (``units_per_producer`` each).

    Nothing here waits on one actor. A producer gets its slots once it answers a ping (its model
    is loaded): one the cluster has no room for never holds a unit the others could run. A
    producer lost mid-task loses its slots at once and is pinged in the background
    (:meth:`pending`, :meth:`answered`); it gets its slots back when it answers. One dead for
    good, or not back within ``restart_timeout_s``, is retired and replaced, at most
    ``max_replacements`` times. The replacements are this pool's to kill (``kill_replacements``),
    the producers it was given the caller's."""

    RETRY_PING_S = 0.5

    def __init__(self, producers: list, *, units_per_producer: int, make_producer: Callable[[], Any] | None,
                 max_replacements: int, restart_timeout_s: float):
        self.producers = list(producers)
        self.units_per_producer = units_per_producer
        self.make_producer = make_producer
        self.max_replacements = max_replacements
        self.restart_timeout_s = restart_timeout_s
        self.free_slots: list = []
        self.replacements: list = []
        self.names = {a: f"producer {i}" for i, a in enumerate(self.producers, 1)}  # Ray's handles hash by actor id
        self.recovering: dict[Any, _Recovery] = {}
        self.faults: list[ProducerFault] = []
        self.last_cause = ""
        """Why the last producer retired died, for the error when none is left."""
        for actor in self.producers:  # starting: units go to each once its model is loaded
            self._wait_for(actor, _Recovery(self.name(actor), None, time.monotonic()))

    def name(self, actor: Any) -> str:
        return self.names[actor]

    def release(self, actor: Any) -> None:
        self.free_slots.append(actor)

    def live(self) -> int:
        return len(self.producers) - len(self.recovering)

    def lost(self, actor: Any, err: Exception) -> tuple[ProducerFault, bool] | None:
        """``actor``'s task failed because the actor did (killed, out of memory, node lost): take
        its slots away and wait for it in the background. Its open fault, and whether this
        failure is its first (its other tasks fail one by one); None for a producer retired already."""
        if actor in self.recovering:
            fault = self.recovering[actor].fault
            return (fault, False) if fault is not None else None
        if actor not in self.producers:
            return None
        self.free_slots = [a for a in self.free_slots if a is not actor]
        fault = ProducerFault(self.name(actor), one_line_cause(err), time.time())
        self.faults.append(fault)
        self._wait_for(actor, _Recovery(fault.producer, fault, time.monotonic()))
        return fault, True

    def pending(self) -> list:
        """The pings in flight, to wait on beside the tasks."""
        return [r.ping for r in self.recovering.values() if r.ping is not None]

    def owner(self, ref: Any) -> Any | None:
        """The producer whose ping ``ref`` is, or None (a task's ref)."""
        return next((actor for actor, r in self.recovering.items() if r.ping is not None and r.ping == ref), None)

    def answered(self, actor: Any, ref: Any) -> None:
        """A ping came back: the producer is up again (its slots return), is restarting still
        (ping again shortly), or is dead for good (retired, replaced)."""
        recovery = self.recovering[actor]
        recovery.ping = None
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # restarting: Ray refuses calls meanwhile
            recovery.next_try = time.monotonic() + self.RETRY_PING_S
            return
        except ray.exceptions.RayActorError as err:
            self.last_cause = one_line_cause(err)
            if recovery.fault is None:  # died starting (its model load, say): a fault too
                recovery.fault = ProducerFault(recovery.name, self.last_cause, time.time())
                self.faults.append(recovery.fault)
            self._retire(actor, f"dead for good: {self.last_cause}")
            return
        del self.recovering[actor]
        waited = time.monotonic() - recovery.since
        self.free_slots += [actor] * self.units_per_producer
        if recovery.fault is None:  # starting: a replacement's is news, the first producers' is not
            (log.info if actor in self.replacements else log.debug)("%s is ready after %.1f s: it takes units",
                                                                     recovery.name, waited)
        else:
            recovery.fault.back_after_s = waited
            log.warning("%s is back after %.1f s (restarted, model loaded): it takes units again",
                        recovery.name, waited)

    def next_event_s(self) -> float | None:
        """Seconds until a ping is due again or a restart runs out of time; None when none waits."""
        if not self.recovering:
            return None
        now = time.monotonic()
        due = [r.next_try - now for r in self.recovering.values() if r.ping is None]
        due += [r.since + self.restart_timeout_s - now for r in self.recovering.values()]
        return max(0.0, min(due))

    def tick(self) -> None:
        """Ping again those due; retire those not back within ``restart_timeout_s``."""
        now = time.monotonic()
        for actor, recovery in list(self.recovering.items()):
            if now >= recovery.since + self.restart_timeout_s:
                self._retire(actor, f"not back within {self.restart_timeout_s:.0f} s")
            elif recovery.ping is None and now >= recovery.next_try:
                self._ping(actor)

    def _wait_for(self, actor: Any, recovery: _Recovery) -> None:
        self.recovering[actor] = recovery
        self._ping(actor)

    def _ping(self, actor: Any) -> None:
        self.recovering[actor].ping = actor.ping.remote()

    def _retire(self, actor: Any, why: str) -> None:
        recovery = self.recovering.pop(actor)
        ray.kill(actor, no_restart=True)  # were it only slow to come back: free its resources
        self.producers.remove(actor)
        if self.make_producer is None or len(self.replacements) >= self.max_replacements:
            log.warning("%s is gone (%s); no replacement left (%d started): the fill goes on with %d producers",
                        recovery.name, why, len(self.replacements), self.live())
            return
        if recovery.fault is not None:
            recovery.fault.replaced = True
        replacement = self.make_producer()
        self.replacements.append(replacement)
        self.producers.append(replacement)
        name = f"producer {len(self.names) + 1}"
        self.names[replacement] = name
        # It takes units once its model is loaded: until then the live producers run them.
        self._wait_for(replacement, _Recovery(name, None, time.monotonic()))
        log.warning("%s is gone (%s): started %s as replacement %d of %d", recovery.name, why, name,
                    len(self.replacements), self.max_replacements)

    def kill_replacements(self) -> None:
        for actor in self.replacements:
            ray.kill(actor)


class _WorkQueue:
    """Units waiting, units in flight (with the producer running each and when it started), and
    the failures of each."""

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
        if not self.in_flight and not pool.recovering:
            raise ProducerFailed(f"no producer left to run {len(self.waiting)} work units (all died; "
                                 f"{len(pool.replacements)} replacements started; the last: {pool.last_cause})")

    def running_on(self, actor: Any) -> int:
        return sum(a == actor for _, a in self.in_flight.values())

    def retry(self, unit: WorkUnit, err: Exception, *, quiet: bool = False) -> None:
        """Queue ``unit`` again after ``err``; ``ProducerFailed`` at once for a full store (no
        retry helps until space is freed) and after ``max_unit_attempts`` failures. ``quiet``:
        the producer's loss is logged instead, once for all its units."""
        self.attempts[unit.shard_name] += 1
        cause = one_line_cause(err)
        if isinstance(getattr(err, "cause", None), StoreFull):
            raise ProducerFailed(f"work unit {unit.shard_name}: {cause}") from err
        if self.attempts[unit.shard_name] >= self.max_unit_attempts:
            raise ProducerFailed(
                f"work unit {unit.shard_name} failed {self.attempts[unit.shard_name]} times; last cause {cause}"
            ) from err
        (log.debug if quiet else log.warning)("work unit %s failed (%s): queued again", unit.shard_name, cause)
        self.waiting.append(unit)

    def tokens_left(self) -> int:
        return sum(u.tokens.size for u in self.waiting) + sum(u.tokens.size for u, _ in self.in_flight.values())

    def units_left(self) -> int:
        return len(self.waiting) + len(self.in_flight)


def _next_event(work: _WorkQueue, pool: _ProducerPool) -> tuple[Any, Any] | None:
    """The first task or ping to end, as (ref, the producer of a ping or None for a task), or
    None when a background wait is due first (:meth:`_ProducerPool.tick`)."""
    refs, timeout = [*work.in_flight, *pool.pending()], pool.next_event_s()
    if not refs:  # only pings due again later
        time.sleep(timeout or 0.0)
        return None
    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    if not ready:
        return None
    return ready[0], pool.owner(ready[0])


class _Progress:
    """The tqdm bar, and a log line every ``log_every_s`` and at the end (for logs that are not a terminal)."""

    def __init__(self, n_units: int, n_done: int, log_every_s: float):
        self.start = time.perf_counter()
        self.n_units = n_units
        self.tokens_forwarded = 0
        self.unit_seconds = 0.0  # the producers' own seconds over the units done
        self.units_done = 0
        self.bar = tqdm(total=n_units, initial=n_done, desc="caching", unit="shard")
        self.log_every_s = log_every_s
        self.next_log = time.monotonic() + log_every_s

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def mean_unit_seconds(self) -> float:
        return self.unit_seconds / self.units_done if self.units_done else 0.0

    def unit_done(self, result: ShardResult, work: _WorkQueue, caches: _Caches) -> None:
        self.tokens_forwarded += result.tokens_forwarded
        self.unit_seconds += result.total_seconds
        self.units_done += 1
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

    The loop never waits on one producer: it waits for whichever task or background ping ends
    first. A producer that dies (killed, out of memory, its node lost) loses its slots at once
    and its units go back on the queue for the live producers (its shard names are
    deterministic, so a shard written before the death is overwritten, and the manifest commits
    each unit once: every (sequence_id, position) ends up in the cache exactly once). Ray
    restarts it in the background; it takes units again once it answers. One dead for good, or
    not back within ``restart_timeout_s``, is replaced by ``make_producer()``, at most
    ``max_replacements`` times; with no room on the cluster for either, the fill finishes on the
    survivors. A unit whose task raised is redone, up to ``max_unit_attempts`` failures (one, when
    the store is full); beyond, or with no producer left, the fill stops with ``ProducerFailed``
    naming the unit and the cause; what was committed stays committed, so a rerun resumes. The
    replacements are killed on the way out, whatever the outcome; the caller owns ``producers``.
    ``on_commit(manifests, producers)`` runs after each unit's commits (progress, tests; an
    exception it raises stops the fill). ``before_commit(hookpoint)`` runs before each manifest
    write (the writer lease's check: an exception stops the fill uncommitted). Progress (shards,
    rows cached, tokens/s, ETA) goes to a tqdm bar and, every ``log_every_s``, to the log; each
    producer lost is one warning line, and the report lists them (``faults``).
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
            event = _next_event(work, pool)
            if event is None:
                pool.tick()
            elif event[1] is not None:
                pool.answered(event[1], event[0])
            elif (results := _finished(event[0], work, pool)) is not None:
                caches.commit(results)
                progress.unit_done(next(iter(results.values())), work, caches)
                if on_commit is not None:
                    on_commit(caches.manifests, pool.producers)
        _log_not_back(pool)
        for fault in pool.faults:
            fault.work_redone_s = fault.units_redone * progress.mean_unit_seconds()
    finally:
        progress.close()
        pool.kill_replacements()
    caches.mark_complete()
    return ProductionReport(caches.manifests, len(todo), progress.tokens_forwarded, progress.seconds,
                            faults=pool.faults)


def _finished(ref: Any, work: _WorkQueue, pool: _ProducerPool) -> dict[str, ShardResult] | None:
    """A task's shards, or None when it failed: its unit is queued again, and a producer that
    died with it is taken out of the pool until it answers again."""
    unit, actor = work.in_flight.pop(ref)
    try:
        results: dict[str, ShardResult] = ray.get(ref)
    except ray.exceptions.RayTaskError as err:  # the task raised; the producer is fine
        work.retry(unit, err)
        pool.release(actor)
        return None
    except ray.exceptions.RayActorError as err:
        work.retry(unit, err, quiet=True)
        if (lost := pool.lost(actor, err)) is None:
            return None
        fault, first = lost
        fault.units_redone += 1
        if first:
            live = pool.live()
            log.warning("%s lost (%s): its %d units go to the %d live producer%s; it rejoins once Ray has restarted it",
                        fault.producer, fault.cause, 1 + work.running_on(actor), live, "" if live == 1 else "s")
        return None
    pool.release(actor)
    return results


def _log_not_back(pool: _ProducerPool) -> None:
    """Once, at the end: the producers the fill finished without."""
    for recovery in pool.recovering.values():
        waited = time.monotonic() - recovery.since
        if recovery.fault is not None:
            log.warning("the fill finished without %s: not back after %.0f s (no room on the cluster to restart "
                        "it, or still loading its model)", recovery.name, waited)
        else:
            log.info("the fill finished without %s: not started after %.0f s (no room on the cluster for it, "
                     "or still loading its model)", recovery.name, waited)
