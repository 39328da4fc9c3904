"""Shard format, manifest and reader: what a training run relies on from the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_writer import shard_meta, write_cache

from activation_cache.manifest import (
    ActivationStats,
    Manifest,
    load_manifest,
)
from activation_cache.producing import shard_stats
from activation_cache.reader import ActivationReader, read_shard, rebatch, shuffle_rows
from activation_cache.schema import (
    CorruptShardError,
    ShardMeta,
    decode_shard,
    encode_shard,
)
from activation_cache.store import LocalStore

D_MODEL = 16


def _meta(dtype: str = "float32") -> ShardMeta:
    return shard_meta(D_MODEL, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shard_round_trip_keeps_values_and_provenance(dtype):
    acts = torch.randn(37, D_MODEL) * 100
    token_ids = np.arange(37) + 1000
    sequence_ids = np.arange(37) // 10
    positions = np.arange(37) % 10
    shard = decode_shard(encode_shard(acts, token_ids, sequence_ids, positions, _meta(dtype)))
    expected = acts.to(getattr(torch, dtype)).float()
    assert torch.equal(shard.activations, expected), "stored values must be bit-exact in the stored dtype"
    np.testing.assert_array_equal(shard.token_ids, token_ids)
    np.testing.assert_array_equal(shard.sequence_ids, sequence_ids)
    np.testing.assert_array_equal(shard.positions, positions)
    assert shard.meta == _meta(dtype)


def test_encode_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"expected \(n_rows, 16\)"):
        encode_shard(torch.zeros(3, 8), np.zeros(3), np.zeros(3), np.zeros(3), _meta())


def _write_cache(store: LocalStore, rows_per_shard: list[int]) -> Manifest:
    return write_cache(store, rows_per_shard, d_model=D_MODEL)


def test_manifest_commit_round_trip_and_no_duplicate_shards(tmp_path):
    store = LocalStore(tmp_path)
    assert load_manifest(store) is None
    manifest = _write_cache(store, [5, 7])
    loaded = load_manifest(store)
    assert loaded == manifest
    assert loaded.rows == 12 and loaded.stats.rows == 12
    np.testing.assert_allclose(loaded.stats.mean()[0], np.arange(12).mean())
    with pytest.raises(ValueError, match="already committed"):
        manifest.with_shard(manifest.shards[0], ActivationStats())


def test_reader_gives_each_row_to_exactly_one_rank_per_epoch(tmp_path):
    store = LocalStore(tmp_path)
    manifest = _write_cache(store, [40, 40, 40, 40, 40, 40])
    seen = []
    for rank in range(2):
        reader = ActivationReader(store, manifest.shards, rank=rank, world_size=2, batch_size=8,
                                  seed=3, shuffle_buffer_rows=16)
        batches = list(reader.epoch(0))
        assert len(batches) == reader.batches_per_epoch(0) == 15
        assert all(b.shape == (8, D_MODEL) for b in batches)
        seen.extend(torch.cat(batches)[:, 0].long().tolist())
    assert sorted(seen) == list(range(240))


def test_reader_shuffles_across_shards_and_epochs(tmp_path):
    store = LocalStore(tmp_path)
    manifest = _write_cache(store, [50, 50, 50, 50])
    reader = ActivationReader(store, manifest.shards, rank=0, world_size=1, batch_size=50,
                              seed=0, shuffle_buffer_rows=64)
    first_batch = next(iter(reader.epoch(0)))[:, 0].long()
    assert len(set((first_batch // 50).tolist())) > 1, "a batch must mix rows from several shards"
    assert not torch.equal(torch.cat(list(reader.epoch(0))), torch.cat(list(reader.epoch(1))))
    again = ActivationReader(store, manifest.shards, rank=0, world_size=1, batch_size=50,
                             seed=0, shuffle_buffer_rows=64)
    assert torch.equal(torch.cat(list(reader.epoch(1))), torch.cat(list(again.epoch(1)))), "same seed, same order"


def test_corrupt_and_missing_shards_are_named(tmp_path):
    store = LocalStore(tmp_path)
    manifest = _write_cache(store, [10, 10])
    entry = manifest.shards[0]
    data = bytearray(store.get_bytes(entry.name))
    data[-100] ^= 0xFF
    store.put_bytes(entry.name, bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard shards/unit-000000.arrow: checksum"):
        read_shard(store, entry)
    store.delete(manifest.shards[1].name)
    with pytest.raises(CorruptShardError, match=r"unit-000001.arrow: listed in the manifest but missing"):
        read_shard(store, manifest.shards[1])
    reader = ActivationReader(store, manifest.shards, rank=0, world_size=1, batch_size=4, seed=0)
    with pytest.raises(CorruptShardError):
        list(reader.epoch(0))


def test_truncated_shard_is_reported(tmp_path):
    store = LocalStore(tmp_path)
    manifest = _write_cache(store, [10])
    entry = manifest.shards[0]
    store.put_bytes(entry.name, store.get_bytes(entry.name)[:200])
    with pytest.raises(CorruptShardError, match=r"unit-000000.arrow: 200 bytes, manifest says"):
        read_shard(store, entry)


def test_shuffle_and_rebatch_keep_every_row():
    chunks = [torch.arange(i * 10, i * 10 + 10).float()[:, None] for i in range(7)]
    out = torch.cat(list(shuffle_rows(iter(chunks), buffer_rows=15, generator=torch.Generator().manual_seed(0))))
    assert sorted(out[:, 0].long().tolist()) == list(range(70))
    batches = list(rebatch(iter(chunks), 16))
    assert [len(b) for b in batches] == [16, 16, 16, 16]
    assert torch.equal(torch.cat(batches)[:, 0], torch.arange(64).float())


def test_one_shard_feeds_two_ranks_half_each(tmp_path):
    store = LocalStore(tmp_path)
    manifest = _write_cache(store, [10])
    halves = [
        torch.cat(list(ActivationReader(store, manifest.shards, rank=rank, world_size=2, batch_size=5, seed=0).epoch(0)))
        for rank in range(2)
    ]
    assert sorted(torch.cat(halves)[:, 0].long().tolist()) == list(range(10))
    assert [len(h) for h in halves] == [5, 5]


@pytest.mark.parametrize("stored", ["float32", "float16"])
def test_a_shards_float32_statistics_equal_float64_ones_and_skip_the_rows_not_finite_as_stored(stored):
    """The producer's statistics (float32 passes) against float64 over the same finite rows."""
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(8192, 64, generator=generator) * torch.logspace(-2, 1, 64) + 3.0
    acts[5, 1], acts[700, 2], acts[701, 3] = float("nan"), float("inf"), -float("inf")
    acts[900, 4] = 1e20  # finite in float32, its square is not
    acts[901, 5] = 1e5  # finite in float32, beyond float16
    stats, finite = shard_stats(acts, stored)
    expected = torch.isfinite(acts.to(getattr(torch, stored))).all(dim=-1)
    assert torch.equal(finite, expected) and stats.rows == int(expected.sum()) == 8192 - (3 + 2 * (stored == "float16"))
    reference = ActivationStats.of(acts[expected].numpy())
    clean = acts[torch.isfinite(acts.half()).all(dim=-1)]  # the float32 passes' case: every row finite
    for got, want in ((stats, reference), (shard_stats(clean, "float32")[0], ActivationStats.of(clean.numpy()))):
        assert got.rows == want.rows and got.norm_sum == pytest.approx(want.norm_sum, rel=1e-6)
        np.testing.assert_allclose(got.sum, want.sum, rtol=1e-5, atol=1e-2)
        np.testing.assert_allclose(got.sum_sq, want.sum_sq, rtol=1e-5)
