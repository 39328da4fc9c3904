"""SAE architectures: the registry and build_sae, shapes and sparsity, the JumpReLU STE, AuxK, the
decoder constraint, BatchTopK's threshold, Matryoshka prefixes, and the dictionary files (fold,
SAELens 6 layout and loading, validation on load)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from trainer.architectures import (
    BatchTopKSAE,
    JumpReLUFunction,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    ReLUSAE,
    StepFunction,
    UnitNormReLUSAE,
    build_sae,
)
from trainer.config import SAEConfig
from trainer.dictionary import dictionary_files, load_dictionary
from trainer.kernels import unit_norm_rows
from trainer.losses import auxk_loss, decode_rows, decode_rows_dense
from trainer.metrics import dense_fraction, firing_histogram, output_fire_counts
from trainer.registry import (
    ARCHITECTURES,
    BUILTIN_ARCHITECTURES,
    TRANSCODER_ARCHITECTURES,
    architecture_class,
    check_architecture,
)
from trainer.sae import SparseCoder, TopKSAE

D_IN, N_LATENTS, K = 12, 48, 4
SCALE = 3.5


def _input(n: int = 40, seed: int = 100) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _build(architecture: str, *, transcoder: bool = False, **options) -> SparseCoder:
    """``build_sae`` from the config, or the class itself where a test sets constructor options."""
    if not options:
        # the encoder GEMM in the parameters' dtype: the outputs are compared with SAELens's exactly
        config = SAEConfig(architecture=architecture, n_latents=N_LATENTS, k=K, encoder_gemm="param")
        return build_sae(config, d_in=D_IN, seed=0, transcoder=transcoder)
    cls = architecture_class(architecture)
    if issubclass(cls, (TopKSAE, BatchTopKSAE)):
        options["k"] = K
    if transcoder:
        options["apply_b_dec_to_input"] = False
    return cls(D_IN, N_LATENTS, seed=0, **options)


def _perturbed(architecture: str, **options) -> SparseCoder:
    """A model whose weights are off their initial values, as after training."""
    sae = _build(architecture, **options)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "log_threshold":
                param.copy_(torch.empty_like(param).uniform_(-2.0, 0.0, generator=generator))
            else:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        sae.W_dec.mul_(1.5)  # raw rows off unit norm
    if isinstance(sae, BatchTopKSAE):  # one training-mode pass estimates the threshold
        sae(_input(64, seed=6), target=torch.zeros(64, sae.d_out))
    return sae


# --------------------------------------------------------------------------- shapes and sparsity


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_shapes_finite_loss_and_gradients_for_every_parameter(architecture: str) -> None:
    sae = _build(architecture)
    x = _input()
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead)
    if architecture == "topk":
        assert out.latent_acts.shape == out.latent_indices.shape == (40, K)
    else:
        assert out.latent_acts.shape == (40, N_LATENTS) and out.latent_indices is None
    assert out.reconstruction.shape == (40, D_IN)
    for term in (out.mse, out.fvu, out.sparsity_loss, out.aux_loss, out.loss, out.l0):
        assert term.shape == () and torch.isfinite(term)
    assert (out.latent_acts >= 0).all()
    out.loss.backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_topk_builds_a_topk_sae_with_exactly_k_active_latents() -> None:
    sae = _build("topk")
    assert isinstance(sae, TopKSAE)
    out = sae(_input())
    assert ((out.latent_acts > 0).sum(dim=1) == K).all()
    torch.testing.assert_close(out.loss, out.mse)
    assert out.l0 == K


def test_batchtopk_keeps_k_times_batch_activations_over_the_whole_batch() -> None:
    sae = _build("batchtopk")
    out = sae(_input(40))
    per_token = (out.latent_acts > 0).sum(dim=1)
    assert per_token.sum() == K * 40
    assert per_token.min() < per_token.max()  # not K per token: the budget is shared
    relu_pre = torch.relu(sae.pre_activations(_input(40)))
    kept = out.latent_acts > 0
    assert relu_pre[~kept].max() <= out.latent_acts[kept].min()  # the largest ones were kept


def test_relu_and_jumprelu_activations_follow_their_definitions() -> None:
    x = _input()
    relu = _perturbed("relu_l1")
    torch.testing.assert_close(relu(x).latent_acts, torch.relu(relu.pre_activations(x)))
    jump = _perturbed("jumprelu")
    pre = jump.pre_activations(x)
    above = pre > jump.threshold()
    acts = jump(x).latent_acts
    torch.testing.assert_close(acts[above], pre[above])
    assert (acts[~above] == 0).all()
    assert above.any() and (~above).any()


def test_anthropic_relu_penalty_is_weighted_by_decoder_norms_and_unit_norm_one_is_not() -> None:
    x = _input()
    for architecture, weighted in (("relu_l1", True), ("relu_l1_unitnorm", False)):
        sae = _perturbed(architecture, sparsity_coefficient=0.7)
        out = sae(x)
        norms = sae.decoder_weight().norm(dim=1) if weighted else torch.ones(N_LATENTS)
        expected = 0.7 * (out.latent_acts * norms).sum(dim=1).mean()
        torch.testing.assert_close(out.sparsity_loss, expected)
        squared_l2 = (out.reconstruction - x).pow(2).sum(dim=1).mean()
        torch.testing.assert_close(out.loss, squared_l2 + expected)


def test_recipes_set_bias_subtraction_decoder_constraint_and_init_norm() -> None:
    anthropic, classic = _build("relu_l1"), _build("relu_l1_unitnorm")
    assert isinstance(anthropic, ReLUSAE) and isinstance(classic, UnitNormReLUSAE)
    assert not anthropic.apply_b_dec_to_input and not anthropic.unit_norm_decoder
    torch.testing.assert_close(anthropic.W_dec.norm(dim=1), torch.full((N_LATENTS,), 0.1))
    assert classic.apply_b_dec_to_input and classic.unit_norm_decoder
    jump = _build("jumprelu")
    assert isinstance(jump, JumpReLUSAE)
    assert not jump.apply_b_dec_to_input and jump.unit_norm_decoder
    for architecture in ("topk", "batchtopk", "matryoshka_batchtopk"):
        assert _build(architecture).apply_b_dec_to_input
        if architecture in TRANSCODER_ARCHITECTURES:
            assert not _build(architecture, transcoder=True).apply_b_dec_to_input
    assert not build_sae(
        SAEConfig(architecture="relu_l1_unitnorm", n_latents=8, k=2), d_in=4, seed=0, transcoder=True
    ).apply_b_dec_to_input


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_parameters_have_saelens_names_and_a_tied_seeded_init(architecture: str) -> None:
    sae = _build(architecture)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    expected = {
        "W_enc": (D_IN, N_LATENTS),
        "b_enc": (N_LATENTS,),
        "W_dec": (N_LATENTS, D_IN),
        "b_dec": (D_IN,),
    }
    if architecture == "jumprelu":
        expected["log_threshold"] = (N_LATENTS,)
    assert shapes == expected
    # Tied: each encoder column points along its decoder row (TopK's is shorter, ENCODER_INIT_NORM).
    torch.testing.assert_close(unit_norm_rows(sae.W_enc.T), unit_norm_rows(sae.W_dec))
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    torch.testing.assert_close(_build(architecture).W_dec, sae.W_dec)
    other = build_sae(SAEConfig(architecture=architecture, n_latents=N_LATENTS, k=K), d_in=D_IN, seed=1)
    assert not torch.equal(other.W_dec, sae.W_dec)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_init_b_dec_sets_the_geometric_median_or_the_mean(architecture: str) -> None:
    sample = torch.randn(300, D_IN) + 4.0
    sample[:5] += 500.0
    sae = _build(architecture)
    sae.init_b_dec(sample, method="mean")
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0))
    sae.init_b_dec(sample)
    assert (sae.b_dec - 4.0).abs().max() < 0.5


def test_registry_rejects_unknown_names_and_bad_paths() -> None:
    with pytest.raises(
        ValueError,
        match=r"architecture='gated': expected one of \['topk', 'batchtopk', "
        r"'matryoshka_batchtopk', 'jumprelu', 'relu_l1', 'relu_l1_unitnorm'\]",
    ):
        SAEConfig(architecture="gated")
    with pytest.raises(ValueError, match="architecture='no.such.module:Coder': cannot import 'no.such.module'"):
        architecture_class("no.such.module:Coder")
    with pytest.raises(ValueError, match="'trainer.sae' has no 'Nothing'"):
        architecture_class("trainer.sae:Nothing")
    with pytest.raises(ValueError, match="trainer.sae:geometric_median is not a trainer.sae.SparseCoder subclass"):
        architecture_class("trainer.sae:geometric_median")
    with pytest.raises(TypeError):
        BatchTopKSAE(4, 8, seed=0)  # k is required
    with pytest.raises(ValueError, match=r"prefix_sizes=\[4, 6\] must end at n_latents=8"):
        MatryoshkaBatchTopKSAE(4, 8, 2, seed=0, prefix_sizes=[4, 6])
    with pytest.raises(
        ValueError, match=r"prefix_sizes=\[4, 4, 8\] must be positive and strictly increasing"
    ):
        MatryoshkaBatchTopKSAE(4, 8, 2, seed=0, prefix_sizes=[4, 4, 8])


def test_every_built_in_name_resolves_to_its_class_and_a_path_to_any_subclass() -> None:
    assert ARCHITECTURES == tuple(BUILTIN_ARCHITECTURES)
    for name in ARCHITECTURES:
        cls = architecture_class(name)
        assert issubclass(cls, SparseCoder) and cls.architecture == name
        check_architecture(name)
    assert architecture_class("trainer.architectures:JumpReLUSAE") is JumpReLUSAE
    check_architecture("my_plugins.coders:TiedCoder")  # validated without importing it


def test_build_sae_passes_each_architecture_the_settings_it_reads() -> None:
    cfg = SAEConfig(architecture="matryoshka_batchtopk", n_latents=16, k=3, k_aux=5, auxk_coefficient=0.5,
                    matryoshka_prefixes=[4, 16])
    sae = build_sae(cfg, d_in=6, seed=0, dtype=torch.bfloat16)
    assert (sae.k, sae.k_aux, sae.auxk_coefficient, sae.prefix_sizes) == (3, 5, 0.5, [4, 16])
    assert sae.W_enc.dtype == torch.bfloat16
    jump = build_sae(SAEConfig(architecture="jumprelu", n_latents=16, k=3, sparsity_coefficient=0.25,
                               jumprelu_sparsity_loss="tanh", jumprelu_bandwidth=0.5), d_in=6, seed=0)
    assert (jump.sparsity_coefficient, jump.sparsity_loss_mode, jump.bandwidth) == (0.25, "tanh", 0.5)
    relu = build_sae(SAEConfig(architecture="relu_l1", n_latents=16, k=3), d_in=6, seed=0)
    assert relu.sparsity_coefficient == 5.0  # None in the config: the architecture's default


def test_a_transcoder_maps_d_in_to_a_different_d_out() -> None:
    for architecture in TRANSCODER_ARCHITECTURES:
        config = SAEConfig(architecture=architecture, n_latents=N_LATENTS, k=K, encoder_gemm="param")
        sae = build_sae(config, d_in=D_IN, d_out=5, seed=0, transcoder=True)
        shapes = {name: tuple(p.shape) for name, p in sae.named_parameters() if name != "log_threshold"}
        assert shapes == {"W_enc": (D_IN, N_LATENTS), "b_enc": (N_LATENTS,), "W_dec": (N_LATENTS, 5), "b_dec": (5,)}
        target = torch.randn(40, 5)
        out = sae(_input(), target=target, dead_mask=torch.ones(N_LATENTS, dtype=torch.bool))
        assert out.reconstruction.shape == (40, 5)
        torch.testing.assert_close(out.mse, (out.reconstruction - target).pow(2).mean())
        out.loss.backward()
        loaded, cfg = load_dictionary(_files(_perturbed(architecture, transcoder=True, d_out=5), hookpoint_out="out",
                                             target_scale=0.5))
        assert loaded.d_out == 5
    with pytest.raises(ValueError, match="d_out=5 differs from d_in=12: a transcoder cannot subtract b_dec"):
        build_sae(SAEConfig(), d_in=D_IN, d_out=5, seed=0)


# --------------------------------------------------------------------------- JumpReLU STE


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_formula_by_hand() -> None:
    # bandwidth 0.1 around theta 0.5: only |z - 0.5| < 0.05 is inside the kernel (0.52, 0.48).
    pre = torch.tensor([[0.30, 0.52, 0.90], [0.48, 0.10, 0.56]], requires_grad=True)
    threshold = torch.full((3,), 0.5, requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = JumpReLUFunction.apply(pre, threshold, 0.1, False)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.52, 0.90], [0.0, 0.0, 0.56]]))
    out.backward(upstream)
    # d/dtheta = -(theta / eps) K((z - theta) / eps) * g = -5 * g inside the window.
    torch.testing.assert_close(threshold.grad, torch.tensor([-5.0 * 4.0, -5.0 * 2.0, 0.0]))
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 2.0, 3.0], [0.0, 0.0, 6.0]]))


def test_step_threshold_gradient_is_the_rectangle_kernel_formula_by_hand() -> None:
    pre = torch.tensor([[0.30, 0.52, 0.90], [0.48, 0.10, 0.56]], requires_grad=True)
    threshold = torch.full((3,), 0.5, requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = StepFunction.apply(pre, threshold, 0.1, False)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    out.backward(upstream)
    # d/dtheta = -(1 / eps) K((z - theta) / eps) * g = -10 * g inside the window; nothing to z.
    torch.testing.assert_close(threshold.grad, torch.tensor([-10.0 * 4.0, -10.0 * 2.0, 0.0]))
    assert pre.grad is None or (pre.grad == 0).all()


def test_ste_to_input_adds_the_kernel_term_to_the_pre_activation_gradient() -> None:
    pre = torch.tensor([[0.30, 0.52, 0.90], [0.48, 0.10, 0.56]], requires_grad=True)
    threshold = torch.full((3,), 0.5)
    JumpReLUFunction.apply(pre, threshold, 0.1, True).backward(torch.ones(2, 3))
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 1.0 + 5.0, 1.0], [5.0, 0.0, 1.0]]))


def test_jumprelu_module_l0_gradient_reaches_log_threshold_through_exp() -> None:
    sae = _perturbed("jumprelu", sparsity_coefficient=0.3, bandwidth=0.5)
    x = _input(64)
    out = sae(x)
    out.sparsity_loss.backward()
    pre = sae.pre_activations(x).detach()
    theta = sae.threshold().detach()
    kernel = ((pre - theta).abs() < 0.25).float() / 0.5
    d_theta = 0.3 * (-kernel).sum(dim=0) / 64  # the L0 term is a mean over tokens
    torch.testing.assert_close(sae.log_threshold.grad, d_theta * theta)
    assert (sae.log_threshold.grad != 0).any()
    assert sae.W_enc.grad is None or (sae.W_enc.grad == 0).all()  # the paper's STE: theta only
    torch.testing.assert_close(out.sparsity_loss, 0.3 * (pre > theta).float().sum(dim=1).mean())


def test_jumprelu_tanh_penalty_matches_saelens_form() -> None:
    sae = _perturbed("jumprelu", sparsity_loss="tanh", sparsity_coefficient=0.2, tanh_scale=4.0)
    out = sae(_input())
    norms = sae.decoder_weight().norm(dim=1)
    torch.testing.assert_close(
        out.sparsity_loss, 0.2 * torch.tanh(4.0 * out.latent_acts * norms).sum(dim=1).mean()
    )
    out.sparsity_loss.backward()
    assert (sae.log_threshold.grad != 0).any() and (sae.W_enc.grad != 0).any()


def test_jumprelu_pre_act_loss_applies_to_dead_latents_only() -> None:
    sae = _perturbed("jumprelu", pre_act_loss_coefficient=0.5)
    x = _input()
    assert sae(x).aux_loss == 0  # without a dead mask
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[:5] = True
    pre, theta = sae.pre_activations(x), sae.threshold()
    expected = (
        0.5
        * (torch.relu(theta - pre)[:, :5] * sae.decoder_weight().norm(dim=1)[:5]).sum(dim=1).mean()
    )
    torch.testing.assert_close(sae(x, dead_mask=dead).aux_loss, expected)


# --------------------------------------------------------------------------- AuxK


def _dense_auxk_reference(residual, pre_acts, decoder, dead_mask, k_aux, coefficient):
    """AuxK from dense ops only: mask, top-k, ReLU, scatter into (B, n), matmul; no b_dec."""
    masked = pre_acts.masked_fill(~dead_mask, float("-inf"))
    values, indices = masked.topk(k_aux, dim=-1)
    dense = torch.zeros_like(pre_acts).scatter(-1, indices, torch.relu(values))
    e_hat = dense @ decoder
    e = residual.detach()
    return coefficient * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


def test_auxk_matches_a_dense_autograd_reference_in_value_and_gradients() -> None:
    generator = torch.Generator().manual_seed(3)
    pre = torch.randn(16, 30, generator=generator, requires_grad=True)
    decoder = torch.randn(30, 8, generator=generator, requires_grad=True)
    residual = torch.randn(16, 8, generator=generator)
    dead = torch.rand(30, generator=generator) < 0.5
    loss = auxk_loss(residual, pre, decoder, dead, k_aux=4, coefficient=0.25)
    pre_grad, decoder_grad = torch.autograd.grad(loss, (pre, decoder))
    reference = _dense_auxk_reference(residual, pre, decoder, dead, 4, 0.25)
    ref_pre_grad, ref_decoder_grad = torch.autograd.grad(reference, (pre, decoder))
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(pre_grad, ref_pre_grad)
    torch.testing.assert_close(decoder_grad, ref_decoder_grad)
    assert (pre_grad[:, ~dead] == 0).all()  # live latents are not trained by AuxK


def test_auxk_default_k_aux_is_half_the_width_and_coefficient_one_thirty_second() -> None:
    generator = torch.Generator().manual_seed(4)
    pre = torch.randn(10, 40, generator=generator)
    decoder = torch.randn(40, 8, generator=generator)
    residual = torch.randn(10, 8, generator=generator)
    dead = torch.ones(40, dtype=torch.bool)
    reference = _dense_auxk_reference(residual, pre, decoder, dead, 4, 1 / 32)
    torch.testing.assert_close(auxk_loss(residual, pre, decoder, dead), reference)


def test_auxk_reconstructs_the_residual_without_adding_b_dec() -> None:
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=0)
    with torch.no_grad():
        sae.b_dec.fill_(10.0)  # a decoder bias that would dominate if it were added again
    x = _input() + 10.0
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[1::2] = True
    out = sae(x, dead_mask=dead)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    residual = x - out.reconstruction
    expected = _dense_auxk_reference(residual, pre, sae.decoder_weight(), dead, D_IN // 2, 1 / 32)
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, out.mse + expected)
    # The same latents, with b_dec added to their reconstruction, would score far worse.
    with_bias = residual - sae.b_dec
    double_counted = _dense_auxk_reference(
        with_bias, pre, sae.decoder_weight(), dead, D_IN // 2, 1 / 32
    )
    assert not torch.allclose(out.aux_loss, double_counted)


def test_auxk_is_exactly_zero_with_finite_gradients_when_nothing_is_dead() -> None:
    pre = torch.randn(8, 20, requires_grad=True)
    decoder = torch.randn(20, 6, requires_grad=True)
    residual = torch.randn(8, 6)
    loss = auxk_loss(residual, pre, decoder, torch.zeros(20, dtype=torch.bool))
    assert loss == 0
    loss.backward()
    assert (pre.grad == 0).all() and (decoder.grad == 0).all()
    # A residual without variance (a perfect reconstruction) gives 0, not 0/0.
    still = auxk_loss(torch.zeros(8, 6), pre, decoder, torch.ones(20, dtype=torch.bool))
    assert still == 0
    still.backward()
    assert torch.isfinite(pre.grad).all()
    for architecture in ("topk", "batchtopk", "matryoshka_batchtopk"):
        out = _build(architecture)(_input(), dead_mask=torch.zeros(N_LATENTS, dtype=torch.bool))
        assert out.aux_loss == 0
        torch.testing.assert_close(out.loss, out.aux_loss + (out.loss - out.aux_loss))


def test_auxk_with_fewer_dead_latents_than_k_aux_uses_only_the_dead_ones() -> None:
    generator = torch.Generator().manual_seed(8)
    pre = torch.randn(12, 16, generator=generator).abs().requires_grad_()
    decoder = torch.randn(16, 8, generator=generator, requires_grad=True)
    residual = torch.randn(12, 8, generator=generator)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 9]] = True
    loss = auxk_loss(residual, pre, decoder, dead, k_aux=6)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    used_rows = decoder.grad.abs().sum(dim=1) > 0
    assert used_rows.tolist() == dead.tolist()


def test_sparse_decode_agrees_with_its_dense_twin() -> None:
    generator = torch.Generator().manual_seed(9)
    values = torch.rand(7, 5, generator=generator, requires_grad=True)
    # Distinct per row, as top-k gives them (the dense twin's scatter would overwrite repeats).
    indices = torch.rand(7, 30, generator=generator).argsort(dim=1)[:, :5]
    decoder = torch.randn(30, 6, generator=generator, requires_grad=True)
    fast = decode_rows(values, indices, decoder)
    slow = decode_rows_dense(values, indices, decoder)
    torch.testing.assert_close(fast, slow)
    upstream = torch.randn(7, 6, generator=generator)
    fast_grads = torch.autograd.grad(fast, (values, decoder), upstream)
    slow_grads = torch.autograd.grad(slow, (values, decoder), upstream)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad)


# --------------------------------------------------------------------------- decoder constraint


def test_projected_gradient_equals_the_forward_normalisation_gradient_at_unit_norm() -> None:
    """The classic explicit recipe (OpenAI ``unit_norm_decoder_grad_adjustment_``: remove each
    row's component along itself from a free decoder's gradient) gives the gradient that
    normalising in ``forward`` gives at unit norm."""
    x = _input()
    normalised = _build("relu_l1_unitnorm")
    free = _build("relu_l1_unitnorm", unit_norm_decoder=False)
    free.load_state_dict(normalised.state_dict())
    normalised(x).loss.backward()
    free(x).loss.backward()
    unit = unit_norm_rows(free.W_dec.detach())
    projected = free.W_dec.grad - (free.W_dec.grad * unit).sum(dim=1, keepdim=True) * unit
    torch.testing.assert_close(projected, normalised.W_dec.grad)
    radial = (projected * free.W_dec).sum(dim=1)
    scale = projected.abs().max()
    torch.testing.assert_close(radial / scale, torch.zeros(N_LATENTS), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- BatchTopK, Matryoshka


def test_batchtopk_threshold_is_a_bias_corrected_average_of_the_smallest_kept_activation() -> None:
    sae = BatchTopKSAE(D_IN, N_LATENTS, K, seed=0, threshold_ema=0.1)
    assert sae.threshold() == 0
    minima = []
    for seed in range(3):
        out = sae(_input(seed=seed))
        minima.append(out.latent_acts[out.latent_acts > 0].min().double())
    weights = torch.tensor([0.9**2, 0.9, 1.0], dtype=torch.float64) * 0.1
    expected = (weights * torch.stack(minima)).sum() / (1 - 0.9**3)
    torch.testing.assert_close(sae.threshold(), expected)
    assert int(sae.threshold_updates) == 3


def test_batchtopk_eval_mode_is_the_jumprelu_it_saves_as_and_does_not_update() -> None:
    sae = _perturbed("batchtopk")
    sae.eval()
    x = _input()
    before = sae.running_threshold.clone()
    out = sae(x)
    pre = sae.pre_activations(x)
    theta = sae.threshold().float()
    torch.testing.assert_close(out.latent_acts, torch.relu(pre) * (pre > theta))
    assert torch.equal(sae.running_threshold, before)
    torch.testing.assert_close(sae.inference_threshold(), theta.expand(N_LATENTS))


def test_batchtopk_threshold_buffer_stays_fp64_when_the_model_is_cast() -> None:
    sae = _build("batchtopk").to(torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16
    assert sae.running_threshold.dtype == torch.float64
    sae(_input().bfloat16())
    assert sae.threshold() > 0


def test_matryoshka_loss_sums_every_prefix_reconstruction_error() -> None:
    sae = MatryoshkaBatchTopKSAE(D_IN, N_LATENTS, K, prefix_sizes=[6, 18, N_LATENTS], seed=0)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = _input()
    out = sae(x)
    decoder = sae.decoder_weight()
    expected = sum(
        (out.latent_acts[:, :m] @ decoder[:m] + sae.b_dec - x).pow(2).mean()
        for m in (6, 18, N_LATENTS)
    )
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.mse, (out.reconstruction - x).pow(2).mean())
    assert _build("matryoshka_batchtopk").prefix_sizes == [6, 12, 24, 48]


# --------------------------------------------------------------------------- dictionary files


def _files(sae, **overrides) -> dict[str, bytes]:
    arguments = dict(
        hookpoint="model.layers.3",
        model_name="tiny",
        scale=SCALE,
        extra_metadata={},
        sparsity=None,
        eval_metrics={},
    )
    arguments.update(overrides)
    return dictionary_files(sae, **arguments)


# What a real run hands dictionary_files, for a TopK dictionary of 24 x 96.
RUN_FILES = dict(
    hookpoint="model.layers.6",
    model_name="SmolLM2-135M",
    extra_metadata={"context_size": 256, "prepend_bos": True},
    sparsity=torch.linspace(0, 0.5, 96),
    eval_metrics={"fvu": 0.12, "l0": 6.0, "n_tokens": 4096, "cosine": float("nan")},
)


def _trained_like_topk() -> TopKSAE:
    sae = TopKSAE(24, 96, 6, seed=0)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.05 * torch.randn_like(param))
        sae.W_dec.mul_(1.7)  # raw decoder rows off unit norm, as after training
    return sae


def _reference_output(
    sae, x_raw: torch.Tensor, *, scale: float = SCALE, target_scale: float = SCALE
):
    """The trained model (eval mode) on normalised input, in raw units."""
    sae.eval()
    with torch.no_grad():
        return sae(x_raw * scale).reconstruction / target_scale


SAVED_AS = {
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "relu_l1": "standard",
    "relu_l1_unitnorm": "standard",
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_folded_dictionary_on_raw_activations_equals_the_model_on_normalised_ones(
    architecture: str,
) -> None:
    sae = _perturbed(architecture)
    x_raw = _input(50, seed=11) / SCALE
    files = _files(sae)
    cfg = json.loads(files["cfg.json"])
    assert cfg["architecture"] == SAVED_AS[architecture]
    assert cfg["metadata"]["training_architecture"] == architecture
    loaded, _ = load_dictionary(files)
    with torch.no_grad():
        out = loaded(x_raw)
    torch.testing.assert_close(out.reconstruction, _reference_output(sae, x_raw))
    if SAVED_AS[architecture] == "jumprelu":
        # Pre-activations are unchanged by the fold, so the threshold is saved as is.
        weights = sae.folded_weights(SCALE)
        torch.testing.assert_close(weights["threshold"], sae.inference_threshold().float())
        fired = out.latent_acts > 0
        assert fired.any() and (~fired).any()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_loads_in_saelens_with_identical_outputs(
    architecture: str, tmp_path: Path
) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae = _perturbed(architecture)
    for name, data in _files(sae).items():
        (tmp_path / name).write_bytes(data)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert loaded.cfg.architecture() == SAVED_AS[architecture]
    x_raw = _input(50, seed=12) / SCALE
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_raw), _reference_output(sae, x_raw))


@pytest.mark.parametrize(
    ("architecture", "saved_as"),
    [
        ("relu_l1", "transcoder"),
        ("jumprelu", "jumprelu_transcoder"),
        ("batchtopk", "jumprelu_transcoder"),
        ("topk", "topk"),
    ],
)
def test_transcoders_save_with_separate_scales_and_load_in_saelens(
    architecture: str, saved_as: str, tmp_path: Path
) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae = _perturbed(architecture, transcoder=True)
    files = _files(
        sae, hookpoint="blocks.2.ln2", hookpoint_out="blocks.2.mlp_out", target_scale=0.8
    )
    cfg = json.loads(files["cfg.json"])
    assert cfg["architecture"] == saved_as and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name_out"] == "blocks.2.mlp_out"
    if saved_as != "topk":
        assert cfg["d_out"] == D_IN
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    x_raw = _input(30, seed=13) / SCALE
    expected = _reference_output(sae, x_raw, target_scale=0.8)
    with torch.no_grad():
        torch.testing.assert_close(sae_lens.SAE.load_from_disk(str(tmp_path))(x_raw), expected)
        torch.testing.assert_close(load_dictionary(files)[0](x_raw).reconstruction, expected)


def test_transcoder_files_refuse_a_model_that_subtracts_b_dec() -> None:
    with pytest.raises(ValueError, match="apply_b_dec_to_input=True"):
        _files(_build("jumprelu", apply_b_dec_to_input=True), hookpoint_out="mlp_out")
    with pytest.raises(ValueError, match=r"target_scale=2.0 differs from scale=3.5"):
        _build("batchtopk").folded_weights(SCALE, target_scale=2.0)


def test_jumprelu_dictionary_without_threshold_is_rejected() -> None:
    files = _files(_perturbed("jumprelu"))
    weights = load_dictionary(files)[0].state_dict()
    del weights["log_threshold"]
    files["sae_weights.safetensors"] = save_safetensors(
        {k: v.contiguous() for k, v in weights.items()}
    )
    with pytest.raises(ValueError, match=r"holds \['W_dec', 'W_enc', 'b_dec', 'b_enc'\], expected"):
        load_dictionary(files)


def test_topk_round_trip_acts_on_raw_activations_like_the_trained_model_on_scaled_ones() -> None:
    torch.manual_seed(0)
    sae = _trained_like_topk()
    x_raw = torch.randn(64, 24) * 3 + 1
    trained = sae(x_raw * SCALE)

    loaded, cfg = load_dictionary(_files(sae, **RUN_FILES))
    out = loaded(x_raw)

    torch.testing.assert_close(out.latent_indices.sort(1).values, trained.latent_indices.sort(1).values)
    torch.testing.assert_close(out.latent_acts.sort(1).values, trained.latent_acts.sort(1).values)
    torch.testing.assert_close(out.reconstruction, trained.reconstruction / SCALE)
    assert cfg["d_in"] == 24 and cfg["d_sae"] == 96 and cfg["k"] == 6


def test_files_hold_the_saelens_topk_layout() -> None:
    files = _files(_trained_like_topk(), **RUN_FILES)
    assert set(files) == {"sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "eval.json"}
    cfg = json.loads(files["cfg.json"])
    # The fields of SAELens 6's TopKSAEConfig.to_dict() (sae_lens/saes/sae.py, topk_sae.py).
    assert set(cfg) == {
        "architecture", "d_in", "d_sae", "k", "rescale_acts_by_decoder_norm", "dtype", "device",
        "apply_b_dec_to_input", "normalize_activations", "reshape_activations", "metadata",
    }
    assert cfg["architecture"] == "topk"
    assert cfg["normalize_activations"] == "none"  # the scale is folded into the weights
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["dtype"] == "float32"
    metadata = cfg["metadata"]
    assert metadata["model_name"] == "SmolLM2-135M"
    assert metadata["hook_name"] == "model.layers.6"
    assert metadata["context_size"] == 256
    assert metadata["sae_lens_version"] >= "6"  # below 6.0 SAELens would migrate the config
    weights = load_safetensors(files["sae_weights.safetensors"])
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "W_enc": (24, 96), "b_enc": (96,), "W_dec": (96, 24), "b_dec": (24,),
    }
    # Unit-norm rows in training space, divided by the folded scale.
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.full((96,), 1 / SCALE))
    sparsity = load_safetensors(files["sparsity.safetensors"])["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(torch.linspace(0, 0.5, 96) + 1e-10))
    assert json.loads(files["eval.json"]) == {"fvu": 0.12, "l0": 6.0, "n_tokens": 4096, "cosine": None}


def test_sparsity_file_is_omitted_without_frequencies() -> None:
    assert "sparsity.safetensors" not in _files(_trained_like_topk(), **{**RUN_FILES, "sparsity": None})


def test_config_that_does_not_match_the_weights_is_rejected() -> None:
    files = _files(_trained_like_topk(), **RUN_FILES)
    cfg = json.loads(files["cfg.json"])
    cfg["d_sae"] = 128
    files["cfg.json"] = json.dumps(cfg).encode()
    with pytest.raises(ValueError, match=r"W_enc shape \(24, 96\) but cfg.json d_in=24, d_sae=128 expects \(24, 128\)"):
        load_dictionary(files)


def test_weights_with_missing_or_extra_tensors_are_rejected() -> None:
    files = _files(_trained_like_topk(), **RUN_FILES)
    weights = load_safetensors(files["sae_weights.safetensors"])
    weights["threshold"] = torch.zeros(96)
    del weights["b_enc"]
    files["sae_weights.safetensors"] = save_safetensors(weights)
    with pytest.raises(ValueError, match=r"holds \['W_dec', 'W_enc', 'b_dec', 'threshold'\], expected"):
        load_dictionary(files)


def test_unsupported_config_values_are_rejected() -> None:
    files = _files(_trained_like_topk(), **RUN_FILES)
    cfg = json.loads(files["cfg.json"])
    cfg["normalize_activations"] = "batch_norm"  # every mode SAELens 6 accepts loads (tests/interp)
    files["cfg.json"] = json.dumps(cfg).encode()
    with pytest.raises(ValueError, match="normalize_activations='batch_norm' is not supported"):
        load_dictionary(files)


def test_metadata_cannot_override_the_named_arguments() -> None:
    with pytest.raises(ValueError, match=r"extra_metadata may not set \['hook_name'\]"):
        _files(_trained_like_topk(), **{**RUN_FILES, "extra_metadata": {"hook_name": "other"}})


# --------------------------------------------------------------------------- metrics helpers


def test_dense_fraction_and_log_frequency_histogram() -> None:
    frequencies = torch.tensor([0.0, 1e-4, 1e-3, 0.05, 0.2, 0.5])
    assert dense_fraction(frequencies) == pytest.approx(2 / 6)
    assert dense_fraction(frequencies, threshold=0.01) == pytest.approx(3 / 6)
    counts, edges = firing_histogram(frequencies, torch.linspace(-10.5, 0.5, 12))
    assert counts.sum() == 6
    assert counts[0] == 1  # never fired: log10(0 + 1e-10) = -10
    torch.testing.assert_close(edges, torch.linspace(-10.5, 0.5, 12))
    counts, edges = firing_histogram(frequencies, 4)  # 4 equal bins over [-10, log10(0.5)]
    assert counts.tolist() == [1.0, 0.0, 2.0, 3.0]
    assert edges[0] == -10 and edges[-1] == pytest.approx(torch.tensor(0.5).log10().item())


def test_output_fire_counts_handles_sparse_and_dense_outputs() -> None:
    dense = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, 3.0]])
    assert output_fire_counts(dense, None, 3).tolist() == [1, 1, 2]
    indices = torch.tensor([[1, 2], [0, 2]])
    acts = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    assert output_fire_counts(acts, indices, 3).tolist() == [1, 1, 1]
