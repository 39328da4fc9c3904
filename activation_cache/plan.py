"""Each trainer worker's data plan: what it reads, for how many steps, at what input scale.

The holdout split, the step count and the normalisation statistics are derived here, the same on
every rank and every run of a cache, from a complete cache's manifest or, for a training that
starts while the cache is still being written, from the shard names and row counts known ahead
(the reader then tails the cache). No Ray: the trainer launch in ``cluster/train.py`` builds a
plan per worker; the one collective (the statistics broadcast of a tailing plan) goes through
``torch.distributed`` when a process group is up.

A transcoder's plan reads ``(x, y)`` pairs from its input cache and its target cache (one
forward pass filled both, so they hold the same shards over the same tokens): the split, the
steps and the input scale come from the input cache as for an SAE, and the target's own scale
and mean from the target's manifest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from activation_cache.manifest import Manifest, ShardEntry, check_paired_caches, load_manifest
from activation_cache.reader import ActivationReader, TailingAborted
from activation_cache.store import ObjectStore

AbortReason = Callable[[], str | None]
"""Why the cache fill failed (its text) once it has, else None: a tailing reader stops with it."""


@dataclass(frozen=True)
class PlanSettings:
    """The training settings a data plan depends on (``train.*`` and ``sae.normalize_activations``)."""

    batch_size: int
    """Rows per step over all data-parallel ranks; each reads ``batch_size // world_size``."""
    epochs: int
    max_tokens: int | None
    """Stop after this many rows trained (None: all epochs)."""
    holdout_fraction: float
    seed: int
    shuffle_buffer_rows: int
    read_threads: int
    prefetch_bytes: int
    normalize: bool
    """Scale inputs so their mean norm is sqrt(d_model)."""
    follow_timeout_s: float
    """How long a tailing reader waits for a shard (or the statistics) to be committed."""
    normalization_rows: int
    """Rows committed before a tailing plan takes the manifest's normalisation statistics."""


@dataclass
class DataPlan:
    """What one worker trains on."""

    reader: ActivationReader
    steps: int
    """Optimizer steps of the whole training (every rank takes the same number)."""
    scale: float
    """Factor applied to every activation (``input_scale``)."""
    mean: np.ndarray
    """The cache's mean activation (unscaled): where b_dec starts."""
    holdout: list[str]
    """Names of the held-out shards, evaluated at the end and never trained on."""
    d_model: int
    rows_at_start: int
    """Rows committed when training started (all of them unless the cache was still being written)."""
    target_scale: float | None = None
    """A transcoder's: factor applied to every target activation (``input_scale`` of the target
    cache); None for an SAE."""
    target_mean: np.ndarray | None = None
    """A transcoder's: the target cache's mean activation (unscaled), where b_dec starts."""
    d_out: int | None = None
    """A transcoder's: the target's width."""


def holdout_count(n_shards: int, fraction: float) -> int:
    """Shards held out of ``n_shards``: ``ceil(fraction * n)``, at least one."""
    return max(1, math.ceil(fraction * n_shards))


def split_holdout(shards: list[ShardEntry], fraction: float) -> tuple[list[ShardEntry], list[ShardEntry]]:
    """(training shards, held-out shards): the last ``ceil(fraction * n)`` shards by name
    (at least one) are held out, the same split on every rank and every run of this cache."""
    ordered = sorted(shards, key=lambda s: s.name)
    n_holdout = holdout_count(len(ordered), fraction)
    return ordered[:-n_holdout], ordered[-n_holdout:]


def input_scale(manifest: Manifest, normalize: bool) -> float:
    """Factor that brings the cache's mean activation norm to sqrt(d_model)."""
    return math.sqrt(manifest.d_model) / manifest.stats.mean_norm if normalize else 1.0


def wait_for_manifest(
    cache: ObjectStore, ready: Callable[[Manifest], bool], what: str, timeout_s: float, abort: AbortReason,
) -> Manifest:
    """The committed manifest once ``ready(manifest)`` holds (polling every second); ``what``
    names the wait in the TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        reason = abort()
        if reason:
            raise TailingAborted(f"cache {cache.uri}: {reason}")
        manifest = load_manifest(cache)
        if manifest is not None and ready(manifest):
            return manifest
        if time.monotonic() > deadline:
            raise TimeoutError(f"cache {cache.uri}: still no {what} after {timeout_s:.0f} s (are the producers running?)")
        time.sleep(1.0)


def _reader(cache: ObjectStore, settings: PlanSettings, rank: int, world_size: int, **options) -> ActivationReader:
    return ActivationReader(
        cache, rank=rank, world_size=world_size, batch_size=settings.batch_size // world_size, seed=settings.seed,
        shuffle_buffer_rows=settings.shuffle_buffer_rows, read_threads=settings.read_threads,
        prefetch_bytes=settings.prefetch_bytes, **options,
    )


def _capped(steps: int, settings: PlanSettings) -> int:
    return steps if settings.max_tokens is None else min(steps, settings.max_tokens // settings.batch_size)


def complete_plan(
    cache: ObjectStore, manifest: Manifest, settings: PlanSettings, *, rank: int, world_size: int,
    target: tuple[ObjectStore, Manifest] | None = None,
) -> DataPlan:
    """The plan over a complete cache. ``rank`` and ``world_size`` are the data-parallel ones.
    With ``target`` (a transcoder's target cache and its complete manifest) the reader yields
    ``(x, y)`` pairs; the two caches must be a pair (``check_paired_caches``) and hold out the
    same shards."""
    train_shards, holdout_shards = split_holdout(manifest.shards, settings.holdout_fraction)
    options: dict = {"shards": train_shards}
    if target is not None:
        target_cache, target_manifest = target
        check_paired_caches(manifest, target_manifest, input_uri=cache.uri, target_uri=target_cache.uri)
        options.update(target_store=target_cache, target_shards=target_manifest.shards)
    reader = _reader(cache, settings, rank, world_size, **options)
    steps = _capped(sum(reader.batches_per_epoch(epoch) for epoch in range(settings.epochs)), settings)
    plan = DataPlan(
        reader, steps, input_scale(manifest, settings.normalize), manifest.stats.mean(),
        [s.name for s in holdout_shards], manifest.d_model, manifest.rows,
    )
    if target is not None:
        plan.target_scale, plan.target_mean, plan.d_out = _target_statistics(target[1], settings)
    return plan


def _target_statistics(target: Manifest, settings: PlanSettings) -> tuple[float, np.ndarray, int]:
    return input_scale(target, settings.normalize), target.stats.mean(), target.d_model


def tailing_plan(
    cache: ObjectStore, expected_shards: dict[str, int], settings: PlanSettings, *, rank: int, world_size: int,
    global_rank: int, abort: AbortReason, target_cache: ObjectStore | None = None,
) -> DataPlan:
    """The plan over a cache still being written. The shard names and row counts are known ahead
    (``expected_shards``: {name: rows} of the complete cache), so the holdout split and the step
    count are fixed before any shard exists: epoch 0 deals the training shards out round-robin
    in unit order (so every rank's shards come in as production goes) and stops at the fewest
    batches any rank can make; later epochs are planned over the complete cache. The
    normalisation statistics are the manifest's once ``normalization_rows`` rows are committed,
    taken by global rank 0 and broadcast, so every rank starts from the same scale and b_dec.
    ``rank`` and ``world_size`` are the data-parallel ones (the reader's); ``global_rank`` is the
    one in the process group. ``abort`` stops the reader and the waits once the fill has failed.
    With ``target_cache`` (a transcoder's target cache, filled by the same forward pass) the
    reader yields ``(x, y)`` pairs, taking a shard once both manifests list it, and the target's
    statistics are taken from its manifest once it too holds ``normalization_rows`` rows."""
    names = sorted(expected_shards)
    n_holdout = holdout_count(len(names), settings.holdout_fraction)
    train_names, holdout = names[:-n_holdout], names[-n_holdout:]
    position = {name: i for i, name in enumerate(train_names)}
    reader = _reader(
        cache, settings, rank, world_size, follow=True, follow_timeout_s=settings.follow_timeout_s,
        shard_filter=lambda entry: entry.name in position, shard_rank=lambda name: position[name] % world_size,
        abort=abort, target_store=target_cache,
    )
    local_batch = settings.batch_size // world_size
    rows = [expected_shards[n] for n in train_names]
    first_epoch = min(sum(rows[r::world_size]) for r in range(world_size)) // local_batch
    later_epochs = (sum(rows) // world_size) // local_batch
    steps = _capped(first_epoch + (settings.epochs - 1) * later_epochs, settings)
    needed = min(settings.normalization_rows, sum(rows))
    scale, mean, d_model, rows_at_start, target_statistics = _broadcast_statistics(
        partial(_statistics, cache, settings, needed, abort, target_cache), global_rank,
    )
    plan = DataPlan(reader, steps, scale, mean, holdout, d_model, rows_at_start)
    if target_statistics is not None:
        plan.target_scale, plan.target_mean, plan.d_out = target_statistics
    return plan


def _statistics(
    cache: ObjectStore, settings: PlanSettings, needed: int, abort: AbortReason, target_cache: ObjectStore | None,
) -> tuple:
    def wait(store: ObjectStore) -> Manifest:
        return wait_for_manifest(store, lambda m: m.rows >= needed, f"{needed} rows (train.normalization_rows)",
                                 settings.follow_timeout_s, abort)

    manifest = wait(cache)
    target_statistics = None
    if target_cache is not None:
        target = wait(target_cache)
        check_paired_caches(manifest, target, input_uri=cache.uri, target_uri=target_cache.uri)
        target_statistics = _target_statistics(target, settings)
    return (input_scale(manifest, settings.normalize), manifest.stats.mean(), manifest.d_model, manifest.rows,
            target_statistics)


def _broadcast_statistics(take: Callable[[], tuple], global_rank: int) -> tuple:
    """``take()`` on global rank 0, its result on every rank of the process group."""
    stats: list = [take() if global_rank == 0 else None]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(stats, src=0)
    return stats[0]
