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

A cross-layer transcoder's plan (``layers=``, ``layer_caches=``) reads its L input and L target
caches as one group: ``x`` the L inputs side by side, ``y`` the L targets. The split and the steps
come from the first input cache; the caches are never scaled on the way (``scale`` and
``target_scale`` are 1.0): the model normalises each layer inside itself, by each layer's own
scales, ``layer_input_scales`` and ``layer_target_scales``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from activation_cache.manifest import Manifest, ShardEntry, check_cache_group, load_manifest
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
    """Factor applied to every activation (``input_scale``); 1.0 for a cross-layer transcoder."""
    mean: np.ndarray
    """The cache's mean activation (unscaled): where b_dec starts. A cross-layer transcoder's: the
    L input caches' means side by side (L * d_in)."""
    holdout: list[str]
    """Names of the held-out shards, evaluated at the end and never trained on."""
    d_model: int
    """The width of ``x``: the cache's d_model; L * d_in for a cross-layer transcoder."""
    rows_at_start: int
    """Rows committed when training started (all of them unless the cache was still being written)."""
    target_scale: float | None = None
    """A transcoder's: factor applied to every target activation (``input_scale`` of the target
    cache); 1.0 for a cross-layer transcoder; None for an SAE."""
    target_mean: np.ndarray | None = None
    """A transcoder's: the target cache's mean activation (unscaled), where b_dec starts; a
    cross-layer transcoder's: the L target caches' means side by side (L * d_out)."""
    d_out: int | None = None
    """A transcoder's: the width of ``y`` (L * the target width for a cross-layer transcoder)."""
    n_layers: int | None = None
    """A cross-layer transcoder's: the layers it covers (L); None for an SAE or a transcoder."""
    layer_input_scales: list[float] | None = None
    """A cross-layer transcoder's: each layer's input scale (``input_scale`` of its input cache's
    manifest under ``settings.normalize``), in layer order, applied inside the model."""
    layer_target_scales: list[float] | None = None
    """A cross-layer transcoder's: each layer's target scale (``input_scale`` of its target cache's
    manifest), in layer order, applied inside the model."""


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


Layer = tuple[ObjectStore, Manifest, ObjectStore, Manifest]
"""One layer of a cross-layer transcoder: (input cache, its manifest, target cache, its manifest)."""


def complete_plan(
    cache: ObjectStore, manifest: Manifest, settings: PlanSettings, *, rank: int, world_size: int,
    target: tuple[ObjectStore, Manifest] | None = None, layers: Sequence[Layer] | None = None,
) -> DataPlan:
    """The plan over a complete cache. ``rank`` and ``world_size`` are the data-parallel ones.
    With ``target`` (a transcoder's target cache and its complete manifest) the reader yields
    ``(x, y)`` pairs; the two caches must be a pair (``check_paired_caches``) and hold out the
    same shards. With ``layers`` (a cross-layer transcoder's caches, one ``Layer`` per covered
    layer in order, ``cache`` and ``manifest`` the first's input) it yields ``(x, y)`` over all of
    them; every cache must be of one forward pass with the first input (``check_cache_group``)."""
    inputs, targets = _complete_group(cache, manifest, target, layers)
    check_cache_group([(store.uri, m) for store, m in inputs], [(store.uri, m) for store, m in targets])
    train_shards, holdout_shards = split_holdout(manifest.shards, settings.holdout_fraction)
    options: dict = {"shards": train_shards}
    if layers is not None:
        options.update(input_stores=[store for store, _ in inputs], target_stores=[store for store, _ in targets])
    elif target is not None:
        options.update(target_store=target[0], target_shards=target[1].shards)
    reader = _reader(cache, settings, rank, world_size, **options)
    steps = _capped(sum(reader.batches_per_epoch(epoch) for epoch in range(settings.epochs)), settings)
    statistics = _plan_statistics([m for _, m in inputs], [m for _, m in targets], settings, layers is not None)
    return DataPlan(reader=reader, steps=steps, holdout=[s.name for s in holdout_shards], rows_at_start=manifest.rows,
                    **statistics)


def _complete_group(
    cache: ObjectStore, manifest: Manifest, target: tuple[ObjectStore, Manifest] | None, layers: Sequence[Layer] | None,
) -> tuple[list[tuple[ObjectStore, Manifest]], list[tuple[ObjectStore, Manifest]]]:
    """A complete plan's (input caches, target caches), each with its manifest."""
    if layers is None:
        return [(cache, manifest)], ([] if target is None else [target])
    _check_layers(cache, target, [layer[0] for layer in layers])
    return [(layer[0], layer[1]) for layer in layers], [(layer[2], layer[3]) for layer in layers]


def _check_layers(cache: ObjectStore, target: object, first_inputs: list[ObjectStore]) -> None:
    if target is not None:
        raise ValueError("a plan reads a transcoder's target or a cross-layer transcoder's layers, not both")
    if not first_inputs or first_inputs[0].uri != cache.uri:
        first = first_inputs[0].uri if first_inputs else None
        raise ValueError(f"the first layer's input cache is {first} but the plan's cache is {cache.uri}: a "
                         "cross-layer transcoder's plan is made on its first layer's input cache")


def _plan_statistics(inputs: list[Manifest], targets: list[Manifest], settings: PlanSettings, layered: bool) -> dict:
    """A DataPlan's scales, means and widths from its caches' manifests (the first input first)."""
    first = inputs[0]
    if not layered:
        statistics = {"scale": input_scale(first, settings.normalize), "mean": first.stats.mean(),
                      "d_model": first.d_model}
        if targets:
            statistics.update(target_scale=input_scale(targets[0], settings.normalize),
                              target_mean=targets[0].stats.mean(), d_out=targets[0].d_model)
        return statistics
    # Each layer's activations have their own size: the model scales each layer by its own factor.
    return {
        "scale": 1.0, "target_scale": 1.0, "n_layers": len(inputs),
        "mean": np.concatenate([m.stats.mean() for m in inputs]), "d_model": sum(m.d_model for m in inputs),
        "target_mean": np.concatenate([m.stats.mean() for m in targets]), "d_out": sum(m.d_model for m in targets),
        "layer_input_scales": [input_scale(m, settings.normalize) for m in inputs],
        "layer_target_scales": [input_scale(m, settings.normalize) for m in targets],
    }


def tailing_plan(
    cache: ObjectStore, expected_shards: dict[str, int], settings: PlanSettings, *, rank: int, world_size: int,
    global_rank: int, abort: AbortReason, target_cache: ObjectStore | None = None,
    layer_caches: Sequence[tuple[ObjectStore, ObjectStore]] | None = None,
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
    statistics are taken from its manifest once it too holds ``normalization_rows`` rows. With
    ``layer_caches`` (a cross-layer transcoder's (input cache, target cache) per covered layer, in
    order, ``cache`` the first's input) the same holds for every cache of the group."""
    if layer_caches is None:
        inputs, targets = [cache], ([] if target_cache is None else [target_cache])
    else:
        _check_layers(cache, target_cache, [inputs for inputs, _ in layer_caches])
        inputs, targets = [pair[0] for pair in layer_caches], [pair[1] for pair in layer_caches]
    names = sorted(expected_shards)
    n_holdout = holdout_count(len(names), settings.holdout_fraction)
    train_names, holdout = names[:-n_holdout], names[-n_holdout:]
    position = {name: i for i, name in enumerate(train_names)}
    group = {"input_stores": inputs, "target_stores": targets} if layer_caches is not None else {"target_store": target_cache}
    reader = _reader(
        cache, settings, rank, world_size, follow=True, follow_timeout_s=settings.follow_timeout_s,
        shard_filter=lambda entry: entry.name in position, shard_rank=lambda name: position[name] % world_size,
        abort=abort, **group,
    )
    local_batch = settings.batch_size // world_size
    rows = [expected_shards[n] for n in train_names]
    first_epoch = min(sum(rows[r::world_size]) for r in range(world_size)) // local_batch
    later_epochs = (sum(rows) // world_size) // local_batch
    steps = _capped(first_epoch + (settings.epochs - 1) * later_epochs, settings)
    needed = min(settings.normalization_rows, sum(rows))
    statistics, rows_at_start = _broadcast_statistics(
        partial(_statistics, inputs, targets, settings, needed, abort, layer_caches is not None), global_rank,
    )
    return DataPlan(reader=reader, steps=steps, holdout=holdout, rows_at_start=rows_at_start, **statistics)


def _statistics(
    inputs: list[ObjectStore], targets: list[ObjectStore], settings: PlanSettings, needed: int, abort: AbortReason,
    layered: bool,
) -> tuple[dict, int]:
    """The plan's statistics (``_plan_statistics``) once every cache holds ``needed`` rows, and the
    rows the first input cache then held."""
    def wait(store: ObjectStore) -> Manifest:
        return wait_for_manifest(store, lambda m: m.rows >= needed, f"{needed} rows (train.normalization_rows)",
                                 settings.follow_timeout_s, abort)

    input_manifests, target_manifests = [wait(store) for store in inputs], [wait(store) for store in targets]
    check_cache_group([(store.uri, m) for store, m in zip(inputs, input_manifests, strict=True)],
                      [(store.uri, m) for store, m in zip(targets, target_manifests, strict=True)])
    return _plan_statistics(input_manifests, target_manifests, settings, layered), input_manifests[0].rows


def _broadcast_statistics(take: Callable[[], tuple], global_rank: int) -> tuple:
    """``take()`` on global rank 0, its result on every rank of the process group."""
    stats: list = [take() if global_rank == 0 else None]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(stats, src=0)
    return stats[0]
