"""An architecture defined here, outside saeforge, trained, saved and loaded back through the job.

Adding an architecture is one class (a ``trainer.sae.SparseCoder`` subclass) and one YAML file
(``conf/sae/<name>.yaml``, here ``SAE_YAML``). The job names the class by its import path; each
Ray Train worker, another process, imports it from there (Ray puts the driver's working directory,
the repository root, on the workers' path), so nothing needs registering in each process.

This module imports only installed packages at its top: a worker imports it to find the class.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from trainer.sae import TopKSAE

pytestmark = pytest.mark.integration


class FreeDecoderTopK(TopKSAE):
    """TopK whose decoder rows are free: trained without the unit-norm constraint, so their norms
    drift (the built-in ``topk`` keeps them at exactly 1). Saved as SAELens's ``topk``."""

    architecture = f"tests.cluster.{Path(__file__).stem}:FreeDecoderTopK"

    def __init__(self, d_in: int, n_latents: int, k: int, **options) -> None:
        options.setdefault("unit_norm_decoder", False)
        super().__init__(d_in, n_latents, k, **options)


SAE_YAML = f"""
# TopK with free decoder rows (tests/cluster/test_custom_architecture.py).
defaults: [sae_schema]
architecture: {FreeDecoderTopK.architecture}
n_latents: 64
k: 4
auxk_coefficient: 0.0
"""


def _sae_overrides(text: str) -> list[str]:
    """The ``sae`` group file as the overrides that select it (``sae.<key>=<value>``)."""
    settings = yaml.safe_load(text)
    settings.pop("defaults")
    return [f"sae.{key}={value}" for key, value in settings.items()]


def test_an_architecture_defined_in_a_test_trains_saves_and_loads_through_the_job(
    ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir
):
    from tiny_job import tiny_job

    from activation_cache.manifest import load_manifest
    from activation_cache.reader import read_shard
    from activation_cache.store import open_store
    from cluster.driver import run_job
    from trainer.architectures import build_sae
    from trainer.dictionary import load_dictionary
    from trainer.layout import CONFIG_FILE, EVAL_FILE, WEIGHTS_FILE

    job = tiny_job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=custom",
                   "eval=off", "logging.wandb_mode=disabled", "train.epochs=2", "cluster.num_train_workers=1",
                   *_sae_overrides(SAE_YAML))
    assert job.sae.architecture == FreeDecoderTopK.architecture
    # In this process too the path names the class (imported under its package name).
    assert type(build_sae(job.sae, d_in=8, seed=0)).__qualname__ == "FreeDecoderTopK"

    [result] = run_job(job).hookpoints
    folder = open_store(result.dictionary_uri)
    files = {name: folder.get_bytes(name) for name in (WEIGHTS_FILE, CONFIG_FILE, EVAL_FILE)}
    loaded, cfg = load_dictionary(files)
    assert cfg["metadata"]["training_architecture"] == FreeDecoderTopK.architecture  # built by the worker
    assert (cfg["architecture"], cfg["d_sae"], cfg["k"]) == ("topk", 64, 4)
    scale = cfg["metadata"]["saeforge_input_scale_folded"]
    row_norms = loaded.W_dec.norm(dim=1) * scale
    assert (row_norms - 1).abs().max() > 1e-3, "free decoder rows: the unit-norm TopK was trained instead"

    # The saved dictionary, on the raw held-out activations, computes what the trained model did:
    # the worker evaluated it (eval.json) before folding the input scale into the saved weights.
    cache = open_store(result.cache_uri)
    shards = sorted(load_manifest(cache).shards, key=lambda entry: entry.name)
    n_holdout = max(1, math.ceil(job.train.holdout_fraction * len(shards)))
    x = torch.cat([read_shard(cache, entry).activations for entry in shards[-n_holdout:]])
    with torch.no_grad():
        reconstruction = loaded(x).reconstruction
    fvu = ((x - reconstruction) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 1 and abs(fvu.item() - result.eval["fvu"]) < 1e-3
    # And the class computes with the saved weights what SAELens's topk (the loader's) computes.
    plugin = FreeDecoderTopK(cfg["d_in"], 64, 4)
    plugin.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plugin(x).reconstruction, reconstruction)
