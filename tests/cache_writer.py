"""Small activation caches for tests, written as the driver leaves them: each shard first, then the
manifest that lists it. Each row's first value is its global row number, so a test can track rows."""

from __future__ import annotations

import numpy as np
import torch

from activation_cache.manifest import ActivationStats, Manifest, ShardEntry, commit_manifest
from activation_cache.schema import ShardMeta, encode_shard, sha256_hex
from activation_cache.store import ObjectStore

HOOKPOINT = "model.layers.1"


def shard_meta(d_model: int, dtype: str = "float32", cache_key: str = "k") -> ShardMeta:
    return ShardMeta(model="tiny", revision="r1", hookpoint=HOOKPOINT, d_model=d_model, dtype=dtype,
                     cache_key=cache_key)


class CacheWriter:
    """Adds shards to a cache one at a time, committing the manifest after each."""

    def __init__(self, store: ObjectStore, *, d_model: int, dtype: str = "float32", compression: str | None = None,
                 cache_key: str = "k", key_inputs: dict | None = None):
        self.store, self.compression = store, compression
        self.meta = shard_meta(d_model, dtype, cache_key)
        self.manifest = Manifest(cache_key=cache_key, key_inputs=key_inputs or {}, model="tiny", revision="r1",
                                 hookpoint=HOOKPOINT, d_model=d_model, dtype=dtype)
        self.next_row = 0

    def add(self, index: int, rows: int) -> None:
        """Shard ``shards/unit-<index>.arrow`` of ``rows`` rows, holding sequence ``index``."""
        acts = torch.randn(rows, self.meta.d_model, generator=torch.Generator().manual_seed(index))
        acts[:, 0] = torch.arange(self.next_row, self.next_row + rows, dtype=torch.float32)
        self.next_row += rows
        data = encode_shard(acts, np.zeros(rows), np.full(rows, index), np.arange(rows), self.meta,
                            compression=self.compression)
        name = f"shards/unit-{index:06d}.arrow"
        self.store.put_bytes(name, data)
        entry = ShardEntry(name=name, rows=rows, size_bytes=len(data), sha256=sha256_hex(data),
                           first_sequence_id=index, n_sequences=1)
        self.manifest = self.manifest.with_shard(entry, ActivationStats.of(acts.numpy()))
        commit_manifest(self.store, self.manifest)

    def complete(self) -> None:
        self.manifest.complete = True
        commit_manifest(self.store, self.manifest)


def write_cache(store: ObjectStore, rows_per_shard: list[int], *, complete: bool = True, **writer_options) -> Manifest:
    """A cache of one shard per entry of ``rows_per_shard``; ``writer_options`` go to ``CacheWriter``."""
    writer = CacheWriter(store, **writer_options)
    for index, rows in enumerate(rows_per_shard):
        writer.add(index, rows)
    if complete:
        writer.complete()
    return writer.manifest
