"""A cross-layer transcoder as a job, on a real local Ray cluster: the tiny model's 4 layers, each
layer's features reading its MLP input and writing to its own and every later MLP output, from 8
caches filled by one forward pass, the latents of every layer split over 2 feature-parallel
DeepSpeed ranks, checkpointed and resumed exactly, evaluated with every MLP output replaced at once.

The pieces are unit-tested beside their modules (tests/trainer/test_clt.py,
tests/trainer/test_clt_feature_parallel.py, tests/activation_cache/test_clt_reader.py,
tests/cluster/test_spliced_evaluation.py, tests/interp/test_clt_interp.py)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_job import dictionary_weights, tiny_job

from activation_cache.manifest import load_manifest
from activation_cache.plan import split_holdout
from activation_cache.reader import read_shard
from activation_cache.store import open_store
from cluster.cli import main as saeforge
from cluster.driver import plan_caches, run_job
from trainer import layout
from trainer.dictionary import load_dictionary

pytestmark = pytest.mark.integration

LAYERS = 4
FOLDER = "clt-model.layers.0.mlp:input-to-model.layers.3.mlp"


def _held_out_rows(job) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw held-out rows of the 8 caches read here, each layer's input and target side by side
    in layer order, every shard checked to hold the same tokens as the first cache's."""
    plans = plan_caches(job, open_store(job.cache.uri))
    stores = [open_store(p.uri) for p in plans]
    manifests = [load_manifest(s) for s in stores]
    _, holdout = split_holdout(manifests[0].shards, 0.1)
    blocks: list[list[torch.Tensor]] = [[] for _ in stores]
    for entry in holdout:
        shards = [read_shard(s, {e.name: e for e in m.shards}[entry.name]) for s, m in zip(stores, manifests, strict=True)]
        for i, shard in enumerate(shards):
            assert (shard.sequence_ids == shards[0].sequence_ids).all() and (shard.positions == shards[0].positions).all()
            blocks[i].append(shard.activations)
    columns = [torch.cat(b) for b in blocks]
    return torch.cat(columns[:LAYERS], dim=1), torch.cat(columns[LAYERS:], dim=1)


def test_a_clt_job_trains_feature_parallel_resumes_exactly_and_evaluates_every_layer(
    ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir
):
    store = str(tmp_path / "store")
    common = (f"model.clt_layers=[0,{LAYERS - 1}]", "sae=jumprelu", "sae.n_latents=64", "deepspeed.feature_parallel=2",
              "cluster.num_train_workers=2", "run.checkpoint_every_steps=20", "run.name=clt")
    job = tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, *common)
    [hp] = run_job(job).hookpoints
    assert hp.dictionary_uri.endswith(f"/dictionary/{FOLDER}") and hp.layers == LAYERS
    target = tmp_path / "pulled"
    assert saeforge(["pull", hp.dictionary_uri, str(target)]) == 0
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    clt, cfg = load_dictionary(files)
    assert cfg["architecture"] == "jumprelu_clt" and cfg["n_layers"] == LAYERS
    assert cfg["metadata"]["hook_names"] == [f"model.layers.{i}.mlp:input" for i in range(LAYERS)]
    assert cfg["metadata"]["hook_names_out"] == [f"model.layers.{i}.mlp" for i in range(LAYERS)]

    # The saved CLT on the raw held-out rows of all 8 caches gives the FVU eval.json reports.
    evaluation = json.loads(files[layout.EVAL_FILE])
    x, y = _held_out_rows(job)
    with torch.no_grad():
        _, prediction = clt.reconstruct(x)
    fvu = ((y - prediction) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert fvu < 0.9, f"held-out FVU {fvu:.3f} of the pulled CLT"
    assert abs(fvu.item() - evaluation["fvu"]) < 1e-3
    per_layer = clt.layer_fvu(prediction, y)
    assert [layer["hookpoint_out"] for layer in evaluation["layers"]] == cfg["metadata"]["hook_names_out"]
    for layer, fvu in zip(evaluation["layers"], per_layer.tolist(), strict=True):
        assert abs(layer["fvu"] - fvu) < 1e-3, "eval.json's per-layer FVU is the saved CLT's on raw rows"
    lm = evaluation["lm"]  # every covered MLP output replaced at once
    assert lm["n_tokens"] > 0 and lm["kl_divergence"] >= 0 and {"clean_ce", "spliced_ce", "ablated_ce"} <= set(lm)
    assert b"model.layers.0" in files[layout.REPORT_FILE] and b"model.layers.3" in files[layout.REPORT_FILE]

    # A second start continues from the newest checkpoint to the same weights, bit for bit.
    first = dictionary_weights(hp.dictionary_uri)
    [again] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, *common[:-1], "run.name=null",
                               "resume=clt", "eval=off")).hookpoints
    assert again.eval["resumed_from_step"] > 0
    for name, tensor in dictionary_weights(again.dictionary_uri).items():
        assert torch.equal(tensor, first[name]), f"{name} differs after the resume"
