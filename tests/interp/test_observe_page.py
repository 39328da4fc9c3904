"""``saeforge observe --html``: the page drawn from hand-built ``Observations``, opened in a real
headless browser (Debian's chromium), checked on what it renders: the tokens as text in order
(hostile ones included, and none of them run), the shading by relative error, the marked
left-out tokens, each token's figures, and the feature section's order."""

from __future__ import annotations

import html
import json
import re
from dataclasses import replace

from browser import Element, browse, chromium_path, parse, png_size_and_pixels

from interp.observe import Baseline, Observations, TextObservation, TokenObservation
from interp.page import MAX_OPACITY, SATURATING_RELATIVE_ERROR, render_page

HOSTILE = "</script><script>window.pwned=1</script>"
QUOTES = '" onmouseover="window.pwned=2'
FEATURE = 7

# (token, token id, encoded, features, relative error): the figures a real observe would give,
# chosen so every way of drawing a token appears. Error norm and L0 follow from the index.
TEXT_1 = [
    ("<s>", 1, False, [], None),
    ("Hello", 100, True, [(3, 2.5), (7, 0.4)], 0.1),
    (HOSTILE, 101, True, [(7, 1.9), (3, 0.2)], 0.6),
    (" <b>&amp;", 102, True, [(11, 4.0)], 2.5),
    ("\n", 103, True, [(3, 1.1)], 0.3),
    (QUOTES, 104, True, [(11, 0.7)], None),
    ("\tend", 105, True, [], 0.0),
]
TEXT_2 = [
    ("<s>", 1, False, [], None),
    (" again\u2028", 200, True, [(3, 3.0)], 0.45),
    ("<|eot_id|>", 2, False, [], None),
    ("  x", 201, True, [(7, 0.8), (11, 0.5)], 0.9),
    ("!", 202, True, [(3, 0.1)], 1.0),
]


def _tokens(rows: list[tuple], feature: int | None) -> list[TokenObservation]:
    tokens = []
    for position, (text, token_id, encoded, features, relative) in enumerate(rows):
        if not encoded:
            tokens.append(TokenObservation(position, token_id, text, False, [], None, None, None, None))
            continue
        activation = None if feature is None else dict(features).get(feature, 0.0)
        tokens.append(TokenObservation(position, token_id, text, True, features, 10 + position, 0.5 + position,
                                       relative, activation))
    return tokens


def observations(*, feature: int | None = FEATURE, source: str = "text") -> Observations:
    texts = [TextObservation("".join(r[0] for r in rows), _tokens(rows, feature)) for rows in (TEXT_1, TEXT_2)]
    return Observations(dictionary="store/runs/r&1/dictionary/model.layers.1", hookpoint="model.layers.1",
                        model="tiny-llama <test>", n_latents=64, top=2, feature=feature,
                        baseline=Baseline(source, 9, 12.5), texts=texts)


def visible(token: str) -> str:
    """How the page writes a token: newline and tab as symbols (independent of interp.page)."""
    return token.replace("\n", "⏎").replace("\t", "⇥")


# --------------------------------------------------------------------------- reading a page


def run_tokens(dom: Element, text: int, shading: str = "relative-error") -> list[Element]:
    run = dom.one("section", id=f"text-{text}").one("div", class_="run", data_shading=shading)
    return [e for e in run.children if isinstance(e, Element) and e.tag == "span"]


def _token_places(dom: Element) -> list[Element]:
    """Every element where tokens are written: the texts (runs and tables) and the feature cards."""
    return [e for section in [*dom.find_all("section", class_="text"), dom.one("section", id="features")]
            for e in section.walk()]


def alpha(style: str) -> float:
    found = re.search(r"rgba\(\s*[\d.]+\s*,\s*[\d.]+\s*,\s*[\d.]+\s*,\s*([\d.]+)\s*\)", style)
    return float(found.group(1)) if found else 0.0


def embedded_json(page: str) -> dict:
    start = page.index('<script type="application/json" id="observations">')
    body = page[page.index(">", start) + 1 : page.index("</script>", start)]  # where the browser ends it too
    return json.loads(body)


# --------------------------------------------------------------------------- without a browser


def test_the_page_fetches_nothing_and_carries_the_observations_back_unchanged():
    obs = observations()
    page = render_page(obs)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", page, re.I), "self-contained: nothing fetched"
    references = re.findall(r'\b(?:src|href|action|srcset)="([^"]*)"', page)
    assert references and all(r.startswith("#") for r in references), references
    assert embedded_json(page) == json.loads(json.dumps(obs.to_dict())), "the embedded JSON reads back as to_dict()"
    assert page.count("<script") == 2 and "window.pwned=1</script>" not in page
    assert "\u2028" not in page[page.index('id="observations"') : page.index("</script>")]

    dom = parse(page)
    for number, rows in ((1, TEXT_1), (2, TEXT_2)):
        assert [e.text() for e in run_tokens(dom, number)] == [visible(r[0]) for r in rows]
    assert not any(e.tag == "b" for e in _token_places(dom)), "a token's <b> stays text"


def test_the_header_says_where_the_baseline_came_from():
    held_out = parse(render_page(observations(source="held-out", feature=None)))
    assert "held-out mean and variance the training recorded" in held_out.one(id="header-baseline").text()
    on_text = parse(render_page(observations(source="text")))
    assert "computed on the 9 observed tokens" in on_text.one(id="header-baseline").text()
    assert not held_out.find_all(data_shading="feature"), "no feature strip without a feature asked for"


# --------------------------------------------------------------------------- in a real browser


# Run only in a test copy of the page whose policy allows any script: what the browser computed.
_PROBE = """<script>
const found = {
  pwned: typeof window.pwned,
  tokens: [...document.querySelectorAll('.run[data-shading="relative-error"] .tok')].map(t => {
    const r = t.getBoundingClientRect();
    return {key: t.dataset.key, background: getComputedStyle(t).backgroundColor, width: r.width, height: r.height};
  }),
};
const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(found);
document.body.appendChild(out);
</script>"""


def test_the_page_renders_tokens_shading_figures_and_features_in_headless_chromium(tmp_path):
    chromium = chromium_path()
    obs = observations()
    page = render_page(obs)
    path = tmp_path / "observe.html"
    path.write_text(page, encoding="utf-8")
    dom = parse(browse(chromium, tmp_path / "profile", "--dump-dom", path.as_uri()))

    # Tokens, in order, as text; hostile ones created nothing.
    for number, rows in ((1, TEXT_1), (2, TEXT_2)):
        spans = run_tokens(dom, number)
        assert [s.text() for s in spans] == [visible(r[0]) for r in rows]
        assert [("excluded" in s.attrs["class"].split()) for s in spans] == [not r[2] for r in rows]
        assert all("left out" in s.attrs["title"] for s, r in zip(spans, rows, strict=True) if not r[2])
    assert [e.attrs.get("type") for e in dom.find_all("script")] == ["application/json", None]
    assert not any(e.tag == "b" for e in _token_places(dom))
    assert not any(a.startswith("on") for e in dom.walk() for a in e.attrs), "no event handler attribute"
    run = dom.one("section", id="text-1").one("div", class_="run", data_shading="relative-error")
    elements = [e for e in run.children if isinstance(e, Element)]
    assert [e.tag for e in elements].count("br") == 1
    assert elements[elements.index(run_tokens(dom, 1)[4]) + 1].tag == "br", "a line break follows the newline token"

    # Shading: stronger for a larger relative error, saturating at 1.0; none where there is none.
    shade = {s.attrs["data-key"]: alpha(s.attrs.get("style", "")) for n in (1, 2) for s in run_tokens(dom, n)}
    by_error = sorted((r[4], f"{n}-{p}") for n, rows in ((1, TEXT_1), (2, TEXT_2))
                      for p, r in enumerate(rows) if r[4] is not None)
    strengths = [shade[key] for _, key in by_error]
    assert strengths == sorted(strengths) and len(set(strengths)) == len(strengths) - 1, by_error
    assert shade["1-6"] == 0 and shade["1-3"] == shade["2-4"] == max(strengths) > shade["2-3"], "0.0 none, 1.0 full"
    for error, key in by_error:  # the documented scale: linear, saturating at relative error 1.0
        assert abs(shade[key] - MAX_OPACITY * min(error / SATURATING_RELATIVE_ERROR, 1.0)) < 2e-3, (key, error)
    assert "beyond" in run_tokens(dom, 1)[3].attrs["class"] and "no-baseline" in run_tokens(dom, 1)[5].attrs["class"]

    # Each token's figures, in the DOM without any interaction.
    for number, tokens in enumerate((t.tokens for t in obs.texts), start=1):
        for token in tokens:
            cells = {td.attrs["data-label"]: td.text() for td in dom.one("tr", id=f"row-{number}-{token.position}").find_all("td")}
            assert cells["token"] == visible(token.token) and cells["id"] == str(token.token_id)
            if not token.encoded:
                assert "left out" in cells["relative error"]
                continue
            assert cells["relative error"] == ("n/a" if token.relative_error is None else f"{token.relative_error:.3f}")
            assert float(cells["error norm"]) == token.error_norm and int(cells["L0"]) == token.l0
            assert float(cells[f"feature {FEATURE}"]) == token.activation
            shown = re.findall(r"(\d+): ([\d.]+)", cells["top 2 features (id: activation)"])
            assert [(int(i), float(a)) for i, a in shown] == token.features

    # The script ran under the page's policy: the panel shows the largest relative error's token.
    panel = dom.one(id="panel-body")
    terms = [e.text() for e in panel.find_all("dt")]
    values = [e.text() for e in panel.find_all("dd")]
    assert dict(zip(terms, values, strict=True))["relative error"] == "2.500"
    assert dict(zip(terms, values, strict=True))["token"] == visible(TEXT_1[3][0])

    # Per feature, the tokens it fires on, largest activation first; features by their largest.
    expected: dict[int, list[tuple[float, str]]] = {}
    for text in obs.texts:
        for token in text.tokens:
            for feature, activation in token.features:
                expected.setdefault(feature, []).append((activation, token.token))
    cards = dom.one("section", id="features").find_all("article", class_="feature")
    assert [int(c.attrs["data-feature"]) for c in cards] == [FEATURE] + sorted(
        (f for f in expected if f != FEATURE), key=lambda f: -max(expected[f])[0])
    for card in cards:
        listed = [(float(li.attrs["data-activation"]), li.one("mark").text()) for li in card.find_all("li")]
        want = sorted(expected[int(card.attrs["data-feature"])], key=lambda e: -e[0])
        assert listed == [(a, visible(t)) for a, t in want]

    # The feature asked for: its own shading, strongest where it is largest.
    strip = run_tokens(dom, 1, "feature")
    assert [s.text() for s in strip] == [visible(r[0]) for r in TEXT_1]
    assert max(strip, key=lambda s: alpha(s.attrs.get("style", ""))).text() == visible(HOSTILE), "1.9 is feature 7's largest"
    assert "computed on the 9 observed tokens" in dom.one(id="header-baseline").text()
    assert dom.one("h1").text() == "saeforge observe: model.layers.1 of tiny-llama <test>"
    assert dom.one(id="header-dictionary").text() == obs.dictionary and dom.one(id="header-features").text() == "64"

    # In a copy that lets any script run: the hostile token still did not, and every token is laid out.
    probe = tmp_path / "probe.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
                     .replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    probed = browse(chromium, tmp_path / "profile", "--dump-dom", probe.as_uri())
    found = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', probed, re.S).group(1)))
    assert found["pwned"] == "undefined"
    assert len(found["tokens"]) == len(TEXT_1) + len(TEXT_2)
    assert all(t["width"] > 0 and t["height"] > 0 for t in found["tokens"])
    rendered = {t["key"]: alpha(t["background"]) for t in found["tokens"]}
    assert [rendered[key] for _, key in by_error] == sorted(rendered[key] for _, key in by_error) and rendered["1-3"] > 0.5

    shot = tmp_path / "observe.png"
    browse(chromium, tmp_path / "profile", "--window-size=1200,900", f"--screenshot={shot}", path.as_uri())
    width, height, pixels = png_size_and_pixels(shot.read_bytes())
    assert (width, height) == (1200, 900) and len(set(pixels)) > 64, "the screenshot shows content"


def test_a_page_without_a_measurable_error_draws_no_shading():
    obs = observations(feature=None)
    flat = replace(obs, texts=[replace(t, tokens=[replace(k, relative_error=None) for k in t.tokens]) for t in obs.texts])
    dom = parse(render_page(flat))
    assert all("style" not in s.attrs for n in (1, 2) for s in run_tokens(dom, n))
    assert not dom.find_all(data_worst="")
