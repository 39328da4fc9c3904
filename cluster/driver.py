"""The job driver: config -> cache (reused or filled by producers) -> trained dictionary.

Everything that can be checked cheaply (config, text, model files, hookpoint, object store) is
checked before Ray starts or a model loads.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from activation_cache.hooking import describe_model, load_tokenizer, resolve_model_source
from activation_cache.keys import cache_key
from activation_cache.manifest import Manifest, load_manifest
from activation_cache.producing import split_units
from activation_cache.schema import ShardMeta, sha256_hex
from activation_cache.store import ObjectStore, join_uri, open_store
from activation_cache.text import check_source, excluded_token_ids, pack_sequences
from cluster.config import JobConfig
from cluster.producer import fill_cache, producer_factory
from cluster.train import TrainPlan, train_dictionary

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """What ``saeforge train`` reports at the end."""

    cache_uri: str
    cache_reused: bool
    tokens_cached: int
    producer_tokens_per_second: float
    dictionary_uri: str
    eval: dict
    seconds: float


def absolute_uri(uri: str) -> str:
    """Plain relative paths resolve against the driver's working directory, so every Ray
    process (whatever its own cwd) writes to the same place."""
    if "://" in uri:
        return uri
    return f"file://{Path(uri).expanduser().resolve()}"


@dataclass
class CachePlan:
    """The cache a job reads: its key, where it lives, and the work to fill it."""

    key: str
    key_inputs: dict
    uri: str
    meta: ShardMeta
    tokens: np.ndarray
    excluded_token_ids: frozenset[int]


def plan_cache(job: JobConfig, root: ObjectStore) -> CachePlan:
    """Tokenize the text and derive the content-addressed cache key (no model weights load)."""
    check_source(job.data.source, job.data.text_column)
    source = resolve_model_source(job.model)
    hookpoint, d_model = describe_model(source, job.model.hookpoint)
    tokenizer = load_tokenizer(source)
    tokens = pack_sequences(job.data, tokenizer)
    excluded = excluded_token_ids(job.data, tokenizer)
    key_inputs = {
        "model": source.model_id, "revision": source.revision, "model_dtype": job.model.dtype,
        "hookpoint": hookpoint, "dataset": job.data.source,
        "tokenizer": f"{type(tokenizer).__name__}:{len(tokenizer)}",
        "tokens_sha256": sha256_hex(tokens.tobytes()), "context_length": job.data.context_length,
        "dtype": job.cache.dtype, "excluded_token_ids": sorted(excluded),
        "sequences_per_shard": job.cache.sequences_per_shard, "format": 1,
    }
    key = cache_key(key_inputs)
    meta = ShardMeta(model=source.model_id, revision=source.revision, hookpoint=hookpoint,
                     d_model=d_model, dtype=job.cache.dtype, cache_key=key)
    return CachePlan(key, key_inputs, join_uri(root.uri, "caches", key), meta, tokens, excluded)


def _check_shard_count(job: JobConfig, plan: CachePlan) -> None:
    n_units = math.ceil(len(plan.tokens) / job.cache.sequences_per_shard)
    n_holdout = max(1, math.ceil(job.train.holdout_fraction * n_units))
    if n_units - n_holdout < job.cluster.num_train_workers:
        raise ValueError(
            f"the cache would hold {n_units} shards ({n_holdout} held out) but "
            f"cluster.num_train_workers={job.cluster.num_train_workers} needs one training shard each: "
            "raise data.max_tokens or lower cache.sequences_per_shard"
        )


def _existing_manifest(store: ObjectStore, plan: CachePlan) -> Manifest:
    manifest = load_manifest(store)
    if manifest is None:
        return Manifest(cache_key=plan.key, key_inputs=plan.key_inputs, model=plan.meta.model,
                        revision=plan.meta.revision, hookpoint=plan.meta.hookpoint,
                        d_model=plan.meta.d_model, dtype=plan.meta.dtype)
    if (manifest.d_model, manifest.dtype) != (plan.meta.d_model, plan.meta.dtype):
        raise ValueError(
            f"cache {store.uri} holds d_model={manifest.d_model} dtype={manifest.dtype} but the job "
            f"expects d_model={plan.meta.d_model} dtype={plan.meta.dtype}"
        )
    return manifest


def _init_ray(job: JobConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if job.cluster.address:
        ray.init(address=job.cluster.address, log_to_driver=True)
    else:
        ray.init(num_cpus=job.cluster.num_cpus, include_dashboard=False,
                 object_store_memory=job.cluster.object_store_memory_bytes)


def build_cache(
    job: JobConfig, plan: CachePlan, *, on_commit: Callable[[Manifest, list], None] | None = None
) -> tuple[Manifest, bool, float]:
    """(complete manifest, whether it was reused as is, producer tokens/s). ``on_commit`` is
    called with the manifest and the live producers after each shard is committed."""
    s3 = job.cache.s3_options()
    store = open_store(plan.uri, s3_options=s3)
    manifest = _existing_manifest(store, plan)
    if manifest.complete:
        log.info("cache %s is complete (%d rows): reusing it", plan.uri, manifest.rows)
        return manifest, True, 0.0
    if manifest.shards:
        log.info("resuming cache %s: %d shards already committed", plan.uri, len(manifest.shards))
    make_producer = producer_factory(
        num_cpus=job.cluster.producer_num_cpus, num_gpus=job.cluster.producer_num_gpus,
        max_restarts=job.cluster.producer_max_restarts,
        model_cfg=job.model, cache_uri=plan.uri, s3_options=s3, meta=plan.meta,
        excluded_token_ids=plan.excluded_token_ids, compression=job.cache.compression_codec,
    )
    producers = [make_producer() for _ in range(job.cluster.num_producers)]
    try:
        report = fill_cache(
            producers=producers, units=split_units(plan.tokens, job.cache.sequences_per_shard),
            manifest=manifest, cache_uri=plan.uri, s3_options=s3,
            units_per_producer=job.cluster.units_per_producer, make_producer=make_producer,
            max_replacements=job.cluster.producer_replacements,
            max_unit_attempts=job.cluster.unit_max_attempts, on_commit=on_commit,
        )
    finally:
        for actor in producers:
            ray.kill(actor)
    return report.manifest, False, report.tokens_per_second


def run_job(job: JobConfig) -> JobResult:
    """``saeforge train``: fill (or reuse) the cache, train, write and evaluate the dictionary."""
    start = time.perf_counter()
    root = open_store(absolute_uri(job.cache.uri), s3_options=job.cache.s3_options())
    root.list("caches/")  # fails fast on a missing bucket or bad credentials
    plan = plan_cache(job, root)
    _check_shard_count(job, plan)
    run_name = job.run.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{plan.key[:8]}"
    runs_root = absolute_uri(job.run.uri) if job.run.uri else join_uri(root.uri, "runs")
    _init_ray(job)
    manifest, reused, producer_rate = build_cache(job, plan)
    train_plan = TrainPlan(
        cache_uri=plan.uri, run_uri=join_uri(runs_root, run_name), run_name=run_name,
        hookpoint=plan.meta.hookpoint, wandb_dir=str(Path(job.logging.dir).resolve() / run_name),
    )
    evaluation = train_dictionary(job, train_plan)
    return JobResult(
        cache_uri=plan.uri, cache_reused=reused, tokens_cached=manifest.rows,
        producer_tokens_per_second=producer_rate,
        dictionary_uri=join_uri(train_plan.run_uri, "dictionary", plan.meta.hookpoint),
        eval=evaluation, seconds=time.perf_counter() - start,
    )
