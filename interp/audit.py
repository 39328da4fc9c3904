"""The steer audit: whether a steer moved the model or only the dashboard, and how much of a
suppressed feature's effect leaks past it through what the dictionary does not explain.

    from interp import open_observer
    from interp.audit import audit, audit_text
    from interp.terminal import format_audit
    from interp.steering import Steerer

    steerer = Steerer(open_observer("store/runs/<run>/dictionary/model.layers.15"))
    text = audit_text(steerer.observer)                      # held-out text of the run
    result = audit(steerer, steerer.edit([1205], "10x"), text)
    print(format_audit(result))

Every figure is measured on the audit text (n_sequences x context token ids), each
variant of the hookpoint's activation run through the rest of the model against the unedited run.
For a transcoder, "the activation" below is its target's (where it writes, e.g. an MLP's output):
its features are encoded from its input in the same pass, and every variant rewrites the target
(``interp.steering.rewritten``); the dashboard's read-back is then the feature encoded from the
input of the edited pass, which the edit, downstream of it, does not change (a note says so).
For a cross-layer transcoder, "the activation" is every covered MLP output the feature writes to
(layer ``l``'s feature: the outputs of layers ``l`` and later), each variant rewriting them in the
order the pass runs them, the features encoded from each layer's input of the same pass
(``interp.cross_layer``); its default targets are the tokens its decoder rows *summed* over the
outputs it writes to promote (each output is added to the residual stream, so the sum is what
it writes there in all), its control direction is drawn in those outputs alone, and "projected
out of the whole activation" is done output by output (each output minus its projection on the
feature's decoder row there: a projection over all outputs at once would need the later ones
before the earlier are written).
A variant edits every position the dictionary encodes (BOS and the other tokens the training left
out keep their activations); it is measured at the *measured positions*: every encoded position
for an amplification, the positions where the feature fires on the unedited text for a
suppression (a clamp or scale to 0, where only those positions change).

The *targets* are the tokens the feature's decoder direction promotes most through the
unembedding (``activation_cache.unembedding.logit_tokens``, special tokens left out; only where the
dictionary writes vectors of the model's hidden size, else the targets must be given), or the
tokens given. The *target log-probability* at a position is ``log sum_{t in targets} p(t)`` of the
next-token distribution there, averaged over the measured positions; its *change* is the variant's
minus the unedited model's; the *KL* is the mean ``KL(unedited || variant)`` in nats.

Result fields (stable: the HTML page and the report draw them):

``AuditResult``: ``dictionary``, ``hookpoint``, ``model``, ``text_source``, ``n_sequences``,
``n_encoded_tokens``, ``seeds``, ``control_seed``, ``features`` (one ``FeatureAudit`` per edited
feature, each audited alone), ``cost`` (``Cost``), ``notes``, ``hookpoint_out`` (where a
transcoder writes; None for an SAE).

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
the audit text per variant, one per generation step, one per batch of continuations scored),
``text_passes`` (variants run over the whole audit text, the unedited one included),
``text_tokens`` (tokens per such pass), ``generated_tokens``, ``tokens_past_hookpoint`` (positions
run past the hookpoint in all), ``text_pass_equivalents`` (that over ``text_tokens``: the cost in
forward passes over the audit text).

Numbers are finite floats or None (JSON null), never NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from activation_cache.config import CacheConfig, DataConfig
from activation_cache.eval_text import EvalText, held_out_text, text_source
from activation_cache.text import pack_sequences, token_decoder
from activation_cache.unembedding import logit_tokens, unembedding_of
from interp.cross_layer import (
    LayerRewrite,
    decoder_directions,
    feature_layer,
    is_cross_layer,
    layer_pass,
    layer_slices,
    layer_width_out,
    summed_decoder_rows,
)
from interp.observe import Observer
from interp.steering import (
    FeatureEdit,
    GenerationSettings,
    Steerer,
    edit_activations,
    edit_rewrite,
    feature_activations,
    rewritten,
)
from trainer.config import TrainConfig
from trainer.evaluation import kl_divergence, spliced_positions

__all__ = [
    "DOSES",
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
    "audit",
    "audit_text",
    "choose_features",
    "firing_counts",
    "logit_lens_refusal",
    "resolve_targets",
    "target_standout",
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
    hookpoint_out: str | None = None
    """Where a transcoder writes (its features read at ``hookpoint``); None for an SAE."""
    layer_hookpoints: list[tuple[str, str]] | None = None
    """A cross-layer transcoder's (input, output) hookpoints per covered layer; None otherwise."""

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


# --------------------------------------------------------------------------- text and targets


def audit_text(observer: Observer, *, text: str | None = None, max_tokens: int = 4096) -> EvalText:
    """The text to audit on: the held-out sequences of the dictionary's run (as its spliced
    evaluation reads them), or ``text`` (a file, folder or ``packaged:...`` source, packed as the
    run packs its text), the first ``max_tokens`` of it in whole sequences (at least one)."""
    data = _run_data(observer)
    if text is not None:
        return text_source(data, text, max_tokens, observer.tokenizer)
    run = observer.folder.run_config
    if run is None:
        raise ValueError(f"{observer.folder.uri}: no run config beside the dictionary to find its held-out text; "
                         "give the text with --text")
    cache, train = run.get("cache") or {}, run.get("train") or {}
    return held_out_text(
        pack_sequences(data, observer.tokenizer),
        sequences_per_shard=int(cache.get("sequences_per_shard", CacheConfig.sequences_per_shard)),
        holdout_fraction=float(train.get("holdout_fraction", TrainConfig.holdout_fraction)),
        max_tokens=max_tokens, excluded=frozenset(observer.excluded), source=data.source,
    )


def _run_data(observer: Observer) -> DataConfig:
    """The run's whole data section (its source too), else the text settings the dictionary records."""
    run = observer.folder.run_config
    if run is not None and "data" in run:
        data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), run["data"]))
        assert isinstance(data, DataConfig)
        return data
    return observer.folder.data_config()


def resolve_targets(observer: Observer, targets: Sequence[str | int]) -> list[int]:
    """Token ids of the given targets: an int is a token id, a string must be one token (checked
    before the model loads; one line naming how it tokenizes otherwise)."""
    if not targets:
        raise ValueError("--target: no target given (leave it out to use the tokens the feature promotes)")
    ids = []
    for target in targets:
        if isinstance(target, int):
            if not 0 <= target < len(observer.tokenizer):
                raise ValueError(f"target token id {target}: the tokenizer has ids 0..{len(observer.tokenizer) - 1}")
            ids.append(target)
            continue
        found = observer.tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(found) != 1:
            pieces = observer.tokenizer.convert_ids_to_tokens(found)
            raise ValueError(f"--target {target!r}: tokenizes to {len(found)} tokens {pieces}; a target is one "
                             "token (a word often needs its leading space, ' Paris')")
        ids.append(found[0])
    return list(dict.fromkeys(ids))


def _promoted(observer: Observer, unembedding: Tensor, feature: int, n: int) -> list[Target]:
    """The ``n`` tokens the feature's decoder direction promotes most, special tokens left out."""
    skip = set(observer.excluded) | set(observer.tokenizer.all_special_ids)
    rows = summed_decoder_rows(observer.sae, [feature])
    [((ids, logits), _)] = logit_tokens(rows, unembedding, [0], n + len(skip))
    kept = [(i, v) for i, v in zip(ids, logits, strict=True) if i not in skip][:n]
    texts = token_decoder(observer.tokenizer)([i for i, _ in kept])
    return [Target(i, t, v) for (i, v), t in zip(kept, texts, strict=True)]


def logit_lens_refusal(observer: Observer) -> str | None:
    """Why the tokens a feature promotes cannot be read through the unembedding (one line), or None:
    the decoder rows must be vectors of the model's hidden size (an SAE or transcoder writing to the
    residual stream, an attention or MLP output), not, say, an MLP's neurons."""
    hidden = observer.hidden_size
    d_out = layer_width_out(observer.sae)
    if hidden is None or d_out == hidden:
        return None
    return (f"{observer.folder.uri}: the logit lens does not apply: the dictionary writes d_out={d_out} at "
            f"{observer.output_hookpoint}, the unembedding reads the model's hidden size {hidden}; "
            "give the targets with --target")


def _unembedding(observer: Observer) -> Tensor:
    refusal = logit_lens_refusal(observer)
    if refusal is not None:
        raise ValueError(refusal)
    weight, note = unembedding_of(observer.harvester().model)
    if weight is None:
        raise ValueError(f"{note}: the audit's default targets are the tokens a feature promotes through it; "
                         "give the targets with --target")
    return weight


def firing_counts(observer: Observer, tokens: Tensor | np.ndarray) -> tuple[Tensor, int]:
    """(n_latents,) how many of the encoded positions of ``tokens`` each latent fires on, and how
    many encoded positions there are."""
    rows = _feature_rows(observer, torch.as_tensor(np.asarray(tokens), dtype=torch.long), None)
    counts = torch.zeros(observer.folder.n_latents)
    with torch.inference_mode():
        for part in rows.split(1024):
            code = observer.sae.encode(part)
            if code.indices is None:
                counts += (code.acts > 0).sum(dim=0).float().cpu()
            else:
                counts.index_add_(0, code.indices[code.acts > 0].cpu(), torch.ones(int((code.acts > 0).sum())))
    return counts, len(rows)


def target_standout(observer: Observer, features: Sequence[int], *, n_targets: int = 5) -> Tensor:
    """(len(features),) how clearly each feature promotes tokens: the mean logit of its top
    ``n_targets`` promoted tokens through the unembedding (special and excluded tokens left out),
    in standard deviations of all the vocabulary's logits above its mean."""
    unembedding = _unembedding(observer)
    skip = sorted(set(observer.excluded) | set(observer.tokenizer.all_special_ids))
    scores = []
    with torch.inference_mode():
        for part in torch.as_tensor(list(features), dtype=torch.long).split(256):
            logits = summed_decoder_rows(observer.sae, part.tolist()).detach().float().cpu() @ unembedding.T
            mean, std = logits.mean(dim=1), logits.std(dim=1)
            logits[:, skip] = -math.inf
            top = logits.topk(min(n_targets, logits.shape[1]), dim=1).values.mean(dim=1)
            scores.append((top - mean) / std.clamp_min(1e-12))
    return torch.cat(scores) if scores else torch.zeros(0)


def choose_features(observer: Observer, tokens: Tensor | np.ndarray, *, n: int = 1, n_targets: int = 5,
                    min_frequency: float = 0.005, max_frequency: float = 0.3) -> list[int]:
    """Up to ``n`` live features with clear promoted tokens, best first: among the features that fire
    on between ``min_frequency`` and ``max_frequency`` of the encoded tokens of ``tokens`` (and on
    held-out text, where the dictionary records its features' maxima), those whose promoted tokens
    stand furthest out of the vocabulary (``target_standout``)."""
    counts, n_rows = firing_counts(observer, tokens)
    frequency = counts / max(1, n_rows)
    alive = (frequency >= min_frequency) & (frequency <= max_frequency)
    if observer.folder.feature_max is not None:  # never fired on held-out text: no unit for "10x"
        alive &= observer.folder.feature_max.cpu() > 0
    live = torch.nonzero(alive).flatten()
    if len(live) == 0:
        return []
    order = target_standout(observer, live.tolist(), n_targets=n_targets).argsort(descending=True)
    return live[order[:n]].tolist()


# --------------------------------------------------------------------------- the hookpoint


def _batches(tokens: Tensor, batch_tokens: int) -> list[slice]:
    size = max(1, batch_tokens // tokens.shape[1])
    return [slice(lo, lo + size) for lo in range(0, len(tokens), size)]


def _encoded(observer: Observer, tokens: Tensor) -> Tensor:
    return spliced_positions(tokens, observer.excluded)


def _sae_rows(observer: Observer, acts: Tensor) -> Tensor:
    param = next(observer.sae.parameters())
    return acts.to(device=param.device, dtype=param.dtype)


@torch.inference_mode()
def _feature_rows(observer: Observer, tokens: Tensor, batch: slice | None, batch_tokens: int = 2048) -> Tensor:
    """The activations the dictionary reads (a transcoder's input; a cross-layer transcoder's
    inputs side by side) at the encoded positions of ``tokens`` (all of them, or one batch of
    sequences), in the dictionary's dtype: the forward stops at the (last) input hookpoint."""
    parts = []
    for part in [batch] if batch is not None else _batches(tokens, batch_tokens):
        acts = observer.feature_inputs(tokens[part])
        parts.append(_sae_rows(observer, acts[_encoded(observer, tokens[part]).to(acts.device)]))
    return torch.cat(parts)


# --------------------------------------------------------------------------- variants

RowEdit = LayerRewrite
"""(j, x, y) -> y': at the encoded positions, the rows the dictionary reads (rows, d_in) and those it
reconstructs (rows, d_out; for an SAE the same rows) -> the variant's rows of the latter; ``j`` the
covered layer of a cross-layer transcoder (each in turn, in one pass), 0 otherwise."""


@dataclass
class _Sums:
    """Running sums of one variant's figures over its measured positions."""

    target_logprob: float = 0.0
    target_probability: float = 0.0
    kl: float = 0.0
    count: int = 0

    def add(self, target_logprob: Tensor, kl: Tensor | None) -> None:
        self.target_logprob += float(target_logprob.double().sum())
        self.target_probability += float(target_logprob.double().exp().sum())
        self.kl += 0.0 if kl is None else float(kl.double().sum())
        self.count += target_logprob.numel()

    def behaviour(self, unedited: _Sums) -> Behaviour:
        n = max(1, self.count)
        lp, p = self.target_logprob / n, self.target_probability / n
        lp0, p0 = unedited.target_logprob / n, unedited.target_probability / n
        return Behaviour(lp, lp - lp0, p, p - p0, self.kl / n)


@dataclass
class _Variant:
    name: str
    feature: int
    edit_rows: RowEdit
    measured: Literal["all", "firing"]
    sums: _Sums = field(default_factory=_Sums)


def _orthogonal_direction(direction: Tensor, seed: int, support: Tensor | None = None) -> Tensor:
    """A random direction orthogonal to ``direction``, of its norm (seeded; float64 arithmetic),
    zero outside ``support`` (bool, the entries it may use) where given."""
    generator = torch.Generator().manual_seed(seed)
    d = direction.detach().double().cpu()
    r = torch.randn(d.shape, generator=generator, dtype=torch.float64)
    if support is not None:
        r = r * support.cpu()
    unit = d / d.norm()
    r = r - (r @ unit) * unit
    return (r / r.norm() * d.norm()).to(dtype=direction.dtype, device=direction.device)


def _along(sae: nn.Module, edit: FeatureEdit, direction: Tensor) -> RowEdit:
    """``edit`` (one feature) with its change written along ``direction`` (flat over the outputs the
    dictionary writes, ``interp.cross_layer.decoder_directions``) instead of its decoder."""
    passing, slices = layer_pass(sae), layer_slices(sae)

    def rows_edit(layer: int, x: Tensor, y: Tensor) -> Tensor:
        passing.read(layer, x)
        f = passing.features(edit.features)
        base = y if edit.error_term == "keep" else passing.prediction(layer)
        return base + (edit.edited(f) - f) @ direction[None, slices[layer]]

    return rows_edit


def _where_firing(sae: nn.Module, feature: int, replace: RowEdit) -> RowEdit:
    """``replace`` at the rows where ``feature`` fires, the rows unchanged elsewhere (and in the
    outputs of a cross-layer transcoder's layers before the feature's, which it does not write)."""
    passing, first = layer_pass(sae), feature_layer(sae, feature)

    def rows_edit(layer: int, x: Tensor, y: Tensor) -> Tensor:
        new = replace(layer, x, y)  # every layer, so that a CLT's replacement keeps its pass
        passing.read(layer, x)
        if layer < first:
            return y
        return torch.where(passing.features([feature]) > 0, new, y)

    return rows_edit


def _projected_out(sae: nn.Module, direction: Tensor) -> RowEdit:
    """Each output minus its projection on the feature's decoder row there (its unit direction
    for an SAE or transcoder); an output the feature does not write is left alone."""
    slices = layer_slices(sae)

    def rows_edit(layer: int, x: Tensor, y: Tensor) -> Tensor:
        part = direction[slices[layer]]
        if not bool(part.any()):
            return y
        unit = part / part.norm()
        return y - (y @ unit)[:, None] * unit

    return rows_edit


def _reconstructed(sae: nn.Module) -> RowEdit:
    passing = layer_pass(sae)

    def rows_edit(layer: int, x: Tensor, y: Tensor) -> Tensor:
        passing.read(layer, x)
        return passing.prediction(layer)

    return rows_edit


# --------------------------------------------------------------------------- cost


@dataclass
class _Counter:
    text_tokens: int
    forward_passes: int = 0
    text_passes: int = 0
    generated_tokens: int = 0
    tokens_past_hookpoint: int = 0

    def cost(self) -> Cost:
        return Cost(self.forward_passes, self.text_passes, self.text_tokens, self.generated_tokens,
                    self.tokens_past_hookpoint, self.tokens_past_hookpoint / max(1, self.text_tokens))


# --------------------------------------------------------------------------- the audit


@dataclass
class _Plan:
    """What the audit measures for one feature of the edit."""

    feature: int
    edit: FeatureEdit
    kind: Kind
    targets: list[Target]
    targets_source: Literal["promoted", "given"]
    activation: Tensor
    """(n_sequences, context) the feature's activation on the unedited text, 0 where not encoded."""
    dashboard: Tensor
    """(n_sequences, context, 2): the value the edit sets and the feature's read-back."""
    variants: list[_Variant] = field(default_factory=list)
    unedited: dict[str, _Sums] = field(default_factory=lambda: {"all": _Sums(), "firing": _Sums()})
    dose_unit: tuple[str, float] | None = None


def _kind(edit: FeatureEdit) -> Kind:
    return "suppress" if edit.mode in ("clamp", "scale") and edit.values[0] == 0 else "amplify"


@torch.inference_mode()
def _prepass(observer: Observer, tokens: Tensor, encoded: Tensor, edits: list[FeatureEdit],
             batches: list[slice]) -> tuple[Tensor, Tensor]:
    """Per edited feature, its activation, the value its edit sets and the read-back, at every
    position: (n_features, n_sequences, context) and (n_features, n_sequences, context, 2)."""
    sae = observer.sae
    m = len(edits)
    activation = torch.zeros(m, *tokens.shape)
    dashboard = torch.zeros(m, *tokens.shape, 2)
    for batch in batches:
        rows = _feature_rows(observer, tokens, batch)
        mask = encoded[batch]
        for j, edit in enumerate(edits):
            f, _ = feature_activations(sae, rows, edit.features)
            # A transcoder's edit is written downstream of the input its features are read from.
            read_from = rows if observer.hookpoint_out is not None else edit_activations(sae, rows, edit)
            read_back, _ = feature_activations(sae, read_from, edit.features)
            activation[j][batch][mask] = f[:, 0].float().cpu()
            dashboard[j][batch][mask] = torch.stack([edit.edited(f)[:, 0], read_back[:, 0]], dim=-1).float().cpu()
    return activation, dashboard


def _plan_variants(plan: _Plan, observer: Observer, *, leak: bool, doses: Sequence[float], control_seed: int) -> None:
    sae, edit, feature = observer.sae, plan.edit, plan.feature
    direction = decoder_directions(sae, [feature]).detach()[0]
    written = None  # a CLT feature's control stays in the outputs it writes to
    if is_cross_layer(sae):
        written = torch.zeros_like(direction, dtype=torch.bool)
        written[layer_slices(sae)[feature_layer(sae, feature)].start:] = True
    control = _orthogonal_direction(direction, control_seed, written)
    measured: Literal["all", "firing"] = "firing" if plan.kind == "suppress" else "all"
    plan.variants += [
        _Variant("steered", feature, edit_rewrite(sae, edit), measured),
        _Variant("control", feature, _along(sae, edit, control), measured),
    ]
    if leak:
        zero = FeatureEdit(edit.features, (0.0,), "clamp", "keep")
        plan.variants += [
            _Variant("projected", feature, _where_firing(sae, feature, _projected_out(sae, direction)), "firing"),
            _Variant("zeroed", feature, edit_rewrite(sae, zero), "firing"),
            _Variant("reconstruction", feature, _where_firing(sae, feature, _reconstructed(sae)), "firing"),
        ]
    if plan.dose_unit is not None:
        for multiple in doses:
            dose = FeatureEdit(edit.features, (multiple * plan.dose_unit[1],), "clamp", edit.error_term)
            plan.variants.append(_Variant(f"dose:{multiple}", feature, edit_rewrite(sae, dose), "all"))


@torch.inference_mode()
def _logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    return torch.log_softmax(model(ids).logits.float(), dim=-1)


@torch.inference_mode()
def _text_passes(steerer: Steerer, tokens: Tensor, encoded: Tensor, plans: list[_Plan], batches: list[slice],
                 counter: _Counter) -> None:
    """Every plan's variants over the text, batch by batch, against the unedited run."""
    observer, model = steerer.observer, steerer.model
    device = model.get_input_embeddings().weight.device
    counter.text_passes = 1 + sum(len(p.variants) for p in plans)
    for batch in batches:
        ids = tokens[batch].to(device)
        mask = encoded[batch].to(device)
        clean = _logprobs(model, ids)
        positions = {plan.feature: {"all": mask, "firing": mask & (plan.activation[batch] > 0).to(device)}
                     for plan in plans}
        for plan in plans:
            target_ids = [t.token_id for t in plan.targets]
            for name, where in positions[plan.feature].items():
                plan.unedited[name].add(clean[where][:, target_ids].logsumexp(dim=-1), None)
            for variant in plan.variants:
                where = positions[plan.feature][variant.measured]
                with rewritten(observer, _replacing(observer, mask, variant.edit_rows)):
                    edited = _logprobs(model, ids)
                variant.sums.add(edited[where][:, target_ids].logsumexp(dim=-1), kl_divergence(clean[where], edited[where]))
        counter.forward_passes += counter.text_passes
        counter.tokens_past_hookpoint += counter.text_passes * ids.numel()


def _replacing(observer: Observer, mask: Tensor, edit_rows: RowEdit) -> LayerRewrite:
    def replace(layer: int, x: Tensor, y: Tensor) -> Tensor:
        out = y.clone()
        out[mask] = edit_rows(layer, _sae_rows(observer, x[mask.to(x.device)]),
                              _sae_rows(observer, y[mask])).to(y.dtype)
        return out

    return replace


# --------------------------------------------------------------------------- continuations


@dataclass
class _Generated:
    prompt: list[int]
    new: list[int]


def _generate(steerer: Steerer, prompts: list[list[int]], seeds: list[int], edit: FeatureEdit | None,
              max_new_tokens: int, counter: _Counter) -> list[_Generated]:
    out = []
    for prompt in prompts:
        for seed in seeds:
            new, _ = steerer.generate(prompt, edit, GenerationSettings(max_new_tokens, seed))
            counter.forward_passes += len(new)
            counter.generated_tokens += len(new)
            counter.tokens_past_hookpoint += len(prompt) + max(0, len(new) - 1)
            out.append(_Generated(prompt, new))
    return out


@torch.inference_mode()
def _coherence(model: nn.Module, generated: list[_Generated], counter: _Counter, batch_tokens: int) -> float | None:
    """The unedited model's mean loss (nats per token) on the generated tokens, after their prompts;
    the continuations scored together, right-padded (a causal model's real positions never see
    the padding), ``batch_tokens`` positions at a time."""
    rows = [g for g in generated if g.new]
    if not rows:
        return None
    device = model.get_input_embeddings().weight.device
    width = max(len(g.prompt) + len(g.new) for g in rows)
    total = 0.0
    for lo in range(0, len(rows), max(1, batch_tokens // width)):
        part = rows[lo: lo + max(1, batch_tokens // width)]
        ids = torch.zeros(len(part), width, dtype=torch.long)
        for r, g in enumerate(part):
            ids[r, : len(g.prompt) + len(g.new)] = torch.tensor(g.prompt + g.new)
        logprobs = _logprobs(model, ids.to(device)).cpu()
        for r, g in enumerate(part):
            start = len(g.prompt)
            total -= float(logprobs[r, start - 1: start - 1 + len(g.new)].gather(-1, ids[r, start: start + len(g.new), None])
                           .double().sum())
        counter.forward_passes += 1
        counter.tokens_past_hookpoint += ids.numel()
    return total / sum(len(g.new) for g in rows)


def _target_figures(generated: list[_Generated], targets: set[int]) -> tuple[float, float]:
    """(share of continuations holding a target, target tokens per generated token)."""
    holding = sum(any(t in targets for t in g.new) for g in generated)
    n_tokens = sum(len(g.new) for g in generated)
    hits = sum(sum(t in targets for t in g.new) for g in generated)
    return holding / max(1, len(generated)), hits / max(1, n_tokens)


def _continuations(steerer: Steerer, plan: _Plan, unedited: list[_Generated], steered: list[_Generated],
                   seeds: list[int], max_new_tokens: int, counter: _Counter, batch_tokens: int) -> Continuations:
    targets = {t.token_id for t in plan.targets}
    model, decode = steerer.model, steerer.observer.tokenizer.decode
    rate0, share0 = _target_figures(unedited, targets)
    rate1, share1 = _target_figures(steered, targets)
    coherence0 = _coherence(model, unedited, counter, batch_tokens)
    coherence1 = _coherence(model, steered, counter, batch_tokens)
    examples = [Example(decode(u.prompt), decode(u.new), decode(s.new))
                for u, s in zip(unedited[:: len(seeds)], steered[:: len(seeds)], strict=True)]
    return Continuations(seeds, len(unedited) // len(seeds), max_new_tokens, rate0, rate1, share0, share1,
                         _or_nan(coherence0), _or_nan(coherence1), examples)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _default_prompts(tokens: Tensor, encoded: Tensor, n: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of the first ``n`` sequences (each holding an encoded token)."""
    prompts = [row[:length].tolist() for row, enc in zip(tokens, encoded, strict=True) if enc[:length].any()]
    return prompts[:n]


def audit(
    steerer: Steerer, edit: FeatureEdit, tokens: EvalText | Tensor | np.ndarray, *,
    targets: Sequence[str | int] | None = None, n_targets: int = 5,
    prompts: Sequence[Sequence[int]] | None = None, seeds: int | Sequence[int] = 5, max_new_tokens: int = 20,
    leak: bool | None = None, doses: Sequence[float] | None = None, control_seed: int = 0,
    batch_tokens: int = 1024, text_source: str = "the given tokens",
) -> AuditResult:
    """Audit ``edit`` on ``tokens`` (n_sequences x context token ids, or the ``EvalText`` that
    ``audit_text`` finds: the run's held-out text, its source named then), each of its features
    alone (the module docstring says what is measured).

    ``targets``: token ids or one-token strings (default: each feature's ``n_targets`` most
    promoted tokens). ``prompts`` (token ids) are continued with each of ``seeds`` (a count: seeds
    0..n-1; or the seeds) for ``max_new_tokens``, unedited and steered (default: the first 16 tokens
    of the first two sequences; none with ``seeds=0``). ``leak`` (default: for a suppression) adds the
    leak's passes; ``doses`` (default: ``DOSES`` for an amplification, none for a suppression) the
    dose-response's multiples. ``control_seed`` draws the control's random direction. The text runs
    ``batch_tokens`` tokens at a time: each batch holds two (tokens, vocab) float32 log-probabilities."""
    observer = steerer.observer
    if isinstance(tokens, EvalText):
        text_source, tokens = tokens.source, tokens.tokens
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}: expected (n_sequences, context) token ids")
    if n_targets < 1:
        raise ValueError(f"n_targets={n_targets} must be at least 1")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens={batch_tokens} must be at least 1")
    GenerationSettings(max_new_tokens)  # checks it
    given = None if targets is None else resolve_targets(observer, targets)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if isinstance(seeds, int) and seeds < 0:
        raise ValueError(f"seeds={seeds}: expected a count (0 for no continuations) or a list of seeds")
    encoded = _encoded(observer, tokens)
    if not encoded.any():
        raise ValueError(f"{text_source}: no token the dictionary encodes ({tokens.numel()} tokens, all left out)")
    prompt_list = _default_prompts(tokens, encoded, 2, 16) if prompts is None else [list(p) for p in prompts]
    if any(not p for p in prompt_list):
        raise ValueError("prompts: a prompt of no tokens; each is continued from at least one token")
    edits = [FeatureEdit((f,), (v,), edit.mode, edit.error_term) for f, v in zip(edit.features, edit.values, strict=True)]
    batches = _batches(tokens, batch_tokens)
    activation, dashboard = _prepass(observer, tokens, encoded, edits, batches)
    unembedding = _unembedding(observer) if given is None else None
    notes: list[str] = []
    if observer.layer_hookpoints is not None:
        notes.append(f"a cross-layer transcoder over {len(observer.layer_hookpoints)} layers: a layer-l feature is "
                     "read from layer l's MLP input and the edits write to the MLP outputs of layers l and later, "
                     "downstream, so the dashboard's read-back is the value before the edit; its promoted targets "
                     "are those of its decoder rows summed over the outputs it writes to")
    elif observer.hookpoint_out is not None:
        notes.append(f"a transcoder: its features are read from {observer.hookpoint} and the edits write to "
                     f"{observer.hookpoint_out}, downstream, so the dashboard's read-back is the value before the edit")
    plans = [_plan(observer, single, activation[j], dashboard[j], unembedding=unembedding, given=given,
                   n_targets=n_targets, leak=leak, doses=doses, control_seed=control_seed, notes=notes)
             for j, single in enumerate(edits)]
    counter = _Counter(text_tokens=tokens.numel())
    _text_passes(steerer, tokens, encoded, plans, batches, counter)
    unedited = _generate(steerer, prompt_list, seed_list, None, max_new_tokens, counter) if seed_list else []
    sampling = _Sampling(prompt_list, seed_list, max_new_tokens, batch_tokens)
    features = [_feature_audit(steerer, plan, encoded, unedited, sampling, counter) for plan in plans]
    return AuditResult(observer.folder.uri, observer.hookpoint, observer.model_name, text_source, len(tokens),
                       int(encoded.sum()), seed_list, control_seed, features, counter.cost(), notes,
                       observer.hookpoint_out, observer.layer_hookpoints)


def _plan(observer: Observer, edit: FeatureEdit, activation: Tensor, dashboard: Tensor, *,
          unembedding: Tensor | None, given: list[int] | None, n_targets: int, leak: bool | None,
          doses: Sequence[float] | None, control_seed: int, notes: list[str]) -> _Plan:
    """One feature's plan: its targets, its kind, its dose unit and the variants to run."""
    feature = edit.features[0]
    if unembedding is not None:
        targets, source = _promoted(observer, unembedding, feature, n_targets), "promoted"
    else:
        assert given is not None
        decoded = token_decoder(observer.tokenizer)(given)
        targets, source = [Target(i, t, None) for i, t in zip(given, decoded, strict=True)], "given"
    plan = _Plan(feature, edit, _kind(edit), targets, source, activation, dashboard)  # type: ignore[arg-type]
    plan_doses = (DOSES if plan.kind == "amplify" else ()) if doses is None else tuple(doses)
    if plan_doses:
        plan.dose_unit = _dose_unit(observer, feature, activation, notes)
    _plan_variants(plan, observer, leak=plan.kind == "suppress" if leak is None else leak, doses=plan_doses,
                   control_seed=control_seed)
    return plan


def _dose_unit(observer: Observer, feature: int, activation: Tensor, notes: list[str]) -> tuple[str, float] | None:
    maxima = observer.folder.feature_max
    if maxima is not None and float(maxima[feature]) > 0:
        return "held-out maximum", float(maxima[feature])
    seen = float(activation.max())
    if seen <= 0:
        notes.append(f"feature {feature}: no held-out maximum recorded and it never fires on the audit text, "
                     "so there is no unit for the dose-response")
        return None
    why = "records no held-out feature maxima" if maxima is None else f"records a held-out maximum of 0 for feature {feature}"
    notes.append(f"the dictionary {why}: feature {feature}'s dose-response is in multiples of its largest "
                 f"activation on the audit text, {seen:.4g}")
    return "audit-text maximum", seen


@dataclass(frozen=True)
class _Sampling:
    """How continuations are sampled and scored."""

    prompts: list[list[int]]
    seeds: list[int]
    max_new_tokens: int
    batch_tokens: int

    def __bool__(self) -> bool:
        return bool(self.prompts and self.seeds)


def _feature_audit(steerer: Steerer, plan: _Plan, encoded: Tensor, unedited_gens: list[_Generated],
                   sampling: _Sampling, counter: _Counter) -> FeatureAudit:
    measured = "firing" if plan.kind == "suppress" else "all"
    where = encoded & (plan.activation > 0) if measured == "firing" else encoded
    unedited = plan.unedited[measured]
    variants = {v.name: v for v in plan.variants}
    dashboard = Dashboard(_mean(plan.activation[where]), _mean(plan.dashboard[..., 0][where]),
                          _mean(plan.dashboard[..., 1][where]))
    continuations = None
    if sampling:
        steered = _generate(steerer, sampling.prompts, sampling.seeds, plan.edit, sampling.max_new_tokens, counter)
        continuations = _continuations(steerer, plan, unedited_gens, steered, sampling.seeds,
                                       sampling.max_new_tokens, counter, sampling.batch_tokens)
    audit_ = FeatureAudit(
        plan.feature, plan.kind, plan.edit.mode, plan.edit.error_term, plan.edit.values[0], plan.targets,
        plan.targets_source, int(where.sum()), unedited.behaviour(unedited), dashboard,
        variants["steered"].sums.behaviour(unedited), variants["control"].sums.behaviour(unedited),
        continuations, _leak(plan) if "projected" in variants else None,
        _dose_response(steerer, plan, sampling, counter), "",
    )
    return dataclasses.replace(audit_, summary=_summary(audit_))


def _leak(plan: _Plan) -> Leak:
    """A, B and the reconstruction's drop, from the variants' sums at the firing positions."""
    firing, variants = plan.unedited["firing"], {v.name: v for v in plan.variants}
    a, b, r = ((firing.target_logprob - variants[name].sums.target_logprob) / max(1, firing.count)
               for name in ("projected", "zeroed", "reconstruction"))
    return Leak(a, b, (a - b) / a if a > 0 else None, r)


def _dose_response(steerer: Steerer, plan: _Plan, sampling: _Sampling, counter: _Counter) -> DoseResponse | None:
    """The dose variants' figures, with the coherence of continuations sampled at each dose."""
    if plan.dose_unit is None:
        return None
    unit_name, unit = plan.dose_unit
    points = []
    for variant in plan.variants:
        if not variant.name.startswith("dose:"):
            continue
        multiple = float(variant.name.removeprefix("dose:"))
        behaviour = variant.sums.behaviour(plan.unedited["all"])
        coherence = None
        if sampling:
            dose = FeatureEdit(plan.edit.features, (multiple * unit,), "clamp", plan.edit.error_term)
            generated = _generate(steerer, sampling.prompts, sampling.seeds, dose, sampling.max_new_tokens, counter)
            coherence = _coherence(steerer.model, generated, counter, sampling.batch_tokens)
        points.append(DosePoint(multiple, multiple * unit, behaviour.target_logprob, behaviour.target_logprob_change,
                                behaviour.kl_divergence, coherence))
    return DoseResponse(unit_name, unit, points)  # type: ignore[arg-type]


def _mean(values: Tensor) -> float:
    return float(values.double().mean()) if values.numel() else math.nan


def _summary(a: FeatureAudit) -> str:
    targets = ", ".join(repr(t.token) for t in a.targets[:3]) + (", …" if len(a.targets) > 3 else "")
    if a.n_positions == 0:
        return (f"Feature {a.feature} never fires on the audit text, so there is nothing to suppress there."
                if a.kind == "suppress" else "The audit text has no position the dictionary encodes.")
    if a.kind == "suppress" and a.leak is not None:
        lk = a.leak
        verdict = ("the direction does not carry the targets there, so no leak can be measured" if lk.leak is None
                   else f"{lk.leak:.0%} of the direction's effect leaks past the suppression through what the "
                   "dictionary does not explain")
        return (f"Zeroing feature {a.feature} with the error term kept changes the log-probability of {targets} by "
                f"{-lk.zeroed_drop:+.3g} nats where it fires, and projecting its decoder direction out of the whole "
                f"activation by {-lk.projected_drop:+.3g}: {verdict} (replacing the activation by its "
                f"reconstruction: {-lk.reconstruction_drop:+.3g}).")
    verb = "Suppressing" if a.kind == "suppress" else f"Setting ({a.mode} {a.value:.4g})"
    return (f"{verb} feature {a.feature} moves the log-probability of {targets} by "
            f"{a.steered.target_logprob_change:+.3g} nats (a random direction of equal norm: "
            f"{a.control.target_logprob_change:+.3g}) at KL {a.steered.kl_divergence:.3g} nats; the dashboard reads "
            f"{a.dashboard.feature_read_back:.4g} for the {a.dashboard.feature_set:.4g} set.")
