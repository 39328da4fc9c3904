"""The engine applies the learning-rate schedule at every optimizer step, under every ZeRO stage."""

from __future__ import annotations

import pytest
import torch

from trainer.config import DeepSpeedConfig, TrainConfig
from trainer.engine import shutdown_engine, wrap_in_deepspeed
from trainer.sae import TopKSAE


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lr_multiplier_sets_the_lr_each_step(stage):
    sae = TopKSAE(8, 32, 4, seed=0)
    engine = wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=16), deepspeed_cfg=DeepSpeedConfig(zero_stage=stage),
        lr=1e-2, world_size=1,
        lr_multiplier=lambda step: min(1.0, (step + 1) / 4),
    )
    try:
        lrs, weights = [], []
        data = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            out = engine(data)
            engine.backward(out.loss)
            before = sae.W_enc.detach().clone()
            engine.step()
            weights.append((sae.W_enc.detach() - before).abs().max().item())
            lrs.append(engine.get_lr()[0])
    finally:
        shutdown_engine(engine)
    assert lrs == pytest.approx([0.005, 0.0075, 0.01, 0.01, 0.01])
    # Adam's first update has magnitude ~lr per element: the first step ran at 0.25 * 1e-2.
    assert weights[0] == pytest.approx(0.0025, rel=0.05)
