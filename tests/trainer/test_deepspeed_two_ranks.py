"""Real two-process DeepSpeed runs on CPU with gloo: the training loop under ZeRO 1 and 2, and
every SAE architecture under ZeRO 0, 2 and 3 (fp32 and bf16).

One launch of two ranks runs both parts, one after the other, so the suite pays for starting the
processes and DeepSpeed once:

* **The loop** (``trainer.loop.DictionaryTrainer``, ZeRO 1 and 2). Each rank trains on its half of every
  global batch. Both ranks must end with identical weights, the loss must fall, and the weights
  must match one process training on the full batches with plain torch Adam and the same
  gradient clipping (what data parallelism promises). Under ZeRO 1 ``wrap_in_deepspeed`` makes
  the process group from the environment and its shutdown removes it; under ZeRO 2 the caller
  owns the group (as with Ray Train) and shutdown must leave it alone.
* **The ZeRO stages** (every architecture, engine steps by hand). ZeRO 3 partitions the
  parameters themselves (``stage3_param_persistence_threshold=0``, so even these small ones),
  gathers them around forward and backward, and keeps the fp32 masters and Adam state
  partitioned: the custom autograd kernels, which save parameters for their backward, and
  ``master_weights`` must still see whole tensors. Each rank trains on its half of every global
  batch, with gradient clipping small enough to bite, from a different initialisation: DeepSpeed
  broadcasts rank 0's weights when it wraps the model. The stages must end with the same fp32
  weights, and the weights one process reaches on the whole batches.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import free_port, run_ranks
from recording_logger import RecordingLogger

from trainer.architectures import build_sae
from trainer.config import DeepSpeedConfig, SAEConfig, TrainConfig
from trainer.engine import master_weights, shutdown_engine, wrap_in_deepspeed
from trainer.loop import DictionaryTrainer
from trainer.metrics import DeadLatentTracker
from trainer.sae import TopKSAE

pytestmark = pytest.mark.integration

WORLD_SIZE = 2
D_IN, N_LATENTS, K = 16, 64, 4
LR, SAE_SEED = 1e-2, 0

# The loop: ZeRO 1 and 2, TopK, default clipping.
LOOP_BATCH, LOOP_STEPS, LOOP_DATA_SEED = 64, 12, 987_654
LOOP_STAGES = {"stage1": 1, "stage2": 2}

# The ZeRO stages: every architecture, clipping that bites.
ZERO_BATCH, ZERO_STEPS, ZERO_DATA_SEED, MAX_GRAD_NORM = 32, 4, 4_242, 0.05
ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu_l1")
# TopK's AuxK term needs dead latents to model the residual with: call the upper quarter dead.
DEAD_MASK = torch.arange(N_LATENTS) >= 3 * N_LATENTS // 4
# name -> (ZeRO stage, precision)
CONFIGS = {"zero0": (0, "fp32"), "zero2": (2, "fp32"), "zero3": (3, "fp32"), "zero2_bf16": (2, "bf16"), "zero3_bf16": (3, "bf16")}


def _global_batches(*, batch: int, steps: int, seed: int, growing: bool) -> list[torch.Tensor]:
    """The same batches on every rank and in the single-process references; ``growing`` scales
    step ``s``'s batch by ``1 + s`` (so clipping bites differently each step)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, D_IN, generator=generator) * ((1 + step) if growing else 2) + 0.5 for step in range(steps)]


def _loop_batches() -> list[torch.Tensor]:
    return _global_batches(batch=LOOP_BATCH, steps=LOOP_STEPS, seed=LOOP_DATA_SEED, growing=False)


def _zero_batches() -> list[torch.Tensor]:
    return _global_batches(batch=ZERO_BATCH, steps=ZERO_STEPS, seed=ZERO_DATA_SEED, growing=True)


def _sae_config(architecture: str) -> SAEConfig:
    return SAEConfig(architecture=architecture, n_latents=N_LATENTS, k=K)


def _forward_kwargs(architecture: str) -> dict[str, torch.Tensor]:
    return {"dead_mask": DEAD_MASK} if architecture == "topk" else {}


# --------------------------------------------------------------------------- in each rank


def _train_loop(rank: int, zero_stage: int) -> dict[str, object]:
    local = LOOP_BATCH // WORLD_SIZE
    batches = (batch[rank * local : (rank + 1) * local] for batch in _loop_batches())
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED)
    engine = wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=LOOP_BATCH), deepspeed_cfg=DeepSpeedConfig(zero_stage=zero_stage),
        lr=LR, world_size=WORLD_SIZE,
    )
    logger = RecordingLogger()
    tracker = DeadLatentTracker(N_LATENTS)
    trainer = DictionaryTrainer(
        engine, scale=1.0, max_steps=LOOP_STEPS, logger=logger, log_every=1,
        dead_tracker=tracker, dead_after_tokens=LOOP_BATCH * 4, world_size=WORLD_SIZE,
    )
    for batch in batches:  # LOOP_STEPS of them
        trainer.step(batch)
    weights = {name: value.detach().clone() for name, value in engine.module.state_dict().items()}
    masters = master_weights(engine)  # a collective under ZeRO: both ranks call it
    shutdown_engine(engine)
    return {
        "weights": weights, "masters": masters, "losses": logger.losses(), "tokens": trainer.tokens,
        "tracker": tracker.state_dict(),
    }


def _train_steps(rank: int, architecture: str, stage: int, precision: str) -> dict[str, object]:
    # Rank 1 starts elsewhere: the engine must broadcast rank 0's weights, under ZeRO 3 too.
    sae = build_sae(_sae_config(architecture), d_in=D_IN, seed=SAE_SEED + rank)
    deepspeed_cfg = DeepSpeedConfig(zero_stage=stage, precision=precision, stage3_param_persistence_threshold=0)
    engine = wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=ZERO_BATCH, max_grad_norm=MAX_GRAD_NORM),
        deepspeed_cfg=deepspeed_cfg, lr=LR, world_size=WORLD_SIZE,
    )
    local = ZERO_BATCH // WORLD_SIZE
    losses = []
    for batch in _zero_batches():
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


def _worker(rank: int, ports: tuple[int, int], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]),
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
    )
    loop: dict[str, object] = {}
    # ZeRO 1: wrap_in_deepspeed makes the group from the environment, and shutdown removes it.
    loop["stage1"] = _train_loop(rank, zero_stage=LOOP_STAGES["stage1"])
    loop["stage1_group_removed"] = not dist.is_initialized()
    # From here the caller owns the group (as with Ray Train); shutdown must leave it alone.
    os.environ["MASTER_PORT"] = str(ports[1])
    dist.init_process_group("gloo")
    loop["stage2"] = _train_loop(rank, zero_stage=LOOP_STAGES["stage2"])
    loop["stage2_group_kept"] = dist.is_initialized()
    zero = {
        (architecture, name): _train_steps(rank, architecture, stage, precision)
        for architecture in ARCHITECTURES
        for name, (stage, precision) in CONFIGS.items()
    }
    dist.destroy_process_group()
    torch.save({"loop": loop, "zero": zero}, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, dict]]:
    out_dir = tmp_path_factory.mktemp("two_ranks")
    return run_ranks(_worker, (free_port(), free_port()), nprocs=WORLD_SIZE, out_dir=out_dir,
                     preload=["torch", "torch._dynamo", "trainer.engine"])


@pytest.fixture(scope="module")
def loop_results(rank_results) -> list[dict[str, object]]:
    return [results["loop"] for results in rank_results]


@pytest.fixture(scope="module")
def zero_results(rank_results) -> list[dict[tuple[str, str], dict[str, object]]]:
    return [results["zero"] for results in rank_results]


# --------------------------------------------------------------------------- single-process references


def _loop_reference() -> dict[str, torch.Tensor]:
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    for batch in _loop_batches():
        optimizer.zero_grad()
        sae(batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), TrainConfig().max_grad_norm)
        optimizer.step()
    return {name: value.detach() for name, value in sae.state_dict().items()}


@functools.cache
def _zero_reference(architecture: str) -> dict[str, torch.Tensor]:
    """One process, the whole batches, torch Adam and ``clip_grad_norm_``. The loss is the mean of
    the two halves' losses, as data parallelism computes it: AuxK's and BatchTopK's losses depend
    on the whole batch they are computed on, not only on each token."""
    sae = build_sae(_sae_config(architecture), d_in=D_IN, seed=SAE_SEED)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    for batch in _zero_batches():
        optimizer.zero_grad()
        halves = batch.chunk(WORLD_SIZE)
        loss = sum(sae(half, **_forward_kwargs(architecture)).loss for half in halves) / WORLD_SIZE
        loss.backward()
        assert torch.nn.utils.clip_grad_norm_(sae.parameters(), MAX_GRAD_NORM) > 2 * MAX_GRAD_NORM
        optimizer.step()
    return {name: value.detach() for name, value in sae.named_parameters()}


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=msg)


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("stage", sorted(LOOP_STAGES))
def test_ranks_end_with_identical_weights_and_falling_loss(loop_results, stage: str) -> None:
    rank0, rank1 = (results[stage] for results in loop_results)
    for name, value in rank0["weights"].items():
        torch.testing.assert_close(rank1["weights"][name], value, rtol=0, atol=0)
        torch.testing.assert_close(rank0["masters"][name], value, rtol=0, atol=0)  # fp32 run
    assert rank0["losses"] == rank1["losses"]  # all-reduced: every rank logs the same figures
    assert len(rank0["losses"]) == LOOP_STEPS
    assert rank0["losses"][-1] < 0.9 * rank0["losses"][0]
    assert rank0["tokens"] == LOOP_STEPS * LOOP_BATCH
    for key, value in rank0["tracker"].items():  # dead-latent counters agree across ranks
        assert torch.equal(rank1["tracker"][key], value), key
    assert int(rank0["tracker"]["n_tokens"]) == LOOP_STEPS * LOOP_BATCH


@pytest.mark.parametrize("stage", sorted(LOOP_STAGES))
def test_two_half_batches_match_one_process_on_the_full_batch(loop_results, stage: str) -> None:
    reference = _loop_reference()
    for name, value in loop_results[0][stage]["weights"].items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_shutdown_removes_only_a_group_it_created(loop_results) -> None:
    for results in loop_results:
        assert results["stage1_group_removed"]
        assert results["stage2_group_kept"]


# --------------------------------------------------------------------------- the ZeRO stages


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_zero3_ends_with_the_weights_of_zero2_and_of_no_zero(zero_results, architecture: str) -> None:
    for results in zero_results:
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
def test_ranks_agree_on_the_weights(zero_results, config: str) -> None:
    for architecture in ARCHITECTURES:
        rank0, rank1 = (results[(architecture, config)]["masters"] for results in zero_results)
        for name, value in rank0.items():
            torch.testing.assert_close(rank1[name], value, rtol=0, atol=0, msg=f"{architecture} {name}")


@pytest.mark.parametrize("config", ["zero0", "zero2", "zero3"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_two_ranks_match_one_process_on_the_whole_batches(zero_results, architecture: str, config: str) -> None:
    expected = _zero_reference(architecture)
    masters = zero_results[0][(architecture, config)]["masters"]
    assert masters.keys() == expected.keys()
    for name, value in masters.items():
        _close(value, expected[name], f"{architecture} {config} {name}")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bf16_zero3_runs_and_tracks_bf16_zero2(zero_results, architecture: str) -> None:
    for results in zero_results:
        zero3, zero2 = results[(architecture, "zero3_bf16")], results[(architecture, "zero2_bf16")]
        assert zero3["module_dtype"] == torch.bfloat16
        assert all(master.dtype == torch.float32 for master in zero3["masters"].values())
        # The same bf16 arithmetic in another order: bf16-rounding differences, no more.
        torch.testing.assert_close(torch.tensor(zero3["losses"]), torch.tensor(zero2["losses"]), rtol=0.01, atol=0)
        for name, value in zero3["masters"].items():
            torch.testing.assert_close(value, zero2["masters"][name], rtol=0, atol=0.02, msg=f"{architecture} {name}")
