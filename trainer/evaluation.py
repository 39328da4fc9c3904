"""Evaluation math of a dictionary spliced into its language model. Pure torch.

Two accumulators, fed batch by batch and read once at the end:

* ``SplicedLossStats``: next-token cross-entropy of the clean model, of the model with the
  SAE's reconstruction substituted at the hookpoint, and with the hookpoint zero-ablated; the
  loss recovered, the KL divergence to the clean model and the delta LM loss.
* ``ReconstructionErrorStats``: what the SAE cannot explain, token by token: the distribution of
  the reconstruction-error norm and of the per-token fraction of variance unexplained, and the
  tokens where the error is largest.

For a transcoder the substituted activations are its target hookpoint's (its prediction from
the input hookpoint), the zero-ablated ones too, and the error is the target's minus the
prediction: wherever "activations" and "reconstruction" are said below, read "target" and
"prediction". For a cross-layer transcoder every covered MLP output is substituted and ablated
at once, and the error of a token is over its L targets side by side (one accumulator for all,
one per layer).

Positions follow one convention: ``mask[b, t]`` says whether the prediction made at position
``t`` (of token ``t + 1``) is scored; ``scored_positions`` builds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

QUANTILES = (0.5, 0.9, 0.99)
"""Quantiles reported for per-token figures, besides the mean and the maximum."""


def spliced_positions(token_ids: Tensor, excluded_token_ids: Iterable[int]) -> Tensor:
    """(B, S) bool: positions whose activations the SAE replaces, those of tokens the cache
    keeps (not in ``excluded_token_ids``: BOS and the other special tokens the SAE never saw)."""
    excluded = torch.tensor(sorted(excluded_token_ids), dtype=token_ids.dtype, device=token_ids.device)
    return ~torch.isin(token_ids, excluded)


def scored_positions(token_ids: Tensor, excluded_token_ids: Iterable[int]) -> Tensor:
    """(B, S) bool: positions whose next-token prediction is scored: the spliced ones, except
    the last position of each sequence, which has no next token."""
    mask = spliced_positions(token_ids, excluded_token_ids)
    mask[..., -1] = False
    return mask


def next_token_log_probs(logits: Tensor, mask: Tensor) -> Tensor:
    """(n_scored, vocab) fp32 log-probabilities predicted at the scored positions of ``logits`` (B, S, V)."""
    return F.log_softmax(logits[mask].float(), dim=-1)


def next_token_targets(token_ids: Tensor, mask: Tensor) -> Tensor:
    """(n_scored,) the token that follows each scored position (in the order ``logits[mask]`` gives)."""
    shifted = torch.roll(token_ids, shifts=-1, dims=-1)  # position t holds token t + 1; the last wraps, never scored
    return shifted[mask]


def cross_entropy(log_probs: Tensor, targets: Tensor) -> Tensor:
    """(n,) per-token cross-entropy, in nats."""
    return -log_probs.gather(-1, targets[:, None].long()).squeeze(-1)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """(n,) per-token KL(p || q) in nats, from log-probabilities (n, vocab)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def _check_shapes(token_ids: Tensor, mask: Tensor, **logits: Tensor) -> None:
    if mask.shape != token_ids.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask shape {tuple(mask.shape)} dtype {mask.dtype} must be bool like token_ids {tuple(token_ids.shape)}")
    if mask[..., -1].any():
        raise ValueError("mask scores the last position of a sequence, which has no next token")
    for name, value in logits.items():
        if value.shape[:-1] != token_ids.shape:
            raise ValueError(f"{name} shape {tuple(value.shape)} must be token_ids {tuple(token_ids.shape)} + (vocab,)")


class SplicedLossStats:
    """Next-token losses of the clean, spliced and zero-ablated model, pooled over every scored
    token of every batch (a token-weighted mean, not a mean of batch means)."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.n_nonfinite = 0
        """Scored tokens left out because one of their figures was NaN or Inf."""
        # fp64 sums: tens of thousands of per-token losses of similar size.
        self._sums = torch.zeros(4, dtype=torch.float64)  # clean CE, spliced CE, ablated CE, KL

    @torch.no_grad()
    def update(
        self, *, clean_logits: Tensor, spliced_logits: Tensor, ablated_logits: Tensor, token_ids: Tensor, mask: Tensor
    ) -> None:
        """Add a batch: logits (B, S, vocab) of the three forward passes over ``token_ids`` (B, S),
        scored where ``mask`` (B, S) is true (see ``scored_positions``)."""
        _check_shapes(token_ids, mask, clean_logits=clean_logits, spliced_logits=spliced_logits,
                      ablated_logits=ablated_logits)
        targets = next_token_targets(token_ids, mask).to(clean_logits.device)
        mask = mask.to(clean_logits.device)
        clean = next_token_log_probs(clean_logits, mask)
        spliced = next_token_log_probs(spliced_logits.to(clean.device), mask)
        ablated = next_token_log_probs(ablated_logits.to(clean.device), mask)
        per_token = torch.stack([
            cross_entropy(clean, targets).double(), cross_entropy(spliced, targets).double(),
            cross_entropy(ablated, targets).double(), kl_divergence(clean, spliced).double(),
        ])
        # A token with a NaN or Inf figure (non-finite activations) would make every mean NaN.
        finite = torch.isfinite(per_token).all(dim=0)
        self._sums += per_token[:, finite].sum(dim=1).cpu()
        self.n_tokens += int(finite.sum())
        self.n_nonfinite += int((~finite).sum())

    def result(self) -> dict[str, float]:
        """``clean_ce``, ``spliced_ce``, ``ablated_ce`` (mean next-token cross-entropy, nats),
        ``ce_recovered`` = (ablated - spliced) / (ablated - clean) (1: as good as the clean model,
        0: no better than zeros; NaN when ablating changes nothing), ``kl_divergence`` (mean
        KL(clean || spliced) per token), ``delta_lm_loss`` = spliced - clean, ``n_tokens``,
        ``nonfinite_tokens_skipped`` (scored tokens with a NaN or Inf figure, left out)."""
        if self.n_tokens == 0:
            raise ValueError(f"no tokens were scored: every position was masked out or non-finite "
                             f"({self.n_nonfinite} non-finite)")
        clean, spliced, ablated, kl = (self._sums / self.n_tokens).tolist()
        gap = ablated - clean
        return {
            "clean_ce": clean,
            "spliced_ce": spliced,
            "ablated_ce": ablated,
            "ce_recovered": (ablated - spliced) / gap if gap != 0 else float("nan"),
            "kl_divergence": kl,
            "delta_lm_loss": spliced - clean,
            "n_tokens": self.n_tokens,
            "nonfinite_tokens_skipped": self.n_nonfinite,
        }


def _summary(values: Tensor) -> dict[str, float]:
    quantiles = torch.quantile(values, torch.tensor(QUANTILES, dtype=values.dtype))
    return {
        "mean": values.mean().item(),
        **{f"p{round(q * 100)}": v for q, v in zip(QUANTILES, quantiles.tolist(), strict=True)},
        "max": values.max().item(),
    }


class ReconstructionErrorStats:
    """Per-token reconstruction error over a stream of batches: every token's error norm is
    kept (4 bytes plus its sequence and position), so the quantiles and the worst tokens are
    exact; evaluation sets are capped, so this stays small.

    A token's FVU is its squared error over the mean per-token variance of all tokens (the
    squared distance to the pooled mean, merged batch by batch as ``PooledReconstructionStats``
    does): its mean over tokens is the pooled FVU.
    """

    def __init__(self) -> None:
        self._squared_errors: list[Tensor] = []
        self._sequences: list[Tensor] = []
        self._positions: list[Tensor] = []
        self.n_tokens = 0
        self._mean: Tensor | None = None
        self._m2 = 0.0
        self.n_nonfinite = 0
        """Tokens left out because their activation or reconstruction holds NaN or Inf."""

    @torch.no_grad()
    def update(self, x: Tensor, reconstruction: Tensor, *, sequences: Tensor, positions: Tensor) -> None:
        """Add a batch: raw activations and their reconstructions (N, d) (a transcoder's target
        and prediction), and where each token is (its sequence index and position, each (N,)).
        Tokens with NaN or Inf are counted, not kept."""
        if x.shape != reconstruction.shape or x.ndim != 2:
            raise ValueError(f"x {tuple(x.shape)} and reconstruction {tuple(reconstruction.shape)} must be the same (N, d)")
        if sequences.shape != (x.shape[0],) or positions.shape != (x.shape[0],):
            raise ValueError(f"sequences {tuple(sequences.shape)} and positions {tuple(positions.shape)} must be ({x.shape[0]},)")
        finite = torch.isfinite(x).all(dim=-1) & torch.isfinite(reconstruction).all(dim=-1)
        if not finite.all():
            self.n_nonfinite += int((~finite).sum())
            x, reconstruction = x[finite], reconstruction[finite]
            sequences, positions = sequences[finite.to(sequences.device)], positions[finite.to(positions.device)]
        if x.shape[0] == 0:
            return
        x64 = x.double()
        self._squared_errors.append((reconstruction.double() - x64).pow(2).sum(dim=-1).cpu())
        self._sequences.append(sequences.long().cpu())
        self._positions.append(positions.long().cpu())
        batch_mean = x64.mean(dim=0)
        batch_m2 = (x64 - batch_mean).pow(2).sum().item()
        n_batch = x.shape[0]
        if self._mean is None:
            self._mean, self._m2 = batch_mean, batch_m2
        else:  # Chan et al.'s parallel merge of the sum of squared deviations
            n_total = self.n_tokens + n_batch
            delta = batch_mean - self._mean
            self._m2 += batch_m2 + delta.pow(2).sum().item() * self.n_tokens * n_batch / n_total
            self._mean = self._mean + delta * (n_batch / n_total)
        self.n_tokens += n_batch

    def error_norms(self) -> Tensor:
        """(n_tokens,) fp32 reconstruction-error norms, in the order the tokens were added."""
        return torch.cat(self._squared_errors).sqrt().float() if self._squared_errors else torch.zeros(0)

    def result(self, *, histogram_bins: int = 40, n_worst: int = 20) -> dict:
        """``error_norm`` and ``token_fvu`` summaries (mean, p50, p90, p99, max),
        ``error_norm_histogram`` (``edges``, ``tokens`` per bin, ``histogram_bins`` equal bins
        from 0 to the largest norm), ``worst_tokens``: the ``n_worst`` tokens of largest error,
        largest first, each ``{sequence, position, error_norm, fvu}``; ``n_tokens``;
        ``nonfinite_tokens_skipped`` (tokens with NaN or Inf, left out)."""
        if self.n_tokens == 0:
            raise ValueError(f"no tokens were evaluated: the batches were empty or non-finite ({self.n_nonfinite} non-finite)")
        if histogram_bins <= 0 or n_worst < 0:
            raise ValueError(f"histogram_bins={histogram_bins} must be positive and n_worst={n_worst} >= 0")
        squared = torch.cat(self._squared_errors)
        norms = squared.sqrt()
        variance_per_token = self._m2 / self.n_tokens
        token_fvu = squared / variance_per_token if variance_per_token > 0 else torch.full_like(squared, float("nan"))
        top = torch.topk(norms, min(n_worst, self.n_tokens)).indices
        sequences, positions = torch.cat(self._sequences), torch.cat(self._positions)
        worst = [
            {"sequence": int(sequences[i]), "position": int(positions[i]), "error_norm": norms[i].item(),
             "fvu": token_fvu[i].item()}
            for i in top.tolist()
        ]
        # An exact SAE has every norm at 0: the bins then span [0, 1] instead of an empty range.
        upper = norms.max().item() if norms.max().item() > 0 else 1.0
        counts, edges = torch.histogram(norms, bins=histogram_bins, range=(0.0, upper))
        return {
            "n_tokens": self.n_tokens,
            "nonfinite_tokens_skipped": self.n_nonfinite,
            "error_norm": _summary(norms),
            "token_fvu": _summary(token_fvu),
            "error_norm_histogram": {"edges": edges.tolist(), "tokens": counts.long().tolist()},
            "worst_tokens": worst,
        }
