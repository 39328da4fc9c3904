"""Transcoders and skip transcoders: every transcoder-capable architecture learns a known
input -> target map (the skip its linear part), the saved weights compute the trained model's
prediction on raw activations, the folder loads back, and Matryoshka is refused."""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from trainer.architectures import build_sae
from trainer.config import SAEConfig
from trainer.dictionary import dictionary_files, load_dictionary
from trainer.loop import evaluate
from trainer.losses import auxk_loss
from trainer.metrics import DeadLatentTracker, output_fire_counts
from trainer.registry import ARCHITECTURES, TRANSCODER_ARCHITECTURES, check_transcoder_architecture
from trainer.sae import SparseCoder, TopKSAE

# x = [sparse features in D_SPARSE dims | dense Gaussian in D_DENSE dims];
# y = the features' own output directions + dense @ LINEAR + shift. The dense part is linear in x
# and not sparse: a skip connection is its exact answer, latents can only approximate it.
D_SPARSE, D_DENSE, D_OUT = 12, 4, 10
D_IN = D_SPARSE + D_DENSE
N_FEATURES, ACTIVE, N_LATENTS, K = 24, 2, 48, 3
BATCH, STEPS, LR, DEAD_AFTER_TOKENS = 256, 400, 1e-2, 2560
SCALE, TARGET_SCALE = 1.7, 0.6  # the input and the target normalised by different factors
SPARSITY = {"jumprelu": 0.05, "relu_l1": 0.1, "relu_l1_unitnorm": 0.1}
CASES = [(architecture, skip) for architecture in TRANSCODER_ARCHITECTURES for skip in (False, True)]
SAVED_AS = {
    # (architecture, skip, d_out == d_in) -> cfg.json architecture
    ("topk", False, False): "topk_transcoder", ("topk", True, False): "topk_skip_transcoder",
    ("topk", False, True): "topk", ("topk", True, True): "topk_skip_transcoder",
    ("batchtopk", False, False): "jumprelu_transcoder", ("batchtopk", True, False): "jumprelu_skip_transcoder",
    ("jumprelu", False, False): "jumprelu_transcoder", ("jumprelu", True, False): "jumprelu_skip_transcoder",
    ("relu_l1", False, False): "transcoder", ("relu_l1", True, False): "skip_transcoder",
    ("relu_l1_unitnorm", False, False): "transcoder", ("relu_l1_unitnorm", True, False): "skip_transcoder",
}


class Problem(NamedTuple):
    linear: Tensor
    """(D_DENSE, D_OUT) the target's linear part, read from the dense input dimensions."""
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def _problem() -> Problem:
    generator = torch.Generator().manual_seed(20_251_205)
    directions_in = torch.randn(N_FEATURES, D_SPARSE, generator=generator)
    directions_out = torch.randn(N_FEATURES, D_OUT, generator=generator)
    directions_in /= directions_in.norm(dim=1, keepdim=True)
    directions_out /= directions_out.norm(dim=1, keepdim=True)
    linear = torch.randn(D_DENSE, D_OUT, generator=generator) * 0.2
    shift = torch.randn(D_OUT, generator=generator) * 0.5

    def sample(n: int) -> tuple[Tensor, Tensor]:
        fires = torch.rand(n, N_FEATURES, generator=generator) < ACTIVE / N_FEATURES
        magnitudes = fires * (torch.rand(n, N_FEATURES, generator=generator) + 0.5)
        dense = torch.randn(n, D_DENSE, generator=generator)
        x = torch.cat([magnitudes @ directions_in, dense], dim=1)
        return x, magnitudes @ directions_out + dense @ linear + shift

    return Problem(linear, sample(BATCH * STEPS), sample(4096))


def _config(architecture: str, skip: bool) -> SAEConfig:
    return SAEConfig(
        architecture=architecture, n_latents=N_LATENTS, k=K, skip_connection=skip,
        sparsity_coefficient=SPARSITY.get(architecture), encoder_gemm="param",  # outputs compared exactly
    )


def _train(architecture: str, skip: bool, problem: Problem) -> SparseCoder:
    """Plain Adam on ``forward(x * SCALE, target=y * TARGET_SCALE)``, as the trainer steps it."""
    sae = build_sae(_config(architecture, skip), d_in=D_IN, d_out=D_OUT, seed=0, transcoder=True)
    x_all, y_all = problem.train
    sae.init_b_dec(y_all[:2048] * TARGET_SCALE, method="mean")
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    tracker = DeadLatentTracker(N_LATENTS)
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        out = sae(x_all[rows] * SCALE, target=y_all[rows] * TARGET_SCALE,
                  dead_mask=tracker.dead_mask(DEAD_AFTER_TOKENS))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        tracker.update_counts(output_fire_counts(out.latent_acts.detach(), out.latent_indices, N_LATENTS),
                              n_tokens=BATCH)
    return sae.eval()  # BatchTopK runs as the JumpReLU it saves as


@pytest.fixture(scope="module")
def problem() -> Problem:
    return _problem()


class _TrainedOnDemand(dict):
    """(architecture, skip) -> the model ``_train`` gives, trained on first use, one torch thread."""

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.problem = problem

    def __missing__(self, key: tuple[str, bool]) -> SparseCoder:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self[key] = _train(*key, self.problem)
        finally:
            torch.set_num_threads(threads)
        return self[key]


@pytest.fixture(scope="module")
def trained(problem: Problem) -> _TrainedOnDemand:
    """Every (architecture, skip) trained once per module, shared by the tests below."""
    return _TrainedOnDemand(problem)


def _held_out(sae: SparseCoder, problem: Problem) -> dict[str, float]:
    return evaluate(sae, [problem.test], scale=SCALE, target_scale=TARGET_SCALE)


def _files(sae: SparseCoder, **options) -> dict[str, bytes]:
    return dictionary_files(
        sae, hookpoint="model.layers.1.mlp:input", hookpoint_out="model.layers.1.mlp", model_name="tiny",
        scale=SCALE, target_scale=TARGET_SCALE, extra_metadata={}, sparsity=None, eval_metrics={}, **options,
    )


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("architecture", TRANSCODER_ARCHITECTURES)
def test_transcoders_learn_the_map_and_the_skip_learns_its_linear_part(
    architecture: str, problem: Problem, trained
) -> None:
    plain, skip = trained[architecture, False], trained[architecture, True]
    assert plain.W_skip is None and skip.W_skip is not None
    plain_fvu, skip_fvu = _held_out(plain, problem)["fvu"], _held_out(skip, problem)["fvu"]
    assert plain_fvu < 0.35  # the mean of the target scores 1.0
    assert skip_fvu < 0.25 and skip_fvu < plain_fvu
    # The skip's rows for the dense dimensions are the linear map (in raw units: the fold's
    # W_skip * SCALE / TARGET_SCALE), which the latents alone can only approximate.
    learned = skip.W_skip[D_SPARSE:].detach() * SCALE / TARGET_SCALE
    assert (learned - problem.linear).norm() / problem.linear.norm() < 0.1
    # The latents explain the sparse part: the skip and b_dec alone fall far short.
    x, y = problem.test
    with torch.no_grad():
        affine_only = (skip.skip_output(x * SCALE) + skip.b_dec) / TARGET_SCALE
    affine_fvu = ((affine_only - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
    assert affine_fvu > 1.3 * skip_fvu


def test_auxk_models_the_residual_of_the_whole_prediction_skip_included() -> None:
    sae = TopKSAE(D_IN, N_LATENTS, K, d_out=D_OUT, apply_b_dec_to_input=False, skip_connection=True, seed=0)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.W_skip.copy_(torch.randn(D_IN, D_OUT, generator=generator))
    x, y = torch.randn(64, D_IN, generator=generator), torch.randn(64, D_OUT, generator=generator)
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[::2] = True
    out = sae(x, target=y, dead_mask=dead)
    with torch.no_grad():
        dense = torch.zeros(64, N_LATENTS).scatter(1, out.latent_indices, out.latent_acts)
        sparse_path = dense @ sae.decoder_weight() + sae.b_dec
        pre = x @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(out.reconstruction, sparse_path + x @ sae.W_skip)
    expected = auxk_loss(y - out.reconstruction, pre, sae.decoder_weight(), dead, coefficient=sae.auxk_coefficient)
    without_skip = auxk_loss(y - sparse_path, pre, sae.decoder_weight(), dead, coefficient=sae.auxk_coefficient)
    torch.testing.assert_close(out.aux_loss, expected)
    assert not torch.allclose(expected, without_skip)


def test_evaluate_measures_the_prediction_against_the_raw_target(problem: Problem, trained) -> None:
    sae = trained["jumprelu", True]
    x, y = problem.test
    metrics = evaluate(sae, [(x[:1000], y[:1000]), (x[1000:], y[1000:])], scale=SCALE, target_scale=TARGET_SCALE)
    with torch.no_grad():
        prediction = sae.reconstruct(x * SCALE)[1].double() / TARGET_SCALE
    y64 = y.double()
    fvu = (prediction - y64).pow(2).sum() / (y64 - y64.mean(0)).pow(2).sum()
    assert metrics["n_tokens"] == 4096
    assert metrics["fvu"] == pytest.approx(fvu.item(), rel=1e-5)
    assert metrics["mse"] == pytest.approx((prediction - y64).pow(2).mean().item(), rel=1e-5)
    # A plain SAE's batches give what (x, x) pairs give.
    sae_plain = build_sae(SAEConfig(n_latents=N_LATENTS, k=K), d_in=D_IN, seed=0)
    assert evaluate(sae_plain, [x], scale=SCALE) == evaluate(sae_plain, [(x, x)], scale=SCALE)


# --------------------------------------------------------------------------- the saved dictionary


def _by_hand(weights: dict[str, Tensor], cfg: dict, x: Tensor) -> Tensor:
    """The saved dictionary's prediction on raw ``x``, from its tensors alone."""
    pre = x @ weights["W_enc"] + weights["b_enc"]
    acts = torch.relu(pre)
    if "threshold" in weights:
        acts = acts * (pre > weights["threshold"])
    if "k" in cfg:
        top = acts.topk(cfg["k"], dim=1)
        acts = torch.zeros_like(acts).scatter(1, top.indices, top.values)
    prediction = acts @ weights["W_dec"] + weights["b_dec"]
    if "W_skip" in weights:
        prediction = prediction + x @ weights["W_skip"].T  # saved (d_out, d_in), as SAELens keeps it
    return prediction


@pytest.mark.parametrize(("architecture", "skip"), CASES)
def test_saved_weights_on_raw_input_give_the_trained_prediction_and_load_back(
    architecture: str, skip: bool, problem: Problem, trained
) -> None:
    sae = trained[architecture, skip]
    files = _files(sae)
    cfg = json.loads(files["cfg.json"])
    weights = load_safetensors(files["sae_weights.safetensors"])
    assert cfg["architecture"] == SAVED_AS[architecture, skip, False]
    assert (cfg["d_in"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (D_IN, D_OUT, False)
    assert cfg["metadata"]["hook_name_out"] == "model.layers.1.mlp"
    assert ("W_skip" in weights) == skip
    x = problem.test[0][:500]
    with torch.no_grad():
        expected = sae.reconstruct(x * SCALE)[1] / TARGET_SCALE
        torch.testing.assert_close(_by_hand(weights, cfg, x), expected)
        loaded, loaded_cfg = load_dictionary(files)
        assert loaded_cfg == cfg and (loaded.W_skip is not None) == skip
        code, prediction = loaded.reconstruct(x)
        torch.testing.assert_close(prediction, expected)
        torch.testing.assert_close(loaded.decode(code.acts, code.indices) + (loaded.skip_output(x) if skip else 0),
                                   expected)
        trained_code = sae.encode(x * SCALE)  # the fold leaves the latents as they were
        torch.testing.assert_close(code.acts, trained_code.acts)
    # Saved again from the loaded model (scales 1), the files hold the same tensors.
    again = dictionary_files(loaded, hookpoint="in", hookpoint_out="out", model_name="tiny", scale=1.0,
                             extra_metadata={}, sparsity=None, eval_metrics={})
    for name, tensor in load_safetensors(again["sae_weights.safetensors"]).items():
        torch.testing.assert_close(tensor, weights[name])


@pytest.mark.parametrize("skip", [False, True])
def test_a_topk_transcoder_to_its_own_width_saves_as_saelens_topk_only_without_a_skip(skip: bool) -> None:
    sae = build_sae(_config("topk", skip), d_in=D_IN, d_out=D_IN, seed=0, transcoder=True)
    cfg = json.loads(_files(sae)["cfg.json"])
    assert cfg["architecture"] == SAVED_AS["topk", skip, True]
    assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False


# --------------------------------------------------------------------------- refusals


def test_matryoshka_and_misplaced_skips_are_refused_in_one_line() -> None:
    assert set(ARCHITECTURES) - set(TRANSCODER_ARCHITECTURES) == {"matryoshka_batchtopk"}
    refusals = []
    for name in ("matryoshka_batchtopk", "trainer.architectures:MatryoshkaBatchTopKSAE"):
        with pytest.raises(ValueError, match="cannot be a transcoder") as refused:
            check_transcoder_architecture(name, setting="sae.architecture")
        refusals.append(refused)
    with pytest.raises(ValueError, match="cannot be a transcoder") as refused:
        build_sae(SAEConfig(architecture="matryoshka_batchtopk", n_latents=N_LATENTS, k=K), d_in=D_IN,
                  d_out=D_OUT, seed=0, transcoder=True)
    refusals.append(refused)
    with pytest.raises(ValueError, match="skip_connection=true needs a transcoder") as refused:
        build_sae(_config("topk", True), d_in=D_IN, seed=0)
    refusals.append(refused)
    with pytest.raises(ValueError, match="needs hookpoint_out") as refused:
        dictionary_files(build_sae(_config("relu_l1", True), d_in=D_IN, seed=0, transcoder=True), hookpoint="in",
                         model_name="tiny", scale=1.0, extra_metadata={}, sparsity=None, eval_metrics={})
    refusals.append(refused)
    assert all("\n" not in str(refused.value) for refused in refusals)
    for name in TRANSCODER_ARCHITECTURES + ("trainer.sae:TopKSAE",):
        check_transcoder_architecture(name)
