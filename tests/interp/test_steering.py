"""Steering is exact where it must be: an edit that changes nothing changes nothing (error term
kept), an edit moves the hookpoint activation by exactly ``(f' - f) @ W_dec``, and generation
with the KV cache under an edit equals recomputing every step without it. In float32, on the
tiny Llama with a small dictionary trained on it (tests/interp/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch
from dictionary_folders import LAYER
from safetensors.torch import load_file

from activation_cache.hooking import ActivationHarvester
from cluster.cli import main as saeforge
from interp.observe import open_observer
from interp.steering import FeatureEdit, GenerationSettings, Steerer, feature_activations
from trainer.layout import WEIGHTS_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def steerer(tiny_dictionaries) -> Steerer:
    with_stats, _ = tiny_dictionaries
    return Steerer(open_observer(str(with_stats)))


def _logits(steerer: Steerer, ids: list[int], edit: FeatureEdit | None) -> torch.Tensor:
    with torch.inference_mode(), steerer.applied(edit):
        return steerer.model(input_ids=torch.tensor([ids])).logits[0]


def _busy_features(steerer: Steerer, ids: list[int], n: int = 2) -> list[int]:
    """The features that fire on most tokens of ``ids``: an edit of them moves many positions."""
    with torch.inference_mode():
        x = steerer.observer.harvester()(torch.tensor([ids]))[0][1:]
        dense, _ = feature_activations(steerer.observer.sae, x, range(steerer.observer.folder.n_latents))
    return (dense > 0).sum(dim=0).topk(n).indices.tolist()


@pytest.mark.parametrize(("mode", "value"), [("scale", 1.0), ("add", 0.0)])
def test_an_edit_that_changes_nothing_leaves_the_model_bit_identical(steerer, mode, value):
    ids = steerer.observer.token_ids(PROMPT)
    features = _busy_features(steerer, ids)
    clean = _logits(steerer, ids, None)
    kept = _logits(steerer, ids, FeatureEdit(tuple(features), (value,) * len(features), mode, "keep"))
    assert torch.equal(kept, clean)
    dropped = _logits(steerer, ids, FeatureEdit(tuple(features), (value,) * len(features), mode, "drop"))
    assert not torch.allclose(dropped, clean, atol=1e-3), "dropping the error term changed nothing: the dictionary is exact?"


def test_an_edit_moves_the_hookpoint_activation_by_exactly_the_edited_decoder_rows(steerer, tiny_dictionaries):
    ids = steerer.observer.token_ids(PROMPT)
    features = _busy_features(steerer, ids)
    edit = FeatureEdit(tuple(features), (3.0, -1.5), "clamp")
    model = steerer.model
    downstream = ActivationHarvester(model, f"model.layers.{LAYER + 1}:input")  # what the next layer receives
    with torch.inference_mode():
        x = steerer.observer.harvester()(torch.tensor([ids]))[0]
        with steerer.applied(edit):
            edited = downstream(torch.tensor([ids]))[0]
    weights = load_file(tiny_dictionaries[0] / WEIGHTS_FILE)
    f, _ = feature_activations(steerer.observer.sae, x[1:], features)
    # f from the dictionary's own encoder equals the saved weights' TopK by hand.
    pre = torch.relu((x[1:] - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    values, indices = pre.topk(4, dim=-1)
    by_hand = torch.zeros_like(pre).scatter(-1, indices, values)[:, features]
    torch.testing.assert_close(f, by_hand, rtol=1e-5, atol=1e-6)
    delta = (torch.tensor([3.0, -1.5]).expand_as(f) - f) @ weights["W_dec"][features]
    assert torch.equal(edited[1:], x[1:] + delta)
    assert torch.equal(edited[0], x[0]), "BOS, left out in training, was edited"


def test_generation_with_the_kv_cache_equals_recomputing_every_step(steerer):
    ids = steerer.observer.token_ids(PROMPT)
    edit = FeatureEdit(tuple(_busy_features(steerer, ids)), (4.0, 4.0), "clamp")
    for settings in (GenerationSettings(max_new_tokens=12), GenerationSettings(max_new_tokens=12, seed=3)):
        cached, cached_logits = steerer.generate(ids, edit, settings, use_cache=True)
        recomputed, recomputed_logits = steerer.generate(ids, edit, settings, use_cache=False)
        assert cached == recomputed
        torch.testing.assert_close(cached_logits, recomputed_logits, rtol=1e-4, atol=1e-4)
    unedited, _ = steerer.generate(ids, None, GenerationSettings(max_new_tokens=12))
    assert unedited != cached, "the edit did not change the greedy continuation"


def test_the_command_prints_both_continuations_and_writes_them_as_json(tiny_dictionaries, steerer, tmp_path, capsys):
    with_stats, _ = tiny_dictionaries
    ids = steerer.observer.token_ids(PROMPT)
    feature = _busy_features(steerer, ids, 1)[0]
    written = {}
    for error_term in ("keep", "drop"):
        written[error_term] = tmp_path / f"steer-{error_term}.json"
        assert saeforge(["steer", str(with_stats), "--feature", str(feature), "--value", "4", "--prompt", PROMPT,
                         "--max-new-tokens", "10", "--error-term", error_term, "--json", str(written[error_term])]) == 0
        out = capsys.readouterr().out
        assert "unedited" in out and "| steered" in out and f"clamp: {feature} -> 4" in out
    kept, dropped = (json.loads(written[term].read_text()) for term in ("keep", "drop"))
    expected = steerer.steer(PROMPT, FeatureEdit((feature,), (4.0,), "clamp"), GenerationSettings(max_new_tokens=10))
    [continuation] = kept["continuations"]
    assert continuation["steered_ids"] == expected.continuations[0].steered_ids
    assert continuation["unedited_ids"] == expected.continuations[0].unedited_ids
    assert kept["error_term"] == "keep" and dropped["error_term"] == "drop"
    assert dropped["continuations"][0]["unedited_ids"] == continuation["unedited_ids"]


def test_a_multiple_is_of_each_features_recorded_held_out_maximum(steerer, tiny_dictionaries):
    from trainer.activation_stats import load_feature_stats
    from trainer.layout import FEATURE_STATS_FILE

    maxima = load_feature_stats((tiny_dictionaries[0] / FEATURE_STATS_FILE).read_bytes()).max_activation
    live = maxima.nonzero().flatten()[:2].tolist()
    edit = steerer.edit(live, "2.5x", mode="add")
    assert edit.values == tuple(2.5 * float(maxima[f]) for f in live) and edit.mode == "add"



def test_the_command_audits_the_steer_and_writes_the_audit_as_json_and_a_page(tiny_dictionaries, tiny_corpus_dir,
                                                                             steerer, tmp_path, capsys):
    with_stats, _ = tiny_dictionaries
    ids = steerer.observer.token_ids(PROMPT)
    feature = _busy_features(steerer, ids, 1)[0]
    written, page = tmp_path / "audit.json", tmp_path / "audit.html"
    assert saeforge(["steer", str(with_stats), "--feature", str(feature), "--value", "5x", "--prompt", PROMPT,
                     "--max-new-tokens", "6", "--audit", "--text", str(tiny_corpus_dir), "--audit-tokens", "256",
                     "--seeds", "2", "--json", str(written), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    result = json.loads(written.read_text())
    [audited] = result["audit"]["features"]
    assert audited["feature"] == feature and audited["kind"] == "amplify"
    assert audited["value"] == pytest.approx(result["values"][0])
    assert audited["dose_response"]["unit"] == "held-out maximum" and len(audited["dose_response"]["points"]) == 6
    assert audited["continuations"]["seeds"] == [0, 1] and audited["summary"] in out
    assert result["audit"]["text_source"] == str(tiny_corpus_dir) and result["audit"]["cost"]["forward_passes"] > 0
    assert page.read_text().startswith("<!DOCTYPE html>") and f'id="feature-{feature}"' in page.read_text()
