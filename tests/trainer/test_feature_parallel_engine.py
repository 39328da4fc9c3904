"""Feature parallelism through DeepSpeed on CPU with gloo: 2 processes splitting the latents
(1 x 2), and 4 as a 2 x 2 (data x feature) grid, under ZeRO 0-3.

Each configuration runs a few steps of ``wrap_in_deepspeed(parallelize_features(TopKSAE), grid=...)`` with
gradient clipping small enough to bite at every step, each data rank on its share of every global
batch. Every figure must match one process running the plain ``TopKSAE`` with torch Adam and
``clip_grad_norm_`` on the whole batches: the loss, the gradient norm DeepSpeed clips by (the
whole dictionary's, with the replicated ``b_dec`` counted once), the updated weights of each slice,
the dictionary gathered from the fp32 master weights, and the dead-latent counters.

The batches grow from step to step, so the clipping factor changes from step to step; Adam is
blind to a gradient scale that stays the same, not to one that changes, so a wrong norm shows in
the weights too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from feature_grid import (
    D_IN,
    DATA_SEED,
    GLOBAL_BATCH,
    N_LATENTS,
    PARAMETERS,
    SAE_SEED,
    K,
    close,
    data_rows,
    grid_runs,
    latent_slice,
    slice_of,
)

from trainer.config import DeepSpeedConfig, TrainConfig
from trainer.engine import master_weights, shutdown_engine, wrap_in_deepspeed
from trainer.feature_parallel import ParallelGrid, build_grid, parallelize_features
from trainer.metrics import DeadLatentTracker, latent_fire_counts
from trainer.sae import TopKSAE

pytestmark = pytest.mark.integration

STEPS, LR = 4, 1e-2
MAX_GRAD_NORM = 0.05  # below every step's gradient norm here (checked against the reference)
# name -> (ZeRO stage, precision) of each engine every run builds in turn.
CONFIGS = {
    "zero0": (0, "fp32"),
    "zero1": (1, "fp32"),
    "zero2": (2, "fp32"),
    "zero3": (3, "fp32"),
    "zero2_bf16": (2, "bf16"),
}
FP32_CONFIGS = [name for name, (_, precision) in CONFIGS.items() if precision == "fp32"]


def _global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    return [torch.randn(GLOBAL_BATCH, D_IN, generator=generator) * (1 + step) + 0.5 for step in range(STEPS)]


# --------------------------------------------------------------------------- what each rank runs


def _train(grid: ParallelGrid, stage: int, precision: str) -> dict[str, object]:
    # Each data rank draws different initial slices: DeepSpeed must broadcast the first data
    # rank's within every data group, so all replicas start from SAE_SEED's dictionary.
    sae = parallelize_features(TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED + grid.data_rank, auxk_coefficient=0),
                               group=grid.feature_group)
    sae.init_b_dec(_global_batches()[0], method="mean")  # non-zero: the encoder input depends on it
    deepspeed_cfg = DeepSpeedConfig(
        zero_stage=stage, precision=precision, feature_parallel=grid.feature_parallel,
        stage3_param_persistence_threshold=0,  # partition every ZeRO-3 parameter, however small
    )
    engine = wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=GLOBAL_BATCH, max_grad_norm=MAX_GRAD_NORM),
        deepspeed_cfg=deepspeed_cfg, lr=LR, world_size=dist.get_world_size(), grid=grid,
    )
    tracker = DeadLatentTracker(N_LATENTS)
    losses, grad_norms = [], []
    for batch in _global_batches():
        x = batch[data_rows(grid.data_rank, grid.data_parallel)]
        out = engine(x.to(next(engine.module.parameters()).dtype))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        norm = engine.get_global_grad_norm()  # None under ZeRO 0 in fp32: DeepSpeed keeps none
        grad_norms.append(None if norm is None else float(norm))
        # Dead-latent counters as the loop keeps them: the selection (global indices) is the same
        # on every rank of a feature group, so counts summed over the data group are the whole
        # dictionary's on the whole global batch, on every rank.
        counts = latent_fire_counts(out.latent_indices, out.latent_acts, N_LATENTS)
        dist.all_reduce(counts, group=grid.data_group)
        tracker.update_counts(counts, n_tokens=GLOBAL_BATCH)
    masters = master_weights(engine)  # a collective over the data group
    results = {
        "losses": losses,
        "grad_norms": grad_norms,
        "masters": masters,
        "full": engine.module.full_state_dict(masters),  # a collective over the feature group
        "module_dtype": engine.module.W_enc.dtype,
        "tracker": tracker.state_dict(),
    }
    shutdown_engine(engine)
    return results


def _later_plain_engine_ranks(world_size: int) -> int:
    """The data-parallel ranks of an engine without a grid, built after the grid's engines were
    shut down in the same process: all of them, not a stale data group's."""
    engine = wrap_in_deepspeed(
        TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED), train_cfg=TrainConfig(batch_size=GLOBAL_BATCH),
        deepspeed_cfg=DeepSpeedConfig(), lr=LR, world_size=world_size,
    )
    ranks = engine.dp_world_size
    shutdown_engine(engine)
    return ranks


def _worker(rank: int, world_size: int, data_parallel: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # deepspeed.initialize asserts LOCAL_RANK is set, as every launcher does.
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    grid = build_grid(data_parallel=data_parallel, feature_parallel=world_size // data_parallel)
    results: dict[str, object] = {"position": (grid.data_rank, grid.feature_rank)}
    for name, (stage, precision) in CONFIGS.items():
        results[name] = _train(grid, stage, precision)
    results["later_plain_engine_ranks"] = _later_plain_engine_ranks(world_size)
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


run = grid_runs(_worker, preload=["torch", "torch._dynamo", "trainer.engine"])


# --------------------------------------------------------------------------- the reference


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    """One process, the whole batches: the plain ``TopKSAE``, torch Adam, ``clip_grad_norm_``."""
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED)
    with torch.no_grad():
        sae.b_dec.copy_(_global_batches()[0].mean(dim=0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    tracker = DeadLatentTracker(N_LATENTS)
    losses, grad_norms = [], []
    for batch in _global_batches():
        optimizer.zero_grad()
        out = sae(batch)
        out.loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(sae.parameters(), MAX_GRAD_NORM).item())
        optimizer.step()
        losses.append(out.loss.item())
        tracker.update_counts(latent_fire_counts(out.latent_indices, out.latent_acts, N_LATENTS), n_tokens=GLOBAL_BATCH)
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "weights": {name: value.detach().clone() for name, value in sae.state_dict().items()},
        "tracker": tracker.state_dict(),
    }


def _replica_losses(ranks: list[dict[str, object]], config: str) -> torch.Tensor:
    """(data_parallel, STEPS): each replica's losses (one feature rank per replica)."""
    by_replica = {results["position"][0]: results[config]["losses"] for results in ranks}
    return torch.tensor([by_replica[d] for d in sorted(by_replica)])


# --------------------------------------------------------------------------- tests


def test_clipping_bites_at_every_step(reference) -> None:
    assert min(reference["grad_norms"]) > 2 * MAX_GRAD_NORM


@pytest.mark.parametrize("config", FP32_CONFIGS)
def test_steps_give_the_single_process_loss(run, reference, config: str) -> None:
    _, ranks = run
    # Equal shares of the global batch: the replicas' mean loss is the loss on the whole batch.
    replica_losses = _replica_losses(ranks, config)
    close(replica_losses.mean(dim=0), torch.tensor(reference["losses"]), "loss per step")
    for results in ranks:  # the ranks of a feature group compute one loss
        same_replica = next(r for r in ranks if r["position"][0] == results["position"][0])
        assert results[config]["losses"] == same_replica[config]["losses"]


@pytest.mark.parametrize("config", [c for c in FP32_CONFIGS if CONFIGS[c][0] > 0])
def test_deepspeed_clips_by_the_whole_dictionarys_gradient_norm(run, reference, config: str) -> None:
    _, ranks = run
    for results in ranks:
        norms = torch.tensor(results[config]["grad_norms"])
        close(norms, torch.tensor(reference["grad_norms"]), f"gradient norm per step, {config}")


@pytest.mark.parametrize("config", FP32_CONFIGS)
def test_every_slice_ends_with_the_single_process_weights(run, reference, config: str) -> None:
    (_, feature_parallel), ranks = run
    for results in ranks:
        feature_rank = results["position"][1]
        masters = results[config]["masters"]
        assert sorted(masters) == sorted(PARAMETERS)
        for name in PARAMETERS:
            expected = slice_of(name, reference["weights"][name], latent_slice(feature_rank, feature_parallel))
            close(masters[name], expected, f"{config} {name} on rank {results['position']}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_master_weights_gather_into_the_saelens_layout(run, reference, config: str) -> None:
    _, ranks = run
    bf16 = CONFIGS[config][1] == "bf16"
    for results in ranks:
        full = results[config]["full"]
        if results["position"][1] != 0:
            assert full is None
            continue
        assert sorted(full) == sorted(PARAMETERS)
        for name in PARAMETERS:
            expected = reference["weights"][name]
            assert full[name].shape == expected.shape and full[name].dtype == torch.float32
            if bf16:  # bf16 forward and backward over fp32 masters: close, not equal
                torch.testing.assert_close(full[name], expected, rtol=0, atol=0.1, msg=name)
            else:
                close(full[name], expected, f"{config} {name}")


def test_bf16_runs_in_bf16_over_fp32_masters_and_tracks_the_reference(run, reference) -> None:
    _, ranks = run
    for results in ranks:
        bf16 = results["zero2_bf16"]
        assert bf16["module_dtype"] == torch.bfloat16
        assert all(master.dtype == torch.float32 for master in bf16["masters"].values())
        torch.testing.assert_close(
            torch.tensor(bf16["grad_norms"]), torch.tensor(reference["grad_norms"]), rtol=0.02, atol=0
        )
    replica_losses = _replica_losses(ranks, "zero2_bf16").mean(dim=0)
    torch.testing.assert_close(replica_losses, torch.tensor(reference["losses"]), rtol=0.02, atol=0)


@pytest.mark.parametrize("config", FP32_CONFIGS)
def test_dead_latent_counters_agree_across_ranks_and_with_the_reference(run, reference, config: str) -> None:
    _, ranks = run
    for results in ranks:
        tracker = results[config]["tracker"]
        for key, expected in reference["tracker"].items():
            assert torch.equal(tracker[key], expected), (config, key, results["position"])


def test_an_engine_built_after_the_grid_is_shut_down_spans_every_rank(run) -> None:
    (data_parallel, feature_parallel), ranks = run
    for results in ranks:
        assert results["later_plain_engine_ranks"] == data_parallel * feature_parallel
