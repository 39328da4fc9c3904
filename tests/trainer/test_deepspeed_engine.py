"""The DeepSpeed wrapper in one process: config, the decoder-norm constraint through ZeRO, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trainer.config import TrainConfig
from trainer.engine import deepspeed_config, master_weights, shutdown_engine, wrap_in_deepspeed
from trainer.sae import TopKSAE


def test_config_splits_the_global_batch_over_ranks() -> None:
    config = deepspeed_config(train_cfg=TrainConfig(batch_size=96, zero_stage=1), world_size=4)
    assert config["train_batch_size"] == 96
    assert config["train_micro_batch_size_per_gpu"] == 24
    assert config["zero_optimization"] == {"stage": 1}
    assert config["gradient_clipping"] == 1.0
    assert config["wall_clock_breakdown"] is False
    assert "bf16" not in config
    bf16 = deepspeed_config(train_cfg=TrainConfig(batch_size=8, precision="bf16"), world_size=1)
    assert bf16["bf16"] == {"enabled": True}


def test_indivisible_batch_names_both_values() -> None:
    with pytest.raises(ValueError, match="train.batch_size=100 is not divisible by world_size=3"):
        deepspeed_config(train_cfg=TrainConfig(batch_size=100), world_size=3)


@pytest.mark.integration
@pytest.mark.parametrize(("zero_stage", "precision"), [(2, "fp32"), (1, "bf16"), (0, "fp32"), (0, "bf16")])
def test_decoder_rows_stay_unit_norm_through_deepspeed_steps(zero_stage: int, precision: str) -> None:
    sae = TopKSAE(16, 64, 4, seed=0)
    initial_w_dec = sae.W_dec.detach().clone()
    train_cfg = TrainConfig(batch_size=32, zero_stage=zero_stage, precision=precision)
    engine = wrap_in_deepspeed(sae, train_cfg=train_cfg, lr=0.05, world_size=1)
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
