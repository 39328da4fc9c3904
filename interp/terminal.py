"""Results as lines for the terminal: observations (a header saying what measured the tokens, then
a row per token), steered continuations (side by side with the unedited ones) and the steer audit."""

from __future__ import annotations

import math
import textwrap

from interp.audit import AuditResult, FeatureAudit
from interp.markup import describe_hookpoints
from interp.observe import Observations, TokenObservation
from interp.steering import SteerResult

_TOKEN_WIDTH = 16


def _token(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= _TOKEN_WIDTH else shown[: _TOKEN_WIDTH - 2] + "…'"


def _at(hookpoint: str, hookpoint_out: str | None, model: str | None = None,
        layer_hookpoints: list[tuple[str, str]] | None = None) -> str:
    """``at model.layers.3 [of <model>]``, or ``[of <model>, ]reads <in> -> writes <out>`` for a
    transcoder (first and last covered layer for a cross-layer transcoder)."""
    if hookpoint_out is None:
        return f"at {hookpoint}" + (f" of {model}" if model else "")
    return (f"of {model}, " if model else "") + describe_hookpoints(hookpoint, hookpoint_out, layer_hookpoints)


def _baseline_line(obs: Observations) -> str:
    b = obs.baseline
    of = "" if obs.hookpoint_out is None else f" at the target {obs.hookpoint_out}"
    if obs.layer_hookpoints is not None:
        of = f" at the {len(obs.layer_hookpoints)} covered outputs side by side"
    if b.source == "held-out":
        return (f"baseline    held-out mean and variance the training recorded{of} ({b.n_tokens:,} tokens, "
                f"total variance {b.total_variance:.4g})")
    return (f"baseline    computed on the {b.n_tokens:,} observed tokens{of} (total variance {b.total_variance:.4g}): "
            "the dictionary records no held-out mean and variance")


def _row(token: TokenObservation, obs: Observations) -> str:
    head = f"{token.position:5d}  {_token(token.token):<{_TOKEN_WIDTH}}"
    if not token.encoded:
        return f"{head}  left out, as in training"
    relative = "n/a" if token.relative_error is None else f"{token.relative_error:8.3f}"
    figures = f"{token.error_norm:9.4g}  {relative:>8}  {token.l0:4d}"
    if token.layers is not None:
        figures += "  " + " ".join("n/a" if layer.relative_error is None else f"{layer.relative_error:.3f}"
                                   for layer in token.layers)
    if obs.feature is not None:
        return f"{head}  {token.activation:10.4g}  {figures}"
    features = "  ".join(f"{_feature(obs, i)}:{a:.3g}" for i, a in token.features)
    return f"{head}  {figures}  {features}"


def _feature(obs: Observations, feature: int) -> str:
    """A feature id as shown: ``137``, or ``137@L2`` for a cross-layer transcoder's (its covered layer)."""
    layer = obs.feature_layer(feature)
    return str(feature) if layer is None else f"{feature}@L{layer}"


def format_observations(obs: Observations) -> str:
    """The whole result as text, one row per token."""
    lines = [
        f"dictionary  {obs.dictionary}  ({obs.n_latents:,} features "
        f"{_at(obs.hookpoint, obs.hookpoint_out, obs.model, obs.layer_hookpoints)})",
        _baseline_line(obs),
    ]
    if obs.layer_hookpoints is not None:
        lines.append(f"layers      {obs.n_per_layer:,} features per layer, feature id l*{obs.n_per_layer} + i shown as "
                     "id@Ll; rel err by layer: each covered output's error over its own variance, layers in order")
    figures = f"{'err norm':>9}  {'rel err':>8}  {'L0':>4}"
    if obs.layer_hookpoints is not None:
        figures += "  rel err by layer"
    if obs.feature is not None:
        columns = f"{'pos':>5}  {'token':<{_TOKEN_WIDTH}}  {'feat ' + _feature(obs, obs.feature):>10}  {figures}"
    else:
        columns = f"{'pos':>5}  {'token':<{_TOKEN_WIDTH}}  {figures}  top {obs.top} features (id:activation)"
    for number, text in enumerate(obs.texts, start=1):
        preview = text.text if len(text.text) <= 60 else text.text[:59] + "…"
        lines += ["", f"text {number}: {preview!r}", columns]
        lines += [_row(token, obs) for token in text.tokens]
    return "\n".join(lines) + "\n"


def _wrapped(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=False) or [""]
    return lines


def format_steer(result: SteerResult, width: int = 56) -> str:
    """Each prompt's two continuations side by side: unedited, steered."""
    features = ", ".join(f"{f} -> {v:.4g}" if result.mode == "clamp" else f"{f} {result.mode} {v:.4g}"
                         for f, v in zip(result.features, result.values, strict=True))
    decoding = "greedy" if result.seed is None else f"sampled, seed {result.seed}"
    lines = [
        f"dictionary  {result.dictionary}  ({_at(result.hookpoint, result.hookpoint_out, None, result.layer_hookpoints)})",
        f"edit        {result.mode}: {features}; error term {'kept' if result.error_term == 'keep' else 'dropped'}",
        f"decoding    {decoding}, up to {result.max_new_tokens} new tokens",
    ]
    for number, c in enumerate(result.continuations, start=1):
        left, right = _wrapped(c.unedited, width), _wrapped(c.steered, width)
        left += [""] * (len(right) - len(left))
        right += [""] * (len(left) - len(right))
        lines += ["", f"prompt {number}: {c.prompt!r}", f"{'unedited':<{width}} | steered", f"{'-' * width}-+-{'-' * width}"]
        lines += [f"{a:<{width}} | {b}" for a, b in zip(left, right, strict=True)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the steer audit


def _f(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _behaviour_rows(a: FeatureAudit) -> list[str]:
    rows = [f"  {'':<13} {'log p(targets)':>15} {'change':>11} {'p(targets)':>11} {'KL (nats)':>10}"]
    for name, b in (("unedited", a.unedited), ("steered", a.steered), ("control", a.control)):
        rows.append(f"  {name:<13} {_f(b.target_logprob):>15} {_f(b.target_logprob_change, '+.4g'):>11} "
                    f"{_f(b.target_probability):>11} {_f(b.kl_divergence):>10}")
    return rows


def _feature_lines(a: FeatureAudit) -> list[str]:
    where = "every encoded position" if a.kind == "amplify" else "the positions where it fires"
    lines = [
        f"feature {a.feature}  {a.kind}: {a.mode} {a.value:.4g}, error term {a.error_term}; "
        f"measured at {where} ({a.n_positions:,})",
        f"  targets ({a.targets_source}): " + "  ".join(
            repr(t.token) + ("" if t.logit is None else f" {t.logit:+.3g}") for t in a.targets),
        f"  dashboard     before {_f(a.dashboard.feature_before)}   set {_f(a.dashboard.feature_set)}   "
        f"read back {_f(a.dashboard.feature_read_back)}",
        *_behaviour_rows(a),
    ]
    c = a.continuations
    if c is not None:
        lines += [
            f"  continuations {len(c.seeds)} seeds x {c.n_prompts} prompts, {c.max_new_tokens} tokens: holding a target "
            f"{_f(c.unedited_target_rate, '.0%')} -> {_f(c.steered_target_rate, '.0%')}, target tokens "
            f"{_f(c.unedited_target_share, '.1%')} -> {_f(c.steered_target_share, '.1%')}, "
            f"coherence (unedited loss, nats) {_f(c.unedited_coherence, '.3f')} -> {_f(c.steered_coherence, '.3f')}",
        ]
    if a.leak is not None:
        lk = a.leak
        lines.append(f"  leak          projected out {_f(lk.projected_drop)}   zeroed {_f(lk.zeroed_drop)}   "
                     f"leak {_f(lk.leak, '.1%')}   reconstruction {_f(lk.reconstruction_drop)}  (drops, nats)")
    if a.dose_response is not None:
        d = a.dose_response
        lines.append(f"  dose-response (clamp; x {d.unit} {d.unit_value:.4g})")
        lines.append(f"  {'multiple':>9} {'value':>10} {'log p(targets)':>15} {'change':>11} {'KL':>10} {'coherence':>10}")
        lines += [f"  {p.multiple:>9g} {p.value:>10.4g} {_f(p.target_logprob):>15} "
                  f"{_f(p.target_logprob_change, '+.4g'):>11} {_f(p.kl_divergence):>10} {_f(p.coherence, '.3f'):>10}"
                  for p in d.points]
    lines.append(f"  {a.summary}")
    return lines


def format_audit(result: AuditResult) -> str:
    """The audit as a terminal table: a header, then per feature its sections and summary."""
    cost = result.cost
    lines = [
        f"dictionary  {result.dictionary}  "
        f"({describe_hookpoints(result.hookpoint, result.hookpoint_out, result.layer_hookpoints)} of {result.model})",
        f"text        {result.text_source}: {result.n_sequences} sequences, {result.n_encoded_tokens:,} encoded tokens",
        f"cost        {cost.forward_passes:,} forward passes past the hookpoint ({cost.text_passes} over the text, "
        f"{cost.generated_tokens:,} generated tokens): {cost.text_pass_equivalents:.1f}x one forward over the text",
        *(f"note        {note}" for note in result.notes),
    ]
    for a in result.features:
        lines += ["", *_feature_lines(a)]
    return "\n".join(lines)
