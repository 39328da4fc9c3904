"""``saeforge observe`` and ``interp.open_observer``: what they report per token equals an
independent computation (the model's hidden state from ``transformers`` at that layer, encoded by
hand with the saved weights) on the tiny model, on a folder SAELens wrote, and on the packaged
model with a small dictionary trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dictionary_folders import LAYER
from safetensors.torch import load_file

from activation_cache.config import PACKAGED_MODEL, ModelConfig
from activation_cache.hooking import (
    load_tokenizer,
    resolve_model_source,
)
from cluster.cli import main as saeforge
from interp.observe import open_observer
from trainer.layout import ACTIVATION_STATS_FILE, WEIGHTS_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["To be, or not to be, that is the question", "the slings and arrows of outrageous fortune"]


def _independent(model_dir: Path, text: str, weights: dict[str, torch.Tensor], k: int, layer: int,
                 model: torch.nn.Module | None = None, chat: bool = False):
    """(token ids, hidden states at the layer, dense TopK activations, reconstruction) computed
    with transformers and the saved weights alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    else:
        tokenizer = load_tokenizer(resolve_model_source(ModelConfig(name_or_path=str(model_dir))))
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids[0] != tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id, *ids]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
        pre = torch.relu((hidden - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
        values, indices = pre.topk(k, dim=-1)
        dense = torch.zeros_like(pre).scatter(-1, indices, values)
        reconstruction = dense @ weights["W_dec"] + weights["b_dec"]
    return ids, hidden, dense, reconstruction


def _assert_matches(text_obs, ids, hidden, dense, reconstruction, *, special: set[int], total_variance: float,
                    top: int, feature: int | None = None) -> None:
    assert [t.token_id for t in text_obs.tokens] == ids
    encoded = [i not in special for i in ids]
    assert [t.encoded for t in text_obs.tokens] == encoded
    assert not text_obs.tokens[0].encoded and text_obs.tokens[0].features == []
    for position, token in enumerate(text_obs.tokens):
        if not token.encoded:
            assert token.error_norm is None and token.relative_error is None
            continue
        values, indices = dense[position].topk(top)
        expected = [(i, v) for i, v in zip(indices.tolist(), values.tolist(), strict=True) if v > 0]
        assert [i for i, _ in token.features] == [i for i, _ in expected], f"position {position}"
        torch.testing.assert_close(torch.tensor([a for _, a in token.features]), torch.tensor([a for _, a in expected]),
                                   rtol=1e-4, atol=1e-5)
        assert token.l0 == int((dense[position] > 0).sum())
        error = (hidden[position] - reconstruction[position]).pow(2).sum()
        assert token.error_norm == pytest.approx(error.sqrt().item(), rel=1e-4, abs=1e-6)
        assert token.relative_error == pytest.approx(error.item() / total_variance, rel=1e-4, abs=1e-7)
        if feature is not None:
            assert token.activation == pytest.approx(dense[position, feature].item(), rel=1e-4, abs=1e-6)


def test_observe_equals_transformers_hidden_states_encoded_with_the_saved_weights(tiny_dictionaries, tiny_model_dir):
    with_stats, _ = tiny_dictionaries
    weights = load_file(with_stats / WEIGHTS_FILE)
    stats = load_file(with_stats / ACTIVATION_STATS_FILE)
    observer = open_observer(str(with_stats))
    feature = 7
    result = observer.observe(TEXTS, top=3, feature=feature)
    assert result.hookpoint == f"model.layers.{LAYER}" and result.n_latents == 64
    assert result.baseline.source == "held-out" and result.baseline.n_tokens == 8 * 31
    special = set(observer.tokenizer.all_special_ids)
    for text, text_obs in zip(TEXTS, result.texts, strict=True):
        ids, hidden, dense, reconstruction = _independent(tiny_model_dir, text, weights, 4, LAYER)
        _assert_matches(text_obs, ids, hidden, dense, reconstruction, special=special,
                        total_variance=stats["variance"].double().sum().item(), top=3, feature=feature)


def test_a_dictionary_without_statistics_is_measured_against_the_text_and_says_so(tiny_dictionaries, tiny_model_dir,
                                                                                  capsys):
    _, without = tiny_dictionaries
    weights = load_file(without / WEIGHTS_FILE)
    result = open_observer(str(without)).observe(TEXTS, top=2)
    rows = []
    for text in TEXTS:
        ids, hidden, _, _ = _independent(tiny_model_dir, text, weights, 4, LAYER)
        rows.append(hidden[1:])  # BOS left out
    rows = torch.cat(rows).double()
    variance = (rows - rows.mean(dim=0)).pow(2).mean(dim=0).sum().item()
    assert result.baseline.source == "text" and result.baseline.n_tokens == len(rows)
    assert result.baseline.total_variance == pytest.approx(variance, rel=1e-5)
    assert saeforge(["observe", str(without), "--text", TEXTS[0]]) == 0
    out = capsys.readouterr().out
    assert "computed on the" in out and "records no held-out mean and variance" in out


def test_the_command_prints_every_token_and_writes_the_same_result_as_json(tiny_dictionaries, tmp_path, capsys):
    with_stats, _ = tiny_dictionaries
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n", encoding="utf-8")
    written, page = tmp_path / "observed.json", tmp_path / "observed.html"
    assert saeforge(["observe", str(with_stats), "--prompts-file", str(prompts), "--top", "3", "--feature", "7",
                     "--json", str(written), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    expected = open_observer(str(with_stats)).observe(TEXTS, top=3, feature=7)
    assert json.loads(written.read_text()) == json.loads(expected.to_json())
    assert page.read_text().startswith("<!DOCTYPE html>") and "Feature 7" in page.read_text()
    assert "held-out mean and variance the training recorded" in out
    rows = [line for line in out.splitlines() if line[:5].strip().isdigit()]
    assert len(rows) == sum(len(t.tokens) for t in expected.texts)
    assert sum("left out, as in training" in line for line in rows) == len(TEXTS)  # each text's BOS


def test_a_folder_saelens_wrote_observes_as_saelens_encodes(tiny_model_dir, tmp_path):
    """SAELens's own TopK SAE, saved with SAELens at a TransformerLens hook name: observe maps the
    hook to the layer's output and reports SAELens's encoding of transformers' hidden state."""
    from sae_lens import SAE, TopKSAEConfig
    from sae_lens import TopKSAE as LensTopKSAE
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(1)
    cfg = TopKSAEConfig(d_in=32, d_sae=48, k=5, metadata=SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_post",
                                                                      model_name="a-model-not-here"))
    lens = LensTopKSAE(cfg)
    with torch.no_grad():
        for param in lens.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    lens.save_model(tmp_path / "saelens")
    loaded = SAE.load_from_disk(tmp_path / "saelens")
    result = open_observer(str(tmp_path / "saelens"), model=str(tiny_model_dir)).observe(TEXTS[0], top=5)
    assert result.hookpoint == f"model.layers.{LAYER}" and result.baseline.source == "text"
    ids, hidden, _, _ = _independent(tiny_model_dir, TEXTS[0], load_file(tmp_path / "saelens" / WEIGHTS_FILE), 5, LAYER)
    with torch.no_grad():
        dense = loaded.encode(hidden)
        reconstruction = loaded.decode(dense)
    rows = hidden[1:].double()
    variance = (rows - rows.mean(dim=0)).pow(2).mean(dim=0).sum().item()
    _assert_matches(result.texts[0], ids, hidden, dense, reconstruction, special={1}, total_variance=variance, top=5)


def test_observe_on_the_packaged_instruct_model_with_its_chat_template(packaged_dictionary):
    """The packaged model (SmolLM2-135M-Instruct) and a small dictionary trained in the session on its
    layer-15 activations over Shakespeare; the text observed inside the chat template."""
    model, folder = packaged_dictionary.model, packaged_dictionary.folder
    observer = open_observer(str(folder), loaded_model=model)
    result = observer.observe("Shall I compare thee to a summer's day?", top=4, chat=True)
    ids, hidden, dense, reconstruction = _independent(
        Path(PACKAGED_MODEL), "Shall I compare thee to a summer's day?", load_file(folder / WEIGHTS_FILE), 16, 15,
        model=model, chat=True)
    assert result.texts[0].tokens[0].token == "<|im_start|>"
    stats = load_file(folder / ACTIVATION_STATS_FILE)
    _assert_matches(result.texts[0], ids, hidden, dense, reconstruction, special=set(observer.tokenizer.all_special_ids),
                    total_variance=stats["variance"].double().sum().item(), top=4)
    encoded = [t for t in result.texts[0].tokens if t.encoded]
    assert len(encoded) < len(result.texts[0].tokens) - 3  # the template's <|im_start|>/<|im_end|> are left out
