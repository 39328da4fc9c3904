"""Small TopK dictionaries trained in a test and written as real dictionary folders: the ones the
interp tests observe and steer (``tiny_dictionaries``, a pytest plugin of tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from activation_cache.config import PACKAGED_MODEL, PACKAGED_TEXT, DataConfig, ModelConfig
from activation_cache.hooking import (
    ActivationHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.store import open_store
from activation_cache.text import iter_documents, pack_sequences
from interp.loading import model_metadata
from trainer.activation_stats import (
    ActivationStats,
    FeatureMaxima,
    activation_stats_file,
    feature_stats_file,
)
from trainer.dictionary import dictionary_files
from trainer.layout import ACTIVATION_STATS_FILE, FEATURE_STATS_FILE, write_dictionary
from trainer.sae import SparseCoder, TopKSAE

LAYER = 1  # the tiny Llama's hookpoint resid_post.1: hidden_states[2] in transformers' numbering


def train_topk(rows: torch.Tensor, n_latents: int, k: int, steps: int) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(rows.shape[1], n_latents, k, seed=0)
    sae.init_b_dec(rows, method="mean")
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = sae(rows[torch.randint(0, len(rows), (256,))]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sae.eval()


def write_folder(folder: Path, sae: SparseCoder, hookpoint: str, model: ModelConfig, held_out: Tensor | None = None) -> Path:
    """``sae`` as a dictionary folder; with ``held_out`` rows, the statistics a training job
    records on them (activation mean and variance, each feature's largest activation)."""
    files = dictionary_files(sae, hookpoint=hookpoint, model_name="test", scale=1.0,
                             extra_metadata=model_metadata(model, DataConfig()), sparsity=None, eval_metrics={})
    if held_out is not None:
        files[ACTIVATION_STATS_FILE] = activation_stats_file(ActivationStats.of(held_out))
        maxima = FeatureMaxima(sae.n_latents)
        with torch.no_grad():
            code = sae.encode(held_out)
        maxima.update(code.acts, code.indices)
        files[FEATURE_STATS_FILE] = feature_stats_file(maxima.result())
    write_dictionary(open_store(str(folder)), files)
    return folder


@pytest.fixture(scope="module")
def tiny_dictionaries(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A TopK dictionary trained on the tiny Llama's layer-1 activations (BOS left out), twice:
    with held-out statistics and feature maxima (from the last 8 sequences) and without."""
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokens = torch.from_numpy(pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 48),
                                             load_tokenizer(source)))
    acts = ActivationHarvester(load_model(source), f"resid_post.{LAYER}")(tokens)[:, 1:].reshape(-1, 32)
    train, held_out = acts[: -8 * 31], acts[-8 * 31:]
    sae = train_topk(train, 64, 4, steps=60)
    model = ModelConfig(name_or_path=str(tiny_model_dir))
    root = tmp_path_factory.mktemp("observed")
    with_stats = write_folder(root / "with-stats", sae, f"model.layers.{LAYER}", model, held_out)
    return with_stats, write_folder(root / "without-stats", sae, f"model.layers.{LAYER}", model, None)


@dataclass(frozen=True)
class PackagedDictionary:
    model: nn.Module
    """The packaged SmolLM2-135M-Instruct, loaded once for the session."""
    folder: Path
    """A TopK dictionary (1,152 latents, k 16, 40 steps) on its layer-15 activations over Shakespeare,
    with the statistics a job records on its held-out rows."""
    text: Tensor
    """(4, 128) token ids, BOS first, the dictionary never trained on."""


@pytest.fixture(scope="session")
def packaged_dictionary(tmp_path_factory) -> PackagedDictionary:
    source = resolve_model_source(ModelConfig(name_or_path=PACKAGED_MODEL))
    model, tokenizer = load_model(source), load_tokenizer(source)
    stream = tokenizer(next(iter_documents(PACKAGED_TEXT))[1][:30000], add_special_tokens=False)["input_ids"]
    tokens = torch.tensor(stream[: 20 * 127]).reshape(20, 127)
    tokens = torch.cat([torch.full((20, 1), tokenizer.bos_token_id), tokens], dim=1)
    acts = ActivationHarvester(model, "resid_post.15")(tokens[:16])[:, 1:].reshape(-1, 576)
    sae = train_topk(acts[:-254], 1152, 16, steps=40)
    folder = write_folder(tmp_path_factory.mktemp("smollm") / "dictionary", sae, "model.layers.15", ModelConfig(),
                          acts[-254:])
    return PackagedDictionary(model, folder, tokens[16:])

