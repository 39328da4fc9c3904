"""Checkpoints: pickle-free nested state, stateful objects walked in and out, one rank's state
in and out of a DeepSpeed engine (bit-identical resumption on two gloo ranks, every ZeRO stage,
fp32 and bf16), the layout under ``checkpoints/`` with its newest-complete rule and retention,
and the ``Checkpointer`` that saves every N steps and resumes from the newest complete one."""

from __future__ import annotations

import ast
import enum
import json
import math
import os
import pickle
import random
import re
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ranks import free_port, launch_ranks
from safetensors.torch import load_file, save_file

import trainer.checkpoint as checkpoint_module
from trainer.checkpoint import (
    AttributeState,
    Checkpoint,
    Checkpointer,
    RankFile,
    capture_state,
    complete_marker,
    decode_rank_state,
    decode_state,
    encode_rank_state,
    encode_state,
    flatten_state,
    gather_rank_files,
    newest_complete_checkpoint,
    parse_complete_marker,
    restore_state,
    superseded_checkpoint_keys,
    unflatten_state,
)
from trainer.layout import checkpoint_dir, complete_marker_key, rank_file_key

ENGINE_MODULE = Path(checkpoint_module.__file__).with_name("engine.py")  # imports deepspeed: loaded lazily

# --------------------------------------------------------------------------- nested state


def _assert_same(a, b, path="state") -> None:
    """Equal structure, types, dict key types and bit-identical tensors (nan == nan)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _mixed_state() -> dict:
    flat = torch.arange(12, dtype=torch.float32)
    return {
        "bf16": torch.randn(3, 5).bfloat16(),
        "rng": torch.get_rng_state(),  # uint8
        "int_keys": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}, 7: "seven"},
        "views": [flat[:6], flat[6:], flat[2:8]],  # adjacent views share storage, the last overlaps
        "leaves": [None, True, False, 0, -(2**70), 1.5, math.inf, -math.inf, math.nan, "", "é"],
        "pair": (0.9, 0.999),
        "ordered": OrderedDict(b=1, a=2),
        "empty": {"list": [], "tuple": (), "tensor": torch.empty(0, 3, dtype=torch.int64)},
        "strided": torch.arange(20).reshape(4, 5).t(),
        "path/with.dots": torch.ones(1),
        "path": {"with.dots": torch.zeros(1)},  # the same tensor name as above, kept apart
    }


def test_flatten_round_trip_keeps_types_keys_and_bits() -> None:
    state = _mixed_state()
    tensors, skeleton = flatten_state(state)
    assert json.loads(json.dumps(skeleton, allow_nan=False)) == skeleton  # plain JSON
    restored = unflatten_state(tensors, skeleton)
    state["ordered"] = dict(state["ordered"])  # mappings come back as dicts
    _assert_same(restored, state)
    assert list(restored["int_keys"]) == [0, 7]


def test_encode_round_trip_through_bytes() -> None:
    state = _mixed_state()
    restored = decode_state(encode_state(state))
    state["ordered"] = dict(state["ordered"])
    _assert_same(restored, state)


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": [1, {"b": object()}]}, "state['a'][1]['b']: object"),
        ({"scaler": np.float32(1.0)}, "state['scaler']: float32"),
        ({(1, 2): 3}, "state: dict key (1, 2) of type tuple"),
        ({"enum": enum.IntEnum("Stage", "one")(1)}, "state['enum']: Stage"),
    ],
)
def test_unserialisable_objects_are_refused_naming_their_path(state, path: str) -> None:
    with pytest.raises(TypeError, match="^" + re.escape(path)) as info:
        flatten_state(state)
    assert "\n" not in str(info.value)


def test_tampered_skeleton_or_tensors_are_refused() -> None:
    tensors, skeleton = flatten_state({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="names tensor 'w', which is missing"):
        unflatten_state({}, skeleton)
    with pytest.raises(ValueError, match="not named by the skeleton"):
        unflatten_state({**tensors, "extra": torch.ones(1)}, skeleton)
    with pytest.raises(ValueError, match="unexpected node"):
        unflatten_state(tensors, {"dict": [["w", {"pickle": "cos\nsystem"}]]})
    with pytest.raises(ValueError, match="not a safetensors file"):
        decode_state(b"\x80\x04K\x01.")  # a pickle is not a state file


def test_a_file_that_is_no_rank_state_is_refused_before_the_engine_is_touched() -> None:
    from trainer.engine import load_rank_state

    with pytest.raises(ValueError, match="rank state format None: expected 'saeforge.rank_state/1'"):
        load_rank_state(None, encode_state({"weights": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"rank state lacks \['engine', 'extra', 'identity'"):
        load_rank_state(None, encode_state({"format": checkpoint_module.RANK_STATE_FORMAT, "module": {}}))


@contextmanager
def _no_unpickling():
    """Make every way of unpickling fail loudly while the block runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled")

    saved = pickle.load, pickle.loads, pickle.Unpickler, torch.load
    pickle.load = pickle.loads = pickle.Unpickler = torch.load = refuse
    try:
        yield
    finally:
        pickle.load, pickle.loads, pickle.Unpickler, torch.load = saved


@pytest.mark.parametrize("source", [Path(checkpoint_module.__file__), ENGINE_MODULE], ids=["checkpoint", "engine"])
def test_decoding_never_unpickles(source: Path) -> None:
    data = encode_state(_mixed_state())
    with _no_unpickling():
        decode_state(data)
    tree = ast.parse(source.read_text())  # the format, and the engine state that loads through it
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            imported |= {alias.name for alias in node.names} | {getattr(node, "module", None)}
    assert not imported & {"pickle", "_pickle", "dill", "cloudpickle"}
    calls_torch_load = [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("load", "load_checkpoint")
        and getattr(node.value, "id", None) in ("torch", "engine")
    ]
    assert not calls_torch_load


# --------------------------------------------------------------------------- the layout


def _write_checkpoint(store: dict[str, bytes], step: int, world_size: int = 2) -> list[RankFile]:
    files = []
    for rank in range(world_size):
        key = rank_file_key(step, rank)
        store[key] = f"state of rank {rank} at step {step}".encode()
        files.append(RankFile.of(key, store[key]))
    key, data = complete_marker(step, files)
    store[key] = data
    return files


def test_keys_follow_the_layout() -> None:
    assert checkpoint_dir(1200) == "checkpoints/step-000001200"
    assert rank_file_key(1200, 3) == "checkpoints/step-000001200/rank-00003.safetensors"
    assert complete_marker_key(7) == "checkpoints/step-000000007/COMPLETE.json"
    with pytest.raises(ValueError, match="step=-1"):
        checkpoint_dir(-1)


def test_newest_complete_checkpoint_skips_incomplete_and_corrupt_steps() -> None:
    store: dict[str, bytes] = {}
    _write_checkpoint(store, 10)
    _write_checkpoint(store, 20)
    _write_checkpoint(store, 30)
    store[rank_file_key(30, 1)] = b"bit rot"  # listed checksum no longer matches
    _write_checkpoint(store, 40)
    del store[rank_file_key(40, 0)]  # a listed file is missing
    store[rank_file_key(50, 0)] = b"written"  # crashed before rank 1 and COMPLETE.json
    store[complete_marker_key(60)] = b"{not json"
    store["checkpoints/notes.txt"] = b"ignored"
    reads: list[str] = []

    def read(key: str) -> bytes:
        reads.append(key)
        return store[key]

    found = newest_complete_checkpoint(sorted(store), read)
    assert isinstance(found, Checkpoint)
    assert (found.step, found.world_size) == (20, 2)
    assert found.read_rank_state(1, read) == store[rank_file_key(20, 1)]
    assert rank_file_key(50, 0) not in reads  # no marker: never read
    # Reading a file checks it against its marker: step 30's rank 1 is the corrupt one.
    corrupt = parse_complete_marker(30, store[complete_marker_key(30)])
    corrupt.read_rank_state(0, read)
    with pytest.raises(ValueError, match=r"rank-00001.safetensors: 7 bytes, expected"):
        corrupt.read_rank_state(1, read)
    assert newest_complete_checkpoint([], read) is None


def test_a_marker_must_list_every_rank_of_its_own_step() -> None:
    store: dict[str, bytes] = {}
    files = _write_checkpoint(store, 5)
    with pytest.raises(ValueError, match="are not ranks 0..1 of step 6"):
        complete_marker(6, files)
    store[complete_marker_key(8)] = store[complete_marker_key(5)]  # a marker copied to another step
    for rank in range(2):
        store[rank_file_key(8, rank)] = store[rank_file_key(5, rank)]
    found = newest_complete_checkpoint(sorted(store), store.__getitem__)
    assert found is not None and found.step == 5


def test_retention_keeps_the_newest_complete_and_anything_in_progress() -> None:
    store: dict[str, bytes] = {}
    for step in (10, 20, 30, 40):
        _write_checkpoint(store, step)
    store[rank_file_key(15, 0)] = b"crashed mid-save"
    store[rank_file_key(50, 0)] = b"being written now"
    doomed = superseded_checkpoint_keys(sorted(store), keep=2)
    assert doomed == [
        complete_marker_key(10), rank_file_key(10, 0), rank_file_key(10, 1),
        rank_file_key(15, 0),
        complete_marker_key(20), rank_file_key(20, 0), rank_file_key(20, 1),
    ]
    assert superseded_checkpoint_keys([rank_file_key(5, 0)], keep=1) == []
    with pytest.raises(ValueError, match="keep=0"):
        superseded_checkpoint_keys([], keep=0)


def test_gather_rank_files_without_a_process_group_is_this_rank_alone() -> None:
    assert not dist.is_initialized()
    assert gather_rank_files(3, b"abc") == [RankFile.of(rank_file_key(3, 0), b"abc")]


# --------------------------------------------------------------------------- stateful objects


class _Counter:
    """A stateful object as the reader and the training loop are: a position and a tensor."""

    def __init__(self, start: int = 0) -> None:
        self.position, self.counts = start, torch.full((3,), float(start))
        self.loaded: list[dict] = []

    def advance(self) -> None:
        self.position += 1
        self.counts += 1

    def state_dict(self) -> dict:
        return {"position": self.position, "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.counts = state["position"], state["counts"].clone()
        self.loaded.append(state)


class _Scale:
    value = 0.5


def test_stateful_objects_are_walked_in_and_out() -> None:
    scale = _Scale()
    states = {"loops": {"a": _Counter(1), "b": _Counter(2)}, "reader": _Counter(7), "scale": AttributeState(scale, "value")}
    captured = capture_state(states)
    assert captured == {"loops": {"a": {"position": 1, "counts": captured["loops"]["a"]["counts"]},
                                  "b": {"position": 2, "counts": captured["loops"]["b"]["counts"]}},
                        "reader": {"position": 7, "counts": captured["reader"]["counts"]}, "scale": 0.5}
    fresh_scale = _Scale()
    fresh_scale.value = 9.0
    fresh = {"loops": {"a": _Counter(), "b": _Counter()}, "reader": _Counter(), "scale": AttributeState(fresh_scale, "value")}
    restore_state(fresh, decode_state(encode_state(captured)))
    _assert_same(capture_state(fresh), captured)
    assert fresh_scale.value == 0.5
    # Names only the saved state has are left alone; a name it lacks is refused with its path.
    restore_state({"reader": _Counter()}, captured)
    with pytest.raises(ValueError, match=r"^checkpoint X has no state\['loops'\]\['c'\]$"):
        restore_state({"loops": {"c": _Counter()}}, captured, where="checkpoint X")
    with pytest.raises(TypeError, match="'weights': Tensor has no state_dict"):
        capture_state({"weights": torch.ones(1)})


def test_rank_state_files_keep_their_format() -> None:
    """The formats are what checkpoints already written carry: changing them breaks resuming."""
    assert (checkpoint_module.STATE_FORMAT, checkpoint_module.RANK_STATE_FORMAT, checkpoint_module.COMPLETE_FORMAT) == (
        "saeforge.state/1", "saeforge.rank_state/1", "saeforge.checkpoint/1")
    parts = {name: {} for name in checkpoint_module.RANK_STATE_PARTS} | {"module": {"b": torch.ones(2)}}
    data = encode_rank_state(parts)
    assert list(decode_state(data)) == ["format", "identity", "module", "optimizer", "lr_scheduler", "engine", "rng", "extra"]
    _assert_same(decode_rank_state(data), {"format": "saeforge.rank_state/1", **parts})
    with pytest.raises(ValueError, match=r"rank state lacks \['rng'\]"):
        encode_rank_state({name: {} for name in checkpoint_module.RANK_STATE_PARTS if name != "rng"})


class _MemoryStore:
    """The object store's calls a Checkpointer makes, over a dict."""

    uri = "memory://run"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def list(self, prefix: str = "") -> list[str]:
        return sorted(key for key in self.objects if key.startswith(prefix))

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def test_checkpointer_saves_every_n_steps_keeps_the_newest_and_resumes() -> None:
    store, loop = _MemoryStore(), _Counter()
    checkpointer = Checkpointer(store, rank=0, world_size=1, every_steps=2, keep=2)
    assert checkpointer.restore({"loop": loop}) == 0 and loop.loaded == []  # nothing to resume
    for step in range(1, 8):
        loop.advance()
        if checkpointer.due(step, last_step=7):
            checkpointer.save(step, {"loop": loop})
    assert [step for step in range(1, 9) if checkpointer.due(step, last_step=8)] == [2, 4, 6]  # never the last step
    assert store.list() == [complete_marker_key(4), rank_file_key(4, 0), complete_marker_key(6), rank_file_key(6, 0)]
    saved = decode_state(store.get_bytes(rank_file_key(6, 0)))
    assert saved["loop"]["position"] == 6 and torch.equal(saved["loop"]["counts"], torch.full((3,), 6.0))
    marker = json.loads(store.get_bytes(complete_marker_key(6)))
    assert (marker["format"], marker["step"], marker["world_size"]) == ("saeforge.checkpoint/1", 6, 1)

    store.put_bytes(rank_file_key(6, 0), b"bit rot")  # the newest is damaged: the one before comes back
    resumed = _Counter()
    assert Checkpointer(store, rank=0, world_size=1, every_steps=2, keep=2).restore({"loop": resumed}) == 4
    assert resumed.position == 4 and torch.equal(resumed.counts, torch.full((3,), 4.0))
    assert not Checkpointer(store, rank=0, world_size=1, every_steps=0, keep=2).due(4, last_step=8)


def test_checkpointer_refuses_another_world_size_and_a_state_it_lacks() -> None:
    store = _MemoryStore()
    for rank in range(2):
        store.put_bytes(rank_file_key(3, rank), encode_state({"loop": {"position": 3}}))
    store.put_bytes(*complete_marker(3, [RankFile.of(k, store.get_bytes(k)) for k in (rank_file_key(3, 0), rank_file_key(3, 1))]))
    loop = _Counter()
    with pytest.raises(ValueError, match=r"^checkpoint at step 3 in memory://run was written by 2 ranks, this run has 1"):
        Checkpointer(store, rank=0, world_size=1, every_steps=1, keep=2).restore({"loop": loop})
    assert loop.loaded == []
    store = _MemoryStore()
    Checkpointer(store, rank=0, world_size=1, every_steps=1, keep=2).save(5, {"loop": loop})
    with pytest.raises(ValueError, match=r"^checkpoint at step 5 in memory://run has no state\['reader'\]"):
        Checkpointer(store, rank=0, world_size=1, every_steps=1, keep=2).restore({"loop": _Counter(), "reader": _Counter()})
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(store, rank=0, world_size=1, every_steps=1, keep=0)


# --------------------------------------------------------------------------- DeepSpeed, two ranks

WORLD_SIZE = 2
D_IN, N_LATENTS, K = 16, 64, 4
GLOBAL_BATCH, LR, STEPS_BEFORE, STEPS_AFTER = 32, 5e-3, 3, 3
SAE_SEED, DATA_SEED = 0, 424_242
DEAD_AFTER_TOKENS = GLOBAL_BATCH  # latents idle for a step are dead, so AuxK and the counters matter
CONFIGS = {  # name -> (ZeRO stage, precision)
    "zero0-fp32": (0, "fp32"), "zero1-fp32": (1, "fp32"), "zero2-fp32": (2, "fp32"), "zero3-fp32": (3, "fp32"),
    "zero0-bf16": (0, "bf16"), "zero1-bf16": (1, "bf16"), "zero2-bf16": (2, "bf16"), "zero3-bf16": (3, "bf16"),
}


def _lr_multiplier(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.7 ** max(0, step - 3)  # warmup, then decay


def _build_engine(config: str, *, n_latents: int = N_LATENTS):
    from trainer.config import DeepSpeedConfig, TrainConfig
    from trainer.engine import wrap_in_deepspeed
    from trainer.sae import TopKSAE  # with the AuxK loss over dead latents

    stage, precision = CONFIGS[config]
    # ZeRO 3 keeps parameters smaller than the persistence threshold whole on every rank: under
    # fp32 the biases stay whole and the matrices are partitioned, under bf16 all are partitioned.
    persistence = 100 if precision == "fp32" else 0
    deepspeed_cfg = DeepSpeedConfig(zero_stage=stage, precision=precision, stage3_param_persistence_threshold=persistence)
    sae = TopKSAE(D_IN, n_latents, K, seed=SAE_SEED)
    return wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=GLOBAL_BATCH), deepspeed_cfg=deepspeed_cfg, lr=LR,
        world_size=WORLD_SIZE, lr_multiplier=_lr_multiplier,
    )


def _seed_data(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _local_batch(rank: int) -> torch.Tensor:
    # Drawn from the global torch, numpy and python RNGs, the same on every rank: the data stream
    # continues correctly only if the checkpoint restored all three.
    x = torch.randn(GLOBAL_BATCH, D_IN) * 2 + 0.5
    x += torch.from_numpy(np.random.standard_normal((GLOBAL_BATCH, D_IN)).astype(np.float32)) * 0.1
    x *= 1 + random.random()
    local = GLOBAL_BATCH // WORLD_SIZE
    return x[rank * local : (rank + 1) * local]


def _train(engine, tracker, rank: int, steps: int) -> None:
    from trainer.metrics import output_fire_counts

    dtype = next(engine.module.parameters()).dtype  # bf16 engines take bf16 inputs
    for _ in range(steps):
        x = _local_batch(rank)
        dead_mask = tracker.dead_mask(DEAD_AFTER_TOKENS)
        out = engine(x.to(dtype), dead_mask=dead_mask)
        engine.backward(out.loss)
        engine.step()
        counts = output_fire_counts(out.latent_acts.detach(), out.latent_indices, tracker.n_latents)
        dist.all_reduce(counts)
        tracker.update_counts(counts, n_tokens=GLOBAL_BATCH)


def _extra(tracker, steps: int) -> dict:
    return {"steps": steps, "dead_tracker": tracker.state_dict(),
            "reader": {"epoch": 0, "batches_done": steps, "shards": ["p0-000000", "p1-000000"]}}


def _finish(engine, out_dir: Path, rank: int, tracker, steps: int) -> None:
    """Record the run's final state (and the fp32 master weights) for the comparisons."""
    from trainer.engine import master_weights, save_rank_state, shutdown_engine

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.state").write_bytes(save_rank_state(engine, extra=_extra(tracker, steps)))
    save_file(master_weights(engine), str(out_dir / f"rank{rank}.masters.safetensors"))  # a collective
    shutdown_engine(engine)


def _save_checkpoint(engine, store: Path, rank: int, tracker, steps: int) -> None:
    """What the worker loop does: every rank writes its file, the gather is the barrier, then
    rank 0 writes COMPLETE.json."""
    from trainer.engine import save_rank_state

    data = save_rank_state(engine, extra=_extra(tracker, steps))
    key = rank_file_key(steps, rank)
    (store / key).parent.mkdir(parents=True, exist_ok=True)
    (store / key).write_bytes(data)
    rank_files = gather_rank_files(steps, data)
    if rank == 0:
        marker_key, marker = complete_marker(steps, rank_files)
        (store / marker_key).write_bytes(marker)


def _first_process(rank: int, out_dir: Path) -> None:
    """Per config: an uninterrupted run that never saves, and one that saves a checkpoint after
    the first steps and goes on (its checkpoint is what a run killed there would leave)."""
    from trainer.metrics import DeadLatentTracker

    for config in CONFIGS:
        engine, tracker = _build_engine(config), DeadLatentTracker(N_LATENTS)
        _seed_data(DATA_SEED)
        _train(engine, tracker, rank, STEPS_BEFORE + STEPS_AFTER)
        _finish(engine, out_dir / config / "uninterrupted", rank, tracker, STEPS_BEFORE + STEPS_AFTER)

        engine, tracker = _build_engine(config), DeadLatentTracker(N_LATENTS)
        _seed_data(DATA_SEED)
        _train(engine, tracker, rank, STEPS_BEFORE)
        _save_checkpoint(engine, out_dir / config / "store", rank, tracker, STEPS_BEFORE)
        _train(engine, tracker, rank, STEPS_AFTER)
        _finish(engine, out_dir / config / "saved_midway", rank, tracker, STEPS_BEFORE + STEPS_AFTER)


def _latest_checkpoint_state(store: Path, rank: int) -> bytes:
    """What a restarted worker does: find the newest complete checkpoint, read its own file."""
    keys = [path.relative_to(store).as_posix() for path in store.rglob("*") if path.is_file()]
    found = newest_complete_checkpoint(keys, lambda key: (store / key).read_bytes())
    assert found is not None and found.step == STEPS_BEFORE and found.world_size == WORLD_SIZE
    return found.read_rank_state(rank, lambda key: (store / key).read_bytes())


def _second_process(rank: int, out_dir: Path) -> None:
    """Per config: a fresh engine loads this rank's state from the checkpoint and trains on; on
    the way, the refusals of states that do not fit."""
    from trainer.engine import load_rank_state, shutdown_engine
    from trainer.metrics import DeadLatentTracker

    errors: dict[str, str] = {}
    for config, (stage, precision) in CONFIGS.items():
        engine, tracker = _build_engine(config), DeadLatentTracker(N_LATENTS)
        _seed_data(DATA_SEED + 1)  # the wrong stream, unless the checkpoint's RNG states come back
        other_stage = out_dir / f"zero{(stage + 1) % 4}-{precision}" / "store"
        for name, path in (
            ("other_rank", out_dir / config / "store" / rank_file_key(STEPS_BEFORE, 1 - rank)),
            ("other_stage", other_stage / rank_file_key(STEPS_BEFORE, rank)),
        ):
            try:
                load_rank_state(engine, path.read_bytes())
            except ValueError as err:
                errors[f"{config}:{name}"] = str(err)
        data = _latest_checkpoint_state(out_dir / config / "store", rank)
        with _no_unpickling():
            extra = load_rank_state(engine, data)
        tracker.load_state_dict(extra["dead_tracker"])
        _train(engine, tracker, rank, STEPS_AFTER)
        _finish(engine, out_dir / config / "resumed", rank, tracker, extra["steps"] + STEPS_AFTER)

    engine = _build_engine("zero2-fp32", n_latents=N_LATENTS // 2)
    try:
        load_rank_state(engine, _latest_checkpoint_state(out_dir / "zero2-fp32" / "store", rank))
    except ValueError as err:
        errors["zero2-fp32:other_shape"] = str(err)
    shutdown_engine(engine)
    (out_dir / f"errors{rank}.json").write_text(json.dumps(errors))


def _worker(rank: int, phase: str, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo")  # the caller's group, as Ray Train's: engines come and go on it
    try:
        (_first_process if phase == "first" else _second_process)(rank, Path(out_dir))
    finally:
        dist.destroy_process_group()



def _spawn(phase: str, out_dir: Path) -> None:
    launch_ranks(_worker, phase, free_port(), nprocs=WORLD_SIZE, out_dir=out_dir,
                 preload=["torch", "torch._dynamo", "trainer.engine"])


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("checkpoint_runs")
    _spawn("first", out_dir)
    return out_dir


@pytest.fixture(scope="module")
def resumed_runs(saved_runs: Path) -> Path:
    _spawn("second", saved_runs)  # fresh processes: nothing survives but the files
    return saved_runs


def _checkpoint_states(runs: Path, config: str) -> list[dict]:
    store = runs / config / "store"
    return [decode_state((store / rank_file_key(STEPS_BEFORE, r)).read_bytes()) for r in range(WORLD_SIZE)]


def _final_state(runs: Path, config: str, run: str, rank: int) -> tuple[dict, dict]:
    state = decode_state((runs / config / run / f"rank{rank}.state").read_bytes())
    return state, load_file(runs / config / run / f"rank{rank}.masters.safetensors")


@pytest.mark.integration
def test_every_rank_saved_its_own_shard_of_the_state(saved_runs: Path) -> None:
    for config, (stage, precision) in CONFIGS.items():
        states = _checkpoint_states(saved_runs, config)
        for rank, state in enumerate(states):
            assert state["identity"]["rank"] == rank and state["identity"]["world_size"] == WORLD_SIZE
            assert state["identity"]["zero_stage"] == stage
            assert state["engine"]["global_steps"] == STEPS_BEFORE
            assert state["extra"]["steps"] == STEPS_BEFORE
            assert int(state["extra"]["dead_tracker"]["n_tokens"]) == STEPS_BEFORE * GLOBAL_BATCH
            assert state["lr_scheduler"]["last_epoch"] == STEPS_BEFORE
        if stage > 0:  # ZeRO: each rank holds its own half of the fp32 master weights
            key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
            halves = [state["optimizer"][key][0] for state in states]
            assert halves[0].numel() == halves[1].numel() and not torch.equal(halves[0], halves[1])
        # Stage 0 replicates the weights (bf16 as trained under bf16); under ZeRO they are only
        # in the fp32 partitions, so no rank's file holds a full copy.
        module = states[0]["module"]
        if stage == 0:
            assert module["W_enc"].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        else:
            assert "W_enc" not in module


@pytest.mark.integration
@pytest.mark.parametrize("config", list(CONFIGS))
def test_saving_a_checkpoint_leaves_the_run_unchanged(saved_runs: Path, config: str) -> None:
    for rank in range(WORLD_SIZE):
        _assert_same(
            _final_state(saved_runs, config, "saved_midway", rank),
            _final_state(saved_runs, config, "uninterrupted", rank),
            f"{config} rank {rank}",
        )


@pytest.mark.integration
@pytest.mark.parametrize("config", list(CONFIGS))
def test_resumed_run_ends_bit_identical_to_the_uninterrupted_run(resumed_runs: Path, config: str) -> None:
    for rank in range(WORLD_SIZE):
        # Weights, optimizer (moments, step, fp32 partitions), scheduler, engine counters, RNG
        # states, the caller's extra; and the fp32 master weights as the dictionary export sees them.
        uninterrupted = _final_state(resumed_runs, config, "uninterrupted", rank)
        _assert_same(_final_state(resumed_runs, config, "resumed", rank), uninterrupted, f"{config} rank {rank}")
    # The comparison has teeth: the checkpoint itself is another state.
    assert not torch.equal(_checkpoint_states(resumed_runs, config)[0]["rng"]["torch"], uninterrupted[0]["rng"]["torch"])


@pytest.mark.integration
def test_states_that_do_not_fit_are_refused(resumed_runs: Path) -> None:
    for rank in range(WORLD_SIZE):
        errors = json.loads((resumed_runs / f"errors{rank}.json").read_text())
        for config in CONFIGS:
            assert errors[f"{config}:other_rank"] == (
                f"checkpoint was written by rank {1 - rank} of world_size=2, this is rank {rank} of world_size=2"
            )
            assert "zero_stage=" in errors[f"{config}:other_stage"]
        assert errors["zero2-fp32:other_shape"].startswith("parameter 'W_dec': checkpoint has [shape, dtype] [[64, 16], 'float32']")
