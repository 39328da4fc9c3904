"""Small TopK dictionaries trained in a test and written as real dictionary folders (the interp
tests observe and steer them)."""

from __future__ import annotations

from pathlib import Path

import torch

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.store import open_store
from interp.loading import model_metadata
from trainer.activation_stats import ActivationStats, activation_stats_file
from trainer.dictionary import dictionary_files
from trainer.layout import ACTIVATION_STATS_FILE, write_dictionary
from trainer.sae import TopKSAE

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


def write_folder(folder: Path, sae: TopKSAE, hookpoint: str, model: ModelConfig, stats: ActivationStats | None) -> Path:
    files = dictionary_files(sae, hookpoint=hookpoint, model_name="test", scale=1.0,
                             extra_metadata=model_metadata(model, DataConfig()), sparsity=None, eval_metrics={})
    if stats is not None:
        files[ACTIVATION_STATS_FILE] = activation_stats_file(stats)
    write_dictionary(open_store(str(folder)), files)
    return folder
