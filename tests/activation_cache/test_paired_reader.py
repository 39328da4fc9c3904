"""A transcoder's data: (x, y) pairs read from an input cache and a target cache of one forward
pass, aligned token by token after the shuffle, once per epoch across ranks, exactly resumable,
tailing both caches, and refused in one line when the two caches are not a pair."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from cache_writer import CacheWriter, write_cache

from activation_cache.errors import CorruptShardError
from activation_cache.manifest import Manifest, check_paired_caches, load_manifest
from activation_cache.plan import PlanSettings, complete_plan, split_holdout, tailing_plan
from activation_cache.reader import ActivationReader, read_shard, read_shard_pair
from activation_cache.store import LocalStore

ROWS = [37, 50, 23, 64, 41, 55, 30]  # uneven on purpose
D_IN, D_OUT = 4, 6
KEY_INPUTS = {"model": "tiny", "revision": "r1", "tokens_sha256": "aa11", "context_length": 64}


def x_rows(seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.stack([seq, pos, 100 * seq + pos, -pos], 1)


def y_rows(seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.stack([seq, pos, 2 * seq, pos % 7, seq + pos, 1 + 0 * seq], 1)


@pytest.fixture
def pair(tmp_path) -> tuple[LocalStore, LocalStore]:
    """Two complete caches over the same tokens; the target stored as bfloat16 (exact for these values)."""
    inputs, targets = LocalStore(tmp_path / "mlp_in"), LocalStore(tmp_path / "mlp_out")
    write_cache(inputs, ROWS, d_model=D_IN, rows_of=x_rows, hookpoint="mlp_in.1", key_inputs=KEY_INPUTS)
    write_cache(targets, ROWS, d_model=D_OUT, dtype="bfloat16", rows_of=y_rows, hookpoint="mlp_out.1",
                key_inputs=KEY_INPUTS)
    return inputs, targets


def _manifest(store) -> Manifest:
    manifest = load_manifest(store)
    assert manifest is not None
    return manifest


def _reader(store, rank=0, world_size=1, **kwargs) -> ActivationReader:
    options = {"batch_size": 16, "seed": 7, "shuffle_buffer_rows": 24, **kwargs}
    return ActivationReader(store, rank=rank, world_size=world_size, **options)


def _tokens(pairs) -> list[tuple[int, int]]:
    """The (sequence_id, position) of every pair, after checking that y belongs to x's token."""
    tokens = []
    for x, y in pairs:
        assert x.dtype == y.dtype == torch.float32 and x.shape[1] == D_IN and y.shape[1] == D_OUT
        seq, pos = x[:, 0].numpy(), x[:, 1].numpy()
        np.testing.assert_array_equal(x.numpy(), x_rows(seq, pos))
        np.testing.assert_array_equal(y.numpy(), y_rows(seq, pos), err_msg="y is not x's token's target")
        tokens += list(zip(seq.astype(int).tolist(), pos.astype(int).tolist(), strict=True))
    return tokens


ALL_TOKENS = sorted((seq, pos) for seq, rows in enumerate(ROWS) for pos in range(rows))


def test_pairs_are_aligned_once_per_epoch_across_ranks_and_x_is_the_unpaired_stream(pair):
    inputs, targets = pair
    for epoch in range(2):
        seen = []
        for rank in range(2):
            paired = list(_reader(inputs, rank, 2, drop_last=False, target_store=targets).epoch(epoch))
            alone = list(_reader(inputs, rank, 2, drop_last=False).epoch(epoch))
            assert len(paired) == len(alone)
            for (x, _), batch in zip(paired, alone, strict=True):
                torch.testing.assert_close(x, batch, rtol=0, atol=0)
            seen += _tokens(paired)
        assert sorted(seen) == ALL_TOKENS, f"epoch {epoch}: every token exactly once across ranks"
    # The shuffle mixes shards inside a batch, so alignment is not an accident of shard order.
    x, _ = next(iter(_reader(inputs, target_store=targets).epoch(0)))
    assert len(set(x[:, 0].tolist())) > 1


@pytest.mark.parametrize("cut", [0, 5, 9, 13])
def test_resume_mid_epoch_gives_exactly_the_remaining_pairs(pair, cut):
    inputs, targets = pair
    stream = iter(_reader(inputs, target_store=targets))
    uninterrupted = [next(stream) for _ in range(15)]  # 15 batches cross into epoch 1
    first = _reader(inputs, target_store=targets)
    batches = iter(first)
    done = [next(batches) for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = _reader(inputs, target_store=targets)
    resumed.load_state_dict(state)
    rest = iter(resumed)
    after = [next(rest) for _ in range(15 - cut)]
    assert _tokens(done + after) == _tokens(uninterrupted)
    with pytest.raises(ValueError, match="paired"):
        _reader(inputs).load_state_dict(state)
    with pytest.raises(ValueError, match="paired"):
        _reader(inputs, target_store=targets).load_state_dict(_reader(inputs).state_dict())


def test_a_shard_whose_positions_differ_is_refused_naming_it_and_both_caches(tmp_path):
    inputs, targets = LocalStore(tmp_path / "in"), LocalStore(tmp_path / "out")
    write_cache(inputs, ROWS[:3], d_model=D_IN, rows_of=x_rows)
    writer = CacheWriter(targets, d_model=D_OUT, rows_of=y_rows)
    writer.add(0, ROWS[0])
    writer.add(1, ROWS[1], positions=np.arange(ROWS[1]) + 1)  # shifted by one token
    writer.add(2, ROWS[2])
    writer.complete()
    with pytest.raises(CorruptShardError) as err:
        list(_reader(inputs, target_store=targets, drop_last=False).epoch(0))
    message = str(err.value)
    assert "shards/unit-000001.arrow" in message and inputs.uri in message and targets.uri in message
    assert "position" in message and "\n" not in message
    entries = {s.name: s for s in writer.manifest.shards}
    with pytest.raises(CorruptShardError, match="unit-000001"):
        read_shard_pair(inputs, targets, entries["shards/unit-000001.arrow"], entries["shards/unit-000001.arrow"])


def test_read_shard_pair_gives_the_two_caches_rows_of_one_shard(pair):
    inputs, targets = pair
    x_entry, y_entry = _manifest(inputs).shards[3], _manifest(targets).shards[3]
    x, y = read_shard_pair(inputs, targets, x_entry, y_entry)
    np.testing.assert_array_equal(x.activations.numpy(), read_shard(inputs, x_entry).activations.numpy())
    np.testing.assert_array_equal(y.activations.numpy(), y_rows(np.full(ROWS[3], 3), np.arange(ROWS[3])))
    np.testing.assert_array_equal(x.positions, y.positions)


@pytest.mark.parametrize(("field", "other"), [("tokens_sha256", "bb22"), ("model", "other-model")])
def test_check_paired_caches_refuses_other_token_streams_and_models_in_one_line(pair, tmp_path, field, other):
    inputs, targets = pair
    check_paired_caches(_manifest(inputs), _manifest(targets), input_uri=inputs.uri, target_uri=targets.uri)
    stranger = LocalStore(tmp_path / "stranger")
    options = {"model": other} if field == "model" else {"key_inputs": {**KEY_INPUTS, field: other}}
    write_cache(stranger, ROWS, d_model=D_OUT, rows_of=y_rows, hookpoint="mlp_out.1", **options)
    with pytest.raises(ValueError) as err:
        check_paired_caches(_manifest(inputs), _manifest(stranger), input_uri=inputs.uri, target_uri=stranger.uri)
    message = str(err.value)
    assert "\n" not in message and field in message and other in message and inputs.uri in message
    assert repr(KEY_INPUTS.get(field, "tiny")) in message, "both values named"


def test_check_paired_caches_refuses_other_shards_or_row_counts(pair, tmp_path):
    inputs, _ = pair
    shorter, fewer = LocalStore(tmp_path / "shorter"), LocalStore(tmp_path / "fewer")
    write_cache(shorter, [*ROWS[:-1], ROWS[-1] - 1], d_model=D_OUT, rows_of=y_rows, key_inputs=KEY_INPUTS)
    write_cache(fewer, ROWS[:-1], d_model=D_OUT, rows_of=y_rows, key_inputs=KEY_INPUTS)
    with pytest.raises(ValueError, match=r"rows of shard shards/unit-000006.arrow=30 .*=29"):
        check_paired_caches(_manifest(inputs), _manifest(shorter), input_uri=inputs.uri, target_uri=shorter.uri)
    with pytest.raises(ValueError, match=r"shard shards/unit-000006.arrow is in complete cache .*mlp_in"):
        check_paired_caches(_manifest(inputs), _manifest(fewer), input_uri=inputs.uri, target_uri=fewer.uri)


SETTINGS = PlanSettings(batch_size=16, epochs=2, max_tokens=None, holdout_fraction=0.2, seed=3,
                        shuffle_buffer_rows=24, read_threads=2, prefetch_bytes=1 << 20, normalize=True,
                        follow_timeout_s=30.0, normalization_rows=1)


def test_complete_plan_pairs_the_same_split_and_takes_the_target_statistics(pair):
    inputs, targets = pair
    x_manifest, y_manifest = _manifest(inputs), _manifest(targets)
    plans = [complete_plan(inputs, x_manifest, SETTINGS, rank=r, world_size=2, target=(targets, y_manifest))
             for r in range(2)]
    alone = complete_plan(inputs, x_manifest, SETTINGS, rank=0, world_size=2)
    train, holdout = split_holdout(y_manifest.shards, SETTINGS.holdout_fraction)
    assert plans[0].holdout == alone.holdout == [s.name for s in holdout]
    assert plans[0].steps == alone.steps and plans[0].d_out == D_OUT and alone.d_out is None
    assert alone.target_scale is None and alone.target_mean is None
    y_all = y_rows(np.repeat(np.arange(len(ROWS)), ROWS), np.concatenate([np.arange(n) for n in ROWS]))
    np.testing.assert_allclose(plans[1].target_mean, y_all.mean(0), rtol=1e-9)
    assert plans[1].target_scale == pytest.approx(np.sqrt(D_OUT) / np.linalg.norm(y_all, axis=1).mean(), rel=1e-9)
    assert plans[1].scale == alone.scale
    train_tokens = [(s.first_sequence_id, p) for s in train for p in range(s.rows)]
    seen = [t for plan in plans for t in _tokens(plan.reader.epoch(0))]
    assert len(set(seen)) == len(seen) and set(seen) <= set(train_tokens)
    other = LocalStore(inputs.root.parent / "other")
    write_cache(other, ROWS, d_model=D_OUT, rows_of=y_rows, key_inputs={**KEY_INPUTS, "context_length": 32})
    with pytest.raises(ValueError, match="context_length=64 .* context_length=32"):
        complete_plan(inputs, x_manifest, SETTINGS, rank=0, world_size=1, target=(other, _manifest(other)))


def test_a_tailing_paired_reader_takes_a_shard_once_both_caches_list_it(tmp_path):
    inputs, targets = LocalStore(tmp_path / "in"), LocalStore(tmp_path / "out")
    write_cache(inputs, ROWS, d_model=D_IN, rows_of=x_rows)  # the input cache is ahead
    late = CacheWriter(targets, d_model=D_OUT, rows_of=y_rows)
    late.add(0, ROWS[0])
    readers = [_reader(inputs, r, 2, drop_last=False, follow=True, poll_seconds=0.01, follow_timeout_s=30,
                       target_store=targets) for r in range(2)]
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda r=r: results.setdefault(r, list(readers[r].epoch(0)))) for r in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # the readers poll while only shard 0 is in both caches
    for index, rows in enumerate(ROWS[1:], start=1):
        late.add(index, rows)
    late.complete()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(t for r in range(2) for t in _tokens(results[r])) == ALL_TOKENS
    later = [t for r in range(2) for t in _tokens(readers[r].epoch(1))]
    assert sorted(later) == ALL_TOKENS, "later epochs are planned over both complete caches"


def test_a_tailing_plan_pairs_the_caches_and_takes_the_target_statistics(pair):
    inputs, targets = pair
    expected = {s.name: s.rows for s in _manifest(inputs).shards}
    # No process group: each plan takes the statistics itself, as global rank 0 would for all.
    plans = [tailing_plan(inputs, expected, SETTINGS, rank=r, world_size=2, global_rank=0, abort=lambda: None,
                          target_cache=targets) for r in range(2)]
    y_all = y_rows(np.repeat(np.arange(len(ROWS)), ROWS), np.concatenate([np.arange(n) for n in ROWS]))
    np.testing.assert_allclose(plans[0].target_mean, y_all.mean(0), rtol=1e-9)
    assert plans[0].d_out == D_OUT and plans[0].target_scale == pytest.approx(
        np.sqrt(D_OUT) / np.linalg.norm(y_all, axis=1).mean(), rel=1e-9)
    train = [(seq, pos) for seq, rows in enumerate(ROWS) if f"shards/unit-{seq:06d}.arrow" not in plans[0].holdout
             for pos in range(rows)]
    seen = [t for plan in plans for t in _tokens(plan.reader.epoch(0))]
    assert len(set(seen)) == len(seen) and set(seen) <= set(train) and len(seen) >= len(train) - 2 * 16
