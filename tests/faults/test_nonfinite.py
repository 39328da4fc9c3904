"""NaN and Inf in activations, and steps whose loss is not finite, on real components.

The fault is real: a copy of the tiny Llama whose embedding rows of two tokens hold NaN and +Inf,
so the model itself emits non-finite activations at ``model.embed_tokens`` (each poisoned token
poisons its own rows only). The producer code writes them into a cache, the reader reads it back,
DeepSpeed engines train on it (one process, and two processes with gloo), the checkpoint code
saves the state, and once a whole job runs on a local Ray cluster against the S3 endpoint.

What a user relies on (issue 9): a few non-finite rows never poison a cache's statistics; a step
whose batch or loss is not finite is skipped (or stops training, by ``train.nonfinite``), counted
and logged, and leaves weights, optimizer, schedule and counters untouched; no checkpoint ever
holds a non-finite tensor.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ranks import free_port, run_ranks
from recording_logger import RecordingLogger
from safetensors.torch import load as load_safetensors
from tiny_job import tiny_overrides
from tiny_model import TEXT

# DeepSpeed picks its accelerator on first use: the CPU, with gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from activation_cache.config import ModelConfig  # noqa: E402
from activation_cache.hooking import (  # noqa: E402
    ActivationHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.manifest import ActivationStats, Manifest, commit_manifest, load_manifest  # noqa: E402
from activation_cache.plan import input_scale, split_holdout  # noqa: E402
from activation_cache.producing import produce_shard, split_units  # noqa: E402
from activation_cache.reader import ActivationReader, read_shard  # noqa: E402
from activation_cache.schema import ShardMeta  # noqa: E402
from activation_cache.store import ObjectStore, open_store  # noqa: E402
from cluster.cli import main as saeforge  # noqa: E402
from cluster.config import compose_job  # noqa: E402
from trainer.architectures import build_sae  # noqa: E402
from trainer.checkpoint import NonFiniteStateError, decode_state, flatten_state  # noqa: E402
from trainer.config import DeepSpeedConfig, SAEConfig, TrainConfig  # noqa: E402
from trainer.engine import (  # noqa: E402
    load_rank_state,
    master_weights,
    save_rank_state,
    shutdown_engine,
    wrap_in_deepspeed,
)
from trainer.evaluation import ReconstructionErrorStats, SplicedLossStats  # noqa: E402
from trainer.feature_parallel import build_grid, parallelize_features  # noqa: E402
from trainer.loop import (  # noqa: E402
    WALL_CLOCK_METRICS,
    DictionaryTrainer,
    NonFiniteBatchError,
    NonFiniteCounts,
    SkippedStepsError,
    evaluate,
)
from trainer.metrics import DeadLatentTracker  # noqa: E402

pytestmark = pytest.mark.integration

HOOKPOINT = "model.embed_tokens"
CONTEXT, SEQUENCES_PER_SHARD, N_SHARDS = 32, 4, 4
BATCH, N_LATENTS, K, LR, SEED = 16, 64, 4, 3e-3, 0
COUNT_KEYS = ("skipped_steps_nonfinite_batch", "skipped_steps_nonfinite_loss", "nonfinite_rows")


# --------------------------------------------------------------------------- the poisoned model and its cache


def _poison(model_dir: Path, token_ids: np.ndarray, excluded: set[int]) -> tuple[int, int]:
    """Set the embedding row of the rarest token of ``token_ids`` seen at least 3 times to NaN
    and one value of the next rarest to +Inf, in place; return the two token ids."""
    from transformers import AutoModelForCausalLM

    counts = Counter(int(t) for t in token_ids.reshape(-1) if int(t) not in excluded)
    nan_token, inf_token = sorted((t for t in counts if counts[t] >= 3), key=lambda t: (counts[t], t))[:2]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[nan_token] = float("nan")
        embedding[inf_token, 3] = float("inf")
    model.save_pretrained(model_dir)
    return nan_token, inf_token


@pytest.fixture(scope="module")
def poisoned(tiny_model_dir, tmp_path_factory) -> dict:
    """The poisoned copy of the tiny Llama and the token stream the cache tests produce from."""
    folder = tmp_path_factory.mktemp("poisoned-llama")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    source = resolve_model_source(ModelConfig(name_or_path=str(folder)))
    ids = np.asarray(load_tokenizer(source)(TEXT * 12, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n_sequences = N_SHARDS * SEQUENCES_PER_SHARD
    assert len(ids) >= n_sequences * CONTEXT
    tokens = ids[: n_sequences * CONTEXT].reshape(n_sequences, CONTEXT)
    nan_token, inf_token = _poison(folder, tokens, excluded=set())
    return {"dir": folder, "tokens": tokens, "bad_tokens": (nan_token, inf_token)}


def _produce(poisoned: dict, store: ObjectStore) -> Manifest:
    """The cache of ``poisoned["tokens"]`` written by the producer code and committed."""
    source = resolve_model_source(ModelConfig(name_or_path=str(poisoned["dir"])))
    harvester = ActivationHarvester(load_model(source), HOOKPOINT)
    meta = ShardMeta(model=source.model_id, revision=source.revision, hookpoint=harvester.hookpoint,
                     d_model=harvester.d_model, dtype="float32", cache_key="poisoned")
    manifest = Manifest(cache_key=meta.cache_key, key_inputs={}, model=meta.model, revision=meta.revision,
                        hookpoint=meta.hookpoint, d_model=meta.d_model, dtype=meta.dtype)
    for unit in split_units(poisoned["tokens"], SEQUENCES_PER_SHARD):
        result = produce_shard(unit, harvester=harvester, store=store, meta=meta, excluded_token_ids=frozenset(),
                               batch_size=4)
        manifest = manifest.with_shard(result.entry, result.stats)
    manifest.complete = True
    commit_manifest(store, manifest)
    return manifest


@pytest.fixture(scope="module")
def cache(poisoned, tmp_path_factory) -> tuple[ObjectStore, Manifest]:
    store = open_store(str(tmp_path_factory.mktemp("poisoned-cache")))
    return store, _produce(poisoned, store)


def _epoch(store: ObjectStore, manifest: Manifest, *, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    reader = ActivationReader(store, manifest.shards, rank=rank, world_size=world_size,
                              batch_size=BATCH // world_size, seed=SEED, shuffle_buffer_rows=64, read_threads=1)
    return list(reader.epoch(0))


def _bad_rows(batch: torch.Tensor) -> int:
    return int((~torch.isfinite(batch).all(dim=-1)).sum())


# --------------------------------------------------------------------------- one process


@pytest.fixture
def engines(engine_factory, one_torch_thread):
    """``engine_factory`` at this module's batch size and learning rate."""
    return functools.partial(engine_factory, batch_size=BATCH, lr=LR)


def _trainer(engine, manifest: Manifest, n_steps: int, logger=None, **options) -> DictionaryTrainer:
    return DictionaryTrainer(engine, scale=input_scale(manifest, True), max_steps=n_steps,
                             logger=logger or RecordingLogger(), log_every=4,
                             dead_tracker=DeadLatentTracker(N_LATENTS), dead_after_tokens=10 * BATCH,
                             world_size=1, **options)


def _assert_finite_state(data: bytes) -> None:
    tensors, _ = flatten_state(decode_state(data))
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), f"checkpoint tensor {name} is not finite"


def _assert_same_state(a: bytes, b: bytes, parts: tuple[str, ...]) -> None:
    first, second = decode_state(a), decode_state(b)
    for part in parts:
        tensors_a, skeleton_a = flatten_state(first[part])
        tensors_b, skeleton_b = flatten_state(second[part])
        assert skeleton_a == skeleton_b, part
        for name, tensor in tensors_a.items():
            assert torch.equal(tensor, tensors_b[name]), f"{part}/{name} differs"


def test_skipped_batches_are_counted_logged_and_resumed(cache, engines) -> None:
    """Skip policy on a real cache: the skipped steps are exactly the batches holding a bad row,
    every row is counted once, the metrics carry the counts, the weights and the checkpoint
    stay finite, a resumed run restores the counters and ends bit-identical, and held-out
    evaluation leaves the bad rows out instead of returning NaN."""
    store, manifest = cache
    batches = _epoch(store, manifest)
    bad = [_bad_rows(b) for b in batches]
    n_bad_batches = sum(n > 0 for n in bad)
    assert 0 < n_bad_batches < len(batches) and sum(bad) == manifest.nonfinite_rows

    engine = engines(build_sae(SAEConfig(n_latents=N_LATENTS, k=K), d_in=manifest.d_model, seed=SEED))
    logger = RecordingLogger()
    trainer = _trainer(engine, manifest, len(batches), logger)
    resume_at = next(i for i, n in enumerate(bad) if n) + 2  # one skip behind the checkpoint
    for step, batch in enumerate(batches, start=1):
        trainer.step(batch)
        if step == resume_at:
            saved = save_rank_state(engine, extra={"loop": trainer.state_dict()})
            counts_at_save = NonFiniteCounts(**vars(trainer.nonfinite))

    assert trainer.nonfinite == NonFiniteCounts(batch_steps=n_bad_batches, loss_steps=0, rows=manifest.nonfinite_rows)
    summary = trainer.summary()
    assert (summary.steps, summary.tokens) == (len(batches), (len(batches) - n_bad_batches) * BATCH)
    for step, metrics in logger.records:  # running totals, with the regular metrics
        assert metrics["skipped_steps_nonfinite_batch"] == sum(n > 0 for n in bad[:step])
        assert metrics["nonfinite_rows"] == sum(bad[:step])
        assert metrics["skipped_steps_nonfinite_loss"] == 0
    assert [entry["nonfinite_rows"] for entry in trainer.history] == [m["nonfinite_rows"] for _, m in logger.records]
    assert all(torch.isfinite(w).all() for w in master_weights(engine).values())
    final = save_rank_state(engine, extra={"loop": trainer.state_dict()})
    _assert_finite_state(final)

    # Resume from the checkpoint taken after a skip: the counters come back, and the run ends
    # exactly where the uninterrupted one did.
    assert counts_at_save.batch_steps >= 1
    resumed_engine = engines(build_sae(SAEConfig(n_latents=N_LATENTS, k=K), d_in=manifest.d_model, seed=SEED + 1))
    resumed = _trainer(resumed_engine, manifest, len(batches))
    resumed.load_state_dict(load_rank_state(resumed_engine, saved)["loop"])
    assert resumed.nonfinite == counts_at_save and resumed.steps_done == resume_at
    for batch in batches[resume_at:]:
        resumed.step(batch)
    assert resumed.nonfinite == trainer.nonfinite
    untimed = dict.fromkeys(WALL_CLOCK_METRICS, 0.0)
    assert resumed.history[-1] | untimed == trainer.history[-1] | untimed
    _assert_same_state(final, save_rank_state(resumed_engine, extra={}), ("module", "optimizer", "lr_scheduler"))

    held_out = evaluate(engine.module, (read_shard(store, e).activations for e in manifest.shards),
                        scale=input_scale(manifest, True))
    assert held_out["nonfinite_rows_skipped"] == manifest.nonfinite_rows
    assert held_out["n_tokens"] == manifest.rows - manifest.nonfinite_rows
    assert all(math.isfinite(v) for v in held_out.values())


def test_stop_policy_and_the_skip_bound_name_the_step(cache, engines) -> None:
    store, manifest = cache
    batches = _epoch(store, manifest)
    bad_steps = [step for step, b in enumerate(batches, start=1) if _bad_rows(b)]
    engine = engines(build_sae(SAEConfig(n_latents=N_LATENTS, k=K), d_in=manifest.d_model, seed=SEED), zero_stage=0)

    trainer = _trainer(engine, manifest, len(batches), nonfinite="stop")
    with pytest.raises(NonFiniteBatchError) as caught:
        for batch in batches:
            before = {k: v.clone() for k, v in engine.module.state_dict().items()}
            trainer.step(batch)
    first = bad_steps[0]
    n_rows = _bad_rows(batches[first - 1])
    assert str(caught.value) == (
        f"step {first}: {n_rows} rows with NaN or Inf in the batch on 1 of 1 ranks; "
        "training stopped before the forward pass (train.nonfinite='stop')"
    )
    for name, value in engine.module.state_dict().items():  # the stopped step changed nothing
        assert torch.equal(value, before[name]), name
    revived = pickle.loads(pickle.dumps(caught.value))  # crosses Ray processes intact
    assert type(revived) is NonFiniteBatchError and str(revived) == str(caught.value) and revived.step == first

    bounded = _trainer(engine, manifest, len(batches), nonfinite="skip", max_skipped_steps=1)
    with pytest.raises(SkippedStepsError) as caught:
        for batch in batches:
            bounded.step(batch)
    assert str(caught.value) == (
        f"step {bad_steps[1]}: 2 steps skipped for non-finite values (2 batches with NaN or Inf, 0 non-finite "
        "losses), more than train.max_skipped_steps=1; training stopped"
    )


def test_a_non_finite_loss_is_skipped_without_touching_the_state(cache, engines) -> None:
    """A batch of finite values so large that their squares overflow fp32: the loss is Inf. The
    skipped step leaves weights, Adam moments, the lr schedule, BatchTopK's threshold buffer and
    the dead-latent counters exactly as a run that never saw the batch."""
    store, manifest = cache
    good = [b for b in _epoch(store, manifest) if not _bad_rows(b)][:3]
    huge = good[0].clone()
    huge[5] = 1e20

    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / 4)

    runs = {}
    for name, batches in (("with_huge", [good[0], good[1], huge, good[2]]), ("without", good)):
        engine = engines(build_sae(SAEConfig(architecture="batchtopk", n_latents=N_LATENTS, k=K), d_in=manifest.d_model, seed=SEED),
                         lr_multiplier=warmup)
        trainer = _trainer(engine, manifest, len(batches))
        for batch in batches:
            trainer.step(batch)
        runs[name] = (trainer, save_rank_state(engine, extra={"dead": trainer.dead_tracker.state_dict()}))

    (skipping, with_huge), (plain, without) = runs["with_huge"], runs["without"]
    assert skipping.nonfinite == NonFiniteCounts(batch_steps=0, loss_steps=1, rows=0)
    assert skipping.metrics["skipped_steps_nonfinite_loss"] == 1 and skipping.tokens == plain.tokens
    _assert_same_state(with_huge, without, ("module", "optimizer", "lr_scheduler", "extra"))
    _assert_finite_state(with_huge)


def test_checkpoint_save_refuses_a_non_finite_tensor_by_name(cache, engines) -> None:
    store, manifest = cache
    engine = engines(build_sae(SAEConfig(n_latents=N_LATENTS, k=K), d_in=manifest.d_model, seed=SEED))
    trainer = _trainer(engine, manifest, 2)
    for batch in [b for b in _epoch(store, manifest) if not _bad_rows(b)][:2]:
        trainer.step(batch)
    master = engine.optimizer.single_partition_of_fp32_groups[0]  # ZeRO 2's fp32 master weights
    moment = next(iter(engine.optimizer.optimizer.state.values()))["exp_avg_sq"]
    for tensor, name in ((master, "['single_partition_of_fp32_groups'][0]"),
                         (moment, "['base_optimizer_state']['state'][0]['exp_avg_sq']")):
        kept = tensor[7].item()
        with torch.no_grad():
            tensor[7] = float("nan")
        with pytest.raises(NonFiniteStateError) as caught:
            save_rank_state(engine, extra={"loop": trainer.state_dict()})
        assert str(caught.value) == (
            f"rank 0: state['optimizer']{name} holds 1 NaN or Inf values of {tensor.numel()}: refusing to "
            "checkpoint a non-finite state (expected every weight and optimizer value finite)"
        )
        with torch.no_grad():
            tensor[7] = kept
    _assert_finite_state(save_rank_state(engine, extra={"loop": trainer.state_dict()}))


def test_the_producer_counts_non_finite_rows_and_keeps_the_statistics_finite(poisoned, cache, tmp_path, caplog,
                                                                             capsys) -> None:
    store, manifest = cache
    nan_token, inf_token = poisoned["bad_tokens"]
    units = split_units(poisoned["tokens"], SEQUENCES_PER_SHARD)
    expected = [int(np.isin(u.tokens, [nan_token, inf_token]).sum()) for u in units]
    assert [s.nonfinite_rows for s in manifest.shards] == expected and sum(expected) > 0

    finite_rows = []
    for unit, entry in zip(units, manifest.shards, strict=True):
        shard = read_shard(store, entry)  # every token stays, exactly once, poisoned or not
        assert sorted(zip(shard.sequence_ids.tolist(), shard.positions.tolist(), strict=True)) == [
            (unit.first_sequence_id + s, p) for s in range(len(unit.tokens)) for p in range(CONTEXT)]
        acts = shard.activations
        assert torch.isnan(acts[torch.from_numpy(shard.token_ids == nan_token)]).all()
        assert torch.isinf(acts[torch.from_numpy(shard.token_ids == inf_token)]).any(dim=-1).all()
        finite_rows.append(acts[torch.isfinite(acts).all(dim=-1)].double())
        assert ActivationStats.of(acts.numpy()).rows == len(finite_rows[-1])
    finite = torch.cat(finite_rows)
    stats = manifest.stats
    assert stats.rows == manifest.rows - manifest.nonfinite_rows == len(finite)
    assert stats.mean_norm == pytest.approx(finite.norm(dim=-1).mean().item(), rel=1e-9)
    assert np.isfinite(stats.mean()).all() and np.isfinite(stats.var()).all()
    assert math.isfinite(input_scale(manifest, True))

    # A warning names the shard; the count shows in `saeforge cache inspect`.
    with caplog.at_level(logging.WARNING, logger="activation_cache.producing"):
        _produce(poisoned, open_store(str(tmp_path / "again")))
    first_bad = next(i for i, n in enumerate(expected) if n)
    assert (f"shard shards/unit-{first_bad:06d}.arrow of {HOOKPOINT}: {expected[first_bad]} of "
            f"{SEQUENCES_PER_SHARD * CONTEXT} rows hold NaN or Inf") in caplog.text
    assert saeforge(["cache", "inspect", "--json", store.uri]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["nonfinite_rows"] == sum(expected)
    assert record["nonfinite_shards"] == [s.name for s in manifest.shards if s.nonfinite_rows]
    assert saeforge(["cache", "inspect", store.uri]) == 0
    assert f"non-finite   {sum(expected)} rows with NaN or Inf" in capsys.readouterr().out

    # Manifests written before the count existed still load, with none counted.
    raw = json.loads(manifest.to_json())
    for shard in raw["shards"]:
        del shard["nonfinite_rows"]
    assert Manifest.from_json(json.dumps(raw).encode()).nonfinite_rows == 0


def test_spliced_evaluation_leaves_non_finite_tokens_out_and_counts_them() -> None:
    """The spliced evaluation's figures over tokens with a NaN activation or logit are those of
    the other tokens alone, with the left-out ones counted, not NaN."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(6, 8, generator=generator)
    reconstruction = x + 0.1 * torch.randn(6, 8, generator=generator)
    poisoned_x = x.clone()
    poisoned_x[2, 1] = float("nan")
    keep = torch.arange(6) != 2
    errors, expected = ReconstructionErrorStats(), ReconstructionErrorStats()
    errors.update(poisoned_x, reconstruction, sequences=torch.arange(6), positions=torch.zeros(6))
    expected.update(x[keep], reconstruction[keep], sequences=torch.arange(6)[keep], positions=torch.zeros(5))
    assert errors.result() == {**expected.result(), "nonfinite_tokens_skipped": 1}

    token_ids = torch.randint(0, 11, (1, 6), generator=generator)
    clean, ablated = torch.randn(2, 1, 6, 11, generator=generator)
    spliced = clean + 0.1
    spliced[0, 2, 4] = float("nan")
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, -1] = False
    losses, expected_losses = SplicedLossStats(), SplicedLossStats()
    losses.update(clean_logits=clean, spliced_logits=spliced, ablated_logits=ablated, token_ids=token_ids, mask=mask)
    mask[0, 2] = False
    expected_losses.update(clean_logits=clean, spliced_logits=spliced, ablated_logits=ablated, token_ids=token_ids,
                           mask=mask)
    assert losses.result() == {**expected_losses.result(), "nonfinite_tokens_skipped": 1}


# --------------------------------------------------------------------------- two processes


WORLD_SIZE = 2


def _rank_epoch(cache_dir: str, rank: int, world_size: int) -> list[torch.Tensor]:
    store = open_store(cache_dir)
    return _epoch(store, load_manifest(store), rank=rank, world_size=world_size)


def _two_rank_trainer(engine, manifest, n_steps: int, **options) -> DictionaryTrainer:
    return DictionaryTrainer(engine, scale=input_scale(manifest, True), max_steps=n_steps, logger=RecordingLogger(),
                             log_every=4, dead_tracker=DeadLatentTracker(N_LATENTS), dead_after_tokens=10 * BATCH,
                             **options)


def _data_parallel(rank: int, cache_dir: str) -> dict:
    """ZeRO 2 over two data-parallel ranks, each reading its own shards: skip, then stop, then a
    checkpoint with a NaN on rank 1 only."""
    manifest = load_manifest(open_store(cache_dir))
    batches = _rank_epoch(cache_dir, rank, WORLD_SIZE)
    n_steps = torch.tensor([len(batches)])
    dist.all_reduce(n_steps, op=dist.ReduceOp.MIN)
    batches = batches[: int(n_steps)]
    result: dict = {"bad_rows": [_bad_rows(b) for b in batches]}

    def engine():
        return wrap_in_deepspeed(build_sae(SAEConfig(n_latents=N_LATENTS, k=K), d_in=manifest.d_model, seed=SEED),
                                 train_cfg=TrainConfig(batch_size=BATCH), deepspeed_cfg=DeepSpeedConfig(zero_stage=2),
                                 lr=LR, world_size=WORLD_SIZE)

    skipping = engine()
    trainer = _two_rank_trainer(skipping, manifest, len(batches), world_size=WORLD_SIZE)
    for batch in batches:
        trainer.step(batch)
    result["counts"], result["masters"] = dict(vars(trainer.nonfinite)), master_weights(skipping)
    master = skipping.optimizer.single_partition_of_fp32_groups[0]
    if rank == 1:
        with torch.no_grad():
            master[0] = float("inf")
    try:
        save_rank_state(skipping, extra={})
    except NonFiniteStateError as err:
        result["refused"] = str(err)
    shutdown_engine(skipping)

    stopping = engine()
    trainer = _two_rank_trainer(stopping, manifest, len(batches), world_size=WORLD_SIZE, nonfinite="stop")
    try:
        for batch in batches:
            trainer.step(batch)
    except NonFiniteBatchError as err:
        result["stopped"] = (err.step, str(err))
    shutdown_engine(stopping)
    return result


def _feature_parallel(rank: int, cache_dir: str) -> dict:
    """One data replica of two feature ranks: both read the same batches."""
    manifest = load_manifest(open_store(cache_dir))
    batches = _rank_epoch(cache_dir, 0, 1)
    grid = build_grid(data_parallel=1, feature_parallel=WORLD_SIZE)
    sae = parallelize_features(build_sae(SAEConfig(n_latents=N_LATENTS, k=K, auxk_coefficient=0), d_in=manifest.d_model,
                                         seed=SEED), group=grid.feature_group)
    engine = wrap_in_deepspeed(sae, train_cfg=TrainConfig(batch_size=BATCH),
                               deepspeed_cfg=DeepSpeedConfig(zero_stage=1, feature_parallel=WORLD_SIZE), lr=LR,
                               world_size=WORLD_SIZE, grid=grid)
    trainer = _two_rank_trainer(engine, manifest, len(batches), world_size=grid.data_parallel,
                                data_group=grid.data_group)
    for batch in batches:
        trainer.step(batch)
    result = {"bad_rows": [_bad_rows(b) for b in batches], "counts": dict(vars(trainer.nonfinite)),
              "finite": all(torch.isfinite(w).all() for w in master_weights(engine).values())}
    shutdown_engine(engine)
    return result


def _worker(rank: int, port: int, cache_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    results = {"data": _data_parallel(rank, cache_dir), "feature": _feature_parallel(rank, cache_dir)}
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_take_the_same_decision(cache, tmp_path) -> None:
    """Bad rows reach one rank's batch and not the other's: both ranks skip (or stop at) the same
    steps, so neither waits in a collective the other never enters; counts agree and add up; a
    NaN in one rank's master weights makes both refuse the checkpoint."""
    store, _ = cache
    rank0, rank1 = run_ranks(_worker, free_port(), store.uri, nprocs=WORLD_SIZE, out_dir=tmp_path,
                             preload=["torch", "torch._dynamo", "trainer.engine"])
    data0, data1 = rank0["data"], rank1["data"]
    either = [a or b for a, b in zip(data0["bad_rows"], data1["bad_rows"], strict=True)]
    assert any(bool(a) != bool(b) for a, b in zip(data0["bad_rows"], data1["bad_rows"], strict=True)), \
        "the data should put bad rows on one rank only at some step"
    expected = NonFiniteCounts(batch_steps=sum(map(bool, either)), loss_steps=0,
                               rows=sum(data0["bad_rows"]) + sum(data1["bad_rows"]))
    assert NonFiniteCounts(**data0["counts"]) == NonFiniteCounts(**data1["counts"]) == expected
    for name, value in data0["masters"].items():
        assert torch.isfinite(value).all() and torch.equal(value, data1["masters"][name]), name

    assert data1["refused"].startswith("rank 1: state['optimizer']['single_partition_of_fp32_groups'][0] holds 1 ")
    assert data0["refused"] == ("rank 0: 1 of 2 ranks hold NaN or Inf in their weights or optimizer state: "
                                "refusing to checkpoint a non-finite state")

    first = next(step for step, bad in enumerate(either, start=1) if bad)
    assert data0["stopped"][0] == data1["stopped"][0] == first
    n_ranks = bool(data0["bad_rows"][first - 1]) + bool(data1["bad_rows"][first - 1])
    n_rows = data0["bad_rows"][first - 1] + data1["bad_rows"][first - 1]
    assert f"step {first}: {n_rows} rows with NaN or Inf in the batch on {n_ranks} of 2 ranks" in data0["stopped"][1]

    feature0, feature1 = rank0["feature"], rank1["feature"]
    assert feature0["bad_rows"] == feature1["bad_rows"]  # one batch, two slices of the dictionary
    rows = feature0["bad_rows"]
    # Each row counted once, though both feature ranks saw it.
    expected = NonFiniteCounts(batch_steps=sum(map(bool, rows)), loss_steps=0, rows=sum(rows))
    assert NonFiniteCounts(**feature0["counts"]) == NonFiniteCounts(**feature1["counts"]) == expected
    assert feature0["finite"] and feature1["finite"]


# --------------------------------------------------------------------------- a whole job


def test_a_job_on_a_poisoned_model_trains_and_reports_the_counts(ray_cluster, s3_bucket_uri, tmp_path, capsys,
                                                                 tiny_model_dir, tiny_corpus_dir) -> None:
    """`saeforge train` with the poisoned model: producers on Ray write its activations to S3,
    Ray Train skips the bad batches on two ranks, the command's summary and eval.json report
    what was skipped, and the dictionary and the checkpoints are finite."""
    from cluster.driver import plan_caches
    from trainer.layout import CHECKPOINTS_DIR

    model_dir = tmp_path / "poisoned-llama"
    shutil.copytree(tiny_model_dir, model_dir)
    options = (f"model.hookpoint={HOOKPOINT}", "eval=off", "train.epochs=1", "run.checkpoint_every_steps=8",
               "train.log_every_steps=5", "train.histogram_every_steps=0", "logging.wandb_mode=disabled",
               "cluster.num_producers=1", "run.name=poisoned", "cluster.object_store_memory_bytes=209715200")
    overrides = tiny_overrides(s3_bucket_uri, tmp_path, model_dir, tiny_corpus_dir, *options)
    job = compose_job(overrides)
    s3_options = job.cache.s3_options()
    [plan] = plan_caches(job, open_store(s3_bucket_uri, s3_options=s3_options))
    bad_tokens = _poison(model_dir, plan.tokens, excluded=set(plan.excluded_token_ids))

    assert saeforge(["train", *overrides]) == 0
    summary = capsys.readouterr().out
    lines = dict(line.split(maxsplit=1) for line in summary.splitlines() if line.startswith(("cache ", "dictionary ")))
    cache = open_store(lines["cache"].split()[0], s3_options=s3_options)
    manifest = load_manifest(cache)
    units = split_units(plan.tokens, job.cache.sequences_per_shard)
    expected = [int(np.isin(u.tokens, bad_tokens).sum()) for u in units]
    assert [s.nonfinite_rows for s in manifest.shards] == expected and sum(expected) > 0
    assert math.isfinite(manifest.stats.mean_norm)

    dictionary = open_store(lines["dictionary"], s3_options=s3_options)
    evaluation = json.loads(dictionary.get_bytes("eval.json"))
    training, holdout = split_holdout(manifest.shards, job.train.holdout_fraction)
    assert evaluation["nonfinite_rows_skipped"] == sum(s.nonfinite_rows for s in holdout)
    skipped, rows = evaluation["train_skipped_steps_nonfinite_batch"], evaluation["train_nonfinite_rows"]
    assert 0 < skipped <= rows <= sum(s.nonfinite_rows for s in training)  # a short last batch may drop a few
    assert evaluation["train_skipped_steps_nonfinite_loss"] == 0
    assert f"skipped steps    {skipped} ({skipped} batches with NaN or Inf, {rows} rows; 0 non-finite losses)" in summary
    assert all(math.isfinite(evaluation[k]) for k in ("fvu", "mse", "cosine"))
    for name, tensor in load_safetensors(dictionary.get_bytes("sae_weights.safetensors")).items():
        assert torch.isfinite(tensor).all(), name
    curves = json.loads(dictionary.get_bytes("training_curves.json"))
    assert curves[-1]["skipped_steps_nonfinite_batch"] == skipped
    run = open_store(lines["dictionary"].split("/dictionary/")[0], s3_options=s3_options)
    rank_files = [k for k in run.list(f"{CHECKPOINTS_DIR}/") if k.endswith(".safetensors")]
    assert rank_files, "the job wrote a checkpoint"
    for key in rank_files:
        state = decode_state(run.get_bytes(key))
        for data in state["dictionaries"].values():
            _assert_finite_state(data.numpy().tobytes())
