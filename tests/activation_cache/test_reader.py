"""The reader's promises: exactly-once per epoch, exact resume, tailing a growing cache, several
readers at once, compression, and the same batches from S3 as from a local directory."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from cache_writer import CacheWriter, shard_meta, write_cache

from activation_cache.manifest import Manifest
from activation_cache.reader import ActivationReader, TailingAborted
from activation_cache.s3 import S3Store
from activation_cache.schema import ShardMeta, decode_shard, encode_shard
from activation_cache.store import LocalStore, ObjectStore

D_MODEL = 8
ROWS = [37, 50, 23, 64, 41, 55, 30]  # uneven on purpose


def _cache(store: ObjectStore, rows=ROWS, **kwargs) -> Manifest:
    return write_cache(store, rows, d_model=D_MODEL, **kwargs)


def _ids(batches) -> list[int]:
    return torch.cat(list(batches))[:, 0].long().tolist() if batches else []


def _reader(store, rank=0, world_size=1, **kwargs) -> ActivationReader:
    options = {"batch_size": 16, "seed": 7, "shuffle_buffer_rows": 24, **kwargs}
    return ActivationReader(store, rank=rank, world_size=world_size, **options)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_once_per_epoch_across_ranks(tmp_path, world_size):
    store = LocalStore(tmp_path)
    _cache(store)
    for epoch in range(2):
        seen = []
        for rank in range(world_size):
            seen += _ids(list(_reader(store, rank, world_size, drop_last=False).epoch(epoch)))
        assert sorted(seen) == list(range(sum(ROWS))), f"epoch {epoch}"
        kept = []
        readers = [_reader(store, rank, world_size) for rank in range(world_size)]
        counts = set()
        for reader in readers:
            batches = list(reader.epoch(epoch))
            counts.add(len(batches))
            assert all(b.shape == (16, D_MODEL) for b in batches)
            kept += _ids(batches)
        assert counts == {readers[0].batches_per_epoch(epoch)}, "equal steps on every rank"
        assert len(set(kept)) == len(kept), "no row twice"
        assert sum(ROWS) - len(kept) < world_size * 16, "only each rank's short tail is dropped"


def test_batches_mix_shards_and_epochs_differ(tmp_path):
    store = LocalStore(tmp_path)
    _cache(store)
    reader = _reader(store)
    first = torch.tensor(_ids([next(iter(reader.epoch(0)))]))
    assert len(set(np.searchsorted(np.cumsum(ROWS), first.numpy(), side="right").tolist())) > 1
    assert _ids(list(reader.epoch(0))) != _ids(list(reader.epoch(1)))


@pytest.mark.parametrize("cut", [0, 1, 9, 17, 18, 19])
def test_resume_continues_with_exactly_the_uninterrupted_batches(tmp_path, cut):
    store = LocalStore(tmp_path)
    _cache(store, dtype="bfloat16")
    stream = iter(_reader(store))
    uninterrupted = [next(stream) for _ in range(20)]  # 20 batches cross into epoch 2
    first = _reader(store)
    batches = iter(first)
    for _ in range(cut):
        next(batches)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = _reader(store)
    resumed.load_state_dict(state)
    rest = iter(resumed)
    for expected in uninterrupted[cut:]:
        assert torch.equal(next(rest), expected)


def test_resume_refuses_a_state_from_another_configuration(tmp_path):
    store = LocalStore(tmp_path)
    _cache(store)
    state = _reader(store).state_dict()
    with pytest.raises(ValueError, match="reader state has batch_size=16 but this reader has batch_size=32"):
        _reader(store, batch_size=32).load_state_dict(state)
    with pytest.raises(ValueError, match="reader state has seed=7 but this reader has seed=8"):
        _reader(store, seed=8).load_state_dict(state)
    other = _reader(store, shard_filter=lambda s: s.name != "shards/unit-000000.arrow")
    with pytest.raises(ValueError, match="other shards"):
        other.load_state_dict(state)


def _write_slowly(writer: CacheWriter, rows: list[int], delay: float) -> threading.Thread:
    def run() -> None:
        for i, n in enumerate(rows):
            time.sleep(delay)
            writer.add(i, n)
        writer.complete()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("world_size", [1, 2])
def test_tailing_readers_take_shards_as_they_are_committed(tmp_path, world_size):
    store = LocalStore(tmp_path)
    writer = CacheWriter(store, d_model=D_MODEL)
    writer.add(99, 5)  # not in ROWS: makes the row count differ from a complete cache's
    thread = _write_slowly(writer, ROWS, delay=0.05)
    seen, results = [], {}

    def read(rank: int) -> None:
        reader = _reader(store, rank, world_size, follow=True, poll_seconds=0.01, drop_last=False)
        results[rank] = _ids(list(reader.epoch(0)))

    readers = [threading.Thread(target=read, args=(rank,)) for rank in range(world_size)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=60)
    thread.join()
    for rank in range(world_size):
        seen += results[rank]
    assert sorted(seen) == list(range(5 + sum(ROWS)))


def test_tailing_epoch_then_planned_epochs(tmp_path):
    store = LocalStore(tmp_path)
    writer = CacheWriter(store, d_model=D_MODEL)
    thread = _write_slowly(writer, ROWS, delay=0.02)
    reader = _reader(store, follow=True, poll_seconds=0.01, drop_last=False)
    assert sorted(_ids(list(reader.epoch(0)))) == list(range(sum(ROWS)))
    thread.join()
    assert sorted(_ids(list(reader.epoch(1)))) == list(range(sum(ROWS)))


def test_tailing_reader_resumes_without_losing_or_repeating_rows(tmp_path):
    store = LocalStore(tmp_path)
    writer = CacheWriter(store, d_model=D_MODEL)
    for i, n in enumerate(ROWS[:3]):
        writer.add(i, n)
    first = _reader(store, follow=True, poll_seconds=0.01, drop_last=False)
    stream = iter(first)
    taken = _ids([next(stream) for _ in range(3)])
    state = json.loads(json.dumps(first.state_dict()))
    for i, n in enumerate(ROWS[3:], start=3):
        writer.add(i, n)
    writer.complete()
    resumed = _reader(store, follow=True, poll_seconds=0.01, drop_last=False)
    resumed.load_state_dict(state)
    rest = _ids(list(resumed.epoch(0)))
    assert sorted(taken + rest) == list(range(sum(ROWS)))


def test_tailing_gives_up_with_a_named_cause_when_nothing_comes(tmp_path):
    store = LocalStore(tmp_path)
    writer = CacheWriter(store, d_model=D_MODEL)
    writer.add(0, 40)
    reader = _reader(store, follow=True, poll_seconds=0.01, follow_timeout_s=0.2)
    with pytest.raises(TimeoutError, match=r"no new shard for 0 s and the manifest is not complete"):
        list(reader.epoch(0))


def test_tailing_deals_shards_to_the_rank_it_is_told(tmp_path):
    store = LocalStore(tmp_path)
    thread = _write_slowly(CacheWriter(store, d_model=D_MODEL), ROWS, delay=0.02)
    starts = np.cumsum([0, *ROWS])
    for rank in (0, 1):
        # Shard i goes to rank i % 2, whatever its name hashes to.
        reader = _reader(store, rank, 2, follow=True, poll_seconds=0.01, drop_last=False,
                         shard_rank=lambda name: int(name[-11:-6]) % 2)
        expected = [row for i in range(rank, len(ROWS), 2) for row in range(starts[i], starts[i + 1])]
        assert sorted(_ids(list(reader.epoch(0)))) == expected
    thread.join()


def test_tailing_stops_with_the_reason_abort_gives(tmp_path):
    store = LocalStore(tmp_path)
    writer = CacheWriter(store, d_model=D_MODEL)
    writer.add(0, 40)
    writer.add(1, 40)  # more than twice the shuffle buffer: batches come before the cache completes
    reason: list[str] = []
    reader = _reader(store, follow=True, poll_seconds=0.01, follow_timeout_s=30,
                     abort=lambda: reason[0] if reason else None)
    batches = reader.epoch(0)
    assert len(next(batches)) == 16, "committed rows are read while nothing is wrong"
    reason.append("filling the cache failed: ProducerFailed: work unit shards/unit-000002.arrow failed 3 times")
    with pytest.raises(TailingAborted, match=r"stopped reading a cache still being written: filling the cache failed: "
                                             r"ProducerFailed: work unit shards/unit-000002.arrow"):
        list(batches)


def test_several_readers_share_one_cache(tmp_path):
    store = LocalStore(tmp_path)
    _cache(store)
    results: dict[int, list[int]] = {}

    def read(seed: int) -> None:
        results[seed] = _ids(list(_reader(store, seed=seed, drop_last=False).epoch(0)))

    threads = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(sorted(ids) == list(range(sum(ROWS))) for ids in results.values())
    assert len({tuple(ids) for ids in results.values()}) == 4, "each seed its own order"


def test_small_prefetch_budget_still_reads_everything(tmp_path):
    store = LocalStore(tmp_path)
    _cache(store)
    reader = _reader(store, prefetch_bytes=1, read_threads=1, drop_last=False)
    assert sorted(_ids(list(reader.epoch(0)))) == list(range(sum(ROWS)))


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_shards_read_back_bit_exact_and_smaller(tmp_path, compression):
    acts = torch.zeros(256, 64)
    acts[:, :4] = torch.randn(256, 4)  # mostly zeros: compressible
    meta = ShardMeta(model="m", revision="r", hookpoint="h", d_model=64, dtype="bfloat16", cache_key="k")
    args = (acts, np.zeros(256), np.zeros(256), np.arange(256), meta)
    plain, packed = encode_shard(*args), encode_shard(*args, compression=compression)
    assert len(packed) < len(plain) / 4
    assert torch.equal(decode_shard(packed).activations, decode_shard(plain).activations)
    store = LocalStore(tmp_path)
    _cache(store, compression=compression)
    assert sorted(_ids(list(_reader(store, drop_last=False).epoch(0)))) == list(range(sum(ROWS)))


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match=r"compression='gzip': expected one of"):
        encode_shard(torch.zeros(1, D_MODEL), [0], [0], [0], shard_meta(D_MODEL), compression="gzip")


@pytest.mark.integration
def test_s3_and_local_caches_give_the_same_batches(tmp_path, s3_bucket_uri):
    torch.manual_seed(0)
    local = LocalStore(tmp_path)
    _cache(local, dtype="float16")
    remote = S3Store(s3_bucket_uri)
    for key in local.list(""):
        remote.put_bytes(key, local.get_bytes(key))
    for rank in range(2):
        a = list(_reader(local, rank, 2, read_threads=3).epoch(1))
        b = list(_reader(remote, rank, 2, read_threads=3).epoch(1))
        assert len(a) == len(b) > 0
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
