"""The spliced-evaluation math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.evaluation import ReconstructionErrorStats, SplicedLossStats, scored_positions
from trainer.metrics import PooledReconstructionStats

LOG3, LOG7 = math.log(3), math.log(7)


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)  # (1, S, V)


def test_losses_kl_and_recovery_match_hand_computed_values():
    tokens = torch.tensor([[0, 0, 1]])
    mask = scored_positions(tokens, [])
    assert mask.tolist() == [[True, True, False]]
    nan = float("nan")  # the last position is never scored: its logits must not matter
    stats = SplicedLossStats()
    stats.update(
        clean_logits=_logits([0, 0], [0, 0], [nan, nan]),          # p = (1/2, 1/2) at both positions
        spliced_logits=_logits([LOG3, 0], [LOG3, 0], [nan, nan]),  # p = (3/4, 1/4)
        ablated_logits=_logits([0, LOG7], [0, LOG7], [nan, nan]),  # p = (1/8, 7/8)
        token_ids=tokens, mask=mask,
    )
    result = stats.result()
    # Position 0 predicts token 0, position 1 predicts token 1.
    clean = math.log(2)
    spliced = (math.log(4 / 3) + math.log(4)) / 2
    ablated = (math.log(8) + math.log(8 / 7)) / 2
    assert result["n_tokens"] == 2
    assert result["clean_ce"] == pytest.approx(clean, rel=1e-6)
    assert result["spliced_ce"] == pytest.approx(spliced, rel=1e-6)
    assert result["ablated_ce"] == pytest.approx(ablated, rel=1e-6)
    assert result["ce_recovered"] == pytest.approx((ablated - spliced) / (ablated - clean), rel=1e-5)
    assert result["delta_lm_loss"] == pytest.approx(spliced - clean, rel=1e-5)
    # KL((1/2, 1/2) || (3/4, 1/4)) = 1/2 log(2/3) + 1/2 log 2 at each position.
    assert result["kl_divergence"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)


def test_excluded_tokens_and_the_last_position_are_not_scored():
    bos = 2
    tokens = torch.tensor([[bos, 0, 1, 0], [bos, 1, bos, 1]])
    assert scored_positions(tokens, {bos}).tolist() == [[False, True, True, False], [False, True, False, False]]
    mask = torch.tensor([[True, True, True, True]] * 2)
    logits = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="last position"):
        SplicedLossStats().update(clean_logits=logits, spliced_logits=logits, ablated_logits=logits,
                                  token_ids=tokens, mask=mask)
    with pytest.raises(ValueError, match=r"ablated_logits shape \(2, 3, 3\)"):
        SplicedLossStats().update(clean_logits=logits, spliced_logits=logits, ablated_logits=logits[:, :3],
                                  token_ids=tokens, mask=scored_positions(tokens, {bos}))


def test_batches_pool_by_token_and_a_perfect_splice_recovers_everything():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (5, 7), generator=generator)
    clean = torch.randn(5, 7, 11, generator=generator)
    ablated = torch.randn(5, 7, 11, generator=generator)
    mask = scored_positions(tokens, {3})
    whole, split = SplicedLossStats(), SplicedLossStats()
    whole.update(clean_logits=clean, spliced_logits=clean, ablated_logits=ablated, token_ids=tokens, mask=mask)
    for rows in (slice(0, 1), slice(1, 5)):  # batches of unequal size: a mean of means would differ
        split.update(clean_logits=clean[rows], spliced_logits=clean[rows], ablated_logits=ablated[rows],
                     token_ids=tokens[rows], mask=mask[rows])
    assert split.result() == pytest.approx(whole.result(), rel=1e-9)
    result = whole.result()
    expected_ce = torch.nn.functional.cross_entropy(clean[:, :-1][mask[:, :-1]], tokens[:, 1:][mask[:, :-1]])
    assert result["clean_ce"] == pytest.approx(expected_ce.item(), rel=1e-6)
    assert result["n_tokens"] == int(mask.sum())
    assert result["spliced_ce"] == result["clean_ce"]
    assert result["kl_divergence"] == pytest.approx(0.0, abs=1e-7)
    assert result["ce_recovered"] == pytest.approx(1.0)
    assert result["delta_lm_loss"] == 0.0
    same = SplicedLossStats()
    same.update(clean_logits=clean, spliced_logits=ablated, ablated_logits=clean, token_ids=tokens, mask=mask)
    assert math.isnan(same.result()["ce_recovered"])  # ablating changed nothing: nothing to recover


def test_error_norm_quantiles_histogram_token_fvu_and_worst_tokens():
    # Mean 0 and total squared deviation 4 over 4 tokens: a token's FVU is its squared error.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    errors = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0], [3.0, 4.0]])  # norms 3, 4, 0, 5
    stats = ReconstructionErrorStats()
    stats.update(x[:2], x[:2] + errors[:2], sequences=torch.tensor([7, 7]), positions=torch.tensor([1, 2]))
    stats.update(x[2:], x[2:] + errors[2:], sequences=torch.tensor([9, 9]), positions=torch.tensor([4, 5]))
    result = stats.result(histogram_bins=5, n_worst=2)
    assert result["n_tokens"] == 4
    # Sorted norms 0, 3, 4, 5; linear interpolation: p50 at rank 1.5, p90 at rank 2.7, p99 at 2.97.
    assert result["error_norm"] == pytest.approx({"mean": 3.0, "p50": 3.5, "p90": 4.7, "p99": 4.97, "max": 5.0})
    assert result["token_fvu"]["mean"] == pytest.approx((9 + 16 + 0 + 25) / 4)
    assert result["token_fvu"]["max"] == pytest.approx(25.0)
    assert result["error_norm_histogram"] == {"edges": pytest.approx([0, 1, 2, 3, 4, 5]), "tokens": [1, 0, 0, 1, 2]}
    assert result["worst_tokens"] == [
        {"sequence": 9, "position": 5, "error_norm": pytest.approx(5.0), "fvu": pytest.approx(25.0)},
        {"sequence": 7, "position": 2, "error_norm": pytest.approx(4.0), "fvu": pytest.approx(16.0)},
    ]
    torch.testing.assert_close(stats.error_norms(), torch.tensor([3.0, 4.0, 0.0, 5.0]))


def test_mean_token_fvu_is_the_pooled_fvu():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=generator) * 3 + 5
    reconstruction = x + torch.randn(300, 16, generator=generator)
    errors, pooled = ReconstructionErrorStats(), PooledReconstructionStats()
    for lo, hi in ((0, 17), (17, 200), (200, 300)):
        rows = torch.arange(lo, hi)
        errors.update(x[lo:hi], reconstruction[lo:hi], sequences=rows // 10, positions=rows % 10)
        pooled.update(x[lo:hi], reconstruction[lo:hi], torch.ones(hi - lo, 1))
    result = errors.result(n_worst=0)
    assert result["token_fvu"]["mean"] == pytest.approx(pooled.result()["fvu"], rel=1e-9)
    assert result["worst_tokens"] == []
    assert sum(result["error_norm_histogram"]["tokens"]) == 300


def test_an_exact_reconstruction_has_zero_error_and_a_usable_histogram():
    x = torch.randn(6, 4)
    stats = ReconstructionErrorStats()
    stats.update(x, x.clone(), sequences=torch.zeros(6, dtype=torch.long), positions=torch.arange(6))
    result = stats.result(histogram_bins=4)
    assert result["error_norm"]["max"] == 0.0
    assert result["error_norm_histogram"] == {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "tokens": [6, 0, 0, 0]}
    with pytest.raises(ValueError, match="no tokens"):
        ReconstructionErrorStats().result()
