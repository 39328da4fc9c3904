"""Turning token sequences into committed-ready shards (the producer's work, no Ray here).

The token stream is cut into deterministic work units; each unit becomes exactly one shard
with a deterministic name, so a unit that is redone (a producer died) rewrites the same shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from activation_cache.hooking import ActivationHarvester, MultiHarvester
from activation_cache.manifest import ActivationStats, ShardEntry
from activation_cache.schema import ShardMeta, encode_shard, sha256_hex
from activation_cache.store import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkUnit:
    """Sequences ``first_sequence_id ..`` of the packed token stream."""

    index: int
    first_sequence_id: int
    tokens: np.ndarray
    """Token ids, shape (n_sequences, context_length)."""

    @property
    def shard_name(self) -> str:
        return f"shards/unit-{self.index:06d}.arrow"


def split_units(tokens: np.ndarray, sequences_per_unit: int) -> list[WorkUnit]:
    return [
        WorkUnit(index=i, first_sequence_id=start, tokens=tokens[start : start + sequences_per_unit])
        for i, start in enumerate(range(0, len(tokens), sequences_per_unit))
    ]


@dataclass
class ShardResult:
    """A written (not yet committed) shard and what it took."""

    entry: ShardEntry
    stats: ActivationStats
    tokens_forwarded: int
    forward_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class ShardTarget:
    """Where the shards of one hookpoint go: its cache and the metadata its shards carry."""

    store: ObjectStore
    meta: ShardMeta


def produce_shards(
    unit: WorkUnit,
    *,
    harvester: MultiHarvester,
    targets: Mapping[str, ShardTarget],
    excluded_token_ids: frozenset[int],
    batch_size: int,
    compression: str | None = None,
) -> dict[str, ShardResult]:
    """Run the model once over ``unit`` and write one shard per hookpoint in ``targets`` (keyed
    by canonical hookpoint, each captured by ``harvester``), special tokens dropped, IPC buffers
    compressed with ``compression`` if any; return each shard's entry, keyed like ``targets``.

    The forward time and the tokens forwarded are counted once, in every result."""
    start = time.perf_counter()
    n_seq, ctx = unit.tokens.shape
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in targets}
    forward_s = 0.0
    for lo in range(0, n_seq, batch_size):
        # A copy of a few KiB: the unit's tokens arrive read-only from Ray's object store, and
        # torch.from_numpy warns that it cannot protect a read-only array.
        ids = torch.tensor(unit.tokens[lo : lo + batch_size])
        t = time.perf_counter()
        captured = harvester.harvest(ids)
        forward_s += time.perf_counter() - t
        for hookpoint in targets:  # in the model's dtype: the rows to keep are chosen before any copy widens them
            acts = captured[hookpoint]
            chunks[hookpoint].append(acts.reshape(-1, acts.shape[-1]).cpu())
    token_ids = unit.tokens.reshape(-1)
    sequence_ids = np.repeat(np.arange(unit.first_sequence_id, unit.first_sequence_id + n_seq), ctx)
    positions = np.tile(np.arange(ctx), n_seq)
    keep = ~np.isin(token_ids, np.fromiter(excluded_token_ids, dtype=np.int64, count=len(excluded_token_ids)))
    keep_t = torch.from_numpy(keep)
    written = {}
    for hookpoint, target in targets.items():
        acts = torch.cat(chunks[hookpoint])[keep_t].float()
        data = encode_shard(
            acts, token_ids[keep], sequence_ids[keep], positions[keep], target.meta, compression=compression
        )
        target.store.put_bytes(unit.shard_name, data)
        stats, finite = shard_stats(acts, target.meta.dtype)
        entry = ShardEntry(
            name=unit.shard_name, rows=int(keep.sum()), size_bytes=len(data), sha256=sha256_hex(data),
            first_sequence_id=unit.first_sequence_id, n_sequences=n_seq, nonfinite_rows=int((~finite).sum()),
        )
        if entry.nonfinite_rows:
            log.warning("shard %s of %s: %d of %d rows hold NaN or Inf; kept in the shard, left out of the "
                        "statistics, skipped in training (train.nonfinite)", unit.shard_name, hookpoint,
                        entry.nonfinite_rows, entry.rows)
        written[hookpoint] = (entry, stats)
    total_s = time.perf_counter() - start
    return {
        hookpoint: ShardResult(entry, stats, tokens_forwarded=n_seq * ctx, forward_seconds=forward_s, total_seconds=total_s)
        for hookpoint, (entry, stats) in written.items()
    }


def shard_stats(acts: torch.Tensor, stored_dtype: str) -> tuple[ActivationStats, torch.Tensor]:
    """The statistics of a shard's finite rows, and which of its float32 rows ``acts`` are finite
    as stored (a float32 value beyond 65504 is Inf in float16).

    One squared copy and three matrix-vector products in float32 (a pass each): the producer's
    budget is a few percent of its forward pass, which float64 passes over every value took
    several times over. A float32 sum over a shard's rows is exact to about 1e-6 relative, far
    below what the statistics serve (the mean norm that scales the training's inputs, the
    mean and variance of each dimension)."""
    squares = acts * acts
    row_squares = squares @ torch.ones(acts.shape[1])
    # NaN or Inf in a row makes its sum of squares NaN or Inf; so does a finite value beyond
    # 1.8e19. Then (and for a narrower stored dtype) the rows are checked value by value and
    # the statistics of those kept taken in float64.
    finite = torch.isfinite(row_squares)
    if stored_dtype != "float32" or not finite.all():
        finite = torch.isfinite(acts.to(getattr(torch, stored_dtype))).all(dim=-1)
        kept = acts[finite].double()
        return ActivationStats(rows=kept.shape[0], norm_sum=float(kept.norm(dim=1).sum()), sum=kept.sum(0).tolist(),
                               sum_sq=(kept * kept).sum(0).tolist()), finite
    ones = torch.ones(acts.shape[0])
    stats = ActivationStats(rows=acts.shape[0], norm_sum=float(row_squares.double().sqrt().sum()),
                            sum=(ones @ acts).double().tolist(), sum_sq=(ones @ squares).double().tolist())
    return stats, finite


def produce_shard(
    unit: WorkUnit,
    *,
    harvester: ActivationHarvester,
    store: ObjectStore,
    meta: ShardMeta,
    excluded_token_ids: frozenset[int],
    batch_size: int,
    compression: str | None = None,
) -> ShardResult:
    """``produce_shards`` for one hookpoint, ``harvester``'s."""
    return produce_shards(
        unit, harvester=harvester, targets={harvester.hookpoint: ShardTarget(store, meta)},
        excluded_token_ids=excluded_token_ids, batch_size=batch_size, compression=compression,
    )[harvester.hookpoint]


def unit_rows(unit: WorkUnit, excluded_token_ids: frozenset[int]) -> int:
    """Rows the shard of ``unit`` will hold, known before any forward pass: one per token that
    is not excluded (``produce_shards`` keeps exactly these)."""
    excluded = np.fromiter(excluded_token_ids, dtype=np.int64, count=len(excluded_token_ids))
    return int((~np.isin(unit.tokens, excluded)).sum())
