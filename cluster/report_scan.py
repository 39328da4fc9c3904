"""The report's feature scan: which latents to show, and their top-activating held-out contexts.

``sample_features`` draws the latents (frequent, median and rare); ``scan_top_activations``
encodes held-out shards and keeps each sampled latent's largest activations with their rows'
provenance (the tokens each latent's decoder direction promotes through the unembedding are
``activation_cache.unembedding.logit_tokens``'s); ``feature_cards`` turns all of it into the
cards of ``cluster.report_cards``.
Torch here, no HTML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from activation_cache.schema import DecodedShard
from activation_cache.unembedding import LogitIds
from cluster.report_cards import Context, FeatureCard

Decode = Callable[[list[int]], list[str]]
"""Token ids -> one display string per id."""


def sparsity_frequencies(data: bytes) -> Tensor:
    """Firing frequencies from ``sparsity.safetensors`` (which holds log10(frequency + 1e-10))."""
    log10 = load_safetensors(data)["sparsity"].double()
    # A latent that never fired is stored as log10(1e-10) = -10; any real frequency over up to
    # 3e9 tokens is above 10**-9.5, so this threshold tells them apart despite float32 rounding.
    return torch.where(log10 > -9.5, 10.0**log10, torch.zeros_like(log10))


def sample_features(
    frequencies: Tensor | None, n_latents: int, n: int, *, seed: int
) -> list[tuple[int, str]]:
    """(latent, band) for up to ``n`` live latents: a third drawn from each of the most frequent,
    the middle and the rarest third of the live latents by firing frequency, most frequent first.
    Without frequencies, ``n`` latents drawn uniformly (band ``random``)."""
    generator = torch.Generator().manual_seed(seed)
    if frequencies is None:
        drawn = torch.randperm(n_latents, generator=generator)[:n].sort().values
        return [(int(i), "random") for i in drawn]
    live = (frequencies > 0).nonzero().flatten()
    order = live[frequencies[live].argsort(descending=True, stable=True)]
    chosen: list[tuple[int, str]] = []
    offset = 0
    for b, (band, members) in enumerate(zip(("frequent", "median", "rare"), order.tensor_split(3), strict=True)):
        quota = n // 3 + (1 if b < n % 3 else 0)
        # Positions in ``order`` sort the picks by frequency, highest first.
        positions = (torch.randperm(len(members), generator=generator)[:quota] + offset).sort().values
        chosen += [(int(order[i]), band) for i in positions]
        offset += len(members)
    return chosen


# --------------------------------------------------------------------------- the scan


@dataclass
class Scan:
    """What ``scan_top_activations`` found for each sampled feature."""

    features: list[int]
    values: Tensor
    """(n_examples, n_features) largest activations, descending; -inf where fewer rows were seen."""
    rows: int
    """Rows scanned."""
    row_ids: Tensor
    """(n_examples, n_features) the scanned-row index of each value."""
    fired: Tensor
    """(n_features,) rows each fired on (> 0)."""
    token_ids: np.ndarray
    sequence_ids: np.ndarray
    positions: np.ndarray
    """Provenance of every scanned row, by scanned-row index."""


class _TopActivations:
    """The running ``n_examples`` largest activations of each feature, with their row indices."""

    def __init__(self, n_examples: int, n_features: int) -> None:
        self.values = torch.full((n_examples, n_features), -math.inf)
        self.row_ids = torch.full((n_examples, n_features), -1, dtype=torch.int64)
        self.fired = torch.zeros(n_features, dtype=torch.int64)

    def add(self, acts: Tensor, finite_rows: Tensor, first_row: int) -> None:
        """Take (rows, n_features) activations of the rows numbered from ``first_row``."""
        # A row with NaN or Inf (a cache keeps them, counted) must not rank first: topk puts NaN on top.
        acts = acts.masked_fill(~(finite_rows[:, None] & ~acts.isnan()), -math.inf)
        self.fired += (acts > 0).sum(dim=0)
        ids = torch.arange(first_row, first_row + len(acts))[:, None].expand(-1, acts.shape[1])
        self.values, top = torch.cat([self.values, acts]).topk(len(self.values), dim=0)
        self.row_ids = torch.cat([self.row_ids, ids]).gather(0, top)


@torch.no_grad()
def scan_top_activations(
    sae: nn.Module, shards: Iterable[DecodedShard], features: Sequence[int], *, n_examples: int, max_tokens: int
) -> Scan:
    """Encode up to ``max_tokens`` rows of ``shards`` (raw activations; ``sae`` acts on raw
    activations, as ``load_dictionary`` gives it) and keep each feature's ``n_examples`` largest
    activations with their rows' provenance. For a transcoder the shards are its input
    hookpoint's: the contexts show what a feature reads."""
    index = torch.tensor(list(features), dtype=torch.int64)
    param = next(sae.parameters())
    top = _TopActivations(n_examples, len(index))
    provenance: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    # The encoder's (rows, n_latents) pre-activations take about 256 MB per chunk in float32.
    chunk_rows = max(64, min(4096, 2**26 // sae.n_latents))
    was_training, rows = sae.training, 0
    sae.eval()
    try:
        for shard in shards:
            take = min(len(shard.activations), max_tokens - rows)
            provenance.append((shard.token_ids[:take], shard.sequence_ids[:take], shard.positions[:take]))
            for start in range(0, take, chunk_rows):
                x = shard.activations[start : min(take, start + chunk_rows)]
                acts = _feature_activations(sae.encode(x.to(device=param.device, dtype=param.dtype)), index.to(param.device))
                top.add(acts, torch.isfinite(x).all(dim=-1).to(acts.device), rows + start)
            rows += take
            if rows >= max_tokens:
                break
    finally:
        sae.train(was_training)
    token_ids, sequence_ids, positions = (
        np.concatenate([p[i] for p in provenance]) if provenance else np.zeros(0, dtype=np.int64) for i in range(3)
    )
    return Scan(list(features), top.values, rows, top.row_ids, top.fired, token_ids, sequence_ids, positions)


def _feature_activations(code: Any, index: Tensor) -> Tensor:
    """(B, len(index)) float32 activations of the latents ``index`` from any architecture's
    ``encode`` (``trainer.sae.Code``): TopK's (B, k) values with indices, or a dense
    architecture's (B, n_latents)."""
    if code.indices is None:
        return code.acts[:, index].float().cpu()
    hit = code.indices.unsqueeze(-1) == index  # (B, k, n_features)
    return (code.acts.float().unsqueeze(-1) * hit).sum(dim=1).cpu()


# --------------------------------------------------------------------------- the cards


def feature_cards(
    features: list[tuple[int, str]],
    frequencies: Tensor | None,
    scan: Scan,
    logit_ids: list[LogitIds] | None,
    *,
    decode: Decode,
    before: int,
    after: int,
) -> list[FeatureCard]:
    """The cards of the sampled features, with their contexts and logit tokens decoded."""
    windows = _SequenceIndex(scan)
    examples = []
    for j in range(len(features)):
        found = [(float(v), int(r)) for v, r in zip(scan.values[:, j], scan.row_ids[:, j], strict=True) if v > 0]
        examples.append([(v, r, *windows.window(r, before, after)) for v, r in found])
    needed = {t for found in examples for _, _, ids, *_ in found for t in ids}
    for promoted, suppressed in logit_ids or []:
        needed.update(promoted[0] + suppressed[0])
    text = _decode_once(needed, decode)
    cards = []
    for j, (feature, band) in enumerate(features):
        contexts = [
            Context([text[t] for t in ids], hit, v, int(scan.sequence_ids[r]), int(scan.positions[r]), more_b, more_a)
            for v, r, ids, hit, more_b, more_a in examples[j]
        ]
        promoted, suppressed = logit_ids[j] if logit_ids else (([], []), ([], []))
        cards.append(FeatureCard(
            index=feature, band=band, frequency=None if frequencies is None else float(frequencies[feature]),
            fired=int(scan.fired[j]), max_activation=contexts[0].activation if contexts else 0.0, contexts=contexts,
            promoted=[(text[t], v) for t, v in zip(*promoted, strict=True)],
            suppressed=[(text[t], v) for t, v in zip(*suppressed, strict=True)],
        ))
    return cards


def _decode_once(ids: set[int], decode: Decode) -> dict[int, str]:
    """Each distinct token id decoded once, in one call, in id order."""
    ordered = sorted(ids)
    return dict(zip(ordered, decode(ordered), strict=True)) if ordered else {}


class _SequenceIndex:
    """The scanned rows sorted by (sequence, position), to cut a window around any row."""

    def __init__(self, scan: Scan) -> None:
        self._span = int(scan.positions.max()) + 1 if len(scan.positions) else 1
        keys = scan.sequence_ids.astype(np.int64) * self._span + scan.positions.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys, self._tokens = keys[order], scan.token_ids[order]
        self._scan = scan

    def window(self, row: int, before: int, after: int) -> tuple[list[int], int, bool, bool]:
        """(token ids from ``before`` to ``after`` positions around ``row``, index of ``row``'s
        token among them, whether the sequence goes on before / after the window)."""
        base = int(self._scan.sequence_ids[row]) * self._span
        position = int(self._scan.positions[row])
        def index(key: int, side: str) -> int:
            return int(np.searchsorted(self._keys, key, side=side))

        lo, hi = index(base + max(position - before, 0), "left"), index(base + min(position + after, self._span - 1), "right")
        first, last = index(base, "left"), index(base + self._span - 1, "right")
        return [int(t) for t in self._tokens[lo:hi]], index(base + position, "left") - lo, first < lo, last > hi
