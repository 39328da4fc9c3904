"""The held-out activation stats: the streaming moments against torch over all rows at once, the
file's round trip and its errors, and the relative error they define against evaluate's FVU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from trainer.activation_stats import (
    ActivationStats,
    RunningMoments,
    activation_stats_file,
    load_activation_stats,
)
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
