"""DeadLatentTracker counting, per-batch metrics, and pooled (not averaged) FVU."""

from __future__ import annotations

import torch

from trainer.losses import reconstruction_error
from trainer.metrics import DeadLatentTracker, PooledReconstructionStats, latent_fire_counts
from trainer.sae import TopKSAE


def test_fire_counts_ignore_latents_selected_with_zero_activation() -> None:
    indices = torch.tensor([[0, 1], [1, 3], [3, 2]])
    acts = torch.tensor([[1.0, 0.5], [0.0, 2.0], [0.3, 0.0]])
    assert latent_fire_counts(indices, acts, 5).tolist() == [1, 1, 0, 2, 0]


def test_tracker_counts_tokens_since_last_firing_and_frequencies() -> None:
    tracker = DeadLatentTracker(4)
    for indices in ([[0], [0], [1]], [[0], [0]]):  # 3 tokens: latents 0 and 1 fire; 2 tokens: latent 0
        indices = torch.tensor(indices)
        counts = latent_fire_counts(indices, torch.ones(indices.shape), 4)
        tracker.update_counts(counts, n_tokens=len(indices))
    assert tracker.tokens_since_fired.tolist() == [0, 2, 5, 5]
    assert tracker.fire_counts.tolist() == [4, 1, 0, 0]
    assert tracker.n_tokens == 5
    torch.testing.assert_close(tracker.frequencies(), torch.tensor([0.8, 0.2, 0.0, 0.0]))
    assert tracker.dead_fraction(5) == 0.5  # latents 2 and 3: silent for 5 tokens
    assert tracker.dead_fraction(3) == 0.5
    assert tracker.dead_fraction(2) == 0.75  # latent 1 too
    assert tracker.dead_mask(6).tolist() == [False, False, False, False]


def test_tracker_state_round_trip() -> None:
    tracker = DeadLatentTracker(3)
    tracker.update_counts(torch.tensor([2, 0, 1]), n_tokens=10)
    restored = DeadLatentTracker(3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.tokens_since_fired.tolist() == [0, 10, 0]
    assert restored.fire_counts.tolist() == [2, 0, 1]
    assert restored.n_tokens == 10


def test_forward_reports_the_one_reconstruction_error_and_l0() -> None:
    sae = TopKSAE(8, 32, 3, seed=0)
    x = torch.randn(20, 8)
    out = sae(x)
    error = reconstruction_error(out.reconstruction, x)
    assert out.l0 == 3.0
    assert abs(error.mse.item() - out.mse.item()) < 1e-6
    assert abs(error.fvu.item() - out.fvu.item()) < 1e-6
    assert abs(error.squared_l2.item() - 8 * out.mse.item()) < 1e-5


def test_pooled_fvu_differs_from_mean_of_batch_fvus() -> None:
    # Two batches with different means: each batch's own variance is small, so per-batch FVUs are
    # large, while around the pooled mean the variance is large and the pooled FVU is small.
    batch_a = torch.tensor([[0.0], [2.0]])
    batch_b = torch.tensor([[10.0], [12.0]])
    recon_a, recon_b = batch_a + 0.5, batch_b - 0.5
    stats = PooledReconstructionStats()
    per_batch = []
    for x, recon in ((batch_a, recon_a), (batch_b, recon_b)):
        stats.update(x, recon, torch.ones(2, 1))
        per_batch.append(reconstruction_error(recon, x).fvu.item())
    pooled = stats.result()
    all_x = torch.cat([batch_a, batch_b])
    expected = (torch.cat([recon_a, recon_b]) - all_x).pow(2).sum() / (all_x - all_x.mean()).pow(2).sum()
    assert abs(pooled["fvu"] - expected.item()) < 1e-8  # expected is float32
    assert per_batch == [0.25, 0.25]  # 0.5 squared error / 2.0 variance in each batch
    assert abs(pooled["fvu"] - 1.0 / 104.0) < 1e-12  # 1.0 / (36 + 16 + 16 + 36) around the mean 6
    assert pooled["n_tokens"] == 4
    assert pooled["mse"] == 0.25


def test_pooled_variance_is_exact_over_uneven_batches() -> None:
    x = torch.randn(101, 6, dtype=torch.float64) * 3 + 1e4  # large offset: naive sum(x^2) loses digits
    recon = x + 0.01
    stats = PooledReconstructionStats()
    for chunk_x, chunk_r in zip(x.split([1, 30, 70]), recon.split([1, 30, 70]), strict=True):
        stats.update(chunk_x, chunk_r, torch.ones(chunk_x.shape[0], 1))
    expected = (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert abs(stats.result()["fvu"] - expected.item()) < 1e-9 * expected.item()
