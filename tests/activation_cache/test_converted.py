"""The Hugging Face-format copy of the packaged GGUF model: the same model, found by every load."""

from __future__ import annotations

import json

import pytest
import torch

from activation_cache.config import PACKAGED_MODEL, ModelConfig
from activation_cache.converted import COMPLETE_MARKER, MODEL_CACHE_ENV, convert, existing_copy
from activation_cache.hooking import load_model, load_tokenizer, resolve_model_source


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    return tmp_path / "models"


def test_the_copy_is_the_gguf_model_bit_for_bit_and_every_load_finds_it(model_cache) -> None:
    gguf = resolve_model_source(ModelConfig(name_or_path=PACKAGED_MODEL))
    assert gguf.gguf_file is not None and existing_copy(gguf) is None

    copy = convert(gguf)
    assert copy.gguf_file is None and copy.directory.parent == model_cache
    # The cache key's inputs do not change with the files read
    assert (copy.model_id, copy.revision) == (gguf.model_id, gguf.revision)
    assert json.loads((copy.directory / COMPLETE_MARKER).read_text())["revision"] == gguf.revision
    assert resolve_model_source(ModelConfig(name_or_path=PACKAGED_MODEL)) == copy
    assert convert(gguf) == copy and convert(copy) == copy  # made once

    text = "ROMEO. But soft, what light through yonder window breaks?\n" * 8
    tokenizers = load_tokenizer(gguf), load_tokenizer(copy)
    assert tokenizers[0](text)["input_ids"] == tokenizers[1](text)["input_ids"]
    assert type(tokenizers[0]).__name__ == type(tokenizers[1]).__name__ and len(tokenizers[0]) == len(tokenizers[1])
    ids = torch.tensor([tokenizers[0](text)["input_ids"][:48]])
    with torch.inference_mode():
        assert torch.equal(load_model(gguf)(ids).logits, load_model(copy)(ids).logits)

def test_an_unfinished_copy_is_not_used(model_cache) -> None:
    gguf = resolve_model_source(ModelConfig(name_or_path=PACKAGED_MODEL))
    (model_cache / f"{gguf.model_id.replace('/', '-')}-{gguf.revision}").mkdir(parents=True)
    assert existing_copy(gguf) is None
    assert resolve_model_source(ModelConfig(name_or_path=PACKAGED_MODEL)).gguf_file == gguf.gguf_file
