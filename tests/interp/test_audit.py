"""The steer audit (``interp.audit``) against known answers: a tiny Llama whose weights make one
direction at the last layer's output control one output token, with dictionaries that capture that
direction fully, half and hardly at all; then on the packaged model with a dictionary trained here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from dictionary_folders import write_folder
from tiny_model import build_tiny_model

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.hooking import (
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.text import pack_sequences
from interp.audit import audit, audit_text, choose_features
from interp.observe import open_observer
from interp.steering import Steerer
from interp.terminal import format_audit
from trainer.architectures import ReLUSAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN = 32
TARGET = 100  # the output token the direction controls (an ordinary byte-level BPE token)
SHARES = {"full": 1.0, "half": 0.5, "hardly": 0.01}


# --------------------------------------------------------------------------- the known answer


def _controlled_llama(folder: Path) -> tuple[Path, torch.Tensor]:
    """A 2-layer tiny Llama in which the component c of the last layer's output along a unit
    direction u is each token's embedding's, in [0.5, 1.5] (no layer writes along u), and only
    token TARGET reads u: its logit is 4 c / rms(x) (about 2 c), every other unembedding row
    orthogonal to u. The rest of the residual has norm about 2 sqrt(31), so removing c moves the
    final RMSNorm by under 1%: the target's log-probability is close to linear in c, and small,
    as the leak's known answers need."""
    from transformers import LlamaForCausalLM

    build_tiny_model(folder, n_layers=2, hidden=HIDDEN)
    model = LlamaForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(7)
    u = torch.randn(HIDDEN, generator=generator)
    u /= u.norm()
    off_u = torch.eye(HIDDEN) - torch.outer(u, u)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(off_u @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(off_u @ layer.mlp.down_proj.weight)
        vocab = model.model.embed_tokens.weight.shape[0]
        along = 0.5 + torch.rand(vocab, 1, generator=generator)
        model.model.embed_tokens.weight.copy_(2.0 * torch.randn(vocab, HIDDEN, generator=generator) @ off_u + along * u)
        head = 0.1 * torch.randn(vocab, HIDDEN, generator=generator) @ off_u
        head[TARGET] = 4.0 * u
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    return folder, u


def _capturing(u: torch.Tensor, share: float) -> ReLUSAE:
    """A ReLU dictionary whose feature 0 reads ``share * x.u`` and writes u, and whose other
    features reconstruct the rest of x exactly (+-q_j for an orthonormal basis q of u's complement)."""
    basis, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(HIDDEN, HIDDEN - 1,
                                                                    generator=torch.Generator().manual_seed(3))], dim=1))
    basis[:, 0] = u  # QR may flip the sign
    rest = basis[:, 1:].T  # (31, d)
    sae = ReLUSAE(HIDDEN, 2 * HIDDEN, unit_norm_decoder=False, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([share * u[None], rest, -rest, torch.zeros(1, HIDDEN)]).T)
        sae.W_dec.copy_(torch.cat([u[None], rest, -rest, rest[:1]]))
        sae.b_enc.zero_()
        sae.b_enc[-1] = -1.0  # a dead feature
        sae.b_dec.zero_()
    return sae.eval()


@pytest.fixture(scope="module")
def controlled(tmp_path_factory, tiny_corpus_dir):
    """(the model, its folder, the audit text, {name: dictionary folder})."""
    root = tmp_path_factory.mktemp("controlled")
    model_dir, u = _controlled_llama(root / "model")
    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    tokens = pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 6),
                            load_tokenizer(source))
    config = ModelConfig(name_or_path=str(model_dir))
    folders = {name: write_folder(root / name, _capturing(u, share), "model.layers.1", config) for name, share in SHARES.items()}
    return load_model(source), model_dir, tokens, folders


def _steerer(controlled, name: str) -> Steerer:
    model, model_dir, _, folders = controlled
    return Steerer(open_observer(str(folders[name]), model=str(model_dir), loaded_model=model))


@pytest.mark.parametrize("name", list(SHARES))
def test_the_leak_is_the_share_of_the_direction_the_dictionary_misses(controlled, name):
    """Zeroing feature 0 removes ``share`` of the component along u; projecting u out removes all
    of it, so the leak is 1 - share (0, 0.5, 0.99)."""
    steerer = _steerer(controlled, name)
    result = audit(steerer, steerer.edit([0], 0.0), controlled[2], n_targets=1, seeds=0)
    [a] = result.features
    assert a.kind == "suppress" and [t.token_id for t in a.targets] == [TARGET]
    assert a.n_positions == result.n_encoded_tokens  # every encoded token has c > 0: the feature fires
    assert a.leak is not None and a.leak.projected_drop > 1.0
    assert a.leak.leak == pytest.approx(1 - SHARES[name], abs=0.05)
    # The dashboard: zeroed as set, but the re-encoded activation still holds share * (1 - share) c.
    assert a.dashboard.feature_set == 0.0
    assert a.dashboard.feature_read_back == pytest.approx(
        (1 - SHARES[name]) * a.dashboard.feature_before, rel=1e-4, abs=1e-6)
    # The other features rebuild the rest exactly: the reconstruction loses what feature 0 misses.
    assert a.leak.reconstruction_drop == pytest.approx((1 - SHARES[name]) * a.leak.projected_drop,
                                                       abs=0.05 * a.leak.projected_drop)
    assert a.dose_response is None and "leaks past the suppression" in a.summary


def test_amplifying_the_captured_direction_raises_its_token_and_the_control_hardly_moves(controlled):
    steerer = _steerer(controlled, "full")
    result = audit(steerer, steerer.edit([0], 6.0), controlled[2], n_targets=1, seeds=3, max_new_tokens=6)
    [a] = result.features
    assert a.kind == "amplify" and a.n_positions == result.n_encoded_tokens
    assert a.steered.target_probability_change > 0.3 and a.steered.target_logprob_change > 2.0
    assert abs(a.control.target_logprob_change) < 0.1 * a.steered.target_logprob_change
    assert a.dashboard.feature_set == 6.0 and a.dashboard.feature_read_back == pytest.approx(6.0, rel=1e-5)
    assert a.continuations is not None and a.continuations.steered_target_share > a.continuations.unedited_target_share
    # No maxima recorded: the doses are multiples of the largest activation on the text, said so.
    assert a.dose_response is not None and a.dose_response.unit == "audit-text maximum"
    assert any("largest activation on the audit text" in n for n in result.notes)
    changes = [p.target_logprob_change for p in a.dose_response.points]
    assert [p.multiple for p in a.dose_response.points] == [0, 1, 2, 5, 10, 20]
    assert changes == sorted(changes) and changes[0] < 0 < changes[-1]
    cost = result.cost
    assert cost.text_passes == 1 + 2 + 6 and cost.text_tokens == controlled[2].size
    assert cost.forward_passes >= cost.text_passes + cost.generated_tokens
    assert "random direction" in format_audit(result)


def test_the_audit_text_is_the_given_source_packed_as_the_training_packed_its_text(controlled, tiny_corpus_dir):
    steerer = _steerer(controlled, "full")
    text = audit_text(steerer.observer, text=str(tiny_corpus_dir), max_tokens=512)
    expected = pack_sequences(DataConfig(source=str(tiny_corpus_dir), max_tokens=512), steerer.observer.tokenizer)
    assert text.tokens.shape == (2, 256) and (text.tokens == expected).all() and text.source == str(tiny_corpus_dir)
    assert audit(steerer, steerer.edit([0], 0.0), text, seeds=0).text_source == str(tiny_corpus_dir)
    with pytest.raises(ValueError, match="no run config beside the dictionary.*--text"):
        audit_text(steerer.observer)


def test_a_target_is_one_token(controlled):
    steerer = _steerer(controlled, "full")
    with pytest.raises(ValueError, match=r"^--target 'To be or not': tokenizes to \d+ tokens .*one token"):
        audit(steerer, steerer.edit([0], 1.0), controlled[2], targets=["To be or not"])
    [a] = audit(steerer, steerer.edit([0], 1.0), controlled[2], targets=[TARGET], seeds=0, doses=()).features
    assert a.targets_source == "given" and [t.token_id for t in a.targets] == [TARGET] and a.targets[0].logit is None


# --------------------------------------------------------------------------- the packaged model


def test_an_automatically_chosen_feature_amplified_on_the_packaged_model(packaged_dictionary):
    model, folder, text = packaged_dictionary.model, packaged_dictionary.folder, packaged_dictionary.text
    steerer = Steerer(open_observer(str(folder), loaded_model=model))
    [feature] = choose_features(steerer.observer, text, n=1)
    # Twice the held-out maximum: at 10x this 40-step dictionary's direction breaks the model (KL
    # about 10 nats) and every token's probability falls, the targets' with it.
    result = audit(steerer, steerer.edit([feature], "2x"), text[:2, :64], seeds=2, max_new_tokens=3,
                   prompts=[text[0, :8].tolist()], leak=True)
    [a] = result.features
    assert a.kind == "amplify" and len(a.targets) == 5 and a.targets_source == "promoted"
    assert a.steered.target_logprob_change > max(0.0, a.control.target_logprob_change)
    assert a.steered.target_probability_change > a.control.target_probability_change
    assert a.dose_response is not None and a.dose_response.unit == "held-out maximum"
    assert a.value == pytest.approx(2 * a.dose_response.unit_value)
    data = a.continuations, a.leak, a.dose_response
    assert all(section is not None for section in data)
    assert all(p.coherence is not None for p in a.dose_response.points)
    numbers = list(_numbers(result.to_dict()))
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert None not in _values(result.to_dict()["features"][0], skip={"leak"})
    json.loads(result.to_json())
    assert result.cost.forward_passes > 0 and result.cost.text_pass_equivalents > result.cost.text_passes


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _values(value, skip=frozenset()):
    if isinstance(value, dict):
        return [x for k, v in value.items() if k not in skip for x in _values(v)]
    if isinstance(value, list):
        return [x for v in value for x in _values(v)]
    return [value]
