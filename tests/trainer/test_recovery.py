"""Synthetic data with a known dictionary, and architectures recovering it in a few seconds."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from trainer.architectures import build_sae
from trainer.config import SAEConfig
from trainer.metrics import DeadLatentTracker, output_fire_counts
from trainer.registry import architecture_class
from trainer.schedules import sparsity_coefficient_at
from trainer.synthetic import SparseFeatureData

# At d_in=32 with 128 features the interference between features (cosines of about 0.18) lets
# BatchTopK's batch-wide selection starve the weaker latents (recovery 40-65% within the budget,
# SAELens's BatchTopK alike); d_in=64 keeps the data in superposition (2x) and every
# architecture above 90%.
D_IN, N_FEATURES, N_LATENTS, MEAN_ACTIVE = 64, 128, 256, 4
DATA_SEED = 20_241_124  # hashed inside SparseFeatureData, so it can never equal an SAE init
BATCH, DEAD_AFTER_TOKENS = 256, 2560

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FeatureRecovery(NamedTuple):
    """How well learned decoder rows match the true feature directions (the measure these tests
    hold each architecture to)."""

    fraction_recovered: float
    """Fraction of true features whose best cosine with some learned row exceeds the threshold."""
    mean_max_cosine: float
    """Mean over true features of the best cosine with any learned row."""
    max_cosine: Tensor
    """(n_features,) each true feature's best cosine."""


@torch.no_grad()
def feature_recovery(
    true_dirs: Tensor, learned_W_dec: Tensor, *, threshold: float = 0.9
) -> FeatureRecovery:
    """Compare (n_features, d) true directions with (n_latents, d) learned decoder rows by cosine."""
    if (
        true_dirs.ndim != 2
        or learned_W_dec.ndim != 2
        or true_dirs.shape[1] != learned_W_dec.shape[1]
    ):
        raise ValueError(
            f"true_dirs {tuple(true_dirs.shape)} and learned_W_dec {tuple(learned_W_dec.shape)} "
            "must be (n, d) and (m, d) with the same d"
        )
    true_unit = true_dirs.float() / true_dirs.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    learned = learned_W_dec.detach().float()
    learned_unit = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    max_cosine = (true_unit @ learned_unit.T).max(dim=1).values
    return FeatureRecovery(
        (max_cosine > threshold).float().mean().item(), max_cosine.mean().item(), max_cosine
    )


def _data() -> SparseFeatureData:
    return SparseFeatureData(
        d_in=D_IN,
        n_features=N_FEATURES,
        mean_active=MEAN_ACTIVE,
        seed=DATA_SEED,
        frequency_exponent=0.25,
        offset_norm=1.0,
    )


@pytest.fixture(scope="module")
def data() -> SparseFeatureData:
    return _data()


@pytest.fixture(scope="module")
def pool(data: SparseFeatureData) -> torch.Tensor:
    return data.sample(65_536).x


def _train(
    sae, pool: torch.Tensor, *, steps: int, lr: float, targets=None, sparsity_warmup: int = 0
):
    """Plain Adam on batches of the pool, with dead-latent tracking for AuxK / the pre-act loss."""
    sae.init_b_dec((pool if targets is None else targets)[:2048])
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    tracker = DeadLatentTracker(sae.n_latents)
    final_coefficient = getattr(sae, "sparsity_coefficient", None)
    n_batches = pool.shape[0] // BATCH
    for step in range(steps):
        rows = slice((step % n_batches) * BATCH, (step % n_batches + 1) * BATCH)
        if final_coefficient is not None:
            sae.sparsity_coefficient = sparsity_coefficient_at(
                step, final=final_coefficient, warmup_steps=sparsity_warmup
            )
        target = None if targets is None else targets[rows]
        out = sae(pool[rows], target=target, dead_mask=tracker.dead_mask(DEAD_AFTER_TOKENS))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        counts = output_fire_counts(out.latent_acts.detach(), out.latent_indices, sae.n_latents)
        tracker.update_counts(counts, n_tokens=BATCH)
    return sae


# --------------------------------------------------------------------------- the generator


def test_generator_is_seeded_sparse_nonnegative_and_power_law(data: SparseFeatureData) -> None:
    again = _data()
    torch.testing.assert_close(again.features, data.features)
    batch = again.sample(20_000)
    assert batch.x.shape == (20_000, D_IN) and batch.coefficients.shape == (20_000, N_FEATURES)
    assert (batch.coefficients >= 0).all()
    active = (batch.coefficients > 0).sum(dim=1).float()
    assert active.mean() == pytest.approx(MEAN_ACTIVE, rel=0.05)
    observed = (batch.coefficients > 0).float().mean(dim=0)
    torch.testing.assert_close(observed, data.frequencies, atol=0.01, rtol=0.15)
    # Power law: p_i proportional to (i + 1) ** -0.25, so p_0 / p_127 = 128 ** 0.25.
    assert (data.frequencies[:-1] >= data.frequencies[1:]).all()
    assert data.frequencies[0] / data.frequencies[-1] == pytest.approx(128**0.25, rel=1e-4)
    torch.testing.assert_close(data.features.norm(dim=1), torch.ones(N_FEATURES))
    torch.testing.assert_close(batch.x, batch.coefficients @ data.features + data.offset)


def test_generator_noise_and_its_seed_differs_from_an_sae_initialised_with_the_same_number() -> (
    None
):
    seed = 7
    data = SparseFeatureData(d_in=16, n_features=64, mean_active=2, seed=seed, noise_std=0.1)
    batch = data.sample(4000)
    noise = batch.x - (batch.coefficients @ data.features + data.offset)
    assert noise.std().item() == pytest.approx(0.1, rel=0.05)
    sae = build_sae(SAEConfig(n_latents=64, k=2), d_in=16, seed=seed)
    assert feature_recovery(data.features, sae.decoder_weight()).fraction_recovered < 0.1
    with pytest.raises(ValueError, match=r"mean_active=0 must be in \(0, n_features=64\]"):
        SparseFeatureData(d_in=16, n_features=64, mean_active=0, seed=seed)


def test_feature_recovery_scores_matches_by_best_cosine() -> None:
    true = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))[0][:10]
    learned = torch.cat([true[torch.randperm(10)] * 3.0, torch.randn(5, 16)])  # any order, any norm
    perfect = feature_recovery(true, learned)
    assert perfect.fraction_recovered == 1.0 and perfect.mean_max_cosine == pytest.approx(1.0)
    tilted = true.clone()
    tilted[:4] = torch.nn.functional.normalize(
        true[:4] + 0.8 * true[[5, 6, 7, 8]], dim=1
    )  # cos 0.78
    partial = feature_recovery(true, tilted[:4])
    assert partial.fraction_recovered == 0.0
    assert partial.max_cosine.shape == (10,)
    assert feature_recovery(true, true[:6]).fraction_recovered == pytest.approx(0.6)


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize(
    ("architecture", "steps", "options"),
    [
        ("topk", 600, {"k": MEAN_ACTIVE}),
        ("batchtopk", 800, {"k": MEAN_ACTIVE}),
        ("jumprelu", 1500, {"sparsity_coefficient": 0.1, "init_threshold": 0.1, "bandwidth": 0.1}),
    ],
)
def test_architecture_recovers_the_true_features(
    architecture: str, steps: int, options: dict, data: SparseFeatureData, pool: torch.Tensor
) -> None:
    sae = architecture_class(architecture)(D_IN, N_LATENTS, seed=0, **options)
    _train(sae, pool, steps=steps, lr=3e-3, sparsity_warmup=300)
    recovery = feature_recovery(data.features, sae.decoder_weight())
    assert recovery.fraction_recovered >= 0.9, recovery
    sae.eval()  # BatchTopK now runs as the JumpReLU it saves as
    with torch.no_grad():
        held_out = sae(data.sample(4096).x)
    assert held_out.fvu < 0.2
    assert held_out.l0 == pytest.approx(MEAN_ACTIVE, rel=0.15)


def test_transcoder_learns_a_fixed_linear_map_of_its_input(
    data: SparseFeatureData, pool: torch.Tensor
) -> None:
    generator = torch.Generator().manual_seed(3)
    linear_map = torch.randn(D_IN, D_IN, generator=generator) / D_IN**0.5
    shift = torch.randn(D_IN, generator=generator)
    targets = pool @ linear_map + shift
    sae = build_sae(SAEConfig(n_latents=N_LATENTS, k=MEAN_ACTIVE), d_in=D_IN, seed=0, transcoder=True)
    _train(sae, pool, targets=targets, steps=600, lr=3e-3)
    x = data.sample(4096).x
    with torch.no_grad():
        out = sae(x, target=x @ linear_map + shift)
        as_autoencoder = sae(x)  # the same latents decode to the map's output, not to x
    assert out.fvu < 0.25
    assert as_autoencoder.fvu > 0.5
    # Its decoder rows are the images of the true features under the map.
    images = data.features @ linear_map
    assert feature_recovery(images, sae.decoder_weight()).fraction_recovered >= 0.9


def test_training_is_deterministic_for_fixed_seeds(pool: torch.Tensor) -> None:
    runs = []
    for _ in range(2):
        sae = build_sae(SAEConfig(architecture="batchtopk", n_latents=N_LATENTS, k=MEAN_ACTIVE), d_in=D_IN, seed=0)
        runs.append(_train(sae, pool[: 20 * BATCH], steps=20, lr=3e-3).W_dec.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
