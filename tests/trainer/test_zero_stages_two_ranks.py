"""ZeRO 3 against ZeRO 2 and no ZeRO: two processes on CPU with gloo, every SAE architecture.

ZeRO 3 partitions the parameters themselves (``stage3_param_persistence_threshold=0``, so even
these small ones), gathers them around forward and backward, and keeps the fp32 masters and Adam
state partitioned: the custom autograd kernels, which save parameters for their backward, and
``master_weights`` must still see whole tensors. Each rank trains on its half of every global batch,
with gradient clipping small enough to bite, from a different initialisation: DeepSpeed broadcasts
rank 0's weights when it wraps the model. The stages must end with the same fp32 weights, and the
weights one process reaches on the whole batches.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import free_port, run_ranks

from trainer.architectures import build_sae
from trainer.config import DeepSpeedConfig, TrainConfig
from trainer.engine import master_weights, shutdown_engine, wrap_in_deepspeed

pytestmark = pytest.mark.integration

WORLD_SIZE = 2
D_IN, N_LATENTS, K = 16, 64, 4
GLOBAL_BATCH, STEPS, LR, MAX_GRAD_NORM = 32, 4, 1e-2, 0.05
SAE_SEED, DATA_SEED = 0, 4_242
ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu_l1")
# TopK's AuxK term needs dead latents to model the residual with: call the upper quarter dead.
DEAD_MASK = torch.arange(N_LATENTS) >= 3 * N_LATENTS // 4
# name -> (ZeRO stage, precision)
CONFIGS = {"zero0": (0, "fp32"), "zero2": (2, "fp32"), "zero3": (3, "fp32"), "zero2_bf16": (2, "bf16"), "zero3_bf16": (3, "bf16")}


def _global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    return [torch.randn(GLOBAL_BATCH, D_IN, generator=generator) * (1 + step) + 0.5 for step in range(STEPS)]


def _forward_kwargs(architecture: str) -> dict[str, torch.Tensor]:
    return {"dead_mask": DEAD_MASK} if architecture == "topk" else {}


def _train(rank: int, architecture: str, stage: int, precision: str) -> dict[str, object]:
    # Rank 1 starts elsewhere: the engine must broadcast rank 0's weights, under ZeRO 3 too.
    sae = build_sae(architecture, d_in=D_IN, n_latents=N_LATENTS, k=K, seed=SAE_SEED + rank)
    deepspeed_cfg = DeepSpeedConfig(zero_stage=stage, precision=precision, stage3_param_persistence_threshold=0)
    engine = wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=GLOBAL_BATCH, max_grad_norm=MAX_GRAD_NORM),
        deepspeed_cfg=deepspeed_cfg, lr=LR, world_size=WORLD_SIZE,
    )
    local = GLOBAL_BATCH // WORLD_SIZE
    losses = []
    for batch in _global_batches():
        x = batch[rank * local : (rank + 1) * local].to(next(engine.module.parameters()).dtype)
        out = engine(x, **_forward_kwargs(architecture))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    norm = engine.get_global_grad_norm()  # None under ZeRO 0 in fp32: DeepSpeed keeps none
    results = {
        "losses": losses,
        "grad_norm": None if norm is None else float(norm),
        "masters": master_weights(engine),  # a collective: both ranks call it
        "module_dtype": next(engine.module.parameters()).dtype,
        # Under ZeRO 3 the module holds placeholders between steps; its parameters are partitioned.
        "module_numel": sum(p.numel() for p in engine.module.parameters()),
    }
    shutdown_engine(engine)
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    results = {
        (architecture, name): _train(rank, architecture, stage, precision)
        for architecture in ARCHITECTURES
        for name, (stage, precision) in CONFIGS.items()
    }
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")



@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[tuple[str, str], dict[str, object]]]:
    out_dir = tmp_path_factory.mktemp("zero_stages")
    return run_ranks(_worker, free_port(), nprocs=WORLD_SIZE, out_dir=out_dir,
                     preload=["torch", "torch._dynamo", "trainer.engine"])


@functools.cache
def _single_process(architecture: str) -> dict[str, torch.Tensor]:
    """One process, the whole batches, torch Adam and ``clip_grad_norm_``. The loss is the mean of
    the two halves' losses, as data parallelism computes it: AuxK's and BatchTopK's losses depend
    on the whole batch they are computed on, not only on each token."""
    sae = build_sae(architecture, d_in=D_IN, n_latents=N_LATENTS, k=K, seed=SAE_SEED)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    for batch in _global_batches():
        optimizer.zero_grad()
        halves = batch.chunk(WORLD_SIZE)
        loss = sum(sae(half, **_forward_kwargs(architecture)).loss for half in halves) / WORLD_SIZE
        loss.backward()
        assert torch.nn.utils.clip_grad_norm_(sae.parameters(), MAX_GRAD_NORM) > 2 * MAX_GRAD_NORM
        optimizer.step()
    return {name: value.detach() for name, value in sae.named_parameters()}


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=msg)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_zero3_ends_with_the_weights_of_zero2_and_of_no_zero(rank_results, architecture: str) -> None:
    for results in rank_results:
        zero3 = results[(architecture, "zero3")]
        for other in ("zero2", "zero0"):
            expected = results[(architecture, other)]
            assert zero3["masters"].keys() == expected["masters"].keys()
            for name, value in zero3["masters"].items():
                _close(value, expected["masters"][name], f"{architecture} {name}: zero3 against {other}")
            _close(torch.tensor(zero3["losses"]), torch.tensor(expected["losses"]), f"{architecture} losses")
        assert zero3["grad_norm"] == pytest.approx(results[(architecture, "zero2")]["grad_norm"], rel=1e-5)
        assert zero3["module_numel"] == 0  # the parameters really were partitioned


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_ranks_agree_on_the_weights(rank_results, config: str) -> None:
    for architecture in ARCHITECTURES:
        rank0, rank1 = (results[(architecture, config)]["masters"] for results in rank_results)
        for name, value in rank0.items():
            torch.testing.assert_close(rank1[name], value, rtol=0, atol=0, msg=f"{architecture} {name}")


@pytest.mark.parametrize("config", ["zero0", "zero2", "zero3"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_two_ranks_match_one_process_on_the_whole_batches(rank_results, architecture: str, config: str) -> None:
    expected = _single_process(architecture)
    masters = rank_results[0][(architecture, config)]["masters"]
    assert masters.keys() == expected.keys()
    for name, value in masters.items():
        _close(value, expected[name], f"{architecture} {config} {name}")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bf16_zero3_runs_and_tracks_bf16_zero2(rank_results, architecture: str) -> None:
    for results in rank_results:
        zero3, zero2 = results[(architecture, "zero3_bf16")], results[(architecture, "zero2_bf16")]
        assert zero3["module_dtype"] == torch.bfloat16
        assert all(master.dtype == torch.float32 for master in zero3["masters"].values())
        # The same bf16 arithmetic in another order: bf16-rounding differences, no more.
        torch.testing.assert_close(torch.tensor(zero3["losses"]), torch.tensor(zero2["losses"]), rtol=0.01, atol=0)
        for name, value in zero3["masters"].items():
            torch.testing.assert_close(value, zero2["masters"][name], rtol=0, atol=0.02, msg=f"{architecture} {name}")
