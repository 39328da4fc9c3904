"""Turning token sequences into committed-ready shards (the producer's work, no Ray here).

The token stream is cut into deterministic work units; each unit becomes exactly one shard
with a deterministic name, so a unit that is redone (a producer died) rewrites the same shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from activation_cache.hooking import ActivationHarvester
from activation_cache.manifest import ActivationStats, ShardEntry
from activation_cache.schema import ShardMeta, encode_shard, sha256_hex
from activation_cache.store import ObjectStore


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
    """Run the model over ``unit``, drop excluded tokens, write the shard (IPC buffers compressed
    with ``compression``, if any); return its entry."""
    start = time.perf_counter()
    n_seq, ctx = unit.tokens.shape
    chunks, forward_s = [], 0.0
    for lo in range(0, n_seq, batch_size):
        ids = torch.from_numpy(unit.tokens[lo : lo + batch_size])
        t = time.perf_counter()
        acts = harvester(ids)
        forward_s += time.perf_counter() - t
        chunks.append(acts.reshape(-1, acts.shape[-1]).float().cpu())
    acts = torch.cat(chunks)
    token_ids = unit.tokens.reshape(-1)
    sequence_ids = np.repeat(np.arange(unit.first_sequence_id, unit.first_sequence_id + n_seq), ctx)
    positions = np.tile(np.arange(ctx), n_seq)
    keep = ~np.isin(token_ids, np.fromiter(excluded_token_ids, dtype=np.int64, count=len(excluded_token_ids)))
    keep_t = torch.from_numpy(keep)
    data = encode_shard(
        acts[keep_t], token_ids[keep], sequence_ids[keep], positions[keep], meta, compression=compression
    )
    store.put_bytes(unit.shard_name, data)
    entry = ShardEntry(
        name=unit.shard_name, rows=int(keep.sum()), size_bytes=len(data), sha256=sha256_hex(data),
        first_sequence_id=unit.first_sequence_id, n_sequences=n_seq,
    )
    return ShardResult(
        entry=entry, stats=ActivationStats.of(acts[keep_t].numpy()),
        tokens_forwarded=n_seq * ctx, forward_seconds=forward_s, total_seconds=time.perf_counter() - start,
    )
