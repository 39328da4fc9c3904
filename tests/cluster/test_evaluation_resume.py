"""The spliced evaluation's shortcut on the tiny Llama: the replaced forwards that start at the
hookpoint's layer, from the clean forward's hidden states, give the whole forwards' logits (the
bfloat16 evaluation against the float32 one: test_spliced_evaluation.py)."""

from __future__ import annotations

import pytest
import torch

from activation_cache.config import ModelConfig
from activation_cache.hooking import load_model, resolve_model_source, spliced
from cluster.evaluation import _Resume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOKPOINT = "model.layers.2"
"""Layer 2 of the tiny model's 4: the replaced forwards start there."""


def test_forwards_from_the_hookpoints_layer_give_the_whole_forwards_logits(tiny_model_dir):
    model = load_model(resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")))
    resume = _Resume.of(model, [HOOKPOINT, "model.layers.3.mlp:input"])
    assert resume is not None and resume.layer == 2
    assert _Resume.of(model, ["model.layers.0"]) is None  # nothing before it to share
    ids = torch.randint(3, 200, (3, 12))
    with torch.inference_mode():
        with resume.capturing():
            clean = model(input_ids=ids).logits
        assert resume.check(clean)
        with spliced(model, HOOKPOINT, lambda acts: acts * 0.5):
            whole, started = model(input_ids=ids).logits, resume.forward()
    torch.testing.assert_close(started, whole, rtol=0, atol=0)
    assert not torch.allclose(whole, clean)
    assert len(model.model.layers) == 4  # the layer list is whole again

