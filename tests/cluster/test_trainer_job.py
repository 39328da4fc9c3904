"""The distributed trainer as a job runs it, on a real local Ray cluster: a trainer worker killed
mid-run, a sweep, a feature-parallel dictionary."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from tiny_job import tiny_job

from activation_cache.store import open_store
from cluster.driver import run_job
from trainer.checkpoint import CHECKPOINTS_DIR, COMPLETE_FILE

pytestmark = pytest.mark.integration


def _weights(dictionary_uri: str) -> dict[str, torch.Tensor]:
    return load_safetensors(open_store(dictionary_uri).get_bytes("sae_weights.safetensors"))


def _assert_same_weights(a: str, b: str) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs"


def _train_worker_pids() -> list[int]:
    """Processes of Ray Train workers on this machine (Ray titles them ``ray::RayTrainWorker...``)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return sorted(pids)


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
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_job(job)), daemon=True)
    runner.start()
    checkpoints = open_store(straight.cache_uri.split("/caches/")[0] + "/runs/killed")
    deadline = time.monotonic() + 300
    while not any(k.endswith(COMPLETE_FILE) for k in checkpoints.list(f"{CHECKPOINTS_DIR}/")):
        assert time.monotonic() < deadline and runner.is_alive(), "no checkpoint was written"
        time.sleep(0.05)
    pids = _train_worker_pids()
    assert pids, "the trainer workers are running"
    os.kill(pids[-1], signal.SIGKILL)
    runner.join(timeout=600)
    [killed] = outcome["result"].hookpoints
    assert killed.eval["resumed_from_step"] >= 40, "the second worker group resumed from a checkpoint"
    assert killed.eval["train_steps"] == straight.eval["train_steps"]
    _assert_same_weights(killed.dictionary_uri, straight.dictionary_uri)
    kept = {k.split("/")[1] for k in checkpoints.list(f"{CHECKPOINTS_DIR}/")}
    assert len(kept) <= 2, f"run.keep_checkpoints=2 keeps two checkpoints, found {sorted(kept)}"


def test_a_sweep_trains_every_variant_on_the_same_batches(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    store = str(tmp_path / "store")
    result = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=sweep", "sweep.k=[4,8]",
                              "sweep.n_latents=[64,128]"))
    by_variant = {hp.variant: hp for hp in result.hookpoints}
    assert sorted(by_variant) == ["n128-k4", "n128-k8", "n64-k4", "n64-k8"]
    for name, hp in by_variant.items():
        assert hp.dictionary_uri.endswith(f"/runs/sweep/sweep/{name}/dictionary/model.layers.2")
        weights = _weights(hp.dictionary_uri)
        assert weights["W_enc"].shape == (32, int(name[1:].split("-")[0]))
        assert hp.eval["l0"] <= int(name.split("-k")[1]) and hp.eval["fvu"] < 1.0
    assert len({hp.eval["train_tokens"] for hp in by_variant.values()}) == 1
    runs = list((tmp_path / "outputs" / "sweep" / "wandb").glob("offline-run-*"))
    assert len(runs) == 4, "one wandb training run per variant"
    evaluated = list((tmp_path / "outputs" / "sweep" / "eval" / "wandb").glob("offline-run-*"))
    assert len(evaluated) == 4 and all("lm" in hp.eval for hp in by_variant.values()), "each variant evaluated"
    # The variant trained in the sweep is the dictionary a job of its own trains: same batches.
    [alone] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=alone",
                               "sae.k=4", "sae.n_latents=64")).hookpoints
    _assert_same_weights(by_variant["n64-k4"].dictionary_uri, alone.dictionary_uri)


def test_a_feature_parallel_dictionary_equals_the_single_rank_one(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    """2 ranks each holding half the latents train the dictionary one rank trains alone on the
    same batches (to float tolerance: the partial reconstructions are summed in another order)."""
    store = str(tmp_path / "store")
    common = ("sae.auxk_coefficient=0", "train.epochs=1", "logging.wandb_mode=disabled", "eval=off")
    [split] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=split", *common,
                               "deepspeed.feature_parallel=2", "cluster.num_train_workers=2")).hookpoints
    [whole] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=whole", *common,
                               "cluster.num_train_workers=1")).hookpoints
    assert split.eval["train_steps"] == whole.eval["train_steps"] > 0
    first, second = _weights(split.dictionary_uri), _weights(whole.dictionary_uri)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-5)
    assert abs(split.eval["fvu"] - whole.eval["fvu"]) < 1e-4


def test_resume_refuses_a_run_without_a_checkpoint_before_anything_starts(tmp_path, tiny_model_dir, tiny_corpus_dir):
    job = tiny_job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=null", "resume=nowhere")
    assert job.run.name == "nowhere"
    with pytest.raises(ValueError, match=r"resume='nowhere': no complete checkpoint under file://.*/runs/nowhere/checkpoints/"):
        run_job(job)
    assert not (tmp_path / "store" / "caches").exists() or not any((tmp_path / "store" / "caches").iterdir())


def test_a_feature_parallel_run_started_again_resumes_to_the_same_weights(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    """The checkpoint of a (data x feature) run holds each rank's slice and optimizer partition: a
    second start of the run (``resume=``) continues from the newest one and writes the same
    dictionary, bit for bit."""
    store = str(tmp_path / "store")
    common = ("eval=off", "sae.auxk_coefficient=0", "train.epochs=3", "logging.wandb_mode=disabled", "deepspeed.feature_parallel=2",
              "cluster.num_train_workers=2", "run.checkpoint_every_steps=20", "run.name=fp")
    [first] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, *common)).hookpoints
    first_weights = _weights(first.dictionary_uri)
    [again] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, *common[:-1], "run.name=null", "resume=fp")).hookpoints
    assert again.eval["resumed_from_step"] == 40 and again.eval["train_steps"] == first.eval["train_steps"] == 57
    for name, tensor in _weights(again.dictionary_uri).items():
        assert torch.equal(tensor, first_weights[name]), f"{name} differs"
