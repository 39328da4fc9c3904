"""The DeepSpeed wrapper in one process: config, the decoder-norm constraint through ZeRO, bf16."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.distributed as dist

from trainer.config import DeepSpeedConfig, TrainConfig
from trainer.engine import (
    deepspeed_config,
    distributed_backend,
    job_config,
    master_weights,
    shutdown_engine,
    single_replica_config,
    wrap_in_deepspeed,
)
from trainer.feature_parallel import ParallelGrid
from trainer.sae import TopKSAE


def test_config_splits_the_global_batch_over_ranks() -> None:
    config = deepspeed_config(
        train_cfg=TrainConfig(batch_size=96), deepspeed_cfg=DeepSpeedConfig(zero_stage=1), world_size=4
    )
    assert config["train_batch_size"] == 96
    assert config["train_micro_batch_size_per_gpu"] == 24
    assert config["zero_optimization"]["stage"] == 1
    assert config["gradient_clipping"] == 1.0
    assert config["wall_clock_breakdown"] is False
    assert "bf16" not in config
    bf16 = deepspeed_config(
        train_cfg=TrainConfig(batch_size=8), deepspeed_cfg=DeepSpeedConfig(precision="bf16"), world_size=1
    )
    assert bf16["bf16"] == {"enabled": True}


def test_config_maps_the_deepspeed_group_into_zero_optimization() -> None:
    zero2 = DeepSpeedConfig(reduce_bucket_size=1000, allgather_bucket_size=2000, contiguous_gradients=False)
    section = deepspeed_config(train_cfg=TrainConfig(batch_size=8), deepspeed_cfg=zero2, world_size=2)[
        "zero_optimization"
    ]
    assert section == {
        "stage": 2, "reduce_bucket_size": 1000, "allgather_bucket_size": 2000, "contiguous_gradients": False,
    }  # overlap_comm left to DeepSpeed's per-stage default; no ZeRO-3 keys below stage 3
    zero3 = DeepSpeedConfig(
        zero_stage=3, overlap_comm=False, stage3_prefetch_bucket_size=10,
        stage3_param_persistence_threshold=0, stage3_max_live_parameters=30,
    )
    section = deepspeed_config(train_cfg=TrainConfig(batch_size=8), deepspeed_cfg=zero3, world_size=2)[
        "zero_optimization"
    ]
    assert section["stage"] == 3
    assert section["overlap_comm"] is False
    assert (
        section["stage3_prefetch_bucket_size"], section["stage3_param_persistence_threshold"],
        section["stage3_max_live_parameters"],
    ) == (10, 0, 30)


def test_feature_parallel_ranks_share_a_micro_batch() -> None:
    # 4 ranks as 2 data x 2 feature: DeepSpeed sees 2 data-parallel replicas.
    config = deepspeed_config(
        train_cfg=TrainConfig(batch_size=96), deepspeed_cfg=DeepSpeedConfig(feature_parallel=2), world_size=4
    )
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (96, 48)
    with pytest.raises(ValueError, match="world_size=3 is not divisible by deepspeed.feature_parallel=2"):
        deepspeed_config(train_cfg=TrainConfig(), deepspeed_cfg=DeepSpeedConfig(feature_parallel=2), world_size=3)


def test_indivisible_batch_names_both_values() -> None:
    with pytest.raises(ValueError, match="train.batch_size=100 is not divisible by the 3 data-parallel ranks"):
        deepspeed_config(train_cfg=TrainConfig(batch_size=100), deepspeed_cfg=DeepSpeedConfig(), world_size=3)


@pytest.mark.parametrize(
    ("deepspeed_cfg", "world_size", "grid", "message"),
    [
        (DeepSpeedConfig(feature_parallel=2), 2, None, "deepspeed.feature_parallel=2 needs grid="),
        (
            DeepSpeedConfig(feature_parallel=2), 4, ParallelGrid(1, 2, 0, 0, None, None),
            "grid of 1 data x 2 feature ranks, but world_size=4 with deepspeed.feature_parallel=2",
        ),
        (
            DeepSpeedConfig(feature_parallel=2), 2, ParallelGrid(1, 2, 0, 0, None, None),
            "deepspeed.feature_parallel=2 needs a model split by parallelize_features, got an unsplit TopKSAE",
        ),
        (
            DeepSpeedConfig(zero_stage=0, precision="bf16", feature_parallel=2), 2, None,
            "deepspeed.zero_stage=0 with deepspeed.precision='bf16' and deepspeed.feature_parallel=2 cannot clip",
        ),
    ],
)
def test_feature_parallel_preconditions_are_checked_before_any_process_group(
    deepspeed_cfg: DeepSpeedConfig, world_size: int, grid: ParallelGrid | None, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        wrap_in_deepspeed(
            TopKSAE(8, 32, 2), train_cfg=TrainConfig(batch_size=8), deepspeed_cfg=deepspeed_cfg,
            lr=1e-2, world_size=world_size, grid=grid,
        )
    assert not dist.is_initialized()


def test_backend_follows_the_hardware(monkeypatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert distributed_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert distributed_backend() == "gloo"


@pytest.mark.integration
@pytest.mark.parametrize(("zero_stage", "precision"), [(2, "fp32"), (1, "bf16"), (0, "fp32"), (0, "bf16")])
def test_decoder_rows_stay_unit_norm_through_deepspeed_steps(zero_stage: int, precision: str) -> None:
    sae = TopKSAE(16, 64, 4, seed=0)
    initial_w_dec = sae.W_dec.detach().clone()
    deepspeed_cfg = DeepSpeedConfig(zero_stage=zero_stage, precision=precision)
    engine = wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=32), deepspeed_cfg=deepspeed_cfg, lr=0.05, world_size=1
    )
    try:
        generator = torch.Generator().manual_seed(11)
        for _ in range(10):
            x = (torch.randn(32, 16, generator=generator) * 2).to(engine.module.W_dec.dtype)
            out = engine(x)
            engine.backward(out.loss)
            engine.step()
        module = engine.module
        assert not torch.allclose(module.W_dec.float(), initial_w_dec, atol=1e-2)  # it trained
        # The decoder the SAE computes with (and exports) has unit rows, whatever the raw
        # parameter's norms after ZeRO copied its master weights back.
        atol = 1e-2 if precision == "bf16" else 1e-6
        torch.testing.assert_close(
            module.decoder_weight().float().norm(dim=1), torch.ones(64), atol=atol, rtol=0
        )
        exported = module.folded_weights(1.0)["W_dec"].float()
        torch.testing.assert_close(exported.norm(dim=1), torch.ones(64), atol=atol, rtol=0)
        _check_master_weights(engine, bf16=precision == "bf16")
    finally:
        shutdown_engine(engine)
    assert not dist.is_initialized()  # wrap_in_deepspeed made the group, so shutdown removed it


def _check_master_weights(engine, *, bf16: bool) -> None:
    masters = master_weights(engine)
    for name, param in engine.module.named_parameters():
        assert masters[name].dtype == torch.float32
        # Under bf16 the module holds the master copy rounded; under fp32 they are the same.
        torch.testing.assert_close(masters[name].to(param.dtype), param.detach(), rtol=0, atol=0)
        assert not torch.equal(masters[name], param.detach().float()) or not bf16, name
    sae = TopKSAE(16, 64, 4)
    sae.load_state_dict(masters)  # an fp32 SAE to export from


def test_one_data_parallel_replica_runs_zero_stage_0_where_stage_0_can() -> None:
    zero2, zero1, zero3 = (DeepSpeedConfig(zero_stage=stage) for stage in (2, 1, 3))
    assert single_replica_config(zero2, world_size=1).zero_stage == 0
    assert single_replica_config(zero1, world_size=1).zero_stage == 0
    assert single_replica_config(zero2, world_size=2) is zero2  # two replicas: ZeRO partitions over them
    assert single_replica_config(zero3, world_size=1) is zero3
    sliced = DeepSpeedConfig(zero_stage=2, feature_parallel=2)
    assert single_replica_config(sliced, world_size=2).zero_stage == 0  # one replica of two slices
    assert single_replica_config(sliced, world_size=4) is sliced
    # bf16 with feature parallelism cannot clip at stage 0 (DeepSpeedConfig.check_clipping).
    bf16_sliced = DeepSpeedConfig(zero_stage=1, precision="bf16", feature_parallel=2)
    assert single_replica_config(bf16_sliced, world_size=2) is bf16_sliced


def test_zero_partitions_only_a_state_of_deepspeed_partition_min_mb_or_more() -> None:
    """12 bytes a parameter (gradient and two Adam moments) in fp32, 14 in bf16: 256 MiB is
    22,369,622 fp32 parameters a rank."""
    zero2 = DeepSpeedConfig(zero_stage=2, partition_min_mb=256)
    assert job_config(zero2, world_size=2, parameters=22_369_621).zero_stage == 0
    assert job_config(zero2, world_size=2, parameters=22_369_622) is zero2
    assert job_config(dataclasses.replace(zero2, precision="bf16"), world_size=2, parameters=20_000_000).zero_stage == 2
    assert job_config(dataclasses.replace(zero2, partition_min_mb=0), world_size=2, parameters=1).zero_stage == 2
    assert job_config(zero2, world_size=1, parameters=10**9).zero_stage == 0  # one replica: single_replica_config
    zero3 = DeepSpeedConfig(zero_stage=3, partition_min_mb=256)
    assert job_config(zero3, world_size=2, parameters=1) is zero3
    bf16_sliced = DeepSpeedConfig(zero_stage=1, precision="bf16", feature_parallel=2, partition_min_mb=256)
    assert job_config(bf16_sliced, world_size=4, parameters=1) is bf16_sliced  # stage 0 could not clip it


@pytest.mark.integration
def test_a_one_replica_engine_at_zero_0_trains_as_zero_2_without_the_all_reduce() -> None:
    """The job's one-replica engine (ZeRO 0, no backward all-reduce) takes the same steps as the
    ZeRO 2 engine it replaces, clipping included."""
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(32, 16, generator=generator) * 3 for _ in range(8)]
    trained = {}
    for one_replica in (False, True):
        cfg = DeepSpeedConfig(zero_stage=2)
        cfg = single_replica_config(cfg, world_size=1) if one_replica else cfg
        engine = wrap_in_deepspeed(TopKSAE(16, 64, 4, seed=0), train_cfg=TrainConfig(batch_size=32, max_grad_norm=0.05),
                                   deepspeed_cfg=cfg, lr=0.01, world_size=1)
        try:
            for x in batches:
                out = engine(x)
                engine.backward(out.loss)
                engine.step()
            trained[one_replica] = (engine.zero_optimization_stage(), engine.enable_backward_allreduce,
                                    master_weights(engine))
        finally:
            shutdown_engine(engine)
    assert trained[True][:2] == (0, False) and trained[False][:2] == (2, True)
    for name, weight in trained[False][2].items():
        torch.testing.assert_close(trained[True][2][name], weight, rtol=1e-5, atol=1e-6, msg=name)
