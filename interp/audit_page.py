"""The steer audit (``interp.audit.AuditResult``) as one self-contained page (``saeforge steer
--audit --html``): per audited feature, what the dashboard shows beside what the model did.

Each feature's section (``section#feature-<id>``) holds, in order:

- its headline sentence (``p.summary``);
- the dashboard (the feature's value before the edit, the value set, the value read back by
  encoding the edited activation) beside the behaviour of the unedited model, the steer and the
  same edit along a random direction of equal norm (``table.behaviour``: target log-probability
  and its change, target probability and its change, KL), and the steer's and the control's
  change and KL as bars side by side, so a reader sees how much of the movement is the feature's;
- the target tokens with their logit-lens logits (logits per unit of activation);
- for a suppression, the leak: A (the decoder direction projected out of the whole activation),
  B (the feature zeroed, error term kept) and the drop from replacing the activation by its
  reconstruction as bars (``figure.leak``), the leak share (A − B) / A in a sentence;
- for an amplification, the dose-response: target log-probability, KL and coherence against the
  multiple of the feature's maximum activation (the unit named: held-out or audit-text maximum),
  as line charts with labelled axes (``figure.dose``), and the points in a table;
- the sampled continuations: how often they hold a target, unedited and steered, and examples.

Then the audit's cost in forward passes past the hookpoint. The header names the dictionary, the
model, the hookpoint, the text and the seeds. Every number shown sits in an element with its
exact value in ``data-value``; the result itself is embedded as JSON (``script#audit``,
``AuditResult.to_dict()``).

Like the training report, the page runs no script at all (its Content-Security-Policy allows
none) and fetches nothing: it works offline from ``file://``. Tokens, prompts and continuations
are untrusted text: all of it is escaped, control characters shown as symbols.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

from interp.markup import BASE_CSS, describe_hookpoints, script_json, visible
from interp.svg import CHART_CSS, svg_bar_chart, svg_line_chart

if TYPE_CHECKING:  # drawing the page needs no torch; the result's module imports it
    from interp.audit import AuditResult, Behaviour, Continuations, DoseResponse, FeatureAudit, Leak

__all__ = ["render_audit_page"]

_CSP = "default-src 'none'; style-src 'unsafe-inline'"

_CSS = BASE_CSS + CHART_CSS + """
header{background:#1d3557;color:#fff;padding:16px 28px}header h1{margin:0 0 8px;font-size:21px}
header table td{border:none;padding:1px 12px 1px 0;color:#e8eef8}header table td:first-child{color:#a9c4ea;white-space:nowrap}
nav a{color:#cfe3ff;margin-right:16px;text-decoration:none}
main{padding:8px 28px 40px;max-width:1400px}
h3{margin:14px 0 6px;font-size:15px}
p.summary{font-size:15px;background:#f3f6fb;border-left:4px solid #1d3557;padding:8px 12px;margin:6px 0 10px}
.side{display:flex;flex-wrap:wrap;gap:12px 28px;align-items:flex-start}
.side>div{min-width:0}
td.num{white-space:nowrap}
.chip{display:inline-block;font-family:"DejaVu Sans Mono",Menlo,monospace;font-size:12px;white-space:pre;
background:#eef6ee;border:1px solid #cfe6cf;border-radius:4px;padding:0 5px}
figure{margin:6px 0}figcaption{color:#5b6470;font-size:13px;max-width:900px}
.examples td{max-width:440px}
.text{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-word}
svg .bar{fill:#2a6fdb}
"""


def render_audit_page(result: AuditResult) -> str:
    """The page: a pure function of ``result`` (the module docstring says what it shows)."""
    title = f"saeforge steer audit: {describe_hookpoints(result.hookpoint, result.hookpoint_out, result.layer_hookpoints)} of {result.model}"
    sections = [_feature_section(result, a) for a in result.features] or [
        '<section id="no-features"><h2>No feature audited</h2></section>']
    nav = "".join(f'<a href="#feature-{a.feature}">feature {a.feature}</a>' for a in result.features)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1>{_header_table(result)}<nav>{nav}<a href=\"#cost\">cost</a></nav></header>"
        f"<main>{_reading_html(result)}{''.join(sections)}{_cost_html(result)}</main>"
        f'<script type="application/json" id="audit">{script_json(result.to_dict())}</script></body></html>\n'
    )


# --------------------------------------------------------------------------- header


def _header_table(result: AuditResult) -> str:
    seeds = ", ".join(str(s) for s in result.seeds) or "none"
    rows = [
        ("dictionary", result.dictionary), ("model", result.model),
        ("hookpoint", describe_hookpoints(result.hookpoint, result.hookpoint_out, result.layer_hookpoints)),
        ("text", result.text_source),
        ("tokens", f"{result.n_sequences:,} sequences, {result.n_encoded_tokens:,} tokens the dictionary encodes"),
        ("seeds", f"continuations sampled with seeds {seeds}; the random direction drawn with seed {result.control_seed}"),
    ]
    cells = "".join(f'<tr><td>{_e(k)}</td><td id="header-{k}">{_e(v)}</td></tr>' for k, v in rows)
    return f"<table>{cells}</table>"


def _reading_html(result: AuditResult) -> str:
    notes = "".join(f"<li>{_e(n)}</li>" for n in result.notes)
    return (
        '<section id="reading"><h2>How to read it</h2><p class="note">A dictionary is a partial account of the '
        "model: a steer is confirmed by what the model does, not by what the dashboard shows. The <b>dashboard</b> "
        "is the feature's value: before the edit, the value the edit sets, and the value read back when the edited "
        "activation is encoded again. The <b>behaviour</b> is the model's next-token distribution after the "
        "hookpoint: the log-probability of the target tokens (log of their summed probability), its change from the "
        "unedited model, and the KL divergence from the unedited model (nats), averaged over the measured positions. "
        "The <b>random direction</b> applies the same edit along a direction of equal norm orthogonal to the "
        "feature's: what moves under it is not the feature's doing.</p>"
        + (f'<ul class="note" id="notes">{notes}</ul>' if notes else "") + "</section>"
    )


# --------------------------------------------------------------------------- one feature


def _edit_words(a: FeatureAudit) -> str:
    verb = {"clamp": "clamped to", "add": "plus", "scale": "scaled by"}.get(a.mode, a.mode)
    multiple = ""
    if a.dose_response is not None and a.dose_response.unit_value > 0:
        multiple = f" ({a.value / a.dose_response.unit_value:.3g}× its {a.dose_response.unit})"
    error = {"keep": "error term kept", "drop": "error term dropped (the edited reconstruction replaces the activation)"}
    return f"{a.kind}: {verb} {_fmt(a.value)}{multiple}, {error.get(a.error_term, f'error term {a.error_term}')}"


def _feature_section(result: AuditResult, a: FeatureAudit) -> str:
    where = ("every position the dictionary encodes" if a.kind == "amplify"
             else "the positions where the feature fires on the unedited text")
    parts = [
        f'<section class="feature" id="feature-{a.feature}" data-feature="{a.feature}" data-kind="{_e(a.kind)}">',
        f"<h2>Feature {a.feature} · {_e(_edit_words(a))}</h2>",
        f'<p class="summary">{_e(a.summary)}</p>',
        f'<p class="note measured">Measured at {a.n_positions:,} positions: {where}.</p>',
        '<div class="side">',
        f'<div><h3>Dashboard</h3>{_dashboard_html(a)}</div>',
        f'<div><h3>Behaviour</h3>{_behaviour_html(a)}</div>',
        "</div>",
        _versus_html(a),
        _targets_html(a),
    ]
    if a.leak is not None:
        parts.append(_leak_html(a.leak))
    if a.dose_response is not None:
        parts.append(_dose_html(a.dose_response, a))
    if a.continuations is not None:
        parts.append(_continuations_html(a.continuations))
    return "".join(parts) + "</section>"


def _dashboard_html(a: FeatureAudit) -> str:
    d = a.dashboard
    rows = [("before the edit", "before", d.feature_before), ("set by the edit", "set", d.feature_set),
            ("read back from the edited activation", "read-back", d.feature_read_back)]
    body = "".join(f'<tr data-figure="{key}"><td>{label}</td>{_num_td(value)}</tr>' for label, key, value in rows)
    return (f'<table class="dashboard"><thead><tr><th>feature {a.feature}</th><th>mean value</th></tr></thead>'
            f"<tbody>{body}</tbody></table>")


_BEHAVIOUR_ROWS = (  # (label, field, format)
    ("log p(targets)", "target_logprob", ".4g"), ("change", "target_logprob_change", "+.4g"),
    ("p(targets)", "target_probability", ".4g"), ("change in p", "target_probability_change", "+.4g"),
    ("KL from unedited (nats)", "kl_divergence", ".4g"),
)


def _behaviour_html(a: FeatureAudit) -> str:
    variants: list[tuple[str, str, Behaviour]] = [
        ("unedited", "unedited", a.unedited), ("steer", "steered", a.steered), ("random direction", "control", a.control)]
    head = "<thead><tr><th></th>" + "".join(f'<th data-variant="{key}">{name}</th>' for name, key, _ in variants)
    body = "".join(
        f'<tr data-figure="{field}"><td>{_e(label)}</td>'
        + "".join(_num_td(getattr(b, field), spec, variant=key) for _, key, b in variants) + "</tr>"
        for label, field, spec in _BEHAVIOUR_ROWS)
    return f'<table class="behaviour">{head}</tr></thead><tbody>{body}</tbody></table>'


def _versus_html(a: FeatureAudit) -> str:
    change = svg_bar_chart([("steer", a.steered.target_logprob_change),
                            ("random direction", a.control.target_logprob_change)],
                           title="change in log p(targets)", x_label="nats")
    kl = svg_bar_chart([("steer", a.steered.kl_divergence), ("random direction", a.control.kl_divergence)],
                       title="KL from the unedited model", x_label="nats")
    return (f'<figure class="versus"><div class="plots">{change}{kl}</div><figcaption>The steer beside the same edit '
            "along a random direction of equal norm: the gap between the two bars is the movement that is the "
            "feature's.</figcaption></figure>")


def _targets_html(a: FeatureAudit) -> str:
    source = ("the tokens the feature's decoder direction promotes most through the unembedding" if
              a.targets_source == "promoted" else "the tokens given")
    rows = "".join(
        f'<tr><td><span class="chip">{_e(visible(t.token))}</span></td><td class="num">{t.token_id}</td>'
        + (_num_td(t.logit, "+.4g") if t.logit is not None else '<td class="note">given</td>') + "</tr>"
        for t in a.targets)
    return (f'<h3>Targets</h3><p class="note">{len(a.targets)} targets: {source}. The logit is the logit lens of '
            "the decoder direction (its logits per unit of activation through the unembedding, skipping the layers "
            "after the hookpoint).</p><table class=\"targets\"><thead><tr><th>token</th><th>id</th>"
            f"<th>logit per unit</th></tr></thead><tbody>{rows}</tbody></table>")


def _leak_html(leak: Leak) -> str:
    bars = [("projected out (A)", leak.projected_drop), ("zeroed (B)", leak.zeroed_drop),
            ("reconstruction", leak.reconstruction_drop)]
    chart = svg_bar_chart(bars, title="drop in log p(targets) where the feature fires", x_label="nats")
    rows = [("A: the decoder direction projected out of the whole activation", "projected", leak.projected_drop),
            ("B: the feature zeroed, the error term kept", "zeroed", leak.zeroed_drop),
            ("the activation replaced by the dictionary's reconstruction", "reconstruction", leak.reconstruction_drop)]
    body = "".join(f'<tr data-figure="{key}"><td>{label}</td>{_num_td(value)}</tr>' for label, key, value in rows)
    body += f'<tr data-figure="leak"><td>leak (A − B) / A</td>{_num_td(leak.leak, ".1%")}</tr>'
    if leak.leak is None:
        sentence = (f"The decoder direction does not carry the targets here (A = {_fmt(leak.projected_drop)} nats, "
                    "not a drop), so there is no effect to leak.")
    else:
        sentence = (f"{leak.leak:.0%} of the effect the feature's decoder direction carries (A = "
                    f"{_fmt(leak.projected_drop)} nats) survives zeroing the feature (B = {_fmt(leak.zeroed_drop)}): "
                    "it flows through what the dictionary does not explain. Replacing the activation by its "
                    f"reconstruction drops log p(targets) by {_fmt(leak.reconstruction_drop)}.")
    return (f'<h3>Leak</h3><figure class="leak">{chart}<figcaption class="leak-sentence">{_e(sentence)}</figcaption>'
            f'</figure><table class="leak">{body}</table>')


def _dose_html(dose: DoseResponse, a: FeatureAudit) -> str:
    unit = f"multiple of the feature's {dose.unit} (1× = {_fmt(dose.unit_value)})"
    points = dose.points
    span = (min(p.multiple for p in points), max(p.multiple for p in points)) if points else None
    charts = [
        svg_line_chart([(p.multiple, p.target_logprob) for p in points], title="log p(targets)", x_label=unit,
                       y_label="nats", reference=(a.unedited.target_logprob, "unedited")),
        svg_line_chart([(p.multiple, p.kl_divergence) for p in points], title="KL from the unedited model",
                       x_label=unit, y_label="nats"),
    ]
    if any(p.coherence is not None for p in points):
        reference = None if a.continuations is None else (a.continuations.unedited_coherence, "unedited")
        charts.append(svg_line_chart([(p.multiple, p.coherence) for p in points if p.coherence is not None],
                                     title="coherence: the unedited model's loss", x_label=unit,
                                     y_label="nats per token", reference=reference, x_range=span))
    rows = "".join(
        f'<tr data-multiple="{p.multiple!r}">{_num_td(p.multiple, "g")}{_num_td(p.value)}{_num_td(p.target_logprob)}'
        f'{_num_td(p.target_logprob_change, "+.4g")}{_num_td(p.kl_divergence)}{_num_td(p.coherence, ".4g")}</tr>'
        for p in points)
    return (f'<h3>Dose-response</h3><figure class="dose" data-unit="{_e(dose.unit)}"><div class="plots">{"".join(charts)}'
            f"</div><figcaption>The feature clamped to a multiple of its {_e(dose.unit)} ({_fmt(dose.unit_value)} in raw "
            "units) at every encoded position. Coherence is the unedited model's mean loss on the continuations "
            "steered at that dose: higher is less like text the model would write.</figcaption></figure>"
            '<table class="dose"><thead><tr><th>multiple</th><th>value</th><th>log p(targets)</th><th>change</th>'
            f"<th>KL (nats)</th><th>coherence</th></tr></thead><tbody>{rows}</tbody></table>")


def _continuations_html(c: Continuations) -> str:
    rows = [("holding a target token", "target-rate", c.unedited_target_rate, c.steered_target_rate, ".0%"),
            ("target tokens per generated token", "target-share", c.unedited_target_share, c.steered_target_share,
             ".1%"),
            ("coherence: the unedited model's loss (nats per token)", "coherence", c.unedited_coherence,
             c.steered_coherence, ".3f")]
    body = "".join(f'<tr data-figure="{key}"><td>{label}</td>{_num_td(u, spec, variant="unedited")}'
                   f'{_num_td(s, spec, variant="steered")}</tr>' for label, key, u, s, spec in rows)
    examples = "".join(
        f'<tr><td class="text">{_text(x.prompt)}</td><td class="text" data-variant="unedited">{_text(x.unedited)}</td>'
        f'<td class="text" data-variant="steered">{_text(x.steered)}</td></tr>' for x in c.examples)
    seeds = ", ".join(str(s) for s in c.seeds)
    return (f'<h3>Sampled continuations</h3><p class="note">{c.n_prompts} prompts × {len(c.seeds)} seeds ({_e(seeds)}), '
            f"{c.max_new_tokens} new tokens each, unedited and steered.</p>"
            '<table class="continuations"><thead><tr><th></th><th>unedited</th><th>steered</th></tr></thead>'
            f"<tbody>{body}</tbody></table>"
            + (f'<table class="examples"><thead><tr><th>prompt</th><th>unedited</th><th>steered</th></tr></thead>'
               f"<tbody>{examples}</tbody></table>" if examples else ""))


# --------------------------------------------------------------------------- cost and helpers


def _cost_html(result: AuditResult) -> str:
    c = result.cost
    rows = [
        ("forward passes past the hookpoint", "forward-passes", f"{c.forward_passes:,}", c.forward_passes),
        ("variants run over the whole audit text (the unedited one included)", "text-passes", f"{c.text_passes:,}",
         c.text_passes),
        ("tokens per such pass", "text-tokens", f"{c.text_tokens:,}", c.text_tokens),
        ("tokens generated", "generated-tokens", f"{c.generated_tokens:,}", c.generated_tokens),
        ("positions run past the hookpoint in all", "tokens-past-hookpoint", f"{c.tokens_past_hookpoint:,}",
         c.tokens_past_hookpoint),
        ("in forward passes over the audit text", "text-pass-equivalents", f"{c.text_pass_equivalents:.1f}",
         c.text_pass_equivalents),
    ]
    body = "".join(f'<tr data-figure="{key}"><td>{label}</td><td class="num" data-value="{value!r}">{shown}</td></tr>'
                   for label, key, shown, value in rows)
    return (f'<section id="cost"><h2>Cost</h2><p class="note">Counted in calls of the model that run past the '
            "hookpoint: one per batch of the audit text per variant, one per generation step, one per continuation "
            f'scored.</p><table class="cost">{body}</table></section>')


def _num_td(value: float | None, spec: str = ".4g", *, variant: str | None = None) -> str:
    """A number's cell: shown with ``spec``, its exact value in ``data-value``; n/a when missing or not finite."""
    where = f' data-variant="{variant}"' if variant else ""
    if value is None or not math.isfinite(value):
        return f'<td class="num"{where}>n/a</td>'
    return f'<td class="num"{where} data-value="{float(value)!r}">{_e(format(value, spec))}</td>'


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _text(text: str) -> str:
    """Generated or prompt text: escaped, its line breaks kept, other control characters shown."""
    return "\n".join(_e(visible(line)) for line in text.split("\n"))


def _e(text: str) -> str:
    return html.escape(text, quote=True)
