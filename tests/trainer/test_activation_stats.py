"""The held-out activation stats: the streaming moments against torch over all rows at once, the
file's round trip and its errors, and the relative error they define against evaluate's FVU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from trainer.activation_stats import (
    ActivationStats,
    FeatureMaxima,
    FeatureStats,
    RunningMoments,
    activation_stats_file,
    feature_stats_file,
    load_activation_stats,
    load_feature_stats,
)
from trainer.architectures import ReLUSAE
from trainer.dictionary import dictionary_files
from trainer.layout import WEIGHTS_FILE
from trainer.loop import evaluate
from trainer.sae import TopKSAE

D = 16


def _uneven_batches(seed: int = 0) -> list[torch.Tensor]:
    """float32 rows far from zero with dimensions of different spread, in batches of uneven sizes
    (one of a single row)."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-2, 1, D)
    return [torch.randn(n, D, generator=generator) * spread + 300.0 for n in (1, 37, 256, 5, 90)]


def test_moments_over_uneven_batches_equal_torch_over_all_rows():
    batches = _uneven_batches()
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    stats = moments.result()
    rows = torch.cat(batches).double()
    torch.testing.assert_close(stats.mean, rows.mean(dim=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.variance, rows.var(dim=0, unbiased=False), rtol=1e-9, atol=1e-12)
    assert stats.n_tokens == len(rows) == 389 and moments.nonfinite_rows_skipped == 0
    assert stats.total_variance == pytest.approx(rows.var(dim=0, unbiased=False).sum().item(), rel=1e-12)
    at_once = ActivationStats.of(rows.float().reshape(389, 1, D))  # leading dimensions flattened
    torch.testing.assert_close(at_once.variance, stats.variance, rtol=1e-9, atol=1e-12)


def test_rows_with_nan_or_inf_are_skipped_and_counted():
    batches = _uneven_batches(seed=1)
    batches[1][3, 0] = float("nan")
    batches[2][[0, 9], [5, D - 1]] = torch.tensor([float("inf"), -float("inf")])
    batches[0][0, 2] = float("nan")  # the single-row batch: nothing of it is left
    moments = RunningMoments()
    passed = list(moments.pass_through(batches))
    assert all(a is b for a, b in zip(passed, batches, strict=True)), "pass_through hands the batches on unchanged"
    stats = moments.result()
    rows = torch.cat(batches).double()
    finite = rows[torch.isfinite(rows).all(dim=1)]
    assert moments.nonfinite_rows_skipped == 4 and stats.n_tokens == len(finite) == len(rows) - 4
    torch.testing.assert_close(stats.mean, finite.mean(dim=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.variance, finite.var(dim=0, unbiased=False), rtol=1e-9, atol=1e-12)


def test_no_finite_rows_is_an_error():
    with pytest.raises(ValueError, match="no finite rows.*2 rows with NaN or Inf skipped"):
        ActivationStats.of(torch.full((2, D), float("nan")))


def test_the_file_round_trips_in_float32():
    stats = ActivationStats.of(torch.cat(_uneven_batches()))
    data = activation_stats_file(stats)
    stored = load_safetensors(data)  # a plain safetensors file any reader opens
    assert {name: t.dtype for name, t in stored.items()} == {"mean": torch.float32, "variance": torch.float32}
    loaded = load_activation_stats(data)
    assert loaded.n_tokens == stats.n_tokens == 389
    assert loaded.mean.dtype == loaded.variance.dtype == torch.float64
    torch.testing.assert_close(loaded.mean, stats.mean.float().double(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.variance, stats.variance.float().double(), rtol=0, atol=0)
    assert loaded.total_variance == pytest.approx(stats.total_variance, rel=1e-6)


def _file(metadata: dict[str, str] | None = None, **tensors: torch.Tensor) -> bytes:
    return save_safetensors(tensors, metadata={"n_tokens": "10"} if metadata is None else metadata)


@pytest.mark.parametrize(("data", "message"), [
    (b"not a safetensors file at all", "29 bytes that are not a safetensors file"),
    (_file(mean=torch.zeros(D)), "no tensor 'variance'"),
    (_file(variance=torch.ones(D)), "no tensor 'mean'"),
    (_file(mean=torch.zeros(D), variance=torch.ones(D - 1)), r"mean shape \(16,\) and variance shape \(15,\)"),
    (_file(mean=torch.zeros(2, D), variance=torch.ones(2, D)), r"must be the same \(d,\)"),
    (_file(mean=torch.tensor([0.0, float("nan")]), variance=torch.ones(2)), "must be finite"),
    (_file(mean=torch.zeros(2), variance=torch.tensor([1.0, -0.5])), "variance must be >= 0.*-0.5"),
    (_file({}, mean=torch.zeros(2), variance=torch.ones(2)), "metadata n_tokens='', expected a positive integer"),
    (_file({"n_tokens": "many"}, mean=torch.zeros(2), variance=torch.ones(2)), "n_tokens='many'"),
    (_file({"n_tokens": "0"}, mean=torch.zeros(2), variance=torch.ones(2)), "n_tokens=0 must be positive"),
], ids=["garbage", "no-variance", "no-mean", "shapes", "not-1d", "nan", "negative-variance",
        "no-n_tokens", "n_tokens-not-a-number", "zero-tokens"])
def test_a_malformed_file_gets_a_one_line_error(data, message):
    with pytest.raises(ValueError, match=message) as error:
        load_activation_stats(data)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("activation stats: ")


def test_relative_errors_average_to_the_pooled_fvu_of_evaluate():
    """Independent of evaluate's own pooling: the tokens' squared errors over the stats' total
    variance, averaged, are the FVU evaluate reports on the same rows (NaN rows left out by both)."""
    batches = _uneven_batches(seed=2)
    batches[3][1, 4] = float("nan")
    sae = TopKSAE(D, 64, 4, seed=7)
    scale = 0.05  # trained on x * scale, as the job does; the stats are in raw units
    sae.init_b_dec(torch.cat(batches[:1]) * scale)
    moments = RunningMoments()
    metrics = evaluate(sae, moments.pass_through(batches), scale=scale)
    stats = moments.result()
    assert stats.n_tokens == metrics["n_tokens"] and moments.nonfinite_rows_skipped == metrics["nonfinite_rows_skipped"] == 1

    x = torch.cat(batches)
    x = x[torch.isfinite(x).all(dim=1)]
    with torch.no_grad():
        reconstruction = sae(x * scale).reconstruction / scale
    relative = stats.relative_error(x, reconstruction)
    assert relative.shape == (len(x),)
    assert 0.01 < metrics["fvu"] < 100, "a random SAE: the check must not be about a trivial FVU"
    assert relative.mean().item() == pytest.approx(metrics["fvu"], rel=1e-5)
    with pytest.raises(ValueError, match="rows of width 8 but the activation stats have d=16"):
        stats.relative_error(x[:, :8], reconstruction[:, :8])


# --------------------------------------------------------------------------- feature maxima


def _topk_sae(scale: float) -> TopKSAE:
    sae = TopKSAE(D, 64, 4, seed=3)
    sae.init_b_dec(torch.cat(_uneven_batches(seed=5)) * scale)
    return sae


def _relu_sae(scale: float) -> ReLUSAE:
    sae = ReLUSAE(D, 64, seed=4, apply_b_dec_to_input=True)
    with torch.no_grad():
        sae.init_b_dec(torch.cat(_uneven_batches(seed=5)) * scale)
        sae.b_enc.copy_(torch.linspace(-0.5, 0.2, 64))
        sae.b_enc[:6] = -1e3  # six latents that never fire: their maximum is 0
    return sae


def _dense_acts_by_hand(weights: dict[str, torch.Tensor], x: torch.Tensor, k: int | None) -> torch.Tensor:
    """(N, n_latents) activations of the saved weights on raw rows, written out from SAELens's
    formulas: relu((x - b_dec) W_enc + b_enc), then only the k largest kept for TopK."""
    pre = torch.relu((x.double() - weights["b_dec"].double()) @ weights["W_enc"].double() + weights["b_enc"].double())
    if k is None:
        return pre
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_feature_maxima_of_evaluate_are_the_saved_dictionarys_largest_activations_on_raw_rows(architecture):
    """The maxima evaluate collects (on x * scale, unfolded weights) equal each latent's largest
    activation of the SAVED dictionary (scale folded in) on the raw rows, over every finite row."""
    scale = 0.05
    sae = _topk_sae(scale) if architecture == "topk" else _relu_sae(scale)
    batches = _uneven_batches(seed=6)
    batches[2][7, 3] = float("nan")  # left out of the maxima as of every figure
    maxima = FeatureMaxima(sae.n_latents)
    metrics = evaluate(sae, batches, scale=scale, feature_max=maxima)
    stats = maxima.result()

    files = dictionary_files(sae, hookpoint="h", model_name="m", scale=scale, extra_metadata={}, sparsity=None,
                             eval_metrics={})
    weights = load_safetensors(files[WEIGHTS_FILE])
    x = torch.cat(batches)
    x = x[torch.isfinite(x).all(dim=1)]
    expected = _dense_acts_by_hand(weights, x, sae.k if architecture == "topk" else None).amax(dim=0)
    assert stats.n_tokens == metrics["n_tokens"] == len(x) == 388
    assert stats.max_activation.dtype == torch.float32 and stats.n_latents == 64
    assert (expected == 0).any() and (expected > 0.05).sum() > 10, "some latents never fire, many fire"
    torch.testing.assert_close(stats.max_activation.double(), expected, rtol=1e-4, atol=1e-5)
    unscaled = expected / scale  # the wrong units differ by far more than the tolerance
    assert not torch.allclose(stats.max_activation.double(), unscaled, rtol=1e-2)


def test_feature_maxima_over_batches_equal_the_maximum_over_all_rows():
    """The accumulator alone: sparse (acts, indices) codes and dense codes, batch by batch, give
    the maximum over all rows at once; an empty batch changes nothing."""
    generator = torch.Generator().manual_seed(8)
    n = 40
    dense = torch.relu(torch.randn(300, n, generator=generator))
    dense[:, 5] = 0  # never fires
    sparse_acts, sparse_indices = dense.topk(3, dim=-1)
    sparse_acts[0, 2] = 0.0  # fewer than k fired: a zero at some index raises nothing
    by_topk, by_dense = FeatureMaxima(n), FeatureMaxima(n)
    for rows in (slice(0, 1), slice(1, 1), slice(1, 120), slice(120, 300)):
        by_topk.update(sparse_acts[rows], sparse_indices[rows])
        by_dense.update(dense[rows], None)
    topk_dense = torch.zeros_like(dense).scatter(-1, sparse_indices, sparse_acts)
    assert by_topk.result().max_activation.equal(topk_dense.amax(dim=0))
    assert by_dense.result().max_activation.equal(dense.amax(dim=0))
    assert by_dense.result().max_activation[5] == 0 and by_dense.n_tokens == by_topk.n_tokens == 300


def test_feature_maxima_refuse_codes_of_the_wrong_shape_and_no_rows():
    maxima = FeatureMaxima(8)
    with pytest.raises(ValueError, match=r"dense acts shape \(2, 7\) must end in n_latents=8"):
        maxima.update(torch.zeros(2, 7), None)
    with pytest.raises(ValueError, match=r"indices shape \(2, 3\) differs from acts shape \(2, 4\)"):
        maxima.update(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no rows to take feature maxima over"):
        maxima.result()
    with pytest.raises(ValueError, match="n_latents=0 must be positive"):
        FeatureMaxima(0)


def test_the_feature_stats_file_round_trips():
    stats = FeatureStats(torch.tensor([0.0, 1.5, 1e-8, 3e4]), n_tokens=389)
    data = feature_stats_file(stats)
    assert {name: t.dtype for name, t in load_safetensors(data).items()} == {"max_activation": torch.float32}
    loaded = load_feature_stats(data)
    assert loaded.n_tokens == 389 and loaded.max_activation.equal(stats.max_activation)


def _maxima_file(metadata: dict[str, str] | None = None, **tensors: torch.Tensor) -> bytes:
    return save_safetensors(tensors, metadata={"n_tokens": "10"} if metadata is None else metadata)


@pytest.mark.parametrize(("data", "message"), [
    (b"garbage", "7 bytes that are not a safetensors file"),
    (_maxima_file(mean=torch.zeros(D)), r"no tensor 'max_activation' \(it holds \['mean'\]\)"),
    (_maxima_file(max_activation=torch.zeros(2, D)), r"max_activation shape \(2, 16\) must be \(n_latents,\)"),
    (_maxima_file(max_activation=torch.tensor([1.0, float("inf")])), "max_activation must be finite"),
    (_maxima_file(max_activation=torch.tensor([1.0, -0.25])), "must be >= 0, but its smallest value is -0.25"),
    (_maxima_file({}, max_activation=torch.ones(2)), "metadata n_tokens='', expected a positive integer"),
    (_maxima_file({"n_tokens": "0"}, max_activation=torch.ones(2)), "n_tokens=0 must be positive"),
], ids=["garbage", "no-tensor", "not-1d", "inf", "negative", "no-n_tokens", "zero-tokens"])
def test_a_malformed_feature_stats_file_gets_a_one_line_error(data, message):
    with pytest.raises(ValueError, match=message) as error:
        load_feature_stats(data)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("feature stats: ")
