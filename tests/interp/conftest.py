"""The dictionaries the interp tests observe and steer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dictionary_folders import LAYER, train_topk, write_folder

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.hooking import (
    ActivationHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.text import pack_sequences
from trainer.activation_stats import ActivationStats


@pytest.fixture(scope="module")
def tiny_dictionaries(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A TopK dictionary trained on the tiny Llama's layer-1 activations (BOS left out), twice:
    with held-out statistics (from the last 8 sequences) and without."""
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokens = torch.from_numpy(pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 48),
                                             load_tokenizer(source)))
    acts = ActivationHarvester(load_model(source), f"resid_post.{LAYER}")(tokens)[:, 1:].reshape(-1, 32)
    train, held_out = acts[: -8 * 31], acts[-8 * 31:]
    sae = train_topk(train, 64, 4, steps=60)
    model = ModelConfig(name_or_path=str(tiny_model_dir))
    root = tmp_path_factory.mktemp("observed")
    with_stats = write_folder(root / "with-stats", sae, f"model.layers.{LAYER}", model, ActivationStats.of(held_out))
    return with_stats, write_folder(root / "without-stats", sae, f"model.layers.{LAYER}", model, None)


