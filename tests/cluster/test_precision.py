"""``model.dtype=auto``: decided once per job on the driver from what the producers report, logged,
written into the run's config and the cache key, and what the producers then run."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from tiny_job import tiny_job

from activation_cache.hooking import MultiHarvester, load_model, resolve_model_source
from activation_cache.manifest import load_manifest
from activation_cache.reader import read_shard
from activation_cache.store import open_store
from cluster.driver import absolute_uri, plan_caches, run_job
from cluster.precision import producer_hardware, resolve_model_dtype
from trainer.kernels import cpu_flags


def _native_cpu() -> bool:
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def test_a_cpu_producer_reports_its_bf16_flags_and_a_cuda_one_without_a_gpu_reports_none() -> None:
    cpu = producer_hardware("cpu")
    assert cpu.device == "cpu" and cpu.name and cpu.bf16_native == _native_cpu()
    assert ("in /proc/cpuinfo" in cpu.why) == cpu.bf16_native
    if not torch.cuda.is_available():
        gpu = producer_hardware("cuda")
        assert not gpu.bf16_native and gpu.why == "CUDA is not available"


def test_an_explicit_dtype_is_kept(tmp_path, tiny_model_dir, tiny_corpus_dir) -> None:
    for dtype in ("float32", "bfloat16"):
        job = tiny_job(str(tmp_path), tmp_path, tiny_model_dir, tiny_corpus_dir, f"model.dtype={dtype}")
        assert resolve_model_dtype(job) is job


def test_on_a_cluster_every_producer_node_reports(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir, caplog) -> None:
    """With an address, Ray tasks with a producer's resources report from the nodes (the test
    cluster's one node here), and the decision is theirs, logged."""
    job = tiny_job(str(tmp_path), tmp_path, tiny_model_dir, tiny_corpus_dir, "model.dtype=auto",
                   "cluster.address=auto", "cluster.num_producers=2")
    with caplog.at_level(logging.INFO, logger="cluster.precision"):
        resolved = resolve_model_dtype(job)
    expected = "bfloat16" if _native_cpu() else "float32"
    assert resolved.model.dtype == expected and job.model.dtype == "auto"
    assert dataclasses.replace(resolved, model=job.model) == job  # nothing else changes
    assert f"model.dtype=auto -> {expected}: producers on {producer_hardware('cpu').name}" in caplog.text


@pytest.mark.integration
def test_an_auto_job_caches_what_the_model_computes_in_the_decided_dtype(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    store = str(tmp_path / "store")
    job = tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "model.dtype=auto", "eval=off", "train.epochs=1")
    [result] = run_job(job).hookpoints
    expected = "bfloat16" if _native_cpu() else "float32"
    config = json.loads(open_store(absolute_uri(store)).get_bytes("runs/tiny/config.json"))
    assert config["model"]["dtype"] == expected  # observe, steer and `saeforge eval` load it so
    cache = open_store(result.cache_uri)
    manifest = load_manifest(cache)
    assert manifest.key_inputs["model_dtype"] == expected
    fp32_job = tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "model.dtype=float32")
    [fp32_plan] = plan_caches(fp32_job, open_store(absolute_uri(store)))
    assert (fp32_plan.uri == result.cache_uri) == (expected == "float32")

    [plan] = plan_caches(dataclasses.replace(job, model=dataclasses.replace(job.model, dtype=expected)),
                         open_store(absolute_uri(store)))
    model = load_model(resolve_model_source(job.model), dtype=expected)
    entry = manifest.shards[0]
    shard = read_shard(cache, entry)
    sequences = sorted(set(shard.sequence_ids.tolist()))
    with torch.inference_mode():
        [acts] = MultiHarvester(model, [result.hookpoint]).harvest(torch.as_tensor(plan.tokens[sequences])).values()
    row_of = {s: i for i, s in enumerate(sequences)}
    reference = acts[[row_of[s] for s in shard.sequence_ids.tolist()], shard.positions.tolist()]
    assert reference.dtype == getattr(torch, expected)
    assert torch.equal(shard.activations, reference.float())
