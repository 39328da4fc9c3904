"""The report page: one self-contained HTML file drawn from a dictionary's files alone.

Sections (each an element with a fixed id): ``#summary``, ``#training-curves``,
``#firing-histogram``, ``#evaluation``, ``#unexplained`` (only when ``eval.json`` has it) and
``#features``: the feature cards of ``report_features.json`` (``cluster.report_cards``); the
cards of the features ``eval.json``'s ``audit`` audited (``cluster.evaluation.audit_cards``)
carry its headline figures (``.audit``, id ``audit-<latent>``).

A transcoder's page (cfg.json's ``metadata.hook_name_out``) says in its header which hookpoint
it reads and which it writes; its cards show what each feature reads (top-activating contexts at
the input hookpoint) and what it writes (the tokens its decoder row promotes), and a skip
transcoder's page says its skip term is not a feature. A cross-layer transcoder's page (cfg.json's
architecture ``*_clt``) names its layer range in the header and the summary; each card says which
layer its feature reads (the latent ``l * d_sae + i`` is layer ``l``'s feature ``i``) and the MLP
outputs it writes, its promoted tokens those of its decoder rows summed over those layers.

Every text that comes from the data (tokens, metadata, eval keys) is HTML-escaped, and the page's
Content-Security-Policy allows no script at all: a token is untrusted text. No torch here:
``render_report`` redraws the page cheaply whenever ``eval.json`` changes (the spliced
evaluation runs after training), without the model or the activations.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster.report_cards import Context, FeatureCard, FeatureSample
from interp.markup import BASE_CSS, visible
from interp.svg import CHART_CSS, svg_histogram, svg_line_chart
from trainer.layout import CONFIG_FILE, EVAL_FILE, FEATURES_FILE, REPORT_FILE, TRAINING_CURVES_FILE


def render_report(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """``{REPORT_FILE: html}`` drawn from a dictionary's files alone: ``cfg.json``, and what there
    is of ``eval.json``, ``training_curves.json`` and ``report_features.json``. Call it again after
    ``eval.json`` changes (the spliced evaluation adds ``lm`` and ``unexplained``)."""
    cfg = json.loads(files[CONFIG_FILE]) if CONFIG_FILE in files else {}
    evaluation = json.loads(files[EVAL_FILE]) if EVAL_FILE in files else {}
    curves = json.loads(files[TRAINING_CURVES_FILE]) if TRAINING_CURVES_FILE in files else None
    sample = FeatureSample.from_json(files[FEATURES_FILE]) if FEATURES_FILE in files else None
    page = render_html(cfg=cfg, evaluation=evaluation, curves=curves, sample=sample)
    return {REPORT_FILE: page.encode("utf-8")}

_CURVES = (  # (key, title, log axis)
    ("loss", "loss", True), ("fvu", "FVU (training batches)", True), ("l0", "L0: latents firing per token", False),
    ("dead_fraction", "dead fraction", False), ("mse", "MSE (normalised activations)", True),
    ("dense_fraction", "dense fraction (firing on > 10% of tokens)", False),
    ("aux_loss", "auxiliary loss", False), ("sparsity_loss", "sparsity loss", False),
    ("lr", "learning rate", False), ("tokens_per_second", "tokens / s", False),
)
_HEADLINE = ("fvu", "mse", "cosine", "l0", "dead_fraction", "dense_fraction", "train_tokens", "train_steps", "n_tokens")
_SECTIONED = {"firing_histogram", "unexplained", "audit"}

_CSS = BASE_CSS + CHART_CSS + """
header{background:#1d3557;color:#fff;padding:18px 28px}header h1{margin:0 0 6px;font-size:22px}
nav a{color:#cfe3ff;margin-right:16px;text-decoration:none}main{padding:8px 28px 40px;max-width:1400px}
h3{margin:0 0 6px;font-size:15px}h4{margin:10px 0 4px;font-size:13px;color:#4a5563}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
article.feature{border:1px solid #dde1e6;border-radius:8px;padding:10px 14px;background:#fcfcfd}
.band{font-size:11px;padding:1px 7px;border-radius:9px;background:#e8eef8;color:#1d3557;margin-left:6px}
ol.contexts{margin:0;padding-left:22px}ol.contexts li{margin:2px 0}
.act{display:inline-block;min-width:52px;color:#5b6470;font-variant-numeric:tabular-nums}
.ctx{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px}
.tok{white-space:pre;border-radius:3px}mark.hit{background:#ffd166;outline:1px solid #e0a100;font-weight:700;color:#111}
.chip{display:inline-block;font-family:"DejaVu Sans Mono",Menlo,monospace;font-size:12px;white-space:pre;
background:#eef6ee;border:1px solid #cfe6cf;border-radius:4px;padding:0 5px;margin:2px 3px 2px 0}
.chip.neg{background:#fbeeee;border-color:#efcfcf}.chip small{color:#5b6470;margin-left:4px}
.audit{border-top:1px dashed #c9d2dc;margin-top:10px}.audit td.num{white-space:nowrap}
"""


def render_html(
    *,
    cfg: dict[str, Any],
    evaluation: dict[str, Any],
    curves: list[dict[str, Any]] | None,
    sample: FeatureSample | None,
) -> str:
    """The report page: a pure function of its arguments."""
    metadata = cfg.get("metadata", {})
    ends, clt = _transcoder_ends(cfg), _cross_layer(cfg)
    if clt is not None:
        title = f"Cross-layer transcoder report: {clt.span()} of {metadata.get('model_name', '?')}"
    elif ends is None:
        title = f"SAE report: {metadata.get('hook_name', '?')} of {metadata.get('model_name', '?')}"
    else:
        title = f"Transcoder report: reads {ends[0]} -> writes {ends[1]} of {metadata.get('model_name', '?')}"
    sections = [
        ("summary", "Summary", _summary_html(cfg, evaluation)),
        ("training-curves", "Training curves", _curves_html(curves)),
        ("firing-histogram", "Firing frequencies", _histogram_html(evaluation.get("firing_histogram"))),
        ("evaluation", "Held-out evaluation", _evaluation_html(evaluation)),
    ]
    if "unexplained" in evaluation:
        sections.append(("unexplained", "What the dictionary leaves unexplained",
                         _unexplained_html(evaluation["unexplained"], transcoder=ends is not None)))
    sections.append(("features", "Features", _features_html(sample, evaluation.get("audit"), cfg)))
    nav = "".join(f'<a href="#{sid}">{html.escape(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(name)}</h2>{content}</section>' for sid, name, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        # No script may run: everything shown is static, and tokens are untrusted text.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><nav>{nav}</nav></header><main>{body}</main></body></html>\n"
    )


def _transcoder_ends(cfg: dict[str, Any]) -> tuple[str, str] | None:
    """(input hookpoint, target hookpoint) of a transcoder's cfg.json; None for an SAE."""
    metadata = cfg.get("metadata", {})
    if "hook_name_out" not in metadata:
        return None
    return str(metadata.get("hook_name", "?")), str(metadata["hook_name_out"])


@dataclass(frozen=True)
class _CrossLayer:
    """A cross-layer transcoder's layers, from its cfg.json: latent ``l * per_layer + i`` is
    layer ``l``'s feature ``i``; it reads ``inputs[l]`` and writes ``targets[l:]``."""

    inputs: list[str]
    targets: list[str]
    per_layer: int

    def layer(self, latent: int) -> int:
        """The position among the covered layers of the layer whose feature ``latent`` is."""
        return min(latent // max(self.per_layer, 1), len(self.inputs) - 1)

    def model_layer(self, latent: int) -> int | str:
        """The model's layer number of the layer ``latent`` reads (its position when the
        hookpoint names none)."""
        layer = self.layer(latent)
        number = _layer_number(self.inputs[layer])
        return layer if number is None else number

    def writes(self, layer: int) -> str:
        first, last = self.targets[layer], self.targets[-1]
        return first if first == last else f"{first} … {last}, summed over {len(self.targets) - layer} layers"

    def span(self) -> str:
        """``layers 0–3 (reads <first input> … writes <last target>)``."""
        numbers = [_layer_number(h) for h in (self.inputs[0], self.targets[-1])]
        layers = (f"layers {numbers[0]}–{numbers[1]}" if None not in numbers and numbers[0] != numbers[1]
                  else f"{len(self.inputs)} layer{'s' if len(self.inputs) != 1 else ''}")
        return f"{layers} (reads {self.inputs[0]} … writes {self.targets[-1]})"


def _layer_number(hookpoint: str) -> int | None:
    """The layer of a canonical hookpoint (``model.layers.2.mlp:input`` -> 2), if it names one."""
    found = re.search(r"\.(\d+)(?:\.|:|$)", hookpoint)
    return int(found.group(1)) if found else None


def _cross_layer(cfg: dict[str, Any]) -> _CrossLayer | None:
    """A cross-layer transcoder's layers (architecture ``*_clt``); None for any other dictionary."""
    if not str(cfg.get("architecture", "")).endswith("_clt"):
        return None
    metadata = cfg.get("metadata", {})
    inputs = [str(h) for h in metadata.get("hook_names") or [metadata.get("hook_name", "?")]]
    targets = [str(h) for h in metadata.get("hook_names_out") or [metadata.get("hook_name_out", "?")]]
    if len(targets) != len(inputs):
        targets = (targets + ["?"] * len(inputs))[: len(inputs)]
    return _CrossLayer(inputs, targets, int(cfg.get("d_sae") or 1))


def _has_skip(cfg: dict[str, Any]) -> bool:
    """A skip transcoder: ``skip_transcoder``, ``jumprelu_skip_transcoder`` (SAELens's) or
    ``topk_skip_transcoder`` (ours); ``trainer.sae.saved_with_skip``'s rule, without torch."""
    return str(cfg.get("architecture", "")).endswith("skip_transcoder")


def _summary_html(cfg: dict[str, Any], evaluation: dict[str, Any]) -> str:
    metadata = cfg.get("metadata", {})
    clt = _cross_layer(cfg)
    per = "" if clt is None else " per layer"
    where: list[tuple[str, Any]] = [("hookpoint", metadata.get("hook_name")),
                                    *([("output hookpoint", metadata["hook_name_out"])] if "hook_name_out" in metadata else [])]
    if clt is not None:
        where = [("layers", clt.span()), ("input hookpoints", clt.inputs), ("output hookpoints", clt.targets)]
    rows: list[tuple[str, Any]] = [
        ("model", metadata.get("model_name")), *where,
        ("architecture", f"{cfg.get('architecture')} (trained as {metadata.get('training_architecture', '?')})"),
        (f"d_in{per}", cfg.get("d_in")), *([(f"d_out{per}", cfg["d_out"])] if "d_out" in cfg else []),
        (f"latents (d_sae){per}", cfg.get("d_sae")),
        *([("TopK across", cfg["clt_topk"])] if "clt_topk" in cfg else []),
        *([("k", cfg["k"])] if "k" in cfg else []),
        *[(key, metadata[key]) for key in ("run_name", "cache_key") if key in metadata],
        *[(f"held-out {key}" if key not in ("train_tokens", "train_steps") else key, evaluation[key])
          for key in _HEADLINE if key in evaluation],
    ]
    lm = evaluation.get("lm")
    if isinstance(lm, dict):
        rows += [(f"spliced LM: {key}", lm[key]) for key in ("ce_recovered", "delta_lm_loss", "kl_divergence") if key in lm]
    return _table(rows)


def _curves_html(curves: list[dict[str, Any]] | None) -> str:
    if not curves:
        return '<p class="note">No training curves were recorded with this dictionary.</p>'
    plots = []
    for key, title, log_y in _CURVES:
        points = [(float(e["step"]), float(e[key])) for e in curves
                  if isinstance(e.get(key), int | float) and isinstance(e.get("step"), int | float)]
        if points:
            plots.append(svg_line_chart(points, title=title, x_label="step", y_label="", log_y=log_y))
    note = (f'<p class="note">{len(curves)} logging steps; each point averages the steps since the previous one. '
            "Loss and MSE are in the training's normalised units.</p>")
    return note + f'<div class="plots">{"".join(plots)}</div>'


def _histogram_html(histogram: Any) -> str:
    if not (isinstance(histogram, dict) and histogram.get("latents") and histogram.get("log10_frequency_edges")):
        return f'<p class="note">{EVAL_FILE} has no firing histogram.</p>'
    edges, counts = histogram["log10_frequency_edges"], histogram["latents"]
    if len(edges) != len(counts) + 1:
        return f'<p class="note">{EVAL_FILE} firing histogram: {len(edges)} edges for {len(counts)} bins; not drawn.</p>'
    svg = svg_histogram(edges, counts, title="latents by held-out firing frequency", x_label="log10 firing frequency",
                        y_label="latents", marker=(-1.0, "dense: > 10%"))
    return (f'<div class="plots">{svg}</div><p class="note">Frequency: the fraction of held-out tokens a latent '
            "fires on. Latents that never fired count at -10, the leftmost bar.</p>")


def _evaluation_html(evaluation: dict[str, Any]) -> str:
    if not evaluation:
        return f'<p class="note">No {EVAL_FILE}.</p>'
    scalars = [(k, v) for k, v in sorted(evaluation.items()) if k not in _SECTIONED and not isinstance(v, dict | list)]
    parts = [_table(scalars)]
    for key, value in sorted(evaluation.items()):
        if key in _SECTIONED or not isinstance(value, dict | list):
            continue
        heading = "Language-model loss with the dictionary spliced in" if key == "lm" else key
        parts.append(f"<h4>{html.escape(heading)}</h4>{_value_html(value)}")
    return "".join(parts)


def _features_html(sample: FeatureSample | None, audit: Any = None, cfg: dict[str, Any] | None = None) -> str:
    ends, clt = _transcoder_ends(cfg or {}), _cross_layer(cfg or {})
    skip = ""
    if ends is not None and _has_skip(cfg or {}):
        skip = ('<p class="note">This is a skip transcoder: beside its features it adds an affine skip term '
                "(W_skip, a dense map of the whole input) to its prediction. The skip term is not a feature: it "
                "has no card, reads every input direction at once and is not edited by steering a feature.</p>")
    return skip + _feature_cards_html(sample, audit, ends, clt)


def _feature_cards_html(sample: FeatureSample | None, audit: Any, ends: tuple[str, str] | None,
                        clt: _CrossLayer | None = None) -> str:
    if sample is None:
        return f'<p class="note">No feature sample was computed for this dictionary ({FEATURES_FILE} is missing).</p>'
    if not sample.cards:
        return '<p class="note">No live latents to show.</p>'
    intro = (f'<p class="note">{len(sample.cards)} latents, drawn (seed {sample.seed}) from the most frequent, middle '
             "and rarest thirds of the live latents; contexts are the top activations among the first "
             f"{sample.rows_scanned:,} held-out tokens, with the activating token highlighted.</p>")
    if clt is not None:
        intro += ('<p class="note">A cross-layer transcoder feature of layer l reads that layer\'s MLP input (its '
                  "top-activating contexts, encoded from the held-out inputs of every covered layer) and writes "
                  "the MLP outputs of layer l and every later covered layer; its promoted tokens are those of its "
                  "decoder rows summed over those layers (its total write into the residual stream).</p>")
    elif ends is not None:
        intro += (f'<p class="note">A transcoder feature reads {html.escape(ends[0])} (its top-activating '
                  f"contexts, encoded from that hookpoint's held-out activations) and writes "
                  f"{html.escape(ends[1])} (its decoder row; the tokens it promotes through the unembedding).</p>")
    if sample.has_logits:
        intro += f'<p class="note">{html.escape(sample.logits_note)}</p>'
    else:
        intro += f'<p class="note">Promoted tokens are unavailable: {html.escape(sample.logits_note)}.</p>'
    layer = [] if clt is None else ["layer"]
    index = _table_rows(
        ["latent", *layer, "band", "frequency", "fired (scanned)", "max activation"],
        [[f'<a href="#feature-{c.index}">{c.index}</a>', *([] if clt is None else [_number(clt.model_layer(c.index))]),
          html.escape(c.band), _number(c.frequency), _number(c.fired), _number(c.max_activation)]
         for c in sample.cards],
    )
    audited = _audited(audit)
    intro += _audit_intro(audit, audited)
    cards = "".join(_card_html(c, sample.has_logits, audited.get(c.index, ""), ends, clt) for c in sample.cards)
    return f'{intro}{index}<div class="cards">{cards}</div>'


def _card_html(card: FeatureCard, has_logits: bool, audit: str = "", ends: tuple[str, str] | None = None,
               clt: _CrossLayer | None = None) -> str:
    reads, writes = ("", "") if ends is None else (f" (reads {ends[0]})", f" (writes {ends[1]})")
    which = ""
    if clt is not None:
        layer = clt.layer(card.index)
        reads, writes = f" (reads {clt.inputs[layer]})", f" (writes {clt.writes(layer)})"
        which = f" · layer {clt.model_layer(card.index)}, feature {card.index - layer * clt.per_layer}"
    frequency = "unknown" if card.frequency is None else f"{card.frequency:.3g}" + (
        f" (1 in {1 / card.frequency:,.0f} tokens)" if card.frequency > 0 else "")
    parts = [
        f'<article class="feature" id="feature-{card.index}"><h3>Latent {card.index}{html.escape(which)}'
        f'<span class="band">{html.escape(card.band)}</span></h3>',
        f'<p class="note">held-out firing frequency {frequency} · fired on {card.fired:,} scanned tokens · '
        f"max activation {card.max_activation:.4g}</p><h4>Top-activating contexts{html.escape(reads)}</h4>",
    ]
    if card.contexts:
        parts.append('<ol class="contexts">' + "".join(_context_html(c) for c in card.contexts) + "</ol>")
    else:
        parts.append('<p class="note">It did not fire on the scanned tokens.</p>')
    if has_logits:
        parts.append(f"<h4>Promoted tokens{html.escape(writes)}</h4>" + _chips(card.promoted, ""))
        parts.append("<h4>Suppressed tokens</h4>" + _chips(card.suppressed, " neg"))
    return "".join(parts) + audit + "</article>"


def _audit_intro(audit: Any, audited: dict[int, str]) -> str:
    if not isinstance(audit, dict):
        return ""
    if "skipped" in audit:
        return f'<p class="note">No steer audit: {html.escape(str(audit["skipped"]))}.</p>'
    shown = ", ".join(f'<a href="#audit-{f}">{f}</a>' for f in audited)
    suppress = audit.get("suppress") or {}
    return (f'<p class="note">Steer audit of latent{"s" if len(audited) != 1 else ""} {shown or "none"} '
            f'({_number(audit.get("seconds"))} s, on {_number(suppress.get("n_encoded_tokens"))} held-out tokens): '
            "each clamped high and zeroed with the error term kept; the change in the log-probability of the "
            "tokens its decoder direction promotes, beside the same edit along a random direction of equal norm. "
            "A dictionary is a partial account of the model: the audit, not the card, says whether a steer moves "
            "it.</p>")


def _audited(audit: Any) -> dict[int, str]:
    """Each audited feature's block for its card, from ``eval.json``'s ``audit``."""
    if not isinstance(audit, dict) or "skipped" in audit:
        return {}
    units = {u.get("feature"): u for u in audit.get("units") or [] if isinstance(u, dict)}
    found: dict[int, dict[str, dict]] = {}
    for kind in ("amplify", "suppress"):
        for entry in (audit.get(kind) or {}).get("features") or []:
            if isinstance(entry, dict) and isinstance(entry.get("feature"), int):
                found.setdefault(entry["feature"], {})[kind] = entry
    return {feature: _audit_html(feature, edits, units.get(feature), audit.get("multiple"))
            for feature, edits in found.items()}


def _audit_html(feature: int, edits: dict[str, dict], unit: dict | None, multiple: Any) -> str:
    rows = []
    amplify, suppress = edits.get("amplify"), edits.get("suppress")
    if amplify is not None:
        scale = (f"{_number(multiple)}× its {html.escape(str(unit.get('unit')))}" if unit else "high")
        rows.append(_audit_row(f"clamped to {scale} ({_number(amplify.get('value'))})", amplify))
    if suppress is not None:
        rows.append(_audit_row("zeroed where it fires", suppress))
    header = ["edit", "positions", "Δ log p(targets)", "random direction", "KL (nats)", "dashboard: set → read back",
              "leak"]
    targets = (amplify or suppress or {}).get("targets") or []
    chips = "".join(f'<span class="chip">{html.escape(visible(str(t.get("token"))))}</span>'
                    for t in targets if isinstance(t, dict))
    summary = (suppress or {}).get("summary") or ""
    return (f'<div class="audit" id="audit-{feature}"><h4>Steer audit</h4>{_table_rows(header, rows)}'
            f'<p class="note">targets (promoted): {chips}</p>'
            + (f'<p class="note">{html.escape(summary)}</p>' if summary else "") + "</div>")


def _audit_row(edit: str, entry: dict) -> list[str]:
    steered, control = entry.get("steered") or {}, entry.get("control") or {}
    dashboard, leak = entry.get("dashboard") or {}, entry.get("leak") or {}
    continuations = entry.get("continuations")
    if isinstance(continuations, dict):
        edit += (f" · targets in sampled continuations {_percent(continuations.get('unedited_target_rate'))} → "
                 f"{_percent(continuations.get('steered_target_rate'))}")
    return [
        edit, f'<span class="num">{_number(entry.get("n_positions"))}</span>',
        _signed(steered.get("target_logprob_change")), _signed(control.get("target_logprob_change")),
        _number(steered.get("kl_divergence")),
        f"{_number(dashboard.get('feature_set'))} → {_number(dashboard.get('feature_read_back'))}",
        _percent(leak.get("leak")) if leak else "—",
    ]


def _signed(value: Any) -> str:
    return f"{value:+.3g}" if isinstance(value, int | float) and math.isfinite(value) else _number(value)


def _percent(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, int | float) and math.isfinite(value) else "—"


def _context_html(context: Context) -> str:
    spans = []
    for i, token in enumerate(context.tokens):
        text = html.escape(visible(token))
        if i == context.hit:
            spans.append(f'<mark class="tok hit" title="activation {context.activation:.4g}">{text}</mark>')
        else:
            spans.append(f'<span class="tok">{text}</span>')
    where = f"sequence {context.sequence_id}, position {context.position}"
    return (f'<li title="{html.escape(where)}"><span class="act">{context.activation:.3g}</span>'
            f'<span class="ctx">{"…" if context.more_before else ""}{"".join(spans)}'
            f'{"…" if context.more_after else ""}</span></li>')


def _chips(tokens: list[tuple[str, float]], kind: str) -> str:
    return "<div>" + "".join(
        f'<span class="chip{kind}">{html.escape(visible(t))}<small>{v:+.3g}</small></span>' for t, v in tokens
    ) + "</div>"


def _number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return html.escape(str(value))


def _table(rows: list[tuple[str, Any]]) -> str:
    return _table_rows(None, [[html.escape(str(k)), _value_html(v)] for k, v in rows])


def _table_rows(header: list[str] | None, rows: list[list[str]]) -> str:
    """A table of already-escaped cells."""
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _value_html(value: Any) -> str:
    """Any JSON value as escaped HTML: dicts as key/value tables, lists of dicts as tables."""
    if isinstance(value, dict):
        return _table_rows(None, [[html.escape(str(k)), _value_html(v)] for k, v in value.items()])
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            return _table_rows(columns, [[_value_html(v.get(c)) for c in columns] for v in value])
        shown = ", ".join(_value_html(v) for v in value[:32])
        return shown + (f" … ({len(value) - 32} more)" if len(value) > 32 else "")
    return _number(value)


def _unexplained_html(unexplained: Any, *, transcoder: bool = False) -> str:
    """``eval.json``'s ``unexplained`` (``cluster.evaluation``): the error summaries as one table,
    the error-norm histogram as a plot, the worst tokens in their contexts; any other key as is.
    A transcoder's error is its target's minus its prediction; a cross-layer transcoder's is over
    every covered MLP output side by side, with each layer's summaries under ``layers``."""
    if not isinstance(unexplained, dict):
        return _value_html(unexplained)
    rest = dict(unexplained)
    parts = []
    summaries = {k: rest.pop(k) for k in ("error_norm", "token_fvu") if isinstance(rest.get(k), dict)}
    if summaries:
        parts.append(_summaries_html(summaries))
    layers = rest.get("layers")
    if isinstance(layers, list) and layers and all(isinstance(entry, dict) for entry in layers):
        rest.pop("layers")  # a cross-layer transcoder's: each covered output's own summaries
        parts.append("<h4>Per covered layer</h4>" + _summaries_html(
            {f"{entry.get('hookpoint_out', '?')}: {name}": entry[name]
             for entry in layers for name in ("error_norm", "token_fvu") if isinstance(entry.get(name), dict)}))
    histogram = rest.get("error_norm_histogram")
    if isinstance(histogram, dict) and len(histogram.get("edges", [])) == len(histogram.get("tokens", [])) + 1 > 1:
        rest.pop("error_norm_histogram")
        parts.append('<div class="plots">' + svg_histogram(
            histogram["edges"], histogram["tokens"], title="tokens by reconstruction-error norm",
            x_label="‖y − ŷ‖: target − prediction (raw units)" if transcoder else "‖x − x̂‖ (raw activation units)",
            y_label="tokens") + "</div>")
    worst = rest.get("worst_contexts")
    if isinstance(worst, list) and worst and all(isinstance(w, dict) for w in worst):
        rest.pop("worst_contexts")
        parts.append("<h4>Tokens with the largest reconstruction error</h4>" + _worst_html(worst))
    if rest:
        parts.insert(0, _value_html(rest))
    return "".join(parts)


_QUANTILES = ("mean", "p50", "p90", "p99", "max")


def _summaries_html(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per summary (``error_norm``, ``token_fvu``), one column per statistic."""
    found = list(dict.fromkeys(c for summary in summaries.values() for c in summary))
    # eval.json is written with sorted keys: put the quantiles back in order.
    columns = [c for c in _QUANTILES if c in found] + [c for c in found if c not in _QUANTILES]
    return _table_rows(["per token", *columns],
                       [[html.escape(name), *(_number(s.get(c)) for c in columns)] for name, s in summaries.items()])


def _worst_html(worst: list[dict[str, Any]]) -> str:
    columns = [c for c in dict.fromkeys(k for w in worst for k in w) if c not in ("context", "token")]
    rows = [[*(_value_html(w.get(c)) for c in columns), _marked_context(w.get("context"), w.get("token"))]
            for w in worst]
    return _table_rows([*columns, "context"], rows)


def _marked_context(context: Any, token: Any) -> str:
    """``cluster.evaluation``'s ``prefix[[token]]suffix`` with the token highlighted."""
    if not isinstance(context, str):
        return _value_html(context)
    marker = f"[[{token}]]" if isinstance(token, str) else "[["
    at = context.find(marker)
    if at < 0 or not isinstance(token, str):
        return f'<span class="ctx tok">{html.escape(visible(context))}</span>'
    before, after = context[:at], context[at + len(marker):]
    return (f'<span class="ctx"><span class="tok">{html.escape(visible(before))}</span>'
            f'<mark class="tok hit">{html.escape(visible(token))}</mark>'
            f'<span class="tok">{html.escape(visible(after))}</span></span>')
