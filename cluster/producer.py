"""Producer actors: model replicas that turn work units into shards, and the loop that feeds them.

The driver holds the only copy of the manifest and commits it after every finished shard, so
a shard is visible exactly once, in the order work completes. Units already listed in the
manifest (a resumed cache) are skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
import torch
from tqdm import tqdm

from activation_cache.config import ModelConfig
from activation_cache.hooking import ActivationHarvester, load_model, resolve_model_source
from activation_cache.manifest import Manifest, commit_manifest
from activation_cache.producing import ShardResult, WorkUnit, produce_shard
from activation_cache.schema import ShardMeta
from activation_cache.store import open_store

log = logging.getLogger(__name__)


class Producer:
    """One model replica. Ray wraps it as an actor in :func:`start_producers`."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cache_uri: str,
        s3_options: dict,
        meta: ShardMeta,
        excluded_token_ids: frozenset[int],
        num_threads: int,
        compression: str | None = None,
    ):
        torch.set_num_threads(num_threads)
        self.model_cfg = model_cfg
        self.store = open_store(cache_uri, s3_options=s3_options)
        self.meta = meta
        self.excluded = excluded_token_ids
        self.compression = compression
        model = load_model(resolve_model_source(model_cfg), dtype=model_cfg.dtype)
        self.harvester = ActivationHarvester(model, meta.hookpoint)

    def produce(self, unit: WorkUnit) -> ShardResult:
        return produce_shard(
            unit, harvester=self.harvester, store=self.store, meta=self.meta,
            excluded_token_ids=self.excluded, batch_size=self.model_cfg.batch_size,
            compression=self.compression,
        )


@dataclass
class ProductionReport:
    """What one cache-filling pass did."""

    manifest: Manifest
    units_produced: int
    tokens_forwarded: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_forwarded / self.seconds if self.seconds else 0.0


def start_producers(n: int, *, num_cpus: float, **producer_kwargs) -> list:
    actor_cls = ray.remote(num_cpus=num_cpus, max_restarts=0)(Producer)
    threads = max(1, int(num_cpus))
    return [actor_cls.remote(num_threads=threads, **producer_kwargs) for _ in range(n)]


def fill_cache(
    *,
    producers: list,
    units: list[WorkUnit],
    manifest: Manifest,
    cache_uri: str,
    s3_options: dict,
    units_per_producer: int,
) -> ProductionReport:
    """Hand ``units`` to ``producers`` (at most ``units_per_producer`` queued at each, which
    bounds memory) and commit each finished shard to the manifest; mark the cache complete."""
    store = open_store(cache_uri, s3_options=s3_options)
    done = {s.name for s in manifest.shards}
    todo = [u for u in units if u.shard_name not in done]
    start, forwarded = time.perf_counter(), 0
    pending: dict = {}
    idle = [actor for _ in range(units_per_producer) for actor in producers]
    busy: dict = {}
    progress = tqdm(total=len(units), initial=len(units) - len(todo), desc="caching", unit="shard")
    queue = list(reversed(todo))
    while queue or pending:
        while queue and idle:
            actor, unit = idle.pop(), queue.pop()
            ref = actor.produce.remote(unit)
            pending[ref], busy[ref] = unit, actor
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        pending.pop(ref)
        idle.append(busy.pop(ref))
        result: ShardResult = ray.get(ref)
        manifest = manifest.with_shard(result.entry, result.stats)
        commit_manifest(store, manifest)
        forwarded += result.tokens_forwarded
        progress.update(1)
        elapsed = time.perf_counter() - start
        progress.set_postfix(tokens=forwarded, tokens_per_s=f"{forwarded / elapsed:.0f}")
    progress.close()
    manifest.complete = True
    commit_manifest(store, manifest)
    return ProductionReport(manifest, len(todo), forwarded, time.perf_counter() - start)
