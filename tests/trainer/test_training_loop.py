"""The training loop on one rank through a real DeepSpeed engine, and held-out evaluation."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from recording_logger import RecordingLogger

from trainer.dictionary import dictionary_files, load_dictionary
from trainer.loggers import NullLogger, make_logger
from trainer.loop import DictionaryTrainer, NonFiniteLossError, StepSchedule, TrainSummary, evaluate
from trainer.metrics import DeadLatentTracker
from trainer.sae import TopKSAE

pytestmark = pytest.mark.integration

D_IN, N_LATENTS, K = 32, 128, 4
SAE_SEED, DATA_SEED = 0, 20_241_124  # different: the same seed would hand the SAE the true directions


def test_training_on_sparse_synthetic_data_drives_fvu_well_below_one(
    engine_factory, sparse_batches
) -> None:
    def data():
        return sparse_batches(d_in=D_IN, n_features=64, active=3, batch_size=256, seed=DATA_SEED)

    held_out = list(itertools.islice(data(), 100, 104))  # later draws of the same features
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED)
    scale = 2.5
    sae.init_b_dec(next(data()) * scale)
    before = evaluate(sae, held_out, scale=scale)

    engine = engine_factory(sae, batch_size=256, lr=1e-2)
    logger = RecordingLogger()
    trainer = DictionaryTrainer(
        engine, scale=scale, max_steps=300, logger=logger, log_every=100,
        dead_tracker=DeadLatentTracker(N_LATENTS), dead_after_tokens=10_000, world_size=1,
    )
    for batch in itertools.islice(data(), 300):
        trainer.step(batch)
    summary = trainer.summary()
    after = evaluate(engine.module, held_out, scale=scale)

    assert before["fvu"] > 0.5
    assert after["fvu"] < 0.15
    assert after["cosine"] > 0.95
    assert after["l0"] == K
    assert after["n_tokens"] == 4 * 256
    assert summary == TrainSummary(steps=300, tokens=300 * 256, final_metrics=logger.records[-1][1])
    assert [step for step, _ in logger.records] == [100, 200, 300]
    assert logger.records[-1][1]["fvu"] < logger.records[0][1]["fvu"]


def test_logged_metrics_and_cadence(engine_factory) -> None:
    sae = TopKSAE(8, 32, 2, seed=SAE_SEED)
    engine = engine_factory(sae, batch_size=16, lr=1e-3, zero_stage=0)
    generator = torch.Generator().manual_seed(DATA_SEED)
    logger = RecordingLogger()
    tracker = DeadLatentTracker(32)
    trainer = DictionaryTrainer(
        engine, scale=1.0, max_steps=7, logger=logger, log_every=3, dead_tracker=tracker, dead_after_tokens=1000,
        world_size=1,
    )
    for _ in range(7):
        trainer.step(torch.randn(16, 8, generator=generator))
    summary = trainer.summary()
    assert [step for step, _ in logger.records] == [3, 6, 7]  # and always the last step
    assert set(logger.records[0][1]) == {
        "loss", "mse", "fvu", "l0", "sparsity_loss", "aux_loss", "dead_fraction", "dense_fraction",
        "tokens_per_second", "lr", "tokens", "skipped_steps_nonfinite_batch", "skipped_steps_nonfinite_loss",
        "nonfinite_rows", "forward_ms", "backward_ms", "optimizer_ms", "between_steps_ms",
    }
    first = logger.records[0][1]
    assert all(first[f"{phase}_ms"] > 0 for phase in ("forward", "backward", "optimizer"))
    # The phases and the time between steps make up the window's wall time.
    window_ms = sum(first[f"{phase}_ms"] for phase in ("forward", "backward", "optimizer", "between_steps"))
    assert window_ms == pytest.approx(3 * 16 / first["tokens_per_second"] * 1e3 / 3, rel=0.05)
    assert logger.records[0][1]["lr"] == 1e-3
    assert logger.records[-1][1]["tokens"] == 7 * 16 == summary.tokens
    assert tracker.n_tokens == 7 * 16


def test_non_finite_loss_stops_before_the_optimizer_step(engine_factory) -> None:
    sae = TopKSAE(8, 32, 2, seed=SAE_SEED)
    engine = engine_factory(sae, batch_size=4, lr=1e-2, zero_stage=1)
    good = torch.randn(4, 8)
    bad = good.clone()
    bad[2, 3] = 1e20  # finite, but its square is not in fp32: the loss is Inf
    batches = [good, good, bad, good]
    weights_after_two_steps: dict[str, torch.Tensor] = {}

    class SnapshotLogger(NullLogger):
        def log(self, metrics: dict[str, float], step: int) -> None:
            weights_after_two_steps.update({k: v.clone() for k, v in engine.module.state_dict().items()})

    with pytest.raises(NonFiniteLossError, match="step 3: non-finite loss on 1 of 1 ranks") as caught:
        trainer = DictionaryTrainer(
            engine, scale=1.0, max_steps=4, logger=SnapshotLogger(), log_every=2,
            dead_tracker=DeadLatentTracker(32), dead_after_tokens=100, world_size=1, nonfinite="stop",
        )
        for batch in batches:
            trainer.step(batch)
    assert caught.value.step == 3
    for name, value in engine.module.state_dict().items():
        torch.testing.assert_close(value, weights_after_two_steps[name], rtol=0, atol=0)
    # Typed and picklable, so it crosses process boundaries (Ray) intact.
    revived = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(revived, NonFiniteLossError) and str(revived) == str(caught.value)


def test_a_step_past_max_steps_is_refused(engine_factory) -> None:
    engine = engine_factory(TopKSAE(8, 32, 2, seed=SAE_SEED), batch_size=4, lr=1e-3, zero_stage=0)
    trainer = DictionaryTrainer(
        engine, scale=1.0, max_steps=2, logger=NullLogger(), log_every=10, dead_tracker=DeadLatentTracker(32),
        dead_after_tokens=100, world_size=1,
    )
    while not trainer.done:
        trainer.step(torch.randn(4, 8))
    assert trainer.steps_done == 2
    with pytest.raises(RuntimeError, match="max_steps=2 already taken"):
        trainer.step(torch.randn(4, 8))


def test_evaluate_in_raw_units_matches_the_exported_dictionary(sparse_batches) -> None:
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED)
    held_out = list(
        itertools.islice(sparse_batches(d_in=D_IN, n_features=64, active=3, batch_size=64, seed=DATA_SEED), 3)
    )
    scale = 0.2
    sae.init_b_dec(torch.cat(held_out) * scale)
    tracker = DeadLatentTracker(N_LATENTS)
    metrics = evaluate(sae, held_out, scale=scale, dead_tracker=tracker)
    files = dictionary_files(
        sae, hookpoint="h", model_name="m", scale=scale, extra_metadata={},
        sparsity=tracker.frequencies(), eval_metrics=metrics,
    )
    exported, _ = load_dictionary(files)
    raw = evaluate(exported, held_out, scale=1.0)
    for key in ("fvu", "mse", "l0", "cosine", "dead_fraction", "n_tokens"):
        assert raw[key] == pytest.approx(metrics[key], rel=1e-5), key
    assert tracker.n_tokens == 3 * 64
    assert metrics["dead_fraction"] == (tracker.fire_counts == 0).float().mean().item()


def test_make_logger_gates_on_rank_zero(tmp_path) -> None:
    assert isinstance(make_logger(rank=1, wandb_mode="offline", dir=str(tmp_path)), NullLogger)
    assert isinstance(make_logger(rank=0, wandb_mode=None), NullLogger)


def test_wandb_logger_offline_writes_under_its_dir(tmp_path) -> None:
    logger = make_logger(
        rank=0, wandb_mode="offline", project="saeforge-test", run_name="unit", dir=str(tmp_path),
        config={"k": K},
    )
    logger.log({"loss": 1.0, "fvu": 0.5}, step=1)
    logger.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu_l1", "relu_l1_unitnorm"])
def test_every_architecture_trains_through_the_engine_loop(engine_factory, sparse_batches, architecture):
    from trainer.architectures import build_sae
    from trainer.config import SAEConfig

    def data():
        return sparse_batches(d_in=D_IN, n_features=64, active=3, batch_size=128, seed=DATA_SEED)

    sae = build_sae(SAEConfig(architecture=architecture, n_latents=N_LATENTS, k=K), d_in=D_IN, seed=SAE_SEED)
    held_out = list(itertools.islice(data(), 50, 52))
    before = evaluate(sae, held_out, scale=1.0)
    engine = engine_factory(sae, batch_size=128, lr=5e-3)
    tracker = DeadLatentTracker(N_LATENTS)
    seen = []
    schedule = StepSchedule(
        sparsity_coefficient=lambda step: seen.append(step) or 0.1 * min(1.0, step / 10),
        k=lambda step: max(K, 16 - step),
    )
    logger = RecordingLogger()
    trainer = DictionaryTrainer(
        engine, scale=1.0, max_steps=40, logger=logger, log_every=20, dead_tracker=tracker,
        dead_after_tokens=2_000, world_size=1, schedule=schedule,
    )
    for batch in itertools.islice(data(), 40):
        trainer.step(batch)
    after = evaluate(engine.module, held_out, scale=1.0)
    assert tracker.n_tokens == 40 * 128
    assert after["fvu"] < before["fvu"]
    if hasattr(sae, "sparsity_coefficient"):
        assert seen[:3] == [0, 1, 2] and sae.sparsity_coefficient == pytest.approx(0.1)
    if architecture == "topk":
        assert sae.k == K, "k annealed down to its final value"
    assert {"sparsity_loss", "aux_loss", "dense_fraction"} <= set(logger.records[-1][1])
