"""The whole loop at tiny size on a real local Ray cluster: text -> producers -> cache -> DeepSpeed
trainers -> dictionary -> pull. The same loop on a real S3 endpoint runs in
tests/faults/test_security.py, which also greps everything it writes for the credentials."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from ray_head import ray_environment, started_ray_head
from tiny_job import (
    CONTEXT,
    SEQUENCES,
    assert_same_weights,
    check_tiny_cache,
    check_tiny_dictionary,
    tiny_overrides,
)
from tiny_job import tiny_job as _job

from activation_cache.manifest import ActivationStats, Manifest, commit_manifest, load_manifest
from activation_cache.reader import read_shard
from activation_cache.store import LocalStore, open_store
from cluster.cli import main as saeforge
from cluster.driver import absolute_uri, build_caches, expected_shards, plan_caches, run_job
from cluster.errors import ProducerFailed, TrainingStopped
from cluster.timing import PHASES
from cluster.train import TrainPlan, train_dictionary, wait_for_complete
from trainer.layout import PRODUCERS_FAILED_FILE

pytestmark = pytest.mark.integration



def _overlap_job(uri: str, tmp_path, model_dir, corpus_dir, *extra: str):
    # Producers and trainer workers share the 2-CPU test cluster.
    return _job(uri, tmp_path, model_dir, corpus_dir, "cluster.train_while_caching=true", "eval=off",
                "cluster.num_producers=1", "cluster.producer_num_cpus=0.5", "cluster.train_worker_num_cpus=0.5",
                "train.epochs=2", *extra)


def test_several_hookpoints_fill_their_caches_from_one_pass_while_training(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    job = _overlap_job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir,
                       "model.hookpoints=[resid_post.1,mlp_out.2]")
    result = run_job(job)
    assert [h.hookpoint for h in result.hookpoints] == ["model.layers.1", "model.layers.2.mlp"]
    first, second = result.hookpoints
    assert first.cache_uri != second.cache_uri
    for hp in result.hookpoints:
        check_tiny_cache(hp.cache_uri, {})
        manifest = load_manifest(open_store(hp.cache_uri))
        assert manifest.hookpoint == hp.hookpoint
        target = tmp_path / "pulled" / hp.hookpoint
        assert saeforge(["pull", hp.dictionary_uri, str(target)]) == 0
        assert json.loads((target / "cfg.json").read_text())["metadata"]["hook_name"] == hp.hookpoint
        assert hp.eval["fvu"] < 0.9
    # Same units, same tokens, different activations: one forward pass fed both caches.
    a, b = (open_store(h.cache_uri) for h in result.hookpoints)
    entry = load_manifest(a).shards[3]
    shard_a, shard_b = read_shard(a, entry), read_shard(b, next(e for e in load_manifest(b).shards if e.name == entry.name))
    assert (shard_a.sequence_ids == shard_b.sequence_ids).all() and (shard_a.token_ids == shard_b.token_ids).all()
    assert not torch.allclose(shard_a.activations, shard_b.activations)


def test_workers_started_beside_the_producers_train_on_the_complete_cache(ray_cluster, tmp_path, tiny_model_dir,
                                                                          tiny_corpus_dir, caplog):
    """With room on the cluster for the producers and the trainer workers at once, the workers
    start while the caches fill and wait for them to complete: they train what a job on the
    complete cache trains, bit for bit."""
    roomy = ("cluster.producer_num_cpus=0.5", "cluster.train_worker_num_cpus=0.5", "eval=off", "train.epochs=1")
    store = str(tmp_path / "store")
    with caplog.at_level(logging.INFO, logger="cluster.driver"):
        [beside] = run_job(_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=beside", *roomy)).hookpoints
    assert "the trainer workers start beside the producers" in caplog.text and not beside.cache_reused
    [after] = run_job(_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=after", *roomy,
                           "cluster.train_worker_num_cpus=1")).hookpoints  # no room: after the (reused) cache
    assert after.cache_reused and after.cache_uri == beside.cache_uri
    assert_same_weights(beside.dictionary_uri, after.dictionary_uri)


def test_a_worker_waiting_for_the_cache_trains_once_it_completes_and_stops_if_the_fill_fails(tmp_path):
    cache, run = LocalStore(tmp_path / "cache"), LocalStore(tmp_path / "run")
    manifest = Manifest(cache_key="k", key_inputs={}, model="m", revision="r", hookpoint="h", d_model=4, dtype="float32")
    commit_manifest(cache, manifest)
    completes = threading.Timer(0.5, lambda: commit_manifest(cache, dataclasses.replace(manifest, complete=True)))
    completes.start()
    assert wait_for_complete(cache, run=run, timeout_s=60).complete
    commit_manifest(cache, manifest)
    run.put_bytes(PRODUCERS_FAILED_FILE, b"filling the cache failed: no producer left")
    with pytest.raises(TrainingStopped, match="no producer left"):
        wait_for_complete(cache, run=run, timeout_s=60)
    run.delete(PRODUCERS_FAILED_FILE)
    with pytest.raises(TimeoutError, match="did not complete within train.follow_timeout_s=0.5 s"):
        wait_for_complete(cache, run=run, timeout_s=0.5)


def _copy_slowly(source, target, entries, *, until_rows: int, then_wait_for, delay_s: float) -> threading.Thread:
    """Commit ``entries`` of ``source`` into ``target`` as producers would: ``until_rows`` rows
    at once, the rest only after ``then_wait_for`` exists, one every ``delay_s``."""
    manifest = dataclasses.replace(load_manifest(source), shards=[], stats=ActivationStats(), complete=False)

    def run() -> None:
        nonlocal manifest
        for entry in entries:
            if manifest.rows >= until_rows:
                deadline = time.monotonic() + 180
                while not then_wait_for.exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(delay_s)
            target.put_bytes(entry.name, source.get_bytes(entry.name))
            stats = ActivationStats.of(read_shard(source, entry).activations.numpy())
            manifest = manifest.with_shard(entry, stats)
            commit_manifest(target, manifest)
        manifest.complete = True
        commit_manifest(target, manifest)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_training_starts_on_the_shards_committed_so_far(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    """Training on a cache still being written starts once train.normalization_rows are
    committed, tails the rest as it comes, and takes as many steps as on the complete cache."""
    job = _job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir, "train.epochs=2",
               "train.normalization_rows=200", "cluster.train_while_caching=true")
    [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
    complete = build_caches(job, [plan]).manifests[plan.hookpoint]
    growing_uri = absolute_uri(str(tmp_path / "growing"))
    wandb_dir = tmp_path / "outputs" / "tailing"
    writer = _copy_slowly(open_store(plan.uri), open_store(growing_uri), complete.shards, until_rows=200,
                          then_wait_for=wandb_dir, delay_s=0.3)
    run_uri = absolute_uri(str(tmp_path / "runs" / "tailing"))
    train_plan = TrainPlan(cache_uri=growing_uri, run_uri=run_uri, run_name="tailing", hookpoint=plan.hookpoint,
                           wandb_dir=str(wandb_dir), label="tailing", checkpoint_uri=run_uri,
                           expected_shards=expected_shards(job, plan))
    [evaluation] = train_dictionary(job, train_plan).values()
    writer.join()
    assert 200 <= evaluation["cache_rows_at_train_start"] < complete.rows
    # 10 training shards of 4 * 31 rows dealt to 2 ranks of 32-row batches: 19 steps an epoch,
    # as on the complete cache.
    assert evaluation["train_steps"] == 2 * (5 * 124 // 32) == 38
    assert evaluation["fvu"] < 0.9


def test_a_failing_fill_stops_the_training_that_tails_it(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # the config and tokenizer load; the weights do not
    job = _overlap_job(str(tmp_path / "store"), tmp_path, broken, tiny_corpus_dir, "cluster.producer_replacements=0",
                       "cluster.producer_max_restarts=0", "train.follow_timeout_s=600")
    started = time.monotonic()
    with pytest.raises(ProducerFailed, match=r"no producer left to run \d+ work units"):
        run_job(job)
    assert time.monotonic() - started < 300, "stopped by the fill's failure, not by the reader's timeout"


NOISE = (
    "PlacementGroupCleaner",  # Ray Train's cleaner polling a State API the local cluster lacks
    "State API may be temporarily unavailable",
    "Found multiple active Ray instances",  # the same cleaner, with another cluster on the machine
    "Setting accelerator to CPU",  # DeepSpeed's import on a machine without a GPU
    "non-writable",  # torch wrapping a read-only NumPy array of ours
    "not writable",
    "all_gather_into_tensor",  # torch's deprecation, called by DeepSpeed's ZeRO
    "Traceback",
)
"""Third-party lines a user can do nothing about, and our own warnings: none reach the console."""


@pytest.mark.timeout(900)
def _observe_in_store_and_pulled(stored: Path, pulled: Path, tmp_path: Path) -> None:
    """``saeforge observe`` on the job's dictionary, in its run and pulled away from it: the copy
    finds its model from cfg.json, both measure against the held-out statistics the job recorded
    and report the same."""
    results = []
    for folder in (stored, pulled):
        written = tmp_path / f"observed-{folder.name}.json"
        assert saeforge(["observe", str(folder), "--text", "Now is the winter of our discontent", "--json",
                         str(written)]) == 0
        results.append(json.loads(written.read_text()))
    evaluation = json.loads((pulled / "eval.json").read_text())
    for result in results:
        assert result.pop("dictionary") and result["baseline"]["source"] == "held-out"
        assert result["baseline"]["n_tokens"] == evaluation["n_tokens"]
    assert results[0] == results[1]
    tokens = results[0]["texts"][0]["tokens"]
    assert not tokens[0]["encoded"] and all(t["encoded"] for t in tokens[1:])
    assert max(len(t["features"]) for t in tokens) == 5  # up to k = 8 fire, the top 5 shown


def test_the_tiny_job_as_a_user_runs_it_beside_another_cluster_then_again_on_its_cache(
    ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir
):
    """The whole loop on a local directory. ``saeforge train`` as a user runs it, with a head
    started by ``ray start --head`` on the machine (the cluster Ray would join by default, through
    its ``ray_current_cluster`` marker): the job starts a local cluster of its own rather than
    stopping with Ray's "When connecting to an existing cluster, object_store_memory must not be
    provided"; its console shows our progress, log lines and figures and none of the ``NOISE``;
    its cache holds every token once and its dictionary pulls, loads and evaluates. A second job on
    the same inputs reuses the cache."""
    overrides = tiny_overrides(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir,
                               "cluster.object_store_memory_bytes=209715200", "cluster.num_cpus=2",
                               "run.checkpoint_every_steps=30")
    saeforge_command = Path(sys.executable).parent / "saeforge"  # the command a user runs, in this venv
    with started_ray_head() as head:
        env = ray_environment({"RAY_TMPDIR": head.temp_root, "WANDB_MODE": "offline"})
        del env["DS_ACCELERATOR"]  # DeepSpeed left to find the CPU itself, as on a user's machine
        env.pop("PYTHONWARNINGS", None)
        run = subprocess.run([str(saeforge_command), "train", *overrides], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=840)
        # The head is the one a plain ray.init() would have joined; the job's cluster is a second
        # session beside the head's.
        marker = (Path(head.temp_root) / "ray" / "ray_current_cluster").read_text().strip()
        assert marker.rsplit(":", 1)[1] == head.gcs_address.rsplit(":", 1)[1]  # Ray writes the node's own IP
        sessions = [p for p in (Path(head.temp_root) / "ray").glob("session_*") if p.name != "session_latest"]
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-4000:]
    assert "Connecting to existing Ray cluster" not in console
    assert len(sessions) == 2, sessions
    assert (tmp_path / "store" / "runs" / "tiny" / "dictionary" / "model.layers.2" / "checksums.json").is_file()
    heard = [line for line in console.splitlines() if any(noise in line for noise in NOISE)]
    assert not heard, "\n".join(heard)
    for ours in (r"caching: 100%", r"step (\d+)/\1 +loss", r"checkpoint at step 30", r"held-out FVU +0\.\d+",
                 r"CE recovered +-?\d", r"dictionary +file://", r"wall time +\d+ s"):
        assert re.search(ours, console), f"{ours!r} missing from the console:\n{console[-4000:]}"
    assert re.search(r"^cache +file://\S+ \(built\)$", console, re.M), console[-4000:]
    # Where the time went, by phase, on the console and beside the run; the phases tile the wall time
    for phase in PHASES:
        assert re.search(rf"^  {phase} +\d+\.\d s +\d+%", console, re.M), f"{phase} missing:\n{console[-2000:]}"
    timings = json.loads((tmp_path / "store" / "runs" / "tiny" / "timings.json").read_text())
    assert all(timings[phase] > 0 for phase in PHASES), timings
    assert sum(timings[phase] for phase in PHASES) == pytest.approx(timings["total"], rel=1e-3)
    assert re.search(rf"^tokens cached +{SEQUENCES * (CONTEXT - 1):,}$", console, re.M), console[-4000:]
    [cache_dir] = (tmp_path / "store" / "caches").iterdir()
    check_tiny_cache(str(cache_dir), {})
    check_tiny_dictionary(str(tmp_path / "store" / "runs" / "tiny" / "dictionary" / "model.layers.2"),
                          str(cache_dir), tmp_path / "pulled", {})
    assert list((tmp_path / "outputs" / "tiny").rglob("offline-run-*")), "wandb offline run files"
    _observe_in_store_and_pulled(tmp_path / "store" / "runs" / "tiny" / "dictionary" / "model.layers.2",
                                 tmp_path / "pulled", tmp_path)

    # A second job on the same inputs reuses the cache; this one trains a BatchTopK SAE, which
    # is saved as the JumpReLU SAELens runs at inference.
    [again] = run_job(_job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir,
                           "run.name=tiny2", "sae=batchtopk")).hookpoints
    assert again.cache_reused and again.cache_uri.removeprefix("file://") == str(cache_dir)
    target = tmp_path / "pulled-batchtopk"
    assert saeforge(["pull", again.dictionary_uri, str(target)]) == 0
    from sae_lens import SAE

    saelens_sae = SAE.load_from_disk(str(target), device="cpu")
    assert saelens_sae.cfg.d_sae == 128 and (saelens_sae.threshold > 0).all()
    assert json.loads((target / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert again.eval["fvu"] < 0.9
