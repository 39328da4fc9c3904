"""The report's feature cards as data: what ``report_features.json`` holds.

The scan (``cluster.report_scan``) makes them; the page (``cluster.report_html``) draws them, and
draws them again from the file alone when ``eval.json`` changes. No torch here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Context:
    """One top-activating token and its neighbours in the same sequence."""

    tokens: list[str]
    """Decoded tokens in position order (tokens excluded from the cache, like BOS, are absent)."""
    hit: int
    """Index in ``tokens`` of the activating token."""
    activation: float
    sequence_id: int
    position: int
    more_before: bool
    """The sequence has cached tokens before the first one shown."""
    more_after: bool


@dataclass(frozen=True)
class FeatureCard:
    """What the report shows of one latent."""

    index: int
    band: str
    """Which part of the sample it came from: ``frequent``, ``median``, ``rare`` or ``random``."""
    frequency: float | None
    """Held-out firing frequency from ``sparsity.safetensors``; None without that file."""
    fired: int
    """Tokens it fired on among those scanned for contexts."""
    max_activation: float
    contexts: list[Context]
    promoted: list[tuple[str, float]] = field(default_factory=list)
    """(token, logit per unit activation), highest first; empty without an unembedding."""
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    """The most negative ones, lowest first."""


@dataclass(frozen=True)
class FeatureSample:
    """The feature cards and how they were made: ``report_features.json``."""

    cards: list[FeatureCard]
    rows_scanned: int
    """Held-out rows the contexts were searched in."""
    logits_note: str
    """How the promoted tokens were computed, or why they are unavailable."""
    has_logits: bool
    seed: int

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FeatureSample:
        raw = json.loads(data)
        cards = [
            FeatureCard(**{**card, "contexts": [Context(**c) for c in card["contexts"]],
                           "promoted": [tuple(t) for t in card["promoted"]],
                           "suppressed": [tuple(t) for t in card["suppressed"]]})
            for card in raw.pop("cards")
        ]
        return cls(cards=cards, **raw)
