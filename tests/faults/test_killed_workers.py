"""Processes killed mid-job on a real local Ray cluster: a producer actor killed while filling
the cache (the cache still holds every token exactly once), a Ray Train worker killed while
training (the job resumes from its newest checkpoint and ends with the weights of a run that was
never interrupted)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from ray_processes import descendants_titled
from tiny_job import assert_same_weights, check_tiny_cache, run_until_checkpoint, tiny_job

from activation_cache.store import open_store
from cluster.driver import absolute_uri, build_caches, plan_caches, run_job
from trainer.layout import CHECKPOINTS_DIR

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("for_good", [False, True], ids=["restarted", "replaced"])
def test_a_killed_producer_loses_and_duplicates_nothing(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir, for_good):
    """A producer killed mid-cache is restarted by Ray (its process killed, as the OOM killer
    would), or, killed for good (``ray.kill``), replaced; the units it held are redone and the
    cache holds every token exactly once. The fill does not wait for it: the live producer goes
    on committing while Ray restarts the lost one (process start, model load) or its
    replacement starts, and the report names the fault."""
    job = tiny_job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir,
                   "cluster.num_producers=2", "cluster.units_per_producer=2")
    [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
    killed, commits = [], []

    def kill_one(manifests, producers) -> None:
        commits.append(time.time())
        if len(commits) == 1:  # a producer takes units once its model is loaded: wait for both
            ray.get([p.ping.remote() for p in producers])
        if killed or len(commits) < 3:  # by the third commit both producers hold units
            return
        killed.append(time.time())
        if for_good:
            ray.kill(producers[0], no_restart=True)
        else:
            os.kill(descendants_titled(b"ray::Producer")[0], signal.SIGKILL)

    report = build_caches(job, [plan], on_commit=kill_one)
    assert killed and not report.reused[plan.hookpoint] and report.manifests[plan.hookpoint].complete
    check_tiny_cache(plan.uri, {})
    [fill] = report.fills
    [fault] = fill.faults
    assert fault.units_redone >= 1 and fault.replaced == for_good, fault
    back = fault.at + (fault.back_after_s if fault.back_after_s is not None else float("inf"))
    assert any(fault.at < t < back for t in commits), f"no unit committed while the lost producer recovered: {fault}"


def test_a_killed_trainer_worker_resumes_from_its_checkpoint_bit_identical(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    """SIGKILL one Ray Train worker after the first checkpoint: Ray Train starts a new group,
    which resumes from the newest complete checkpoint and ends with exactly the weights of a run
    that was never interrupted."""
    store = str(tmp_path / "store")
    options = ("eval=off", "train.epochs=25", "run.checkpoint_every_steps=40", "train.log_every_steps=40",
               "train.histogram_every_steps=0", "logging.wandb_mode=disabled", "cluster.train_max_failures=1")
    [straight] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=straight", *options)).hookpoints
    assert straight.eval["resumed_from_step"] == 0

    job = tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=killed", *options)
    runner, outcome, checkpoints = run_until_checkpoint(job, straight.cache_uri.split("/caches/")[0] + "/runs/killed")
    pids = descendants_titled(b"ray::RayTrainWorker")
    assert pids, "the trainer workers are running"
    os.kill(pids[-1], signal.SIGKILL)
    runner.join(timeout=600)
    [killed] = outcome["result"].hookpoints
    assert killed.eval["resumed_from_step"] >= 40, "the second worker group resumed from a checkpoint"
    assert killed.eval["train_steps"] == straight.eval["train_steps"]
    assert_same_weights(killed.dictionary_uri, straight.dictionary_uri)
    kept = {k.split("/")[1] for k in checkpoints.list(f"{CHECKPOINTS_DIR}/")}
    assert len(kept) <= 2, f"run.keep_checkpoints=2 keeps two checkpoints, found {sorted(kept)}"
