"""A real two-process DeepSpeed run on CPU with gloo, ZeRO stages 1 and 2.

Each rank trains on its half of every global batch. Both ranks must end with identical weights,
the loss must fall, and the weights must match one process training on the full batches with
plain torch Adam and the same gradient clipping (what data parallelism promises).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import free_port

from trainer.config import DeepSpeedConfig, TrainConfig
from trainer.engine import master_weights, shutdown_engine, wrap_in_deepspeed
from trainer.loop import train
from trainer.metrics import DeadLatentTracker
from trainer.sae import TopKSAE

pytestmark = pytest.mark.integration

WORLD_SIZE = 2
D_IN, N_LATENTS, K = 16, 64, 4
GLOBAL_BATCH, STEPS, LR = 64, 12, 1e-2
SAE_SEED, DATA_SEED = 0, 987_654


def _global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    return [torch.randn(GLOBAL_BATCH, D_IN, generator=generator) * 2 + 0.5 for _ in range(STEPS)]


class _LossLogger:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.losses.append(metrics["loss"])

    def finish(self) -> None:
        pass


def _train_one_stage(rank: int, zero_stage: int) -> dict[str, object]:
    local = GLOBAL_BATCH // WORLD_SIZE
    batches = (batch[rank * local : (rank + 1) * local] for batch in _global_batches())
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED)
    engine = wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=GLOBAL_BATCH), deepspeed_cfg=DeepSpeedConfig(zero_stage=zero_stage),
        lr=LR, world_size=WORLD_SIZE,
    )
    logger = _LossLogger()
    tracker = DeadLatentTracker(N_LATENTS)
    summary = train(
        engine, batches, scale=1.0, max_steps=STEPS, logger=logger, log_every=1,
        dead_tracker=tracker, dead_after_tokens=GLOBAL_BATCH * 4, world_size=WORLD_SIZE,
    )
    weights = {name: value.detach().clone() for name, value in engine.module.state_dict().items()}
    masters = master_weights(engine)  # a collective under ZeRO: both ranks call it
    shutdown_engine(engine)
    return {
        "weights": weights, "masters": masters, "losses": logger.losses, "tokens": summary.tokens,
        "tracker": tracker.state_dict(),
    }


def _worker(rank: int, ports: tuple[int, int], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]),
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
    )
    results: dict[str, object] = {}
    # ZeRO 1: wrap_in_deepspeed makes the group from the environment, and shutdown removes it.
    results["stage1"] = _train_one_stage(rank, zero_stage=1)
    results["stage1_group_removed"] = not dist.is_initialized()
    # ZeRO 2: the caller owns the group (as with Ray Train); shutdown must leave it alone.
    os.environ["MASTER_PORT"] = str(ports[1])
    dist.init_process_group("gloo")
    results["stage2"] = _train_one_stage(rank, zero_stage=2)
    results["stage2_group_kept"] = dist.is_initialized()
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")



def _single_process_reference() -> dict[str, torch.Tensor]:
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    for batch in _global_batches():
        optimizer.zero_grad()
        sae(batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), TrainConfig().max_grad_norm)
        optimizer.step()
    return {name: value.detach() for name, value in sae.state_dict().items()}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, object]]:
    out_dir = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_worker, args=((free_port(), free_port()), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_ranks_end_with_identical_weights_and_falling_loss(rank_results, stage: str) -> None:
    rank0, rank1 = (results[stage] for results in rank_results)
    for name, value in rank0["weights"].items():
        torch.testing.assert_close(rank1["weights"][name], value, rtol=0, atol=0)
        torch.testing.assert_close(rank0["masters"][name], value, rtol=0, atol=0)  # fp32 run
    assert rank0["losses"] == rank1["losses"]  # all-reduced: every rank logs the same figures
    assert len(rank0["losses"]) == STEPS
    assert rank0["losses"][-1] < 0.9 * rank0["losses"][0]
    assert rank0["tokens"] == STEPS * GLOBAL_BATCH
    for key, value in rank0["tracker"].items():  # dead-latent counters agree across ranks
        assert torch.equal(rank1["tracker"][key], value), key
    assert int(rank0["tracker"]["n_tokens"]) == STEPS * GLOBAL_BATCH


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_two_half_batches_match_one_process_on_the_full_batch(rank_results, stage: str) -> None:
    reference = _single_process_reference()
    for name, value in rank_results[0][stage]["weights"].items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_shutdown_removes_only_a_group_it_created(rank_results) -> None:
    for results in rank_results:
        assert results["stage1_group_removed"]
        assert results["stage2_group_kept"]
