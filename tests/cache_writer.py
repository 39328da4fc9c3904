"""Small activation caches for tests, written as the driver leaves them: each shard first, then the
manifest that lists it. Each row's first value is its global row number, so a test can track rows;
with ``rows_of`` a row's values are a function of its (sequence_id, position) instead, so the two
caches of a transcoder's pair (the 2L of a cross-layer transcoder, ``layer_rows``) can be written
over the same tokens and a test can check alignment."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from activation_cache.manifest import ActivationStats, Manifest, ShardEntry, commit_manifest
from activation_cache.schema import ShardMeta, encode_shard, sha256_hex
from activation_cache.store import ObjectStore

HOOKPOINT = "model.layers.1"


RowsOf = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(sequence_ids, positions) of a shard's rows -> their activations (rows, d_model)."""


def shard_meta(d_model: int, dtype: str = "float32", cache_key: str = "k", *, model: str = "tiny",
               hookpoint: str = HOOKPOINT) -> ShardMeta:
    return ShardMeta(model=model, revision="r1", hookpoint=hookpoint, d_model=d_model, dtype=dtype,
                     cache_key=cache_key)


class CacheWriter:
    """Adds shards to a cache one at a time, committing the manifest after each."""

    def __init__(self, store: ObjectStore, *, d_model: int, dtype: str = "float32", compression: str | None = None,
                 cache_key: str = "k", key_inputs: dict | None = None, model: str = "tiny",
                 hookpoint: str = HOOKPOINT, rows_of: RowsOf | None = None):
        self.store, self.compression, self.rows_of = store, compression, rows_of
        self.meta = shard_meta(d_model, dtype, cache_key, model=model, hookpoint=hookpoint)
        self.manifest = Manifest(cache_key=cache_key, key_inputs=key_inputs or {}, model=model, revision="r1",
                                 hookpoint=hookpoint, d_model=d_model, dtype=dtype)
        self.next_row = 0

    def add(self, index: int, rows: int, *, positions: np.ndarray | None = None) -> None:
        """Shard ``shards/unit-<index>.arrow`` of ``rows`` rows, holding sequence ``index`` at
        ``positions`` (default 0, 1, ...)."""
        sequence_ids = np.full(rows, index)
        positions = np.arange(rows) if positions is None else np.asarray(positions)
        if self.rows_of is not None:
            acts = torch.from_numpy(np.asarray(self.rows_of(sequence_ids, positions), dtype=np.float32))
        else:
            acts = torch.randn(rows, self.meta.d_model, generator=torch.Generator().manual_seed(index))
            acts[:, 0] = torch.arange(self.next_row, self.next_row + rows, dtype=torch.float32)
        self.next_row += rows
        data = encode_shard(acts, np.zeros(rows), sequence_ids, positions, self.meta, compression=self.compression)
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


def layer_rows(layer: int, width: int, *, target: bool) -> RowsOf:
    """Rows that say whose they are: ``[layer, target, sequence_id, position, ...]``, the rest small
    integers of all four (exact in bfloat16 for sequences and positions below 128), so that each
    layer's cache has its own mean and norm."""
    if width < 4:
        raise ValueError(f"width={width}: layer_rows needs at least 4 columns")

    def rows_of(seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        head = [np.full_like(seq, layer), np.full_like(seq, int(target)), seq, pos]
        rest = [(seq + (j + layer) * pos + 3 * layer + int(target)) % 13 for j in range(4, width)]
        return np.stack(head + rest, 1)

    return rows_of
