"""TopKSAE: shapes, sparsity, the decoder-norm constraint, b_dec init and the scale fold."""

from __future__ import annotations

import pytest
import torch

from trainer.sae import ENCODER_INIT_NORM, TopKSAE, geometric_median, tied_init


def test_forward_shapes_and_exactly_k_active_latents() -> None:
    sae = TopKSAE(16, 96, 5, seed=0)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(100))
    out = sae(x)
    assert out.latent_acts.shape == (40, 5)
    assert out.latent_indices.shape == (40, 5)
    assert out.reconstruction.shape == (40, 16)
    assert out.mse.shape == out.fvu.shape == out.loss.shape == ()
    # With 96 latents about half the pre-activations are positive: every token fills all k slots.
    assert ((out.latent_acts > 0).sum(dim=1) == 5).all()
    dense = torch.zeros(40, 96).scatter(1, out.latent_indices, out.latent_acts)
    assert ((dense != 0).sum(dim=1) == 5).all()
    assert out.latent_indices.unique(dim=1).shape == (40, 5)  # k distinct latents per token


def test_backward_reaches_every_parameter_with_its_shape() -> None:
    sae = TopKSAE(16, 96, 5, seed=0)
    sae.init_b_dec(torch.randn(64, 16))
    sae(torch.randn(40, 16)).loss.backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None, name
        assert param.grad.shape == param.shape, name
        assert torch.isfinite(param.grad).all(), name


def test_parameters_follow_saelens_names_and_tied_unit_norm_init() -> None:
    sae = TopKSAE(8, 32, 4, seed=3)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_enc": (8, 32), "b_enc": (32,), "W_dec": (32, 8), "b_dec": (8,)}
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T * ENCODER_INIT_NORM)
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    torch.testing.assert_close(TopKSAE(8, 32, 4, seed=3).W_dec, sae.W_dec)  # seeded
    assert not torch.equal(TopKSAE(8, 32, 4, seed=4).W_dec, sae.W_dec)


def test_tied_init_scales_the_encoder_and_keeps_directions_across_dtypes() -> None:
    w_enc, w_dec = tied_init(32, 8, seed=5, decoder_norm=0.1, encoder_norm=2.0)
    torch.testing.assert_close(w_dec.norm(dim=1), torch.full((32,), 0.1))
    torch.testing.assert_close(w_enc.norm(dim=0), torch.full((32,), 2.0))
    torch.testing.assert_close(w_enc, w_dec.T * 20)
    w_enc16, w_dec16 = tied_init(32, 8, seed=5, decoder_norm=0.1, encoder_norm=2.0, dtype=torch.bfloat16)
    assert w_dec16.dtype == torch.bfloat16 and w_enc16.is_contiguous()
    torch.testing.assert_close(w_dec16.float(), w_dec, rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="encoder_norm=0.0 must be positive"):
        tied_init(32, 8, seed=5, encoder_norm=0.0)
    with pytest.raises(ValueError, match="decoder_norm=-1"):
        tied_init(32, 8, seed=5, decoder_norm=-1)


def test_forward_reports_mse_and_batch_fvu() -> None:
    sae = TopKSAE(16, 64, 4, seed=0)
    x = torch.randn(30, 16) * 3 + 2
    out = sae(x)
    error = (out.reconstruction - x).pow(2)
    torch.testing.assert_close(out.mse, error.mean())
    torch.testing.assert_close(out.fvu, error.sum() / (x - x.mean(0)).pow(2).sum())
    torch.testing.assert_close(out.loss, out.mse)


def test_decode_matches_a_sum_of_selected_decoder_rows() -> None:
    sae = TopKSAE(12, 48, 6, seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) + 0.5)  # raw rows off unit norm
        sae.b_dec.normal_()
    acts, indices, pre_acts = sae.encode(torch.randn(20, 12))
    assert pre_acts is None  # the sparse kernel never holds all n pre-activations
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    expected = (acts.unsqueeze(-1) * rows[indices]).sum(dim=1) + sae.b_dec
    torch.testing.assert_close(sae.decode(acts, indices), expected)


def test_decoder_rows_stay_unit_norm_under_plain_adam() -> None:
    sae = TopKSAE(16, 64, 4, seed=0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        optimizer.zero_grad()
        sae(torch.randn(32, 16, generator=generator) * 2).loss.backward()
        optimizer.step()
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-3)  # raw drifted
    torch.testing.assert_close(sae.decoder_weight().norm(dim=1), torch.ones(64))


def test_decoder_gradient_has_no_component_along_its_row() -> None:
    sae = TopKSAE(16, 64, 4, seed=0)
    sae(torch.randn(32, 16)).loss.backward()
    radial = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(radial, torch.zeros(64), atol=1e-7, rtol=0)


def test_init_b_dec_mean_and_geometric_median() -> None:
    sample = torch.randn(200, 8) + 5.0
    sample[:5] += 1000.0  # outliers drag the mean, not the median
    sae = TopKSAE(8, 32, 4, seed=0)
    sae.init_b_dec(sample, method="mean")
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0))
    sae.init_b_dec(sample)
    assert (sae.b_dec - 5.0).abs().max() < 0.5
    with pytest.raises(ValueError, match=r"sample shape \(10, 7\) must be \(N, d_out=8\)"):
        sae.init_b_dec(torch.randn(10, 7))


def test_geometric_median_minimises_summed_distance() -> None:
    points = torch.randn(50, 3, generator=torch.Generator().manual_seed(1)).double()
    median = geometric_median(points)
    cost = (points - median).norm(dim=1).sum()
    for direction in torch.eye(3, dtype=torch.float64):
        for step in (1e-3, -1e-3):
            assert cost <= (points - (median + step * direction)).norm(dim=1).sum()


def test_folded_weights_on_raw_input_equal_training_model_on_scaled_input() -> None:
    sae = TopKSAE(16, 64, 4, seed=0)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn_like(param))
    scale = 0.37
    x_raw = torch.randn(25, 16) * 10
    trained = sae(x_raw * scale)
    exported = TopKSAE(16, 64, 4, unit_norm_decoder=False)
    exported.load_state_dict(sae.folded_weights(scale))
    out = exported(x_raw)
    torch.testing.assert_close(out.latent_indices.sort(1).values, trained.latent_indices.sort(1).values)
    torch.testing.assert_close(out.reconstruction, trained.reconstruction / scale)


def test_constructor_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"k=9 must be in \[1, n_latents=8\]"):
        TopKSAE(4, 8, 9)
    with pytest.raises(ValueError, match="n_latents=0 must be positive"):
        TopKSAE(4, 0, 1)
