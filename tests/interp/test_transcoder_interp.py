"""``saeforge observe`` and ``saeforge steer`` on transcoders (the tiny Llama's layer-1 MLP input ->
its output, tests/dictionary_folders.py): what observe reports per token and what a steer does to
the logits equal a computation by hand, with torch hooks registered here on the MLP and the saved
weights alone; the audit runs on a transcoder's features, and refuses the logit lens in one line
where the transcoder does not write vectors of the model's hidden size."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch
from dictionary_folders import LAYER, MLP_IN, MLP_OUT, write_folder
from safetensors.torch import load_file
from torch import Tensor, nn

from activation_cache.config import ModelConfig
from cluster.cli import main as saeforge
from interp.audit import audit
from interp.observe import open_observer
from interp.steering import FeatureEdit, GenerationSettings, Steerer
from interp.terminal import format_audit
from trainer.layout import ACTIVATION_STATS_FILE, WEIGHTS_FILE
from trainer.sae import TopKSAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["To be, or not to be, that is the question", "the slings and arrows of outrageous fortune"]
K = 4


def _mlp(model: nn.Module) -> nn.Module:
    return model.model.layers[LAYER].mlp


def _mlp_rows(model: nn.Module, ids: list[int]) -> tuple[Tensor, Tensor]:
    """(seq, 32) the layer's MLP input and output on ``ids``, captured by hooks registered here."""
    captured: dict[str, Tensor] = {}
    mlp = _mlp(model)
    handles = [mlp.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0])),
               mlp.register_forward_hook(lambda m, args, out: captured.__setitem__("y", out))]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return captured["x"][0], captured["y"][0]


def _by_hand(weights: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(dense TopK activations, prediction) of the saved transcoder on ``x``: ``x`` is not
    centred (no b_dec on the input); a skip transcoder's ``W_skip`` is saved (d_out, d_in)."""
    pre = torch.relu(x @ weights["W_enc"] + weights["b_enc"])
    values, indices = pre.topk(K, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    prediction = dense @ weights["W_dec"] + weights["b_dec"]
    if "W_skip" in weights:
        prediction = prediction + x @ weights["W_skip"].T
    return dense, prediction


@contextmanager
def _mlp_output_rewritten(model: nn.Module, rewrite: Callable[[Tensor, Tensor], Tensor]):
    """While active, the MLP's output ``y`` becomes ``rewrite(x, y)`` at every position but the
    first (BOS, left out in training), ``x`` the MLP's input in the same pass (no KV cache)."""
    captured: dict[str, Tensor] = {}
    mlp = _mlp(model)

    def output(module, args, y):
        out = y.clone()
        out[:, 1:] = rewrite(captured["x"][:, 1:], y[:, 1:])
        return out

    handles = [mlp.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0])),
               mlp.register_forward_hook(output)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _edit_by_hand(weights: dict[str, Tensor], features: list[int], values: list[float], *, drop: bool):
    """The steer's MLP output by hand: ``y + (f' - f) W_dec[features]`` (clamp), or the prediction
    in place of ``y`` with ``drop``."""

    def rewrite(x: Tensor, y: Tensor) -> Tensor:
        dense, prediction = _by_hand(weights, x)
        f = dense[..., features]
        delta = (torch.tensor(values).expand_as(f) - f) @ weights["W_dec"][features]
        return (prediction if drop else y) + delta

    return rewrite


@pytest.fixture(scope="module")
def steerer(tiny_transcoders) -> Steerer:
    return Steerer(open_observer(str(tiny_transcoders.with_stats)))


def _busy_features(steerer: Steerer, weights: dict[str, Tensor], ids: list[int], n: int = 2) -> list[int]:
    x, _ = _mlp_rows(steerer.model, ids)
    dense, _ = _by_hand(weights, x[1:])
    return (dense > 0).sum(dim=0).topk(n).indices.tolist()


# --------------------------------------------------------------------------- observe


def _assert_observed(text_obs, x: Tensor, y: Tensor, weights: dict[str, Tensor], total_variance: float,
                     top: int, feature: int) -> None:
    dense, prediction = _by_hand(weights, x)
    assert not text_obs.tokens[0].encoded and text_obs.tokens[0].error_norm is None  # BOS
    for position, token in enumerate(text_obs.tokens[1:], start=1):
        values, indices = dense[position].topk(top)
        assert [i for i, _ in token.features] == [i for i, v in zip(indices.tolist(), values.tolist(), strict=True)
                                                  if v > 0], f"position {position}"
        torch.testing.assert_close(torch.tensor([a for _, a in token.features]), values[values > 0],
                                   rtol=1e-4, atol=1e-5)
        assert token.l0 == int((dense[position] > 0).sum())
        assert token.activation == pytest.approx(dense[position, feature].item(), rel=1e-4, abs=1e-6)
        error = (y[position] - prediction[position]).pow(2).sum().item()  # the target's error, not the input's
        assert token.error_norm == pytest.approx(error ** 0.5, rel=1e-4, abs=1e-6)
        assert token.relative_error == pytest.approx(error / total_variance, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("folder", ["plain", "skip"])
def test_observe_encodes_the_mlp_input_and_measures_the_prediction_of_its_output(
        tiny_transcoders, tiny_skip_transcoder, steerer, folder):
    path = tiny_transcoders.with_stats if folder == "plain" else tiny_skip_transcoder
    weights = load_file(path / WEIGHTS_FILE)
    assert ("W_skip" in weights) == (folder == "skip")
    if folder == "skip":
        assert weights["W_skip"].abs().max() > 1e-3, "the skip term stayed at its zero initialisation"
    total_variance = load_file(path / ACTIVATION_STATS_FILE)["variance"].double().sum().item()
    observer = open_observer(str(path), loaded_model=steerer.model, tokenizer=steerer.observer.tokenizer)
    result = observer.observe(TEXTS, top=3, feature=5)
    assert (result.hookpoint, result.hookpoint_out) == (MLP_IN, MLP_OUT)
    assert result.baseline.source == "held-out" and result.baseline.n_tokens == 8 * 31
    for text, text_obs in zip(TEXTS, result.texts, strict=True):
        ids = observer.token_ids(text)
        assert [t.token_id for t in text_obs.tokens] == ids
        x, y = _mlp_rows(steerer.model, ids)
        _assert_observed(text_obs, x, y, weights, total_variance, top=3, feature=5)


def test_without_statistics_the_baseline_is_the_targets_variance_on_the_text(tiny_transcoders, steerer, tmp_path,
                                                                            capsys):
    without = tiny_transcoders.without_stats
    result = open_observer(str(without)).observe(TEXTS, top=2)
    targets = torch.cat([_mlp_rows(steerer.model, steerer.observer.token_ids(text))[1][1:] for text in TEXTS]).double()
    variance = (targets - targets.mean(dim=0)).pow(2).mean(dim=0).sum().item()
    assert result.baseline.source == "text" and result.baseline.n_tokens == len(targets)
    assert result.baseline.total_variance == pytest.approx(variance, rel=1e-5)

    written, page = tmp_path / "observed.json", tmp_path / "observed.html"
    assert saeforge(["observe", str(without), "--text", TEXTS[0], "--json", str(written), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert f"reads {MLP_IN} -> writes {MLP_OUT}" in out.splitlines()[0]
    assert f"observed tokens at the target {MLP_OUT}" in out
    data = json.loads(written.read_text())
    assert (data["hookpoint"], data["hookpoint_out"]) == (MLP_IN, MLP_OUT)
    assert f"reads {MLP_IN} -&gt; writes {MLP_OUT}" in page.read_text()


def test_an_sae_observes_and_steers_as_before(tiny_dictionaries):
    observer = open_observer(str(tiny_dictionaries[0]))
    assert observer.hookpoint_out is None and observer.output_hookpoint == f"model.layers.{LAYER}"
    result = observer.observe(TEXTS[0])
    assert result.hookpoint_out is None and result.where == f"model.layers.{LAYER}"


# --------------------------------------------------------------------------- steer


@pytest.mark.parametrize("error_term", ["keep", "drop"])
@pytest.mark.parametrize("folder", ["plain", "skip"])
def test_a_steer_changes_the_mlp_output_by_the_edited_decoder_rows(tiny_transcoders, tiny_skip_transcoder, steerer,
                                                                  folder, error_term):
    path = tiny_transcoders.with_stats if folder == "plain" else tiny_skip_transcoder
    weights = load_file(path / WEIGHTS_FILE)
    this = Steerer(open_observer(str(path), loaded_model=steerer.model, tokenizer=steerer.observer.tokenizer))
    model = this.model
    ids = this.observer.token_ids(TEXTS[0])
    features = _busy_features(this, weights, ids)
    edit = FeatureEdit(tuple(features), (3.0, 0.0), "clamp", error_term)
    with torch.inference_mode():
        with this.applied(edit):
            steered = model(input_ids=torch.tensor([ids])).logits[0]
        with _mlp_output_rewritten(model, _edit_by_hand(weights, features, [3.0, 0.0], drop=error_term == "drop")):
            by_hand = model(input_ids=torch.tensor([ids])).logits[0]
        clean = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(steered, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, clean, atol=1e-3), "the edit did not move the logits"


def test_an_edit_that_changes_nothing_leaves_the_model_bit_identical(tiny_transcoders, steerer):
    ids = steerer.observer.token_ids(TEXTS[1])
    features = _busy_features(steerer, load_file(tiny_transcoders.with_stats / WEIGHTS_FILE), ids)
    with torch.inference_mode():
        clean = steerer.model(input_ids=torch.tensor([ids])).logits[0]
        with steerer.applied(FeatureEdit(tuple(features), (1.0, 1.0), "scale", "keep")):
            unchanged = steerer.model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.equal(unchanged, clean)


def test_steered_generation_equals_recomputing_each_step_under_the_hand_hook(tiny_transcoders, steerer):
    weights = load_file(tiny_transcoders.with_stats / WEIGHTS_FILE)
    ids = steerer.observer.token_ids(TEXTS[0])
    features = _busy_features(steerer, weights, ids)
    edit = FeatureEdit(tuple(features), (4.0, 4.0), "clamp")
    result = steerer.steer(TEXTS[0], edit, GenerationSettings(max_new_tokens=8))
    sequence = list(ids)
    with torch.inference_mode(), _mlp_output_rewritten(steerer.model, _edit_by_hand(weights, features, [4.0, 4.0],
                                                                                     drop=False)):
        for _ in range(8):
            sequence.append(int(steerer.model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    assert result.continuations[0].steered_ids == sequence[len(ids):]
    assert result.hookpoint_out == MLP_OUT


# --------------------------------------------------------------------------- the audit


def test_the_audit_measures_a_transcoder_feature_through_its_output(tiny_transcoders, tiny_corpus_dir, steerer):
    from activation_cache.config import DataConfig
    from activation_cache.text import pack_sequences

    tokens = torch.from_numpy(pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32,
                                                        max_tokens=32 * 4), steerer.observer.tokenizer))
    weights = load_file(tiny_transcoders.with_stats / WEIGHTS_FILE)
    feature = _busy_features(steerer, weights, tokens[0].tolist(), n=1)[0]
    result = audit(steerer, FeatureEdit((feature,), (0.0,), "clamp"), tokens, seeds=0)
    [a] = result.features
    assert result.hookpoint_out == MLP_OUT and any("a transcoder" in note for note in result.notes)
    # Promoted targets: the decoder row (the MLP output's direction) through the unembedding.
    unembedding = steerer.model.lm_head.weight.detach() * steerer.model.model.norm.weight.detach()
    assert a.targets[0].logit == pytest.approx(float(weights["W_dec"][feature] @ unembedding[a.targets[0].token_id]),
                                               rel=1e-4)
    # The edit writes downstream of the input the feature is read from: the read-back is the value before.
    assert a.dashboard.feature_read_back == pytest.approx(a.dashboard.feature_before)
    assert a.leak is not None and a.steered.kl_divergence > 0
    assert f"reads {MLP_IN} -> writes {MLP_OUT}" in format_audit(result)


def test_the_logit_lens_is_refused_where_the_transcoder_writes_another_width(tiny_model_dir, tmp_path, capsys):
    neurons = f"model.layers.{LAYER}.mlp.down_proj:input"  # the MLP's 64 neurons, not the hidden size 32
    folder = write_folder(tmp_path / "to-neurons", TopKSAE(32, 16, 2, d_out=64, apply_b_dec_to_input=False, seed=0),
                          MLP_IN, ModelConfig(name_or_path=str(tiny_model_dir)), hookpoint_out=neurons)
    assert saeforge(["steer", str(folder), "--feature", "3", "--value", "2", "--prompt", TEXTS[0], "--audit"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the logit lens does not apply" in err[0] and "d_out=64" in err[0] and "--target" in err[0]


def test_a_target_of_the_wrong_width_is_refused_before_the_model_loads(tiny_model_dir, tmp_path):
    folder = write_folder(tmp_path / "too-wide", TopKSAE(32, 16, 2, d_out=48, apply_b_dec_to_input=False, seed=0),
                          MLP_IN, ModelConfig(name_or_path=str(tiny_model_dir)), hookpoint_out=MLP_OUT)
    with pytest.raises(ValueError, match=rf"dictionary d_out=48 but .* at {MLP_OUT} has width 32"):
        open_observer(str(folder))
