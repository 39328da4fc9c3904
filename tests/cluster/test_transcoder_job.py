"""Transcoders as jobs, on a real local Ray cluster: the tiny model's MLP input at layer 1 predicting
its output, from two caches filled by one forward pass, trained by 2 DeepSpeed workers, evaluated
spliced into the model, written as a folder that names both ends and that SAELens loads.

One job-level test per capability (a TopK transcoder with a sweep, checkpoints and an exact
resume; a BatchTopK skip transcoder); the pieces are unit-tested beside their modules
(tests/trainer/test_transcoders.py, tests/activation_cache/test_paired_reader.py,
tests/cluster/test_spliced_evaluation.py, tests/interp/test_transcoder_interp.py)."""

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
from trainer.activation_stats import load_activation_stats
from trainer.dictionary import load_dictionary

pytestmark = pytest.mark.integration

TRANSCODER = ("model.hookpoint=mlp_in.1", "model.target_hookpoint=mlp_out.1")
FOLDER = "model.layers.1.mlp:input-to-model.layers.1.mlp"


def _held_out_pairs(input_cache: str, target_cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw held-out rows of both caches, read here without the trainer's code paths, each pair
    of shards checked to hold the same tokens in the same order."""
    xs, ys = [], []
    x_store, y_store = open_store(input_cache), open_store(target_cache)
    x_manifest, y_manifest = load_manifest(x_store), load_manifest(y_store)
    _, holdout = split_holdout(x_manifest.shards, 0.1)
    targets = {s.name: s for s in y_manifest.shards}
    for entry in holdout:
        x, y = read_shard(x_store, entry), read_shard(y_store, targets[entry.name])
        assert (x.sequence_ids == y.sequence_ids).all() and (x.positions == y.positions).all()
        xs.append(x.activations)
        ys.append(y.activations)
    return torch.cat(xs), torch.cat(ys)


def _check_transcoder_folder(hp, tmp_path, *, architecture: str, skip: bool) -> tuple[torch.nn.Module, dict]:
    """Pull the dictionary and check it against the raw caches: names, both hookpoints, held-out
    FVU of the target, the target's stats, and (where SAELens has the class) SAELens's outputs."""
    assert hp.dictionary_uri.endswith(f"/dictionary/{FOLDER}")
    assert hp.cache_uri != hp.target_cache_uri, "each hookpoint keeps its own cache"
    target = tmp_path / "pulled" / architecture
    assert saeforge(["pull", hp.dictionary_uri, str(target)]) == 0
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    sae, cfg = load_dictionary(files)
    assert cfg["architecture"] == architecture
    assert cfg["metadata"]["hook_name"] == "model.layers.1.mlp:input"
    assert cfg["metadata"]["hook_name_out"] == "model.layers.1.mlp"
    assert (sae.W_skip is not None) == skip
    evaluation = json.loads(files[layout.EVAL_FILE])
    x, y = _held_out_pairs(hp.cache_uri, hp.target_cache_uri)
    with torch.no_grad():
        _, prediction = sae.reconstruct(x)
    fvu = ((y - prediction) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert fvu < 0.9, f"held-out FVU {fvu:.3f} of the pulled transcoder"
    assert abs(fvu.item() - evaluation["fvu"]) < 1e-3, "eval.json describes the saved transcoder on raw rows"
    stats = load_activation_stats(files[layout.ACTIVATION_STATS_FILE])  # the target's, not the input's
    torch.testing.assert_close(stats.mean.double(), y.double().mean(0), rtol=1e-5, atol=1e-6)
    lm = evaluation["lm"]  # the MLP output replaced by the transcoder's prediction
    # (The tiny random model's MLP barely moves its loss, so CE recovered is not compared here:
    # tests/cluster/test_spliced_evaluation.py checks these figures against hooks of its own.)
    assert lm["n_tokens"] > 0 and lm["kl_divergence"] >= 0 and {"clean_ce", "spliced_ce", "ablated_ce"} <= set(lm)
    assert b"reads" in files[layout.REPORT_FILE] and b"writes" in files[layout.REPORT_FILE]
    if architecture != "topk_skip_transcoder":
        from sae_lens import SAE

        saelens = SAE.load_from_disk(str(target), device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(saelens(x), prediction, rtol=1e-4, atol=1e-4)
    return sae, evaluation


def test_a_transcoder_job_trains_a_sweep_from_two_caches_and_resumes_exactly(
    ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir
):
    store = str(tmp_path / "store")
    common = (*TRANSCODER, "run.checkpoint_every_steps=20", "sweep.k=[4,8]", "run.name=tc")
    result = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, *common))
    by_variant = {hp.variant: hp for hp in result.hookpoints}
    assert sorted(by_variant) == ["k4", "k8"]
    for hp in by_variant.values():
        sae, evaluation = _check_transcoder_folder(hp, tmp_path / hp.variant, architecture="topk", skip=False)
        assert evaluation["l0"] <= sae.k
    runs = list((tmp_path / "outputs" / "tc" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, "one wandb training run per variant"

    # The caches are the hookpoints' own: an SAE job on the MLP output finds the target's cache.
    sae_job = tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "model.hookpoint=mlp_out.1")
    [sae_cache] = plan_caches(sae_job, open_store(store))
    assert sae_cache.uri.removeprefix("file://") == by_variant["k4"].target_cache_uri.removeprefix("file://")

    # A second start of the run continues from its newest checkpoint to the same weights, bit for bit.
    first = {name: dictionary_weights(hp.dictionary_uri) for name, hp in by_variant.items()}
    again = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, *common[:-1], "run.name=null",
                             "resume=tc", "eval=off"))
    for hp in again.hookpoints:
        assert hp.eval["resumed_from_step"] > 0
        for name, tensor in dictionary_weights(hp.dictionary_uri).items():
            assert torch.equal(tensor, first[hp.variant][name]), f"{hp.variant} {name} differs after the resume"


def test_a_skip_transcoder_job_saves_its_skip_term_where_saelens_reads_it(
    ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir
):
    store = str(tmp_path / "store")
    [hp] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, *TRANSCODER, "sae=batchtopk",
                            "sae.skip_connection=true", "run.name=skip")).hookpoints
    sae, evaluation = _check_transcoder_folder(hp, tmp_path, architecture="jumprelu_skip_transcoder", skip=True)
    assert sae.W_skip.abs().sum() > 0, "the skip term trained"

    # The pulled folder finds its model (cfg.json's metadata) and observes through both ends,
    # measuring relative errors against the target's held-out variance saved beside it.
    out = tmp_path / "observed.json"
    assert saeforge(["observe", str(tmp_path / "pulled" / "jumprelu_skip_transcoder"), "--text",
                     "the quick brown fox jumps over the lazy dog", "--json", str(out)]) == 0
    observed = json.loads(out.read_text())
    assert (observed["hookpoint"], observed["hookpoint_out"]) == ("model.layers.1.mlp:input", "model.layers.1.mlp")
    assert observed["baseline"]["source"] == "held-out"
    tokens = [t for t in observed["texts"][0]["tokens"] if t["encoded"]]
    assert tokens and all(t["relative_error"] >= 0 and t["l0"] >= 0 for t in tokens)

