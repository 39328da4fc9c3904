"""The steer audit: whether a steer moved the model or only the dashboard, and how much of a
suppressed feature's effect leaks past it through what the dictionary does not explain.

    from interp import open_observer
    from interp.audit import audit, audit_text, format_audit
    from interp.steering import Steerer

    steerer = Steerer(open_observer("store/runs/<run>/dictionary/model.layers.15"))
    text = audit_text(steerer.observer)                      # held-out text of the run
    result = audit(steerer, steerer.edit([1205], "10x"), text.tokens, text_source=text.source)
    print(format_audit(result))

Every figure is measured on the audit text (``tokens``: n_sequences x context token ids), each
variant of the hookpoint's activation run through the rest of the model against the unedited run.
A variant edits every position the dictionary encodes (BOS and the other tokens the training left
out keep their activations); it is measured at the *measured positions*: every encoded position
for an amplification, the positions where the feature fires on the unedited text for a
suppression (a clamp or scale to 0, where only those positions change).

The *targets* are the tokens the feature's decoder direction promotes most through the
unembedding (``activation_cache.unembedding.logit_tokens``, special tokens left out), or the
tokens given. The *target log-probability* at a position is ``log sum_{t in targets} p(t)`` of the
next-token distribution there, averaged over the measured positions; its *change* is the variant's
minus the unedited model's; the *KL* is the mean ``KL(unedited || variant)`` in nats.

Result fields (stable: the HTML page and the report draw them):

``AuditResult``: ``dictionary``, ``hookpoint``, ``model``, ``text_source``, ``n_sequences``,
``n_encoded_tokens``, ``seeds``, ``control_seed``, ``features`` (one ``FeatureAudit`` per edited
feature, each audited alone), ``cost`` (``Cost``), ``notes``.

``FeatureAudit``: ``feature``, ``kind`` (``amplify`` | ``suppress``), ``mode``, ``error_term``,
``value`` (raw units), ``targets`` (``Target``: ``token_id``, ``token``, ``logit`` per unit of
activation through the unembedding or None for a given one), ``targets_source`` (``promoted`` |
``given``), ``n_positions`` (measured), ``unedited`` (``Behaviour`` of the unedited model: its
target log-probability and probability; change and KL 0), ``dashboard`` (``Dashboard``),
``steered`` and ``control`` (``Behaviour``), ``continuations`` (``Continuations`` or None),
``leak`` (``Leak`` or None), ``dose_response`` (``DoseResponse`` or None), ``summary`` (one sentence).

``Dashboard``: ``feature_before`` (mean activation of the feature on the unedited activations at
the measured positions), ``feature_set`` (mean value the edit sets), ``feature_read_back`` (mean
activation of the feature when the edited activation is encoded again).

``Behaviour``: ``target_logprob``, ``target_logprob_change``, ``target_probability`` (mean
``sum_{t in targets} p(t)``), ``target_probability_change``, ``kl_divergence``.

``Continuations`` (sampled from ``prompts`` with each seed, unedited and steered): ``seeds``,
``n_prompts``, ``max_new_tokens``, ``unedited_target_rate`` / ``steered_target_rate`` (share of
continuations holding a target token), ``unedited_target_share`` / ``steered_target_share``
(target tokens per generated token), ``unedited_coherence`` / ``steered_coherence`` (the unedited
model's mean loss in nats per token on the continuations), ``examples`` (``Example``: ``prompt``,
``unedited``, ``steered``: the first seed's texts).

``Leak`` (suppressions): ``projected_drop`` (A: the drop in target log-probability when the unit
decoder direction ``u`` is projected out of the whole activation, ``x - (x.u) u``),
``zeroed_drop`` (B: the feature zeroed with the error term kept), ``leak`` ((A - B) / A; None when
A <= 0: the direction does not carry the targets), ``reconstruction_drop`` (the activation replaced
by the dictionary's reconstruction), all at the positions where the feature fires.

``DoseResponse`` (amplifications): ``unit`` (``held-out maximum``: the feature's largest held-out
activation the training recorded; ``audit-text maximum``: its largest activation on the audit
text, where none is recorded), ``unit_value``, ``points`` (``DosePoint``: ``multiple``, ``value``,
``target_logprob``, ``target_logprob_change``, ``kl_divergence``, ``coherence``, the feature
clamped to ``multiple * unit_value`` at every encoded position).

``Cost``: ``forward_passes`` (calls of the model that run past the hookpoint: one per batch of
the audit text per variant, one per generation step, one per continuation scored),
``text_passes`` (variants run over the whole audit text, the unedited one included),
``text_tokens`` (tokens per such pass), ``generated_tokens``, ``tokens_past_hookpoint`` (positions
run past the hookpoint in all), ``text_pass_equivalents`` (that over ``text_tokens``: the cost in
forward passes over the audit text).

Numbers are finite floats or None (JSON null), never NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "AuditResult",
    "Behaviour",
    "Continuations",
    "Cost",
    "Dashboard",
    "DosePoint",
    "DoseResponse",
    "Example",
    "FeatureAudit",
    "Leak",
    "Target",
]

Kind = Literal["amplify", "suppress"]
DOSES: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)
"""Multiples of the feature's maximum activation the dose-response clamps it to."""


@dataclass(frozen=True)
class Target:
    token_id: int
    token: str
    """The token alone, decoded."""
    logit: float | None
    """``W_U[token] . W_dec[feature]``: logits per unit of activation through the unembedding
    (a logit lens skipping the layers after the hookpoint); None for a given target."""


@dataclass(frozen=True)
class Dashboard:
    """What a dashboard shows for the feature at the measured positions (means)."""

    feature_before: float
    """The feature's activation on the unedited activation."""
    feature_set: float
    """The value the edit sets (``f'``)."""
    feature_read_back: float
    """The feature's activation when the edited activation is encoded again."""


@dataclass(frozen=True)
class Behaviour:
    """The next-token distribution at the measured positions under one variant (means)."""

    target_logprob: float
    """``log sum_{t in targets} p(t)``."""
    target_logprob_change: float
    """Minus the unedited model's."""
    target_probability: float
    """``sum_{t in targets} p(t)``."""
    target_probability_change: float
    kl_divergence: float
    """``KL(unedited || variant)`` in nats."""


@dataclass(frozen=True)
class Example:
    prompt: str
    unedited: str
    steered: str


@dataclass(frozen=True)
class Continuations:
    """Sampled continuations of the prompts, one per seed, unedited and steered."""

    seeds: list[int]
    n_prompts: int
    max_new_tokens: int
    unedited_target_rate: float
    """Share of the unedited continuations holding at least one target token."""
    steered_target_rate: float
    unedited_target_share: float
    """Target tokens per generated token, unedited."""
    steered_target_share: float
    unedited_coherence: float
    """The unedited model's mean loss (nats per token) on the unedited continuations."""
    steered_coherence: float
    """The unedited model's mean loss on the steered continuations."""
    examples: list[Example]


@dataclass(frozen=True)
class Leak:
    """A suppression's leak, at the positions where the feature fires."""

    projected_drop: float
    """A: drop in target log-probability with the decoder direction projected out of the whole activation."""
    zeroed_drop: float
    """B: drop with the feature zeroed, the error term kept."""
    leak: float | None
    """(A - B) / A; None when A <= 0 (the direction does not carry the targets)."""
    reconstruction_drop: float
    """Drop with the activation replaced by the dictionary's reconstruction."""


@dataclass(frozen=True)
class DosePoint:
    multiple: float
    value: float
    """The clamp value in raw units: ``multiple * unit_value``."""
    target_logprob: float
    target_logprob_change: float
    kl_divergence: float
    coherence: float | None
    """The unedited model's mean loss on the continuations steered at this dose; None without prompts."""


@dataclass(frozen=True)
class DoseResponse:
    unit: Literal["held-out maximum", "audit-text maximum"]
    unit_value: float
    points: list[DosePoint]


@dataclass(frozen=True)
class FeatureAudit:
    feature: int
    kind: Kind
    mode: str
    error_term: str
    value: float
    targets: list[Target]
    targets_source: Literal["promoted", "given"]
    n_positions: int
    """Measured positions: every encoded one (amplify), those where the feature fires (suppress)."""
    unedited: Behaviour
    dashboard: Dashboard
    steered: Behaviour
    control: Behaviour
    """The same edit along a random direction orthogonal to the feature's, of equal norm."""
    continuations: Continuations | None
    leak: Leak | None
    dose_response: DoseResponse | None
    summary: str


@dataclass(frozen=True)
class Cost:
    forward_passes: int
    text_passes: int
    text_tokens: int
    generated_tokens: int
    tokens_past_hookpoint: int
    text_pass_equivalents: float


@dataclass(frozen=True)
class AuditResult:
    dictionary: str
    hookpoint: str
    model: str
    text_source: str
    n_sequences: int
    n_encoded_tokens: int
    seeds: list[int]
    control_seed: int
    features: list[FeatureAudit]
    cost: Cost
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; NaN or infinity (none should occur) become None."""
        return _finite(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
