"""``saeforge steer --audit``'s page drawn from hand-built ``AuditResult``s (an amplification with
its dose-response, a suppression with its leak), opened in a real headless browser (Debian's
chromium) and checked on what it renders: the sentences, the figures, the curves and bars drawn
where the data puts them, hostile tokens and continuations as text that never runs, nothing fetched."""

from __future__ import annotations

import html
import json
import re

from browser import Element, browse, chromium_path, parse

from interp.audit import (
    AuditResult,
    Behaviour,
    Continuations,
    Cost,
    Dashboard,
    DosePoint,
    DoseResponse,
    Example,
    FeatureAudit,
    Leak,
    Target,
)
from interp.audit_page import render_audit_page
from interp.svg import svg_bar_chart

HOSTILE = "</script><script>window.pwned=1</script>"
QUOTES = '" onmouseover="window.pwned=2'
MULTIPLES = [0.0, 1.0, 2.0, 5.0, 10.0, 20.0]
# Not monotone, so that "drawn in the data's order" is more than "drawn rising".
LOGPROBS = [-6.0, -5.5, -4.75, -3.0, -1.9, -2.4]
KLS = [0.01, 0.02, 0.05, 0.3, 1.1, 2.7]
COHERENCE = [3.1, 3.0, 3.2, 3.9, 5.2, None]  # the last dose's continuations not scored: no point drawn


def _behaviour(logprob: float, change: float, probability: float, p_change: float, kl: float) -> Behaviour:
    return Behaviour(logprob, change, probability, p_change, kl)


def amplification() -> AuditResult:
    targets = [Target(310, " Paris", 0.91), Target(311, HOSTILE, 0.5), Target(312, "\n<b>&amp;", 0.25)]
    dose = DoseResponse("held-out maximum", 3.0, [
        DosePoint(m, 3.0 * m, lp, lp + 5.2, kl, c) for m, lp, kl, c in zip(MULTIPLES, LOGPROBS, KLS, COHERENCE, strict=True)])
    continuations = Continuations(
        seeds=[0, 1, 2, 3, 4], n_prompts=2, max_new_tokens=16, unedited_target_rate=0.1, steered_target_rate=0.7,
        unedited_target_share=0.0125, steered_target_share=0.1875, unedited_coherence=3.05, steered_coherence=4.4,
        examples=[Example("The capital <i>of</i>", " is a city\nof lights", f" Paris{HOSTILE}\tParis"),
                  Example(QUOTES, "\x00 quiet", " Paris &amp; Paris")])
    feature = FeatureAudit(
        feature=12, kind="amplify", mode="clamp", error_term="keep", value=30.0, targets=targets,
        targets_source="promoted", n_positions=4032,
        unedited=_behaviour(-5.2, 0.0, 0.0055, 0.0, 0.0),
        dashboard=Dashboard(feature_before=0.42, feature_set=30.0, feature_read_back=27.5),
        steered=_behaviour(-1.9, 3.3, 0.15, 0.1445, 1.1),
        control=_behaviour(-5.05, 0.15, 0.0064, 0.0009, 0.35),
        continuations=continuations, leak=None, dose_response=dose,
        summary=f"Setting (clamp 30) feature 12 moves the log-probability of ' Paris', {HOSTILE!r} by +3.3 nats "
                "(a random direction of equal norm: +0.15) at KL 1.1 nats; the dashboard reads 27.5 for the 30 set.",
    )
    return _result(feature, notes=["feature 12: <b>no</b> maximum recorded & the unit is the audit text's"])


def suppression() -> AuditResult:
    feature = FeatureAudit(
        feature=7, kind="suppress", mode="clamp", error_term="keep", value=0.0,
        targets=[Target(90, HOSTILE, None), Target(91, " York", None)], targets_source="given", n_positions=211,
        unedited=_behaviour(-2.0, 0.0, 0.135, 0.0, 0.0),
        dashboard=Dashboard(feature_before=2.6, feature_set=0.0, feature_read_back=0.05),
        steered=_behaviour(-2.2, -0.2, 0.11, -0.025, 0.04),
        control=_behaviour(-2.01, -0.01, 0.134, -0.001, 0.02),
        continuations=None,
        leak=Leak(projected_drop=0.8, zeroed_drop=0.2, leak=0.75, reconstruction_drop=0.5),
        dose_response=None,
        summary=f"Zeroing feature 7 with the error term kept lowers the log-probability of {HOSTILE!r} by 0.2 nats "
                "where it fires, and projecting its decoder direction out of the whole activation by 0.8: 75% of the "
                "direction's effect leaks past the suppression through what the dictionary does not explain.",
    )
    return _result(feature, notes=[])


def _result(feature: FeatureAudit, notes: list[str]) -> AuditResult:
    return AuditResult(
        dictionary="store/runs/r&1/dictionary/model.layers.1", hookpoint="model.layers.1", model="tiny-llama <test>",
        text_source="held-out sequences of the run <r&1>", n_sequences=32, n_encoded_tokens=4032, seeds=[0, 1, 2, 3, 4],
        control_seed=7, features=[feature],
        cost=Cost(forward_passes=1234, text_passes=9, text_tokens=4096, generated_tokens=640,
                  tokens_past_hookpoint=51234, text_pass_equivalents=12.5),
        notes=notes,
    )


def visible(text: str) -> str:
    """How the page writes a token: control characters as symbols (independent of interp.markup)."""
    return text.replace("\n", "⏎").replace("\t", "⇥").replace("\x00", "\\x00")


def visible_text(text: str) -> str:
    """How the page writes a continuation: its line breaks kept."""
    return "\n".join(visible(line) for line in text.split("\n"))


# --------------------------------------------------------------------------- reading the page


def embedded_json(page: str) -> dict:
    start = page.index('<script type="application/json" id="audit">')
    return json.loads(page[page.index(">", start) + 1 : page.index("</script>", start)])


def figures(table: Element) -> dict[str, list[float | None]]:
    """Each row's figures (``data-figure``) as the numbers its cells hold."""
    return {tr.attrs["data-figure"]: [_value(td) for td in tr.find_all("td", class_="num")]
            for tr in table.find_all("tr") if "data-figure" in tr.attrs}


def _value(td: Element) -> float | None:
    """A cell's exact value, checked against the text the reader sees."""
    if "data-value" not in td.attrs:
        assert td.text() == "n/a", td.text()
        return None
    exact = float(td.attrs["data-value"])
    shown = td.text().replace(",", "")
    if shown.endswith("%"):
        assert abs(float(shown[:-1]) / 100 - exact) <= 0.0051 * max(1.0, abs(exact)), (shown, exact)
    else:
        assert abs(float(shown) - exact) <= 5e-4 * max(1.0, abs(exact)), (shown, exact)
    return exact


def polyline(svg: Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in svg.one("polyline").attrs["points"].split()]


def charts(figure: Element) -> dict[str, Element]:
    """The figure's charts by their title."""
    return {svg.one("text", class_="title").text(): svg for svg in figure.find_all("svg")}


def bars(svg: Element) -> dict[str, float]:
    """Each bar's drawn width by its label (the ``<title>`` it carries: "label: value")."""
    return {rect.one("title").text().rsplit(":", 1)[0]: float(rect.attrs["width"]) for rect in svg.find_all("rect", class_="bar")}


# --------------------------------------------------------------------------- without a browser


def test_the_page_fetches_nothing_runs_nothing_and_carries_the_result_back():
    for result in (amplification(), suppression()):
        page = render_audit_page(result)
        without_namespace = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", without_namespace, re.I)
        references = re.findall(r'\b(?:src|href|action|srcset|xlink:href)="([^"]*)"', page)
        assert references and all(r.startswith("#") for r in references), references
        assert "script-src" not in page and "default-src 'none'" in page, "a policy under which no script runs"
        assert page.count("<script") == 1 and "window.pwned=1</script>" not in page
        assert embedded_json(page) == json.loads(result.to_json()), "the embedded JSON reads back as to_dict()"


def test_a_bar_chart_draws_negative_values_left_of_zero_at_their_length():
    dom = parse(svg_bar_chart([("up", 2.0), ("down", -1.0), ("nan", float("nan"))], title="t", x_label="nats"))
    rects = {r.one("title").text(): r for r in dom.find_all("rect", class_="bar")}
    assert set(rects) == {"up: 2", "down: -1"}, "a value that is not finite is left out"
    zero = float(dom.one("line", class_="zero").attrs["x1"])
    up, down = rects["up: 2"], rects["down: -1"]
    assert abs(float(up.attrs["x"]) - zero) < 0.1 and abs(float(down.attrs["x"]) + float(down.attrs["width"]) - zero) < 0.1
    assert abs(float(up.attrs["width"]) / float(down.attrs["width"]) - 2.0) < 0.01


# --------------------------------------------------------------------------- in a real browser


def _check_header(dom: Element, result: AuditResult) -> None:
    assert dom.one("h1").text() == "saeforge steer audit: model.layers.1 of tiny-llama <test>"
    assert dom.one(id="header-dictionary").text() == result.dictionary
    assert dom.one(id="header-text").text() == result.text_source
    assert "32 sequences, 4,032 tokens" in dom.one(id="header-tokens").text()
    assert "seeds 0, 1, 2, 3, 4" in dom.one(id="header-seeds").text() and "seed 7" in dom.one(id="header-seeds").text()
    cost = figures(dom.one("table", class_="cost"))
    assert cost["forward-passes"] == [1234] and cost["text-pass-equivalents"] == [12.5]
    assert cost["tokens-past-hookpoint"] == [51234] and cost["generated-tokens"] == [640]


def _check_feature(section: Element, audit: FeatureAudit) -> None:
    """The sentence, the dashboard, the behaviour of unedited, steer and control, and the targets."""
    assert section.one("p", class_="summary").text() == audit.summary
    d = audit.dashboard
    assert figures(section.one("table", class_="dashboard")) == {
        "before": [d.feature_before], "set": [d.feature_set], "read-back": [d.feature_read_back]}
    shown = figures(section.one("table", class_="behaviour"))
    for field in ("target_logprob", "target_logprob_change", "target_probability", "target_probability_change",
                  "kl_divergence"):
        assert shown[field] == [getattr(b, field) for b in (audit.unedited, audit.steered, audit.control)], field
    versus = charts(section.one("figure", class_="versus"))
    drawn = bars(versus["change in log p(targets)"])
    want = abs(audit.steered.target_logprob_change) / abs(audit.control.target_logprob_change)
    assert abs(drawn["steer"] / drawn["random direction"] - want) < 0.02 * want, "bar lengths follow the changes"
    drawn = bars(versus["KL from the unedited model"])
    assert abs(drawn["steer"] / drawn["random direction"] - audit.steered.kl_divergence / audit.control.kl_divergence) < 0.05
    rows = section.one("table", class_="targets").find_all("tr")[1:]
    assert [r.one("span", class_="chip").text() for r in rows] == [visible(t.token) for t in audit.targets]
    assert [_value(r.find_all("td")[2]) if t.logit is not None else r.find_all("td")[2].text()
            for r, t in zip(rows, audit.targets, strict=True)] == [t.logit or "given" for t in audit.targets]


def _check_dose_response(section: Element, audit: FeatureAudit) -> None:
    figure = section.one("figure", class_="dose")
    assert figure.attrs["data-unit"] == "held-out maximum"
    drawn = charts(figure)
    assert set(drawn) == {"log p(targets)", "KL from the unedited model", "coherence: the unedited model's loss"}
    for title, values in (("log p(targets)", LOGPROBS), ("KL from the unedited model", KLS),
                          ("coherence: the unedited model's loss", COHERENCE)):
        svg = drawn[title]
        kept = [(m, v) for m, v in zip(MULTIPLES, values, strict=True) if v is not None]
        points = polyline(svg)
        assert len(points) == len(kept), f"{title}: one point per dose with a value"
        assert [x for x, _ in points] == sorted(x for x, _ in points), "doses left to right"
        xs = [x for x, _ in points]  # spaced as the multiples are: x linear in the multiple
        assert abs((xs[-1] - xs[0]) / (xs[1] - xs[0]) - (kept[-1][0] - kept[0][0]) / (kept[1][0] - kept[0][0])) < 0.01
        by_value = sorted(range(len(kept)), key=lambda i: kept[i][1])
        assert sorted(range(len(kept)), key=lambda i: -points[i][1]) == by_value, f"{title}: a higher value draws higher"
        labels = [t.text() for t in svg.find_all("text", class_="label")]
        assert labels[0] == "multiple of the feature's held-out maximum (1× = 3)", labels
        assert labels[1] in ("nats", "nats per token")
    shared = [dict(zip(MULTIPLES, (x for x, _ in polyline(svg)), strict=False)) for svg in drawn.values()]
    assert all(xs[m] == shared[0][m] for xs in shared for m in xs), "the charts share their x axis"
    # The unedited model's level drawn as a reference, between the doses whose values straddle it.
    svg = drawn["log p(targets)"]
    reference = float(svg.one("line", class_="reference").attrs["y1"])
    ys = dict(zip(LOGPROBS, (y for _, y in polyline(svg)), strict=True))
    assert ys[-5.5] > reference > ys[-4.75], "-5.2 (unedited) lies between -5.5 and -4.75"
    table = section.one("table", class_="dose")
    rows = [[_value(td) for td in tr.find_all("td")] for tr in table.find_all("tr")[1:]]
    assert rows == [[p.multiple, p.value, p.target_logprob, p.target_logprob_change, p.kl_divergence, p.coherence]
                    for p in audit.dose_response.points]


def _check_continuations(section: Element, audit: FeatureAudit) -> None:
    c = audit.continuations
    shown = figures(section.one("table", class_="continuations"))
    assert shown == {"target-rate": [c.unedited_target_rate, c.steered_target_rate],
                     "target-share": [c.unedited_target_share, c.steered_target_share],
                     "coherence": [c.unedited_coherence, c.steered_coherence]}
    rows = section.one("table", class_="examples").find_all("tr")[1:]
    assert [[td.text() for td in r.find_all("td")] for r in rows] == [
        [visible_text(x.prompt), visible_text(x.unedited), visible_text(x.steered)] for x in c.examples]


def _check_leak(section: Element, leak: Leak) -> None:
    figure = section.one("figure", class_="leak")
    drawn = bars(figure.one("svg"))
    assert set(drawn) == {"projected out (A)", "zeroed (B)", "reconstruction"}
    a, b, r = drawn["projected out (A)"], drawn["zeroed (B)"], drawn["reconstruction"]
    assert abs(a / b - leak.projected_drop / leak.zeroed_drop) < 0.02 and abs(r / a - leak.reconstruction_drop / leak.projected_drop) < 0.01
    sentence = figure.one("figcaption").text()
    assert sentence.startswith("75% of the effect the feature's decoder direction carries (A = 0.8 nats) survives "
                               "zeroing the feature (B = 0.2)"), sentence
    assert figures(section.one("table", class_="leak")) == {
        "projected": [0.8], "zeroed": [0.2], "reconstruction": [0.5], "leak": [0.75]}


def _no_markup_from_data(dom: Element) -> None:
    main = dom.one("main")
    assert not any(e.tag in ("b", "i") for s in main.find_all("section", class_="feature") for e in s.walk()), \
        "a token's or continuation's markup stays text"
    assert [e.attrs.get("type") for e in dom.find_all("script")] == ["application/json"]
    assert not any(a.startswith("on") for e in dom.walk() for a in e.attrs), "no event handler attribute"


# Run only in a test copy of the page whose policy allows any script: what the browser laid out.
_PROBE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
const found = {
  pwned: typeof window.pwned,
  svgs: [...document.querySelectorAll("svg")].map(box),
  polylines: [...document.querySelectorAll("polyline")].map(p => p.getTotalLength()),
  bars: [...document.querySelectorAll("rect.bar")].map(box),
  chips: [...document.querySelectorAll(".chip")].map(box),
};
const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(found);
document.body.appendChild(out);
</script>"""


def test_the_page_renders_the_audit_in_headless_chromium(tmp_path):
    chromium = chromium_path()
    amplify, suppress = amplification(), suppression()
    pages = {}
    for name, result in (("amplify", amplify), ("suppress", suppress)):
        path = tmp_path / f"{name}.html"
        path.write_text(render_audit_page(result), encoding="utf-8")
        pages[name] = path
    dom = parse(browse(chromium, tmp_path / "profile", "--dump-dom", pages["amplify"].as_uri()))
    _check_header(dom, amplify)
    section = dom.one("section", id="feature-12")
    assert section.attrs["data-kind"] == "amplify"
    assert section.one("h2").text() == "Feature 12 · amplify: clamped to 30 (10× its held-out maximum), error term kept"
    _check_feature(section, amplify.features[0])
    _check_dose_response(section, amplify.features[0])
    _check_continuations(section, amplify.features[0])
    assert not section.find_all("figure", class_="leak")
    assert dom.one(id="notes").text() == amplify.notes[0]
    _no_markup_from_data(dom)

    dom = parse(browse(chromium, tmp_path / "profile", "--dump-dom", pages["suppress"].as_uri()))
    _check_header(dom, suppress)
    section = dom.one("section", id="feature-7")
    assert section.attrs["data-kind"] == "suppress"
    _check_feature(section, suppress.features[0])
    _check_leak(section, suppress.features[0].leak)
    assert not section.find_all("figure", class_="dose") and not section.find_all("table", class_="continuations")
    assert section.one("p", class_="measured").text() == (
        "Measured at 211 positions: the positions where the feature fires on the unedited text.")
    _no_markup_from_data(dom)

    # In a copy that lets any script run: the hostile strings still did not, and the charts are laid out.
    page = pages["amplify"].read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
                     .replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    probed = browse(chromium, tmp_path / "profile", "--window-size=1200,900", "--dump-dom", probe.as_uri())
    found = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', probed, re.S).group(1)))
    assert found["pwned"] == "undefined"
    assert len(found["svgs"]) == 5 and all(w > 300 and h > 100 for w, h in found["svgs"]), "2 bar charts, 3 curves"
    assert len(found["polylines"]) == 3 and all(length > 50 for length in found["polylines"])
    assert len(found["bars"]) == 4 and all(w > 0 and h > 0 for w, h in found["bars"])
    assert len(found["chips"]) == 3 and all(w > 0 and h > 0 for w, h in found["chips"])
