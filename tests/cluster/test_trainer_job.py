"""The distributed trainer as a job runs it, on a real local Ray cluster: a sweep, a
feature-parallel dictionary, a run started again (a trainer worker killed mid-run:
tests/faults/test_killed_workers.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_job import assert_same_weights, dictionary_weights, tiny_job

from cluster.driver import run_job

pytestmark = pytest.mark.integration


def test_a_sweep_trains_every_variant_on_the_same_batches(ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    store = str(tmp_path / "store")
    result = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=sweep", "sweep.k=[4,8]",
                              "sweep.n_latents=[64,128]"))
    by_variant = {hp.variant: hp for hp in result.hookpoints}
    assert sorted(by_variant) == ["n128-k4", "n128-k8", "n64-k4", "n64-k8"]
    for name, hp in by_variant.items():
        assert hp.dictionary_uri.endswith(f"/runs/sweep/sweep/{name}/dictionary/model.layers.2")
        weights = dictionary_weights(hp.dictionary_uri)
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
    assert_same_weights(by_variant["n64-k4"].dictionary_uri, alone.dictionary_uri)


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
    first, second = dictionary_weights(split.dictionary_uri), dictionary_weights(whole.dictionary_uri)
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
    first_weights = dictionary_weights(first.dictionary_uri)
    [again] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, *common[:-1], "run.name=null", "resume=fp")).hookpoints
    assert again.eval["resumed_from_step"] == 40 and again.eval["train_steps"] == first.eval["train_steps"] == 57
    for name, tensor in dictionary_weights(again.dictionary_uri).items():
        assert torch.equal(tensor, first_weights[name]), f"{name} differs"
