"""``saeforge observe`` and ``saeforge steer`` on cross-layer transcoders over all 4 layers of the tiny
Llama (tests/dictionary_folders.py's ``tiny_clts``, JumpReLU and TopK per layer): what observe
reports per token, and what a steer does to the logits, equal a computation by hand from torch
hooks registered here on every MLP and the saved weights alone; the audit runs on a CLT's feature."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch
from dictionary_folders import CLT_INPUTS, CLT_TARGETS, write_folder
from safetensors.torch import load_file
from torch import Tensor, nn

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.text import pack_sequences
from cluster.cli import main as saeforge
from interp.audit import audit
from interp.observe import open_observer
from interp.steering import FeatureEdit, GenerationSettings, Steerer
from interp.terminal import format_audit
from trainer.clt import CrossLayerTranscoder
from trainer.layout import ACTIVATION_STATS_FILE, WEIGHTS_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["To be, or not to be, that is the question", "the slings and arrows of outrageous fortune"]
L, N = 4, 16


def _mlps(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


def _mlp_rows(model: nn.Module, ids: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Each MLP's (seq, 32) input and output on ``ids``, captured by hooks registered here."""
    xs: dict[int, Tensor] = {}
    ys: dict[int, Tensor] = {}
    handles = []
    for layer, mlp in enumerate(_mlps(model)):
        handles.append(mlp.register_forward_pre_hook(lambda m, args, layer=layer: xs.__setitem__(layer, args[0][0])))
        handles.append(mlp.register_forward_hook(lambda m, args, out, layer=layer: ys.__setitem__(layer, out[0])))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return [xs[layer] for layer in range(L)], [ys[layer] for layer in range(L)]


def _layer_features(weights: dict[str, Tensor], layer: int, x: Tensor) -> Tensor:
    """(rows, N) dense activations of the saved CLT's layer ``layer`` on its MLP input ``x``:
    JumpReLU ``pre * (pre > threshold)``, or the layer's own top 3 of ``relu(pre)``."""
    pre = x @ weights["W_enc"][layer] + weights["b_enc"][layer]
    if "threshold" in weights:
        return pre * (pre > weights["threshold"][layer])
    values, indices = torch.relu(pre).topk(3, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def _predicted(weights: dict[str, Tensor], features: list[Tensor], layer: int) -> Tensor:
    """``b_dec[j] + sum_{l <= j} f_l W_dec_l[:, j - l]``: the saved CLT's prediction of MLP output ``j``."""
    out = weights["b_dec"][layer]
    for source in range(layer + 1):
        out = out + features[source] @ weights[f"W_dec_{source}"][:, layer - source]
    return out


def _by_hand(weights: dict[str, Tensor], xs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    features = [_layer_features(weights, layer, x) for layer, x in enumerate(xs)]
    return features, [_predicted(weights, features, layer) for layer in range(L)]


@pytest.fixture(scope="module", params=["jumprelu", "topk"])
def clt(request, tiny_clts) -> tuple[Steerer, dict[str, Tensor], str]:
    folder = getattr(tiny_clts, request.param)
    return Steerer(open_observer(str(folder))), load_file(folder / WEIGHTS_FILE), str(folder)


# --------------------------------------------------------------------------- observe


def test_observe_encodes_every_layer_and_measures_every_output(clt):
    steerer, weights, folder = clt
    observer = steerer.observer
    variance = load_file(f"{folder}/{ACTIVATION_STATS_FILE}")["variance"].double().reshape(L, 32).sum(dim=1)
    result = observer.observe(TEXTS, top=4, feature=N + 5)
    assert result.layer_hookpoints == list(zip(CLT_INPUTS, CLT_TARGETS, strict=True))
    assert (result.hookpoint, result.hookpoint_out, result.n_per_layer) == (CLT_INPUTS[0], CLT_TARGETS[0], N)
    assert result.baseline.layer_total_variance == pytest.approx(variance.tolist(), rel=1e-6)
    for text, text_obs in zip(TEXTS, result.texts, strict=True):
        xs, ys = _mlp_rows(steerer.model, observer.token_ids(text))
        features, predictions = _by_hand(weights, xs)
        dense = torch.cat(features, dim=1)  # flat ids: layer l's feature i is l * N + i
        assert not text_obs.tokens[0].encoded and text_obs.tokens[0].layers is None  # BOS
        for position, token in enumerate(text_obs.tokens[1:], start=1):
            values, indices = dense[position].topk(4)
            assert [i for i, _ in token.features] == indices[values > 0].tolist(), f"position {position}"
            torch.testing.assert_close(torch.tensor([a for _, a in token.features]), values[values > 0],
                                       rtol=1e-4, atol=1e-5)
            assert token.activation == pytest.approx(dense[position, N + 5].item(), rel=1e-4, abs=1e-6)
            errors = torch.stack([(ys[j][position] - predictions[j][position]).pow(2).sum() for j in range(L)])
            assert [layer.l0 for layer in token.layers] == [int((f[position] > 0).sum()) for f in features]
            assert token.l0 == int((dense[position] > 0).sum())
            assert [layer.error_norm for layer in token.layers] == pytest.approx(errors.sqrt().tolist(), rel=1e-4)
            assert [layer.relative_error for layer in token.layers] == pytest.approx(
                (errors.double() / variance).tolist(), rel=1e-4)
            assert token.error_norm == pytest.approx(errors.sum().sqrt().item(), rel=1e-4)
            assert token.relative_error == pytest.approx(errors.sum().item() / variance.sum().item(), rel=1e-4)


def test_observe_from_the_command_line_names_every_layer(tiny_clts, tmp_path, capsys):
    written = tmp_path / "observed.json"
    assert saeforge(["observe", str(tiny_clts.topk), "--text", TEXTS[0], "--json", str(written),
                     "--html", str(tmp_path / "observed.html")]) == 0
    out = capsys.readouterr().out
    assert f"reads {CLT_INPUTS[0]} .. {CLT_INPUTS[-1]} -> writes {CLT_TARGETS[0]} .. {CLT_TARGETS[-1]}" in out
    assert "rel err by layer" in out
    data = json.loads(written.read_text())
    assert data["n_latents"] == L * N and data["n_per_layer"] == N
    assert [pair for pair in data["layer_hookpoints"]] == [list(p) for p in zip(CLT_INPUTS, CLT_TARGETS, strict=True)]
    token = data["texts"][0]["tokens"][1]
    assert all(f["layer"] == f["id"] // N for f in token["features"]) and len(token["layers"]) == L


# --------------------------------------------------------------------------- steer


@contextmanager
def _mlp_outputs_rewritten(model: nn.Module, rewrite: Callable[[int, list[Tensor], Tensor], Tensor]):
    """While active, MLP ``j``'s output ``y`` becomes ``rewrite(j, xs, y)`` at every position but
    the first (BOS, left out in training), ``xs`` the inputs of MLPs ``0..j`` in the same pass."""
    xs: dict[int, Tensor] = {}

    def output(module, args, y, layer):
        out = y.clone()
        out[:, 1:] = rewrite(layer, [xs[source][:, 1:] for source in range(layer + 1)], y[:, 1:])
        return out

    handles = []
    for layer, mlp in enumerate(_mlps(model)):
        handles.append(mlp.register_forward_pre_hook(lambda m, args, layer=layer: xs.__setitem__(layer, args[0])))
        handles.append(mlp.register_forward_hook(lambda m, args, y, layer=layer: output(m, args, y, layer)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _edit_by_hand(weights: dict[str, Tensor], features: list[int], values: list[float], *, drop: bool):
    """The steer's MLP outputs by hand: output ``j`` plus ``(f' - f) W_dec_l[i, j - l]`` for each
    edited feature ``l * N + i`` with ``l <= j`` (clamp), ``f`` encoded from MLP ``l``'s input in
    the same pass; with ``drop``, the CLT's prediction of output ``j`` in place of ``y``."""

    def rewrite(layer: int, xs: list[Tensor], y: Tensor) -> Tensor:
        base = _predicted(weights, [_layer_features(weights, s, x) for s, x in enumerate(xs)], layer) if drop else y
        for feature, value in zip(features, values, strict=True):
            source, index = divmod(feature, N)
            if source <= layer:
                f = _layer_features(weights, source, xs[source])[..., index]
                base = base + (value - f)[..., None] * weights[f"W_dec_{source}"][index, layer - source]
        return base

    return rewrite


def _busy_features(weights: dict[str, Tensor], xs: list[Tensor], layers: tuple[int, ...]) -> list[int]:
    """The feature of each of ``layers`` that fires on most tokens of the text (flat ids)."""
    return [layer * N + int((_layer_features(weights, layer, xs[layer][1:]) > 0).sum(dim=0).argmax())
            for layer in layers]


@pytest.mark.parametrize("error_term", ["keep", "drop"])
def test_a_steer_moves_every_later_mlp_output_by_the_features_decoders(clt, error_term):
    steerer, weights, _ = clt
    model, ids = steerer.model, steerer.observer.token_ids(TEXTS[0])
    features = _busy_features(weights, _mlp_rows(model, ids)[0], (1, 2))
    edit = FeatureEdit(tuple(features), (3.0, 0.0), "clamp", error_term)
    with torch.inference_mode():
        with steerer.applied(edit):
            steered = model(input_ids=torch.tensor([ids])).logits[0]
        with _mlp_outputs_rewritten(model, _edit_by_hand(weights, features, [3.0, 0.0], drop=error_term == "drop")):
            by_hand = model(input_ids=torch.tensor([ids])).logits[0]
        clean = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(steered, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, clean, atol=1e-3), "the edit did not move the logits"


def test_an_edit_that_changes_nothing_leaves_the_model_bit_identical(clt):
    steerer, weights, _ = clt
    ids = steerer.observer.token_ids(TEXTS[1])
    features = _busy_features(weights, _mlp_rows(steerer.model, ids)[0], (0, 3))
    with torch.inference_mode():
        clean = steerer.model(input_ids=torch.tensor([ids])).logits[0]
        with steerer.applied(FeatureEdit(tuple(features), (1.0, 1.0), "scale", "keep")):
            unchanged = steerer.model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.equal(unchanged, clean)


def test_steered_generation_equals_recomputing_each_step_under_the_hand_hooks(tiny_clts):
    steerer = Steerer(open_observer(str(tiny_clts.jumprelu)))
    weights = load_file(tiny_clts.jumprelu / WEIGHTS_FILE)
    ids = steerer.observer.token_ids(TEXTS[0])
    [feature] = _busy_features(weights, _mlp_rows(steerer.model, ids)[0], (1,))
    result = steerer.steer(TEXTS[0], FeatureEdit((feature,), (6.0,), "clamp"), GenerationSettings(max_new_tokens=8))
    sequence = list(ids)
    with torch.inference_mode(), _mlp_outputs_rewritten(steerer.model,
                                                        _edit_by_hand(weights, [feature], [6.0], drop=False)):
        for _ in range(8):
            sequence.append(int(steerer.model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    assert result.continuations[0].steered_ids == sequence[len(ids):]
    assert result.layer_hookpoints == list(zip(CLT_INPUTS, CLT_TARGETS, strict=True))


# --------------------------------------------------------------------------- the audit


def test_the_audit_measures_a_clt_feature_through_every_output_it_writes(tiny_clts, tiny_corpus_dir):
    steerer = Steerer(open_observer(str(tiny_clts.jumprelu)))
    weights = load_file(tiny_clts.jumprelu / WEIGHTS_FILE)
    tokens = torch.from_numpy(pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32,
                                                        max_tokens=32 * 4), steerer.observer.tokenizer))
    [feature] = _busy_features(weights, _mlp_rows(steerer.model, tokens[0].tolist())[0], (2,))
    result = audit(steerer, FeatureEdit((feature,), (0.0,), "clamp"), tokens, seeds=0)
    [a] = result.features
    assert result.layer_hookpoints is not None and any("cross-layer" in note for note in result.notes)
    # Promoted targets: the feature's decoder rows summed over the outputs it writes (layers 2, 3).
    unembedding = steerer.model.lm_head.weight.detach() * steerer.model.model.norm.weight.detach()
    summed = weights["W_dec_2"][feature - 2 * N].sum(dim=0)
    assert a.targets[0].logit == pytest.approx(float(summed @ unembedding[a.targets[0].token_id]), rel=1e-4)
    assert a.dashboard.feature_read_back == pytest.approx(a.dashboard.feature_before)
    assert a.leak is not None and a.steered.kl_divergence > 0 and a.n_positions > 0
    assert "cross-layer" in format_audit(result)


def test_a_clt_that_picks_its_top_k_across_layers_cannot_steer(tiny_model_dir, tmp_path):
    across = CrossLayerTranscoder(4, 32, 16, activation="topk", k=2, clt_topk="all", seed=0)
    folder = write_folder(tmp_path / "across", across, CLT_INPUTS[0], ModelConfig(name_or_path=str(tiny_model_dir)),
                          hookpoint_out=CLT_TARGETS[0], hookpoints=CLT_INPUTS, hookpoints_out=CLT_TARGETS)
    observer = open_observer(str(folder))
    assert observer.observe(TEXTS[0]).texts[0].tokens[1].l0 == 2 * 4  # observe works: k * L over all layers
    with pytest.raises(ValueError, match=r"clt_topk='all'.*clt_topk='layer' or jumprelu"):
        Steerer(observer)
