"""The whole loop at tiny size on a real local Ray cluster, with a local directory and with a
real S3 endpoint: text -> producers -> cache -> DeepSpeed trainers -> dictionary -> pull."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import ray
import torch

from activation_cache.manifest import load_manifest
from activation_cache.reader import read_shard
from activation_cache.store import open_store
from cluster.cli import main as saeforge
from cluster.config import compose_job
from cluster.driver import absolute_uri, build_cache, plan_cache, run_job
from cluster.train import input_scale, split_holdout
from trainer.dictionary import load_dictionary

pytestmark = pytest.mark.integration

CONTEXT, SEQUENCES, PER_SHARD = 32, 48, 4


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    # Ray workers inherit the environment the local cluster starts with, as they would on a
    # real node; credentials are never passed through the job's config or runtime_env.
    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}})
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _job(uri: str, tmp_path, model_dir, corpus_dir, *extra: str):
    return compose_job([
        "model=local", f"model.name_or_path={model_dir}", "model.hookpoint=resid_post.2", "model.batch_size=4",
        "data=text_files", f"data.source={corpus_dir}", f"data.context_length={CONTEXT}",
        f"data.max_tokens={CONTEXT * SEQUENCES}", f"cache.uri={uri}", f"cache.sequences_per_shard={PER_SHARD}",
        "sae.n_latents=128", "sae.k=8", "train.batch_size=64", "train.epochs=4", "train.lr=3e-3",
        "train.shuffle_buffer_rows=256", f"logging.dir={tmp_path / 'outputs'}", "run.name=tiny",
        "cluster.object_store_memory_bytes=209715200", *extra,
    ])


def _check_cache(cache_uri: str, s3_options: dict) -> None:
    store = open_store(cache_uri, s3_options=s3_options)
    manifest = load_manifest(store)
    assert manifest.complete
    assert len(manifest.shards) == SEQUENCES // PER_SHARD
    # BOS (position 0) is excluded, every other token of every sequence is cached exactly once.
    assert manifest.rows == SEQUENCES * (CONTEXT - 1)
    seen = Counter()
    for entry in manifest.shards:
        shard = read_shard(store, entry)
        seen.update(zip(shard.sequence_ids.tolist(), shard.positions.tolist(), strict=True))
    assert set(seen.values()) == {1}
    assert set(seen) == {(s, p) for s in range(SEQUENCES) for p in range(1, CONTEXT)}


def _check_dictionary(result, tmp_path, s3_options: dict) -> None:
    target = tmp_path / "pulled"
    argv = ["pull", result.dictionary_uri, str(target)]
    if s3_options.get("endpoint_url"):
        argv += ["--endpoint-url", s3_options["endpoint_url"]]
    assert saeforge(argv) == 0
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    assert {"sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "eval.json"} <= set(files)
    sae, cfg = load_dictionary(files)
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (32, 128, 8)
    evaluation = json.loads(files["eval.json"])
    assert {"fvu", "l0", "dead_fraction"} <= set(evaluation)
    assert evaluation["fvu"] < 1.0 and evaluation["l0"] <= 8
    assert sum(evaluation["firing_histogram"]["latents"]) == 128
    assert 0 <= evaluation["dense_fraction"] <= 1

    # Independently of the trainer's own figure: the saved dictionary, applied to RAW held-out
    # activations, reconstructs them better than their mean does.
    store = open_store(result.cache_uri, s3_options=s3_options)
    manifest = load_manifest(store)
    _, holdout = split_holdout(manifest.shards, 0.1)
    x = torch.cat([read_shard(store, e).activations for e in holdout])
    with torch.no_grad():
        recon = sae(x).reconstruction
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.9, f"held-out FVU {fvu:.3f} of the pulled dictionary"
    assert abs(fvu.item() - evaluation["fvu"]) < 1e-3, "eval.json must describe the saved dictionary on raw activations"
    assert input_scale(manifest, True) != 1.0, "the test must exercise the normalisation fold"

    # The pulled folder loads in SAELens and computes the same reconstruction.
    from sae_lens import SAE

    saelens_sae = SAE.load_from_disk(str(target), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(saelens_sae(x), recon, rtol=1e-4, atol=1e-4)


def test_loop_on_local_directory(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    job = _job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir)
    result = run_job(job)
    assert not result.cache_reused
    assert result.tokens_cached == SEQUENCES * (CONTEXT - 1)
    _check_cache(result.cache_uri, {})
    _check_dictionary(result, tmp_path, {})
    assert list((tmp_path / "outputs" / "tiny").rglob("offline-run-*")), "wandb offline run files"

    # A second job on the same inputs reuses the cache; this one trains a BatchTopK SAE, which
    # is saved as the JumpReLU SAELens runs at inference.
    again = run_job(_job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir,
                         "run.name=tiny2", "sae=batchtopk"))
    assert again.cache_reused and again.cache_uri == result.cache_uri
    target = tmp_path / "pulled-batchtopk"
    assert saeforge(["pull", again.dictionary_uri, str(target)]) == 0
    from sae_lens import SAE

    saelens_sae = SAE.load_from_disk(str(target), device="cpu")
    assert saelens_sae.cfg.d_sae == 128 and (saelens_sae.threshold > 0).all()
    assert json.loads((target / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert again.eval["fvu"] < 0.9


def test_loop_on_s3(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir, s3_server, s3_bucket_uri):
    job = _job(s3_bucket_uri, tmp_path, tiny_model_dir, tiny_corpus_dir,
               f"cache.s3_endpoint_url={s3_server.endpoint_url}", "cache.dtype=bfloat16")
    result = run_job(job)
    assert result.cache_uri.startswith(s3_bucket_uri)
    options = {"endpoint_url": s3_server.endpoint_url}
    _check_cache(result.cache_uri, options)
    _check_dictionary(result, tmp_path, options)


@pytest.mark.parametrize("for_good", [False, True], ids=["restarted", "replaced"])
def test_a_killed_producer_loses_and_duplicates_nothing(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir, for_good):
    """A producer killed mid-cache (``ray.kill``) is restarted by Ray, or, killed for good,
    replaced; the units it held are redone and the cache holds every token exactly once."""
    job = _job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir,
               "cluster.num_producers=2", "cluster.units_per_producer=2")
    plan = plan_cache(job, open_store(absolute_uri(job.cache.uri)))
    killed = []

    def kill_one(manifest, producers) -> None:
        if not killed:  # after the first commit: both producers hold queued units
            killed.append(producers[0])
            ray.kill(producers[0], no_restart=for_good)

    manifest, reused, _ = build_cache(job, plan, on_commit=kill_one)
    assert killed and not reused and manifest.complete
    _check_cache(plan.uri, {})
