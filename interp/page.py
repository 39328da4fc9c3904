"""``Observations`` as one self-contained page (``saeforge observe --html``): each text as a run of
tokens shaded by how much the dictionary leaves unexplained there, each token's features, and
per feature the tokens it fires on.

The page works offline from ``file://``: inline CSS and one inline script, nothing fetched. Its
Content-Security-Policy lets only that script run (by its hash), so a token that slipped through
unescaped still could not run; and every token is escaped, for it is untrusted text (``</script>``,
quotes, ``&``). Everything the script shows is already in the page without it: each token's
figures in its ``title`` and in the text's token table (``tr#row-<text>-<position>``); the script
only copies the hovered or clicked token's row into the side panel. The observations themselves
are embedded as JSON (``script#observations``, ``Observations.to_dict()``) for whoever wants them
back from the page.

Shading, fixed so pages compare with each other: a token's background is red with opacity
``MAX_OPACITY * min(relative_error, 1) / 1``, linear from 0 (fully explained) and saturating at
relative error 1.0, an error as large as a typical activation's deviation from the baseline mean
(predicting the mean would do as well). Tokens beyond 1.0 are also underlined. With a feature
asked for, a second run of the same tokens is shaded blue by that feature's activation over its
largest activation on the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections import defaultdict
from dataclasses import dataclass

from interp.markup import BASE_CSS, script_json, visible
from interp.observe import Observations, TokenObservation

__all__ = ["MAX_OPACITY", "SATURATING_RELATIVE_ERROR", "render_page"]

SATURATING_RELATIVE_ERROR = 1.0
"""The relative error at which the shading is full: as bad as the baseline's mean deviation."""
MAX_OPACITY = 0.8
"""The opacity of full shading (more would hide the token's text)."""
_ERROR_RGB = "214,40,40"
_FEATURE_RGB = "37,99,235"
_CONTEXT_BEFORE, _CONTEXT_AFTER = 4, 2
_CONTEXTS_PER_FEATURE = 25

_CSS = BASE_CSS + """
header{background:#1d3557;color:#fff;padding:16px 28px}header h1{margin:0 0 8px;font-size:21px}
header table td{border:none;padding:1px 12px 1px 0;color:#e8eef8}header table td:first-child{color:#a9c4ea;white-space:nowrap}
main{display:grid;grid-template-columns:minmax(0,1fr) 360px;gap:18px;padding:8px 28px 40px;max-width:1500px}
@media (max-width:900px){main{grid-template-columns:1fr}}
h3{margin:12px 0 6px;font-size:15px}
aside{position:sticky;top:12px;align-self:start;background:#fff;border:1px solid #dde1e6;border-radius:8px;
margin:18px 0;padding:12px 16px;max-height:calc(100vh - 40px);overflow:auto}
aside dl{display:grid;grid-template-columns:auto 1fr;gap:3px 12px;margin:0}aside dt{color:#5b6470}aside dd{margin:0}
.run{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:14px;line-height:2;padding:6px 0}
.tok{white-space:pre;border-radius:3px;padding:1px 0;cursor:pointer}
.tok:focus,.tok.selected{outline:2px solid #1d3557;outline-offset:1px}
.tok.beyond{text-decoration:underline 2px #7a0000}
.tok.excluded{color:#8a929c;border:1px dashed #9aa3ad;font-style:italic}
.tok.no-baseline{border:1px dotted #d97706}
.tok:empty::after{content:"\\2205";color:#9aa3ad}
.legend{display:flex;flex-wrap:wrap;align-items:center;gap:6px 22px;margin:6px 0}
.scale{display:inline-flex;flex-direction:column;font-size:12px}
.scale .bar{width:260px;height:14px;border:1px solid #c9ced4;border-radius:3px}
.scale .ticks{display:flex;justify-content:space-between;width:262px;color:#5b6470}
.ctx{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px}
.ctx .tok{cursor:default}mark.hit{background:#ffd166;outline:1px solid #e0a100;font-weight:700;color:#111}
ol.contexts{margin:0;padding-left:22px}ol.contexts li{margin:2px 0}
.act{display:inline-block;min-width:64px;margin-right:6px;color:#5b6470;font-variant-numeric:tabular-nums}
.where{color:#8a929c;font-size:12px;margin-left:8px}
article.feature{border:1px solid #dde1e6;border-radius:8px;padding:8px 14px;margin:10px 0;background:#fcfcfd}
article.feature h3{margin:2px 0 6px}.band{font-size:12px;font-weight:400;color:#5b6470;margin-left:8px}
.feats a{color:#1d3557;text-decoration:none;font-variant-numeric:tabular-nums}
"""

# Copies the hovered, focused or clicked token's table row into the side panel; a click pins it.
# Text is moved as cloned DOM nodes (never through innerHTML), so it stays text.
_SCRIPT = """"use strict";
(() => {
  const body = document.getElementById("panel-body");
  let pinned = null;
  const tokenOf = event => event.target instanceof Element ? event.target.closest("[data-key]") : null;
  function show(token) {
    const row = document.getElementById("row-" + token.dataset.key);
    if (!row) return;
    const list = document.createElement("dl");
    for (const cell of row.cells) {
      const term = document.createElement("dt");
      term.textContent = cell.dataset.label;
      const value = document.createElement("dd");
      value.append(...[...cell.childNodes].map(node => node.cloneNode(true)));
      list.append(term, value);
    }
    const where = document.createElement("p");
    where.className = "note";
    where.textContent = row.dataset.where + (pinned ? " (pinned: click it again to unpin)" : "");
    body.replaceChildren(where, list);
    for (const old of document.querySelectorAll(".tok.selected")) old.classList.remove("selected");
    for (const same of document.querySelectorAll('.run [data-key="' + token.dataset.key + '"]')) same.classList.add("selected");
  }
  document.addEventListener("mouseover", event => { const t = tokenOf(event); if (t && !pinned) show(t); });
  document.addEventListener("focusin", event => { const t = tokenOf(event); if (t && !pinned) show(t); });
  document.addEventListener("click", event => {
    const t = tokenOf(event);
    if (!t) return;
    pinned = pinned && pinned.dataset.key === t.dataset.key ? null : t;
    show(t);
  });
  const worst = document.querySelector("[data-worst]");
  if (worst) show(worst);
})();
"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
_CSP = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'"


def render_page(obs: Observations) -> str:
    """The page: a pure function of ``obs`` (the module docstring says what it shows)."""
    title = f"saeforge observe: {obs.where} of {obs.model}"
    worst = _worst_token(obs)
    texts = "".join(_text_html(obs, number, worst) for number in range(1, len(obs.texts) + 1))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_escape(title)}</h1>{_header_table(obs)}</header>"
        f'<main><div class="content">{_legend_html(obs)}{texts}{_features_html(obs)}</div>'
        '<aside id="panel"><h2>Token</h2><div id="panel-body"><p class="note">Hover over a token to see its '
        "features and figures here; click it to keep them.</p></div></aside></main>"
        f'<script type="application/json" id="observations">{script_json(obs.to_dict())}</script>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


# --------------------------------------------------------------------------- header and legend


def _header_table(obs: Observations) -> str:
    rows = [
        ("dictionary", obs.dictionary), ("model", obs.model), ("hookpoint", obs.where),
        ("features", f"{obs.n_latents:,}" + ("" if obs.layer_hookpoints is None else
                                            f" ({len(obs.layer_hookpoints)} covered layers x {obs.n_per_layer:,}: "
                                            f"layer l's feature i is l*{obs.n_per_layer} + i)")),
        ("per token", f"its top {obs.top} features by activation"),
        ("baseline", _baseline_sentence(obs)),
    ]
    if obs.feature is not None:
        rows.append(("feature asked for", f"{obs.feature}: its activation at every token is shown under each text"))
    cells = "".join(f'<tr><td>{_escape(k)}</td><td id="{"header-" + k.replace(" ", "-")}">{_escape(v)}</td></tr>'
                    for k, v in rows)
    return f"<table>{cells}</table>"


def _baseline_sentence(obs: Observations) -> str:
    b = obs.baseline
    if b.source == "held-out":
        return (f"held-out mean and variance the training recorded ({b.n_tokens:,} tokens, "
                f"total variance {b.total_variance:.4g})")
    return (f"computed on the {b.n_tokens:,} observed tokens (total variance {b.total_variance:.4g}): the dictionary "
            "records no held-out mean and variance, so relative errors compare these tokens with each other")


def _legend_html(obs: Observations) -> str:
    bar = f"linear-gradient(to right,rgba({_ERROR_RGB},0),rgba({_ERROR_RGB},{MAX_OPACITY}))"
    ticks = "".join(f"<span>{t}</span>" for t in ("0", "0.25", "0.5", "0.75", f"≥ {SATURATING_RELATIVE_ERROR:g}"))
    parts = [
        '<section id="legend"><h2>How to read it</h2><div class="legend">',
        f'<span class="scale"><span class="bar" style="background:{bar}"></span><span class="ticks">{ticks}</span>'
        "<span>relative error</span></span>",
        '<span><span class="tok beyond" style="background-color:'
        f'{_shade(_ERROR_RGB, 1.0)}">beyond</span> relative error above {SATURATING_RELATIVE_ERROR:g}</span>',
        '<span><span class="tok excluded">&lt;s&gt;</span> left out, as in training (BOS and special tokens): '
        "not encoded, no figures</span>",
        '<span><span class="tok no-baseline">tok</span> encoded, but no relative error (the baseline has no variance)</span>',
    ]
    if obs.feature is not None:
        fbar = f"linear-gradient(to right,rgba({_FEATURE_RGB},0),rgba({_FEATURE_RGB},{MAX_OPACITY}))"
        parts.append(f'<span class="scale"><span class="bar" style="background:{fbar}"></span><span class="ticks">'
                     f"<span>0</span><span>{_feature_max(obs):.4g}</span></span>"
                     f"<span>feature {obs.feature}'s activation (its largest on this page)</span></span>")
    parts.append(
        "</div><p class=\"note\">Each token is shaded by its <b>relative error</b> |x − x̂|² / E|x′ − μ|²: the squared "
        "error of the dictionary's reconstruction x̂ of the token's activation x, over the mean squared deviation of "
        "the baseline's activations x′ from their mean μ. 0: the dictionary explains the token fully; 1.0: the error "
        "is as large as a typical activation's deviation from the mean. Its mean over held-out tokens is the "
        "dictionary's FVU. The shading is linear and fixed from page to page: none at 0, full at "
        f"{SATURATING_RELATIVE_ERROR:g} and above. ⏎ and ⇥ stand for a newline and a tab in a token.</p></section>")
    return "".join(parts)


# --------------------------------------------------------------------------- texts


def _text_html(obs: Observations, number: int, worst: tuple[int, int] | None) -> str:
    text = obs.texts[number - 1]
    run = "".join(_token_span(number, t, worst) for t in text.tokens)
    parts = [f'<section class="text" id="text-{number}"><h2>Text {number}</h2>{_text_summary(text.tokens)}',
             f'<div class="run" data-shading="relative-error">{run}</div>']
    if obs.feature is not None:
        top = _feature_max(obs)
        strip = "".join(_feature_span(number, t, top) for t in text.tokens)
        parts.append(f"<h3>Feature {obs.feature}'s activation</h3>"
                     f'<div class="run" data-shading="feature">{strip}</div>')
    parts.append(f"<details><summary>Every token's features and figures</summary>{_token_table(obs, number)}</details>")
    return "".join(parts) + "</section>"


def _text_summary(tokens: list[TokenObservation]) -> str:
    encoded = [t for t in tokens if t.encoded]
    measured = [t for t in encoded if t.relative_error is not None]
    summary = f"{len(tokens)} tokens, {len(encoded)} encoded"
    if measured:
        mean = sum(t.relative_error for t in measured) / len(measured)
        top = max(measured, key=lambda t: t.relative_error)
        summary += (f"; relative error: mean {mean:.3f}, largest {top.relative_error:.3f} at position "
                    f"{top.position} ({visible(top.token)!r})")
    return f'<p class="note">{_escape(summary)}</p>'


def _token_span(number: int, token: TokenObservation, worst: tuple[int, int] | None) -> str:
    attributes = {"class": "tok", "data-key": f"{number}-{token.position}", "tabindex": "0",
                  "title": _token_title(token)}
    if not token.encoded:
        attributes["class"] += " excluded"
    elif token.relative_error is None:
        attributes["class"] += " no-baseline"
    else:
        share = min(token.relative_error / SATURATING_RELATIVE_ERROR, 1.0)
        attributes["style"] = f"background-color:{_shade(_ERROR_RGB, share)}"
        if token.relative_error > SATURATING_RELATIVE_ERROR:
            attributes["class"] += " beyond"
    if worst == (number, token.position):
        attributes["data-worst"] = ""
    return _span(attributes, token.token)


def _feature_span(number: int, token: TokenObservation, top: float) -> str:
    attributes = {"class": "tok", "data-key": f"{number}-{token.position}", "title": _token_title(token)}
    if not token.encoded:
        attributes["class"] += " excluded"
    else:
        activation = token.activation or 0.0
        attributes["data-activation"] = f"{activation:.6g}"
        share = min(max(activation / top, 0.0), 1.0) if top > 0 else 0.0
        attributes["style"] = f"background-color:{_shade(_FEATURE_RGB, share)}"
    return _span(attributes, token.token)


def _span(attributes: dict[str, str], token: str) -> str:
    """A token as an element: its text escaped, with a line break after a token holding a newline."""
    shown = "".join(f' {name}="{_escape(value)}"' for name, value in attributes.items())
    after = "<br>" if "\n" in token else ""
    return f"<span{shown}>{_escape(visible(token))}</span>{after}"


def _token_title(token: TokenObservation) -> str:
    head = f"position {token.position} · id {token.token_id}"
    if not token.encoded:
        return f"{head} · left out, as in training (BOS, special tokens): not encoded"
    figures = [head, f"relative error {_relative(token.relative_error)}", f"error norm {token.error_norm:.4g}",
               f"L0 {token.l0}"]
    if token.layers is not None:
        figures.append("relative error by layer " + " / ".join(_relative(layer.relative_error) for layer in token.layers))
    if token.activation is not None:
        figures.append(f"feature activation {token.activation:.4g}")
    features = ", ".join(f"{i}: {a:.4g}" for i, a in token.features) or "none fired"
    return " · ".join(figures) + f" · features {features}"


def _token_table(obs: Observations, number: int) -> str:
    labels = ["position", "token", "id", "relative error", "error norm", "L0"]
    if obs.feature is not None:
        labels.append(f"feature {obs.feature}")
    labels.append(f"top {obs.top} features (id: activation)")
    head = "<thead><tr>" + "".join(f"<th>{_escape(label)}</th>" for label in labels) + "</tr></thead>"
    rows = []
    for token in obs.texts[number - 1].tokens:
        cells = [f"{token.position}", f'<span class="tok">{_escape(visible(token.token))}</span>', f"{token.token_id}"]
        if token.encoded:
            cells += [_relative(token.relative_error), f"{token.error_norm:.4g}", f"{token.l0}"]
            if obs.feature is not None:
                cells.append(f"{token.activation or 0.0:.4g}")
            cells.append(_features_cell(token.features))
        else:
            cells += ["left out, as in training (BOS, special tokens): not encoded"] + [""] * (len(labels) - 4)
        tds = "".join(f'<td data-label="{_escape(label)}">{cell}</td>' for label, cell in zip(labels, cells, strict=True))
        where = f"text {number}, position {token.position}"
        rows.append(f'<tr id="row-{number}-{token.position}" data-where="{where}">{tds}</tr>')
    return f"<table>{head}<tbody>{''.join(rows)}</tbody></table>"


def _features_cell(features: list[tuple[int, float]]) -> str:
    if not features:
        return "none fired"
    return '<span class="feats">' + ", ".join(
        f'<a href="#feature-{i}">{i}</a>: {a:.4g}' for i, a in features) + "</span>"


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class _Firing:
    activation: float
    text: int
    """1-based, as the page numbers texts."""
    position: int


def _firings(obs: Observations) -> dict[int, list[_Firing]]:
    """Each feature in any token's top list: where it is there, largest activation first. The
    feature asked for (``obs.feature``) at every token it fired on, top list or not."""
    found: dict[int, list[_Firing]] = defaultdict(list)
    for number, text in enumerate(obs.texts, start=1):
        for token in text.tokens:
            for feature, activation in token.features:
                if feature != obs.feature:
                    found[feature].append(_Firing(activation, number, token.position))
            if obs.feature is not None and token.activation:
                found[obs.feature].append(_Firing(token.activation, number, token.position))
    return {f: sorted(firings, key=lambda x: (-x.activation, x.text, x.position)) for f, firings in found.items()}


def _features_html(obs: Observations) -> str:
    firings = _firings(obs)
    order = sorted(firings, key=lambda f: (f != obs.feature, -firings[f][0].activation, f))
    intro = (f'<p class="note">{len(order)} features, each with the tokens where it is among the token\'s top '
             f"{obs.top} (a feature that fired on a token but ranked lower there is not listed for it), largest "
             "activation first; features ordered by their largest activation."
             + _asked_note(obs.feature, firings) + "</p>")
    cards = "".join(_feature_card(obs, f, firings[f]) for f in order)
    return f'<section id="features"><h2>Features</h2>{intro}{cards}</section>'


def _asked_note(feature: int | None, firings: dict[int, list[_Firing]]) -> str:
    if feature is None:
        return ""
    if feature not in firings:
        return f" Feature {feature}, asked for, fired on no token here."
    return f" Feature {feature}, asked for, comes first with every token it fired on."


def _feature_card(obs: Observations, feature: int, firings: list[_Firing]) -> str:
    asked = " · asked for" if feature == obs.feature else ""
    band = f"largest {firings[0].activation:.4g} · on {len(firings)} token{'s' if len(firings) != 1 else ''}{asked}"
    items = "".join(_firing_html(obs, f) for f in firings[:_CONTEXTS_PER_FEATURE])
    more = (f'<p class="note">… and {len(firings) - _CONTEXTS_PER_FEATURE} more, with smaller activations.</p>'
            if len(firings) > _CONTEXTS_PER_FEATURE else "")
    return (f'<article class="feature" id="feature-{feature}" data-feature="{feature}"><h3>Feature {feature}'
            f'<span class="band">{_escape(band)}</span></h3><ol class="contexts">{items}</ol>{more}</article>')


def _firing_html(obs: Observations, firing: _Firing) -> str:
    tokens = obs.texts[firing.text - 1].tokens
    start, end = max(firing.position - _CONTEXT_BEFORE, 0), min(firing.position + _CONTEXT_AFTER + 1, len(tokens))
    spans = []
    for token in tokens[start:end]:
        text = _escape(visible(token.token))
        if token.position == firing.position:
            spans.append(f'<mark class="tok hit" data-key="{firing.text}-{token.position}">{text}</mark>')
        else:
            spans.append(f'<span class="tok{" excluded" if not token.encoded else ""}">{text}</span>')
    return (f'<li data-activation="{firing.activation:.6g}"><span class="act">{firing.activation:.4g}</span>'
            f'<span class="ctx">{"…" if start > 0 else ""}{"".join(spans)}{"…" if end < len(tokens) else ""}</span>'
            f'<span class="where">text {firing.text}, position {firing.position}</span></li>')


# --------------------------------------------------------------------------- helpers


def _worst_token(obs: Observations) -> tuple[int, int] | None:
    """(text number, position) of the page's largest relative error: the panel shows it first."""
    measured = [(t.relative_error, number, t.position) for number, text in enumerate(obs.texts, start=1)
                for t in text.tokens if t.relative_error is not None]
    if not measured:
        return None
    _, number, position = max(measured, key=lambda m: (m[0], -m[1], -m[2]))
    return number, position


def _feature_max(obs: Observations) -> float:
    return max((t.activation or 0.0 for text in obs.texts for t in text.tokens), default=0.0)


def _shade(rgb: str, share: float) -> str:
    return f"rgba({rgb},{MAX_OPACITY * share:.3f})"


def _relative(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _escape(text: str) -> str:
    return html.escape(text, quote=True)
