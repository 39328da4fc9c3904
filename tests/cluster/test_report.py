"""The dictionary report: its feature statistics on a tiny real model's activations, its escaping
of untrusted tokens, and the page opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import browse, chromium_path, png_size_and_pixels
from safetensors.torch import load as load_safetensors

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.hooking import (
    ActivationHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.producing import produce_shard, split_units
from activation_cache.reader import read_shard
from activation_cache.schema import DecodedShard, ShardMeta
from activation_cache.store import LocalStore
from activation_cache.text import pack_sequences, token_decoder
from activation_cache.unembedding import load_unembedding, logit_tokens, unembedding_of
from cluster.report import ReportOptions, build_report, report_artifact_name, report_with_model
from cluster.report_cards import FeatureSample
from cluster.report_html import render_report
from cluster.report_scan import (
    feature_cards,
    sample_features,
    scan_top_activations,
    sparsity_frequencies,
)
from interp.audit import AuditResult, Behaviour, Cost, Dashboard, FeatureAudit, Leak, Target
from interp.svg import svg_line_chart
from trainer.architectures import ReLUSAE
from trainer.clt import CrossLayerTranscoder
from trainer.dictionary import dictionary_files, load_dictionary
from trainer.layout import (
    CONFIG_FILE,
    EVAL_FILE,
    FEATURES_FILE,
    REPORT_FILE,
    SPARSITY_FILE,
    TRAINING_CURVES_FILE,
    WEIGHTS_FILE,
)
from trainer.loop import evaluate
from trainer.metrics import DeadLatentTracker, firing_histogram
from trainer.sae import TopKSAE

SECTIONS = ("summary", "training-curves", "firing-histogram", "evaluation", "unexplained", "features")
HOOKPOINT = "model.layers.1"
# eval.json's "unexplained", in the shape cluster/evaluation.py's spliced evaluation writes it.
UNEXPLAINED = {
    "n_tokens": 496,
    "error_norm": {"mean": 0.21, "p50": 0.19, "p90": 0.35, "p99": 0.61, "max": 0.73},
    "token_fvu": {"mean": 0.17, "p50": 0.12, "p90": 0.41, "p99": 0.95, "max": 1.4},
    "error_norm_histogram": {"edges": [0.0, 0.25, 0.5, 0.75], "tokens": [300, 180, 16]},
    "worst_contexts": [
        {"sequence": 41, "position": 7, "error_norm": 0.73, "fvu": 1.4, "token": " York",
         "context": "summer by this sun of[[ York]]; and"},
        {"sequence": 44, "position": 3, "error_norm": 0.7, "fvu": 1.3, "token": "<b>", "context": "a [[b]] <b>[[<b>]]</b>"},
    ],
}


@dataclass
class TinyDictionary:
    files: dict[str, bytes]
    holdout: list[DecodedShard]
    model_dir: Path


@pytest.fixture(scope="module")
def tiny_dictionary(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> TinyDictionary:
    """The tiny Llama's layer-1 activations (BOS excluded) as real shards, 2 of 6 held out, and
    the dictionary of a TopK SAE trained on the other 4 for 80 steps, with its training curves."""
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokenizer = load_tokenizer(source)
    tokens = pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 48), tokenizer)
    harvester = ActivationHarvester(load_model(source), "resid_post.1")
    meta = ShardMeta(model="tiny", revision=source.revision, hookpoint=HOOKPOINT, d_model=32, dtype="float32", cache_key="k")
    store = LocalStore(tmp_path_factory.mktemp("cache"))
    shards = [
        read_shard(store, produce_shard(unit, harvester=harvester, store=store, meta=meta, batch_size=8,
                                        excluded_token_ids=frozenset(tokenizer.all_special_ids)).entry)
        for unit in split_units(tokens, 8)
    ]
    train, holdout = torch.cat([s.activations for s in shards[:-2]]), shards[-2:]
    sae, curves = _train_topk(train)
    firing = DeadLatentTracker(sae.n_latents)
    metrics = evaluate(sae, (s.activations for s in holdout), scale=1.0, dead_tracker=firing)
    counts, edges = firing_histogram(firing.frequencies(), bins=torch.linspace(-10, 0, 41))
    metrics["firing_histogram"] = {"log10_frequency_edges": edges.tolist(), "latents": counts.long().tolist()}
    metrics["lm"] = {"clean_ce": 5.52, "spliced_ce": 5.91, "ablated_ce": 9.13, "ce_recovered": 0.892, "text": "corpus"}
    metrics["unexplained"] = UNEXPLAINED
    files = dictionary_files(sae, hookpoint=HOOKPOINT, model_name="tiny", scale=1.0, extra_metadata={"run_name": "tiny"},
                             sparsity=firing.frequencies(), eval_metrics=metrics)
    files[TRAINING_CURVES_FILE] = json.dumps(curves).encode()
    return TinyDictionary(files, holdout, tiny_model_dir)


def _train_topk(x: torch.Tensor) -> tuple[TopKSAE, list[dict]]:
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4, seed=0)
    sae.init_b_dec(x, method="mean")
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    curves = []
    for step in range(1, 81):
        out = sae(x[torch.randint(0, len(x), (256,))])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 10 == 0:
            curves.append({"step": step, "loss": out.loss.item(), "fvu": out.fvu.item(), "l0": 4.0,
                           "dead_fraction": 0.0, "lr": 3e-3, "tokens_per_second": 1e4, "tokens": 256 * step})
    return sae, curves


def _decoder(model_dir: Path):
    return token_decoder(load_tokenizer(resolve_model_source(ModelConfig(name_or_path=str(model_dir)))))


def _dense_activations(sae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(rows, n_latents) activations the plain way: the whole encoder output at once."""
    with torch.no_grad():
        code = sae.encode(x)
    if code.indices is None:
        return code.acts
    return torch.zeros(len(x), sae.n_latents).scatter_(1, code.indices, code.acts)


def _relu_dictionary(files: dict[str, bytes]) -> dict[str, bytes]:
    sae = ReLUSAE(32, 64, seed=3, decoder_init_norm=1.0)
    frequencies = torch.full((64,), 0.2)
    return dictionary_files(sae, hookpoint=HOOKPOINT, model_name="tiny", scale=1.0, extra_metadata={},
                            sparsity=frequencies, eval_metrics=json.loads(files[EVAL_FILE]))


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_contexts_are_each_features_largest_held_out_activations_in_their_sequences(tiny_dictionary, architecture):
    files = tiny_dictionary.files if architecture == "topk" else _relu_dictionary(tiny_dictionary.files)
    sae, _ = load_dictionary(files)
    frequencies = sparsity_frequencies(files[SPARSITY_FILE])
    decode = _decoder(tiny_dictionary.model_dir)
    features = sample_features(frequencies, sae.n_latents, 9, seed=1)
    scan = scan_top_activations(sae, tiny_dictionary.holdout, [f for f, _ in features], n_examples=5, max_tokens=10**9)
    cards = feature_cards(features, frequencies, scan, None, decode=decode, before=3, after=2)

    holdout = tiny_dictionary.holdout
    dense = _dense_activations(sae, torch.cat([s.activations for s in holdout]))
    sequence_ids, positions, token_ids = (np.concatenate([getattr(s, name) for s in holdout])
                                          for name in ("sequence_ids", "positions", "token_ids"))
    assert scan.rows == len(dense)
    assert len(cards) == 9
    for card in cards:
        column = dense[:, card.index]
        expected = column.topk(5).values
        torch.testing.assert_close(torch.tensor([c.activation for c in card.contexts]), expected[expected > 0])
        assert card.fired == int((column > 0).sum())
        for context in card.contexts:
            row = np.flatnonzero((sequence_ids == context.sequence_id) & (positions == context.position)).item()
            assert column[row].item() == pytest.approx(context.activation)
            near = np.flatnonzero((sequence_ids == context.sequence_id) & (abs(positions - context.position) <= 3)
                                  & (positions - context.position <= 2))
            near = near[np.argsort(positions[near])]
            assert context.tokens == decode(token_ids[near].tolist())
            assert context.tokens[context.hit] == decode([int(token_ids[row])])[0]
            assert context.more_before == bool(positions[sequence_ids == context.sequence_id].min() < context.position - 3)


def test_the_scan_stops_after_max_tokens(tiny_dictionary):
    sae, _ = load_dictionary(tiny_dictionary.files)
    consumed = []

    def shards():
        for shard in tiny_dictionary.holdout:
            consumed.append(shard)
            yield shard

    scan = scan_top_activations(sae, shards(), [0, 1, 2], n_examples=4, max_tokens=50)
    assert scan.rows == 50 and len(scan.token_ids) == 50
    assert int(scan.row_ids.max()) < 50
    assert len(consumed) == 1, "a shard after the limit is never read"


def test_rows_with_nan_or_inf_are_never_top_examples(tiny_dictionary):
    sae, _ = load_dictionary(tiny_dictionary.files)
    shard = tiny_dictionary.holdout[0]
    poisoned = shard.activations.clone()
    poisoned[3, 0], poisoned[7, 5] = float("nan"), float("inf")
    clean = scan_top_activations(sae, [shard], range(sae.n_latents), n_examples=4, max_tokens=10_000)
    scan = scan_top_activations(sae, [dataclasses.replace(shard, activations=poisoned)], range(sae.n_latents),
                                n_examples=4, max_tokens=10_000)
    assert not torch.isnan(scan.values).any()
    assert not ({3, 7} & set(scan.row_ids.flatten().tolist())), "a non-finite row was ranked"
    assert (scan.fired <= clean.fired).all()


def test_the_sample_mixes_frequent_median_and_rare_live_latents():
    frequencies = torch.cat([torch.logspace(-6, -1, 300, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)])
    frequencies = frequencies[torch.randperm(350, generator=torch.Generator().manual_seed(0))]
    sample = sample_features(frequencies, 350, 24, seed=0)
    assert sample == sample_features(frequencies, 350, 24, seed=0)
    assert sample != sample_features(frequencies, 350, 24, seed=1)
    bands = [band for _, band in sample]
    assert bands == ["frequent"] * 8 + ["median"] * 8 + ["rare"] * 8
    shown = [frequencies[i].item() for i, _ in sample]
    assert shown == sorted(shown, reverse=True) and min(shown) > 0, "live latents only, most frequent first"
    ranked = frequencies.argsort(descending=True).tolist()[:300]
    assert all(ranked.index(i) < 100 for i, band in sample if band == "frequent")
    assert all(ranked.index(i) >= 200 for i, band in sample if band == "rare")
    assert [b for _, b in sample_features(None, 350, 5, seed=0)] == ["random"] * 5


def test_promoted_tokens_are_those_whose_unembedding_the_decoder_row_points_along():
    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(6, 16, generator=generator)
    W_U = 0.01 * torch.randn(100, 16, generator=generator)
    W_U[42] = 3 * W_dec[4]
    W_U[7] = -2 * W_dec[4]
    (promoted, top), (suppressed, bottom) = logit_tokens(W_dec, W_U, [4], 3)[0]
    assert promoted[0] == 42 and suppressed[0] == 7
    assert top == sorted(top, reverse=True) and bottom == sorted(bottom)
    assert top[0] == pytest.approx((W_U[42] @ W_dec[4]).item())


def test_the_unembedding_read_from_safetensors_equals_the_loaded_models(tiny_dictionary):
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_dictionary.model_dir)))
    read, note = load_unembedding(source)
    loaded, _ = unembedding_of(load_model(source))
    torch.testing.assert_close(read, loaded, rtol=0, atol=0)
    assert "final norm (LlamaRMSNorm) is folded" in note


class _GemmaStyleNorm(torch.nn.Module):
    """An RMSNorm that scales by 1 + weight, as Gemma's does."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class _ToyLM(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.norm = norm
        self.lm_head = torch.nn.Linear(8, 20, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


@pytest.mark.parametrize("norm", ["layernorm", "gemma"])
def test_the_final_norms_gain_is_folded_into_the_unembedding_whatever_its_convention(norm):
    torch.manual_seed(0)
    if norm == "layernorm":
        module = torch.nn.LayerNorm(8)
        torch.nn.init.normal_(module.weight)
        torch.nn.init.normal_(module.bias)
        gain = module.weight
    else:
        module = _GemmaStyleNorm(8)
        gain = 1 + module.weight
    model = _ToyLM(module)
    W_U, note = unembedding_of(model)
    torch.testing.assert_close(W_U, (model.lm_head.weight * gain).detach(), rtol=1e-5, atol=1e-5)
    assert f"final norm ({type(module).__name__}) is folded" in note


def test_tokens_and_metadata_are_escaped_and_no_script_can_run(tiny_dictionary):
    hostile = '<script>alert("t")</script><img src=x onerror=alert(1)>&amp;'
    page = build_report(tiny_dictionary.files, holdout=tiny_dictionary.holdout,
                        decode=lambda ids: [hostile] * len(ids), options=ReportOptions(n_features=3))[REPORT_FILE].decode()
    assert "<script" not in page and "<img" not in page
    assert html.escape(hostile) in page
    assert "default-src 'none'" in page, "a Content-Security-Policy that forbids scripts"


def test_a_report_without_curves_sparsity_or_model_still_has_its_sections(tiny_dictionary):
    files = {k: v for k, v in tiny_dictionary.files.items() if k not in (SPARSITY_FILE, TRAINING_CURVES_FILE)}
    evaluation = json.loads(files[EVAL_FILE])
    for key in ("firing_histogram", "lm", "unexplained"):
        evaluation.pop(key)
    files[EVAL_FILE] = json.dumps(evaluation).encode()
    page = build_report(files, holdout=tiny_dictionary.holdout, options=ReportOptions(n_features=4))[REPORT_FILE].decode()
    for section in set(SECTIONS) - {"unexplained"}:
        assert f'id="{section}"' in page
    assert 'id="unexplained"' not in page
    assert "No training curves were recorded" in page and "has no firing histogram" in page
    assert "Promoted tokens are unavailable: no unembedding was given" in page
    assert page.count('class="band">random<') == 4
    assert re.search(r'<mark class="tok hit"[^>]*>⟨\d+⟩</mark>', page), "tokens shown as ids without a decoder"


def test_the_page_is_redrawn_from_the_files_when_eval_json_changes(tiny_dictionary):
    files = {k: v for k, v in tiny_dictionary.files.items() if k != EVAL_FILE}
    report = build_report(files, holdout=tiny_dictionary.holdout, decode=_decoder(tiny_dictionary.model_dir),
                          options=ReportOptions(n_features=4))
    sample = FeatureSample.from_json(report[FEATURES_FILE])
    assert sample.to_json() == report[FEATURES_FILE] and len(sample.cards) == 4
    assert 'id="unexplained"' not in report[REPORT_FILE].decode()

    later = {**files, **report, EVAL_FILE: tiny_dictionary.files[EVAL_FILE]}  # the spliced evaluation landed
    page = render_report(later)[REPORT_FILE].decode()
    features = re.search(r'<section id="features">.*?</section>', report[REPORT_FILE].decode(), re.S).group(0)
    assert features in page, "the feature cards come back unchanged from report_features.json"
    unexplained = re.search(r'<section id="unexplained">.*?</section>', page, re.S).group(0)
    assert "<svg" in unexplained, "the error-norm histogram is drawn"
    assert '<mark class="tok hit"> York</mark>' in unexplained
    assert '<mark class="tok hit">&lt;b&gt;</mark>' in unexplained and "<b>" not in unexplained
    assert ">ce_recovered<" in page and ">0.892<" in page


def test_the_same_inputs_give_the_same_report(tiny_dictionary):
    decode = _decoder(tiny_dictionary.model_dir)
    first, second = (build_report(tiny_dictionary.files, holdout=tiny_dictionary.holdout, decode=decode)
                     for _ in range(2))
    assert first == second


_REDRAW_WITHOUT_TORCH = """
import sys
from pathlib import Path

from cluster.report_html import render_report
from trainer.layout import REPORT_FILE

folder = Path(sys.argv[1])
page = render_report({p.name: p.read_bytes() for p in folder.iterdir()})[REPORT_FILE]
(folder / REPORT_FILE).write_bytes(page)
heavy = sorted(m for m in ("torch", "numpy", "safetensors", "transformers") if m in sys.modules)
assert not heavy, f"drawing the report imported {heavy}"
"""


def test_the_page_is_redrawn_from_the_files_alone_without_importing_torch(tiny_dictionary, tmp_path):
    report = build_report(tiny_dictionary.files, holdout=tiny_dictionary.holdout,
                          decode=_decoder(tiny_dictionary.model_dir), options=ReportOptions(n_features=4))
    for name in (CONFIG_FILE, EVAL_FILE, TRAINING_CURVES_FILE):
        (tmp_path / name).write_bytes(tiny_dictionary.files[name])
    (tmp_path / FEATURES_FILE).write_bytes(report[FEATURES_FILE])
    done = subprocess.run([sys.executable, "-c", _REDRAW_WITHOUT_TORCH, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / REPORT_FILE).read_bytes() == report[REPORT_FILE], "the same page as the one built with torch"


def test_report_artifact_names_are_ones_wandb_accepts():
    assert report_artifact_name("run 1", "", "model.layers.15:input") == "report-run_1-model.layers.15_input"


def test_a_loss_spanning_decades_gets_a_log_axis():
    svg = svg_line_chart([(s, 10 ** (-s / 50)) for s in range(0, 201, 10)], title="loss", x_label="step",
                         y_label="", log_y=True)
    assert [html.unescape(t) for t in re.findall(r'text-anchor="end">([^<]+)<', svg)] == ["0.0001", "0.001", "0.01", "0.1", "1"]


def _feature_audit(feature: int, kind: str, value: float, change: float, control: float, *,
                   leak: float | None = None) -> FeatureAudit:
    """One feature's audit with the given headline figures (the rest filled in plainly)."""
    unedited = Behaviour(-3.0, 0.0, 0.05, 0.0, 0.0)
    steered = Behaviour(-3.0 + change, change, 0.05, 0.0, 0.25)
    return FeatureAudit(
        feature=feature, kind=kind, mode="clamp", error_term="keep", value=value,
        targets=[Target(7, " <script>", 0.5), Target(9, "\n", 0.4)], targets_source="promoted", n_positions=37,
        unedited=unedited, dashboard=Dashboard(1.2, value, value * 0.98), steered=steered,
        control=Behaviour(-3.0 + control, control, 0.05, 0.0, 0.01), continuations=None,
        leak=None if leak is None else Leak(1.0, 1.0 - leak, leak, 1.5), dose_response=None,
        summary=f"Feature {feature} leaks <b>{leak}</b>." if leak is not None else "",
    )


def _audit_result(features: list[FeatureAudit]) -> dict:
    return AuditResult("d", HOOKPOINT, "tiny", "held-out units", 4, 992, [], 0, features,
                       Cost(1, 1, 1024, 0, 1024, 1.0), []).to_dict()


def test_the_audited_cards_show_the_audits_headline_figures(tiny_dictionary):
    """eval.json's audit (cluster.evaluation.audit_cards) lands on the cards of the features it
    audited, and only there; its tokens and sentences are escaped like every other text."""
    report = build_report(tiny_dictionary.files, holdout=tiny_dictionary.holdout,
                          decode=_decoder(tiny_dictionary.model_dir), options=ReportOptions(n_features=6))
    cards = [c.index for c in FeatureSample.from_json(report[FEATURES_FILE]).cards]
    first, second = cards[1], cards[4]
    audit = {
        "features": [first, second], "multiple": 10.0, "seconds": 3.5, "notes": [],
        "units": [{"feature": first, "unit": "held-out maximum", "unit_value": 2.5},
                  {"feature": second, "unit": "held-out maximum", "unit_value": 1.5}],
        "amplify": _audit_result([_feature_audit(first, "amplify", 25.0, 2.34, 0.071),
                                  _feature_audit(second, "amplify", 15.0, 0.5, -0.25)]),
        "suppress": _audit_result([_feature_audit(first, "suppress", 0.0, -0.8, -0.01, leak=0.12),
                                   _feature_audit(second, "suppress", 0.0, -0.1, 0.0, leak=None)]),
    }
    evaluation = {**json.loads(tiny_dictionary.files[EVAL_FILE]), "audit": audit}
    page = render_report({**tiny_dictionary.files, **report, EVAL_FILE: json.dumps(evaluation).encode()})[REPORT_FILE].decode()

    articles = dict(re.findall(r'<article class="feature" id="feature-(\d+)">(.*?)</article>', page, re.S))
    assert sorted(int(i) for i in articles) == sorted(cards)
    shown = {int(i) for i, body in articles.items() if 'class="audit"' in body}
    assert shown == {first, second}

    def cells(feature: int) -> list[list[str]]:
        block = re.search(rf'<div class="audit" id="audit-{feature}">(.*?)</div>', articles[str(feature)], re.S).group(1)
        rows = re.findall(r"<tr>(.*?)</tr>", block, re.S)[1:]  # after the header
        return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", r, re.S)] for r in rows]

    amplified, zeroed = cells(first)
    assert amplified == ["clamped to 10× its held-out maximum (25)", "37", "+2.34", "+0.071", "0.25", "25 → 24.5", "—"]
    assert zeroed == ["zeroed where it fires", "37", "-0.8", "-0.01", "0.25", "0 → 0", "12%"]
    assert cells(second)[1][-1] == "—", "no leak figure where the direction does not carry the targets"
    block = articles[str(first)]
    assert "&lt;script&gt;" in block and "<script>" not in block and "⏎" in block, "target tokens escaped and visible"
    assert "leaks &lt;b&gt;0.12&lt;/b&gt;." in block, "the suppression's sentence, escaped"
    features = re.search(r'<section id="features">.*?</section>', page, re.S).group(0)
    assert f'<a href="#audit-{first}">{first}</a>' in features and "3.5 s" in features
    evaluation_section = re.search(r'<section id="evaluation">.*?</section>', page, re.S).group(0)
    assert ">audit<" not in evaluation_section, "the audit is drawn on the cards, not dumped as a table"

    skipped = {**evaluation, "audit": {"skipped": "no live feature card with promoted tokens"}}
    page = render_report({**tiny_dictionary.files, **report, EVAL_FILE: json.dumps(skipped).encode()})[REPORT_FILE].decode()
    assert 'class="audit"' not in page
    assert "No steer audit: no live feature card with promoted tokens." in page


# --------------------------------------------------------------------------- in a real browser


# Run only in a test copy of the page (the report itself allows no script): measures what the
# browser laid out and writes it into the DOM, which --dump-dom then prints.
_LAYOUT_PROBE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
const all = q => [...document.querySelectorAll(q)];
const found = {
  sections: Object.fromEntries(all("section").map(s => [s.id, box(s)])),
  svgs: all("svg").map(box), polylines: all("polyline").map(p => p.getTotalLength()),
  bars: all("rect.bar").map(box), hits: all("mark.hit").map(box),
  hitColour: getComputedStyle(document.querySelector("mark.hit")).backgroundColor,
};
const out = document.createElement("pre"); out.id = "layout"; out.textContent = JSON.stringify(found);
document.body.appendChild(out);
</script>"""


def test_the_report_renders_every_section_in_headless_chromium(tiny_dictionary, tmp_path):
    chromium = chromium_path()
    files = report_with_model(tiny_dictionary.files, holdout=iter(tiny_dictionary.holdout),
                              model=ModelConfig(name_or_path=str(tiny_dictionary.model_dir)),
                              options=ReportOptions(n_features=6, n_examples=4))
    page = files[REPORT_FILE].decode()
    report = tmp_path / REPORT_FILE
    report.write_text(page, encoding="utf-8")

    dom = browse(chromium, tmp_path / "profile", "--dump-dom", report.as_uri())
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom
    curves = len(json.loads(tiny_dictionary.files[TRAINING_CURVES_FILE])[0]) - 2  # all but step and tokens
    assert dom.count("<svg") == curves + 2, "a chart per training curve, the firing and the error-norm histograms"
    frequencies = sparsity_frequencies(tiny_dictionary.files[SPARSITY_FILE])
    rows = sum(len(s.activations) for s in tiny_dictionary.holdout)
    fired = [round(frequencies[i].item() * rows) for i, _ in sample_features(frequencies, 64, 6, seed=0)]
    assert dom.count('<mark class="tok hit" title=') == sum(min(n, 4) for n in fired) > 6, "each context's token highlighted"
    assert dom.count('<article class="feature"') == 6 and 'class="chip"' in dom, "feature cards with promoted tokens"

    probe = tmp_path / "probe.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
                     .replace("</body>", _LAYOUT_PROBE + "</body>"), encoding="utf-8")
    probed = browse(chromium, tmp_path / "profile", "--dump-dom", probe.as_uri())
    layout = json.loads(html.unescape(re.search(r'<pre id="layout">(.*?)</pre>', probed, re.S).group(1)))
    assert set(layout["sections"]) == set(SECTIONS)
    assert all(height > 60 for _, height in layout["sections"].values()), layout["sections"]
    assert all(w >= 400 and h >= 200 for w, h in layout["svgs"]), "every chart is laid out at its size"
    assert len(layout["polylines"]) == curves and all(length > 0 for length in layout["polylines"])
    assert layout["bars"] and all(h > 0 for _, h in layout["bars"])
    assert all(w > 0 and h > 0 for w, h in layout["hits"]) and layout["hitColour"] == "rgb(255, 209, 102)"

    shot = tmp_path / "report.png"
    browse(chromium, tmp_path / "profile", "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri())
    width, height, pixels = png_size_and_pixels(shot.read_bytes())
    assert (width, height) == (1280, 2400)
    assert len(set(pixels)) > 64, "the screenshot shows content, not a blank page"



# --------------------------------------------------------------------------- transcoders

MLP_IN, MLP_OUT = "model.layers.1.mlp:input", "model.layers.1.mlp"


@pytest.fixture(scope="module")
def mlp_input_shards(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> list[DecodedShard]:
    """The tiny Llama's layer-1 MLP inputs (BOS excluded) as real shards: what a transcoder of
    that MLP reads, as the job passes them to the report."""
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokenizer = load_tokenizer(source)
    tokens = pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 16), tokenizer)
    harvester = ActivationHarvester(load_model(source), "mlp_in.1")
    meta = ShardMeta(model="tiny", revision=source.revision, hookpoint=MLP_IN, d_model=32, dtype="float32", cache_key="i")
    store = LocalStore(tmp_path_factory.mktemp("mlp-in-cache"))
    return [
        read_shard(store, produce_shard(unit, harvester=harvester, store=store, meta=meta, batch_size=8,
                                        excluded_token_ids=frozenset(tokenizer.all_special_ids)).entry)
        for unit in split_units(tokens, 8)
    ]


def _transcoder_files(target: str, d_out: int, *, skip: bool = False) -> dict[str, bytes]:
    transcoder = TopKSAE(32, 64, 4, d_out=d_out, apply_b_dec_to_input=False, seed=0, skip_connection=skip)
    return dictionary_files(transcoder, hookpoint=MLP_IN, hookpoint_out=target, model_name="tiny", scale=1.0,
                            extra_metadata={}, sparsity=None, eval_metrics={"fvu": 0.3})


def test_a_transcoders_cards_show_what_each_feature_reads_and_writes(tiny_model_dir, mlp_input_shards):
    """Reads: each card's contexts are the feature's largest activations on the input
    hookpoint's rows, encoded by hand from the saved weights. Writes: its promoted tokens are
    those its saved decoder row points along through the model's unembedding."""
    files = _transcoder_files(MLP_OUT, 32)
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    W_U, note = load_unembedding(source)
    decode = _decoder(tiny_model_dir)
    report = build_report(files, holdout=mlp_input_shards, decode=decode, unembedding=W_U, unembedding_note=note,
                          options=ReportOptions(n_features=6, n_logit_tokens=5))
    page, sample = report[REPORT_FILE].decode(), FeatureSample.from_json(report[FEATURES_FILE])
    assert f"<h1>Transcoder report: reads {MLP_IN} -&gt; writes {MLP_OUT} of tiny</h1>" in page
    assert "skip term" not in page

    weights = load_safetensors(files[WEIGHTS_FILE])
    x = torch.cat([s.activations for s in mlp_input_shards])
    pre = torch.relu(x @ weights["W_enc"] + weights["b_enc"])
    top = pre.topk(4, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert sample.has_logits and len(sample.cards) == 6 and sample.rows_scanned == len(x)
    for card in sample.cards:
        column = dense[:, card.index]
        assert card.max_activation == pytest.approx(column.max().item(), rel=1e-5)
        assert card.fired == int((column > 0).sum())
        logits = W_U @ weights["W_dec"][card.index]
        promoted = logits.topk(5)
        assert [t for t, _ in card.promoted] == decode(promoted.indices.tolist())
        assert [v for _, v in card.promoted] == pytest.approx(promoted.values.tolist(), rel=1e-5)
        article = re.search(rf'<article class="feature" id="feature-{card.index}">(.*?)</article>', page, re.S).group(1)
        assert f"<h4>Top-activating contexts (reads {MLP_IN})</h4>" in article
        assert f"<h4>Promoted tokens (writes {MLP_OUT})</h4>" in article


def test_a_transcoder_writing_another_width_has_no_logit_lens_and_a_skip_term_is_no_feature(
        tiny_model_dir, mlp_input_shards):
    """A transcoder into the MLP's 64 neurons (down_proj's input) writes no residual direction:
    the page says in one line that the logit lens does not apply. A skip transcoder's page says
    its skip term is not a feature."""
    target = "model.layers.1.mlp.down_proj:input"
    files = _transcoder_files(target, 64)
    W_U, note = load_unembedding(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    report = build_report(files, holdout=mlp_input_shards, unembedding=W_U, unembedding_note=note,
                          options=ReportOptions(n_features=3))
    page = report[REPORT_FILE].decode()
    assert f"reads {MLP_IN} -&gt; writes {target}" in page
    assert ("Promoted tokens are unavailable: the logit lens does not apply: the transcoder writes d_out=64 but the "
            f"unembedding has shape {tuple(W_U.shape)}, not the model&#x27;s residual width.") in page
    assert "<h4>Promoted tokens" not in page and not FeatureSample.from_json(report[FEATURES_FILE]).has_logits
    assert "<td>d_out</td><td>64</td>" in page

    skip = build_report(_transcoder_files(MLP_OUT, 32, skip=True), holdout=mlp_input_shards, unembedding=W_U,
                        options=ReportOptions(n_features=3))[REPORT_FILE].decode()
    assert "The skip term is not a feature" in skip and "skip term" not in page
    assert "<td>architecture</td><td>topk_skip_transcoder (trained as topk)</td>" in skip


# --------------------------------------------------------------------------- cross-layer transcoders

CLT_LAYERS = 4
CLT_INPUTS = [f"model.layers.{layer}.mlp:input" for layer in range(CLT_LAYERS)]
CLT_TARGETS = [f"model.layers.{layer}.mlp" for layer in range(CLT_LAYERS)]


@pytest.fixture(scope="module")
def clt_input_shards(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> list[DecodedShard]:
    """The tiny Llama's 4 MLP inputs (BOS excluded) cached as real shards, one cache per layer,
    each shard's rows put side by side (rows, 4 * 32) with the provenance they share: a
    cross-layer transcoder's held-out rows as the job passes them to the report."""
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokenizer = load_tokenizer(source)
    tokens = pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 16), tokenizer)
    model = load_model(source)
    per_layer = []
    for layer, hookpoint in enumerate(CLT_INPUTS):
        meta = ShardMeta(model="tiny", revision=source.revision, hookpoint=hookpoint, d_model=32, dtype="float32",
                         cache_key=f"i{layer}")
        store = LocalStore(tmp_path_factory.mktemp(f"clt-in-{layer}"))
        per_layer.append([
            read_shard(store, produce_shard(unit, harvester=ActivationHarvester(model, f"mlp_in.{layer}"), store=store,
                                            meta=meta, batch_size=8,
                                            excluded_token_ids=frozenset(tokenizer.all_special_ids)).entry)
            for unit in split_units(tokens, 8)
        ])
    return [dataclasses.replace(shards[0], activations=torch.cat([s.activations for s in shards], dim=1))
            for shards in zip(*per_layer, strict=True)]


def test_a_clt_page_names_its_layers_and_each_card_the_layer_it_reads_and_the_outputs_it_writes(
        tiny_model_dir, clt_input_shards):
    """A feature of layer l (latent l * n + i) reads layer l's MLP input: its contexts are its
    largest activations encoded by hand from that layer's held-out inputs and the saved weights.
    It writes the MLP outputs of layers l..3: its promoted tokens are those its decoder rows,
    summed over those layers, point along through the unembedding."""
    clt = CrossLayerTranscoder(CLT_LAYERS, 32, 16, activation="topk", k=3, seed=0)
    files = dictionary_files(clt, hookpoint=CLT_INPUTS[0], hookpoint_out=CLT_TARGETS[0], hookpoints=CLT_INPUTS,
                             hookpoints_out=CLT_TARGETS, model_name="tiny", scale=1.0, extra_metadata={}, sparsity=None,
                             eval_metrics={"fvu": 0.3})
    W_U, note = load_unembedding(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir))))
    decode = _decoder(tiny_model_dir)
    report = build_report(files, holdout=clt_input_shards, decode=decode, unembedding=W_U, unembedding_note=note,
                          options=ReportOptions(n_features=12, n_logit_tokens=5))
    page, sample = report[REPORT_FILE].decode(), FeatureSample.from_json(report[FEATURES_FILE])
    assert ("<h1>Cross-layer transcoder report: layers 0–3 (reads model.layers.0.mlp:input … writes "
            "model.layers.3.mlp) of tiny</h1>") in page
    assert "<td>d_in per layer</td><td>32</td>" in page and "<td>latents (d_sae) per layer</td><td>16</td>" in page

    weights = load_safetensors(files[WEIGHTS_FILE])
    x = torch.cat([s.activations for s in clt_input_shards]).view(-1, CLT_LAYERS, 32)
    assert sample.has_logits and len(sample.cards) == 12 and sample.rows_scanned == len(x)
    assert {card.index // 16 for card in sample.cards} == set(range(CLT_LAYERS))  # every layer drawn
    for card in sample.cards:
        layer, feature = divmod(card.index, 16)
        pre = torch.relu(x[:, layer] @ weights["W_enc"][layer] + weights["b_enc"][layer])
        top = pre.topk(3, dim=-1)
        column = torch.zeros_like(pre).scatter(-1, top.indices, top.values)[:, feature]
        assert card.max_activation == pytest.approx(column.max().item(), rel=1e-5)
        assert card.fired == int((column > 0).sum())
        promoted = (W_U @ weights[f"W_dec_{layer}"][feature].sum(dim=0)).topk(5)
        assert [t for t, _ in card.promoted] == decode(promoted.indices.tolist())
        assert [v for _, v in card.promoted] == pytest.approx(promoted.values.tolist(), rel=1e-4)
        article = re.search(rf'<article class="feature" id="feature-{card.index}">(.*?)</article>', page, re.S).group(1)
        assert f"<h3>Latent {card.index} · layer {layer}, feature {feature}" in article
        assert f"<h4>Top-activating contexts (reads {CLT_INPUTS[layer]})</h4>" in article
        writes = (CLT_TARGETS[3] if layer == 3
                  else f"{CLT_TARGETS[layer]} … {CLT_TARGETS[3]}, summed over {CLT_LAYERS - layer} layers")
        assert f"<h4>Promoted tokens (writes {writes})</h4>" in article
    # The spliced evaluation's per-layer figures (cluster.evaluation.evaluate_spliced_clt) get a row each.
    summary = {"mean": 0.2, "p50": 0.1, "p90": 0.4, "p99": 0.6, "max": 0.7}
    evaluation = {"fvu": 0.3, "lm": {"ce_recovered": 0.8, "layers": [{"hookpoint": i, "hookpoint_out": o, "fvu": 0.25}
                                                                    for i, o in zip(CLT_INPUTS, CLT_TARGETS, strict=True)]},
                  "unexplained": {**UNEXPLAINED, "layers": [{"hookpoint_out": o, "error_norm": summary, "token_fvu": summary}
                                                            for o in CLT_TARGETS]}}
    redrawn = render_report({**files, **report, EVAL_FILE: json.dumps(evaluation).encode()})[REPORT_FILE].decode()
    assert "<h4>Per covered layer</h4>" in redrawn
    for target in CLT_TARGETS:
        assert f"<tr><td>{target}: token_fvu</td><td>0.2</td><td>0.1</td>" in redrawn
        assert f"<td>{target}</td><td>0.25</td>" in redrawn
