"""A cross-layer transcoder's data: a token's L inputs and L targets read together from 2L caches of
one forward pass, aligned token by token after the shuffle, once per epoch across ranks, exactly
resumable, tailing every cache, refused in one line when a cache is not of the group, and planned
with each layer's own scales and means."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest
import torch
from cache_writer import CacheWriter, layer_rows, write_cache

from activation_cache.errors import CorruptShardError
from activation_cache.manifest import Manifest, load_manifest
from activation_cache.plan import PlanSettings, complete_plan, split_holdout, tailing_plan
from activation_cache.reader import ActivationReader, read_shard_group
from activation_cache.store import LocalStore

ROWS = [37, 50, 23, 64, 41, 55, 30]  # uneven on purpose
LAYERS = 3
D_IN, D_OUT = 5, 6
KEY_INPUTS = {"model": "tiny", "revision": "r1", "tokens_sha256": "aa11", "context_length": 64}
ALL_TOKENS = sorted((seq, pos) for seq, rows in enumerate(ROWS) for pos in range(rows))


def _write_group(root, rows=ROWS, **target_options) -> tuple[list[LocalStore], list[LocalStore]]:
    """Each layer's input and target cache over the same tokens; layer 1's target stored as bfloat16."""
    inputs = [LocalStore(root / f"mlp_in.{layer}") for layer in range(LAYERS)]
    targets = [LocalStore(root / f"mlp_out.{layer}") for layer in range(LAYERS)]
    for layer in range(LAYERS):
        write_cache(inputs[layer], rows, d_model=D_IN, rows_of=layer_rows(layer, D_IN, target=False),
                    hookpoint=f"mlp_in.{layer}", key_inputs=KEY_INPUTS)
        write_cache(targets[layer], rows, d_model=D_OUT, rows_of=layer_rows(layer, D_OUT, target=True),
                    hookpoint=f"mlp_out.{layer}", key_inputs=KEY_INPUTS,
                    dtype="bfloat16" if layer == 1 else "float32", **target_options)
    return inputs, targets


@pytest.fixture
def group(tmp_path) -> tuple[list[LocalStore], list[LocalStore]]:
    return _write_group(tmp_path)


def _manifest(store) -> Manifest:
    manifest = load_manifest(store)
    assert manifest is not None
    return manifest


def _reader(inputs, targets=None, rank=0, world_size=1, **kwargs) -> ActivationReader:
    options = {"batch_size": 16, "seed": 7, "shuffle_buffer_rows": 24, **kwargs}
    if targets is not None:
        options.update(input_stores=inputs, target_stores=targets)
    return ActivationReader(inputs[0], rank=rank, world_size=world_size, **options)


def _expected(seq: np.ndarray, pos: np.ndarray, width: int, target: bool) -> np.ndarray:
    """What the L caches of one side hold for these tokens, side by side in layer order."""
    return np.concatenate([layer_rows(layer, width, target=target)(seq, pos) for layer in range(LAYERS)], 1)


def _tokens(batches) -> list[tuple[int, int]]:
    """The (sequence_id, position) of every row, after checking that all of its L inputs and L
    targets are that token's."""
    tokens = []
    for x, y in batches:
        assert x.dtype == y.dtype == torch.float32
        assert x.shape[1] == LAYERS * D_IN and y.shape[1] == LAYERS * D_OUT
        seq, pos = x[:, 2].numpy().astype(int), x[:, 3].numpy().astype(int)
        np.testing.assert_array_equal(x.numpy(), _expected(seq, pos, D_IN, False), err_msg="x is not one token's")
        np.testing.assert_array_equal(y.numpy(), _expected(seq, pos, D_OUT, True), err_msg="y is not x's token's")
        tokens += list(zip(seq.tolist(), pos.tolist(), strict=True))
    return tokens


def test_a_tokens_inputs_and_targets_come_together_once_per_epoch_and_x_leads_with_the_unpaired_stream(group):
    inputs, targets = group
    for epoch in range(2):
        seen = []
        for rank in range(2):
            grouped = list(_reader(inputs, targets, rank, 2, drop_last=False).epoch(epoch))
            alone = list(_reader(inputs, None, rank, 2, drop_last=False).epoch(epoch))
            assert len(grouped) == len(alone)
            for (x, _), batch in zip(grouped, alone, strict=True):
                torch.testing.assert_close(x[:, :D_IN], batch, rtol=0, atol=0)
            seen += _tokens(grouped)
        assert sorted(seen) == ALL_TOKENS, f"epoch {epoch}: every token exactly once across ranks"
    x, _ = next(iter(_reader(inputs, targets).epoch(0)))
    assert len(set(x[:, 2].tolist())) > 1, "the shuffle mixes shards inside a batch"
    # A budget below one group's bytes still reads every shard (one group in flight at a time).
    tight = list(_reader(inputs, targets, drop_last=False, prefetch_bytes=1).epoch(0))
    assert sorted(_tokens(tight)) == ALL_TOKENS


def test_one_layer_group_is_the_transcoders_pair(group):
    inputs, targets = group
    pair = list(_reader(inputs, drop_last=False, target_store=targets[0]).epoch(0))
    one = list(_reader(inputs[:1], targets[:1], drop_last=False).epoch(0))
    for (x, y), (x1, y1) in zip(pair, one, strict=True):
        torch.testing.assert_close((x, y), (x1, y1), rtol=0, atol=0)


@pytest.mark.parametrize("cut", [0, 5, 13])
def test_resume_mid_epoch_gives_exactly_the_remaining_tokens(group, cut):
    inputs, targets = group
    stream = iter(_reader(inputs, targets))
    uninterrupted = [next(stream) for _ in range(15)]  # 15 batches cross into epoch 1
    first = _reader(inputs, targets)
    batches = iter(first)
    done = [next(batches) for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = _reader(inputs, targets)
    resumed.load_state_dict(state)
    rest = iter(resumed)
    after = [next(rest) for _ in range(15 - cut)]
    assert _tokens(done + after) == _tokens(uninterrupted)
    with pytest.raises(ValueError, match="3 layers' caches but this one reads 1"):
        _reader(inputs, target_store=targets[0]).load_state_dict(state)


def test_a_shifted_shard_in_one_layers_cache_is_refused_naming_it_and_the_caches(tmp_path):
    inputs, targets = _write_group(tmp_path, rows=ROWS[:3])
    shifted = LocalStore(tmp_path / "mlp_out.2.shifted")
    writer = CacheWriter(shifted, d_model=D_OUT, rows_of=layer_rows(2, D_OUT, target=True), key_inputs=KEY_INPUTS)
    writer.add(0, ROWS[0])
    writer.add(1, ROWS[1], positions=np.arange(ROWS[1]) + 1)  # one token off
    writer.add(2, ROWS[2])
    writer.complete()
    bad = [*targets[:2], shifted]
    with pytest.raises(CorruptShardError) as err:
        list(_reader(inputs, bad, drop_last=False).epoch(0))
    message = str(err.value)
    assert "shards/unit-000001.arrow" in message and inputs[0].uri in message and shifted.uri in message
    assert "position" in message and "\n" not in message
    name = "shards/unit-000001.arrow"
    manifests = [_manifest(s) for s in inputs], [_manifest(s) for s in bad]
    with pytest.raises(CorruptShardError, match=f"{re.escape(name)}.*{re.escape(shifted.uri)}"):
        read_shard_group(inputs, bad, name, *manifests)


def test_read_shard_group_gives_one_shards_rows_of_every_cache(group):
    inputs, targets = group
    name = "shards/unit-000003.arrow"
    x, y = read_shard_group(inputs, targets, name, [_manifest(s) for s in inputs], [_manifest(s) for s in targets])
    seq, pos = np.full(ROWS[3], 3), np.arange(ROWS[3])
    np.testing.assert_array_equal(x.numpy(), _expected(seq, pos, D_IN, False))
    np.testing.assert_array_equal(y.numpy(), _expected(seq, pos, D_OUT, True))


SETTINGS = PlanSettings(batch_size=16, epochs=2, max_tokens=None, holdout_fraction=0.2, seed=3,
                        shuffle_buffer_rows=24, read_threads=2, prefetch_bytes=1 << 20, normalize=True,
                        follow_timeout_s=30.0, normalization_rows=1)


def _layers(inputs, targets) -> list[tuple]:
    return [(i, _manifest(i), t, _manifest(t)) for i, t in zip(inputs, targets, strict=True)]


def _check_statistics(plan) -> None:
    """The plan's per-layer scales and concatenated means against numpy over every token."""
    seq = np.repeat(np.arange(len(ROWS)), ROWS)
    pos = np.concatenate([np.arange(n) for n in ROWS])
    assert plan.scale == 1.0 and plan.target_scale == 1.0 and plan.n_layers == LAYERS
    assert plan.d_model == LAYERS * D_IN and plan.d_out == LAYERS * D_OUT
    for side, width, target, scales, mean in (("input", D_IN, False, plan.layer_input_scales, plan.mean),
                                               ("target", D_OUT, True, plan.layer_target_scales, plan.target_mean)):
        rows = [layer_rows(layer, width, target=target)(seq, pos).astype(np.float64) for layer in range(LAYERS)]
        expected = [np.sqrt(width) / np.linalg.norm(r, axis=1).mean() for r in rows]
        np.testing.assert_allclose(scales, expected, rtol=1e-9, err_msg=f"{side} scales")
        assert len(set(scales)) == LAYERS, f"each layer's {side} scale is its own"
        np.testing.assert_allclose(mean, np.concatenate([r.mean(0) for r in rows]), rtol=1e-9)


def test_complete_plan_over_layers_takes_each_layers_scales_and_the_first_inputs_split(group):
    inputs, targets = group
    layers = _layers(inputs, targets)
    plans = [complete_plan(inputs[0], _manifest(inputs[0]), SETTINGS, rank=r, world_size=2, layers=layers)
             for r in range(2)]
    alone = complete_plan(inputs[0], _manifest(inputs[0]), SETTINGS, rank=0, world_size=2)
    assert plans[0].holdout == alone.holdout and plans[0].steps == alone.steps
    assert alone.n_layers is None and alone.layer_input_scales is None
    _check_statistics(plans[1])
    train, _ = split_holdout(_manifest(inputs[0]).shards, SETTINGS.holdout_fraction)
    train_tokens = {(s.first_sequence_id, p) for s in train for p in range(s.rows)}
    seen = [t for plan in plans for t in _tokens(plan.reader.epoch(0))]
    assert len(set(seen)) == len(seen) and set(seen) <= train_tokens
    unscaled = complete_plan(inputs[0], _manifest(inputs[0]), SETTINGS.__class__(**{**SETTINGS.__dict__,
                             "normalize": False}), rank=0, world_size=1, layers=layers)
    assert unscaled.layer_input_scales == unscaled.layer_target_scales == [1.0] * LAYERS


@pytest.mark.parametrize("side", ["input", "target"])
def test_a_cache_of_another_token_stream_is_refused_in_one_line(group, tmp_path, side):
    inputs, targets = group
    stranger = LocalStore(tmp_path / "stranger")
    width = D_IN if side == "input" else D_OUT
    write_cache(stranger, ROWS, d_model=width, rows_of=layer_rows(2, width, target=side == "target"),
                key_inputs={**KEY_INPUTS, "tokens_sha256": "bb22"})
    if side == "input":
        inputs = [*inputs[:2], stranger]
    else:
        targets = [*targets[:2], stranger]
    with pytest.raises(ValueError) as err:
        complete_plan(inputs[0], _manifest(inputs[0]), SETTINGS, rank=0, world_size=1, layers=_layers(inputs, targets))
    message = str(err.value)
    assert "\n" not in message and "tokens_sha256='aa11'" in message and "tokens_sha256='bb22'" in message
    assert inputs[0].uri in message and f"{side} cache {stranger.uri}" in message
    with pytest.raises(ValueError, match="tokens_sha256='aa11' .* tokens_sha256='bb22'"):
        tailing_plan(inputs[0], {s.name: s.rows for s in _manifest(inputs[0]).shards}, SETTINGS, rank=0,
                     world_size=1, global_rank=0, abort=lambda: None, layer_caches=list(zip(inputs, targets, strict=True)))


def test_a_layer_of_another_width_or_a_plan_on_another_cache_is_refused(group, tmp_path):
    inputs, targets = group
    wider = LocalStore(tmp_path / "wider")
    write_cache(wider, ROWS, d_model=D_OUT + 2, rows_of=layer_rows(2, D_OUT + 2, target=True), key_inputs=KEY_INPUTS)
    with pytest.raises(ValueError, match=re.escape(f"target cache {targets[0].uri} holds d_model={D_OUT} but target "
                                                   f"cache {wider.uri} holds d_model={D_OUT + 2}")):
        complete_plan(inputs[0], _manifest(inputs[0]), SETTINGS, rank=0, world_size=1,
                      layers=_layers(inputs, [*targets[:2], wider]))
    with pytest.raises(ValueError, match=re.escape(f"first layer's input cache is {inputs[1].uri}")):
        complete_plan(inputs[0], _manifest(inputs[0]), SETTINGS, rank=0, world_size=1,
                      layers=_layers(inputs[1:], targets[1:]))


def test_a_tailing_group_takes_a_shard_once_every_cache_lists_it_and_plans_each_layers_scales(tmp_path):
    inputs, targets = _write_group(tmp_path)
    late_store = LocalStore(tmp_path / "mlp_out.1.late")  # one layer's target cache is behind the others
    late = CacheWriter(late_store, d_model=D_OUT, rows_of=layer_rows(1, D_OUT, target=True), key_inputs=KEY_INPUTS)
    late.add(0, ROWS[0])
    targets = [targets[0], late_store, targets[2]]
    readers = [_reader(inputs, targets, r, 2, drop_last=False, follow=True, poll_seconds=0.01, follow_timeout_s=30)
               for r in range(2)]
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda r=r: results.setdefault(r, list(readers[r].epoch(0)))) for r in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # the readers poll while only shard 0 is in every cache
    for index, rows in enumerate(ROWS[1:], start=1):
        late.add(index, rows)
    late.complete()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(t for r in range(2) for t in _tokens(results[r])) == ALL_TOKENS
    assert sorted(t for r in range(2) for t in _tokens(readers[r].epoch(1))) == ALL_TOKENS
    expected = {s.name: s.rows for s in _manifest(inputs[0]).shards}
    # No process group: each plan takes the statistics itself, as global rank 0 would for all.
    plans = [tailing_plan(inputs[0], expected, SETTINGS, rank=r, world_size=2, global_rank=0, abort=lambda: None,
                          layer_caches=list(zip(inputs, targets, strict=True))) for r in range(2)]
    _check_statistics(plans[0])
    seen = [t for plan in plans for t in _tokens(plan.reader.epoch(0))]
    assert len(set(seen)) == len(seen) and not {f"shards/unit-{seq:06d}.arrow" for seq, _ in seen} & set(plans[0].holdout)
