"""The tiny job the cluster tests run: the tiny model over the tiny corpus, 12 shards of 4 sequences."""

from __future__ import annotations

CONTEXT, SEQUENCES, PER_SHARD = 32, 48, 4


def tiny_overrides(uri, tmp_path, model_dir, corpus_dir, *extra: str) -> list[str]:
    """The tiny job as command-line overrides (``saeforge train <these>``)."""
    return [
        # float32 throughout: the cluster tests hold the cache to the model's own float32 forward
        # and the dictionaries to float32 references (model.dtype=auto has its tests in
        # test_precision.py, the bf16 encoder GEMM in tests/trainer/); ZeRO as configured, however
        # small the tiny dictionary (deepspeed.partition_min_mb: tests/trainer/test_deepspeed_engine.py)
        "model=local", f"model.name_or_path={model_dir}", "model.hookpoint=resid_post.2", "model.batch_size=4",
        "model.dtype=float32", "sae.encoder_gemm=param", "deepspeed.partition_min_mb=0",
        "data=text_files", f"data.source={corpus_dir}", f"data.context_length={CONTEXT}",
        f"data.max_tokens={CONTEXT * SEQUENCES}", f"cache.uri={uri}", f"cache.sequences_per_shard={PER_SHARD}",
        "sae.n_latents=128", "sae.k=8", "train.batch_size=64", "train.epochs=4", "train.lr=3e-3",
        "train.shuffle_buffer_rows=256", f"logging.dir={tmp_path / 'outputs'}", "run.name=tiny", *extra,
    ]


def tiny_job(uri: str, tmp_path, model_dir, corpus_dir, *extra: str):
    from cluster.config import compose_job

    return compose_job(
        tiny_overrides(uri, tmp_path, model_dir, corpus_dir, "cluster.object_store_memory_bytes=209715200", *extra)
    )


def check_tiny_cache(cache_uri: str, s3_options: dict) -> None:
    """The tiny job's cache is complete and holds every token (but BOS) of every sequence exactly once."""
    from collections import Counter

    from activation_cache.manifest import load_manifest
    from activation_cache.reader import read_shard
    from activation_cache.store import open_store

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


def dictionary_weights(dictionary_uri: str) -> dict:
    """The tensors of a written dictionary's weights file, by name."""
    from safetensors.torch import load

    from activation_cache.store import open_store
    from trainer.layout import WEIGHTS_FILE

    return load(open_store(dictionary_uri).get_bytes(WEIGHTS_FILE))


def assert_same_weights(a: str, b: str) -> None:
    """The dictionaries at ``a`` and ``b`` hold bit-identical tensors."""
    import torch

    first, second = dictionary_weights(a), dictionary_weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs"


def check_tiny_dictionary(dictionary_uri: str, cache_uri: str, target, s3_options: dict) -> None:
    """Pull the tiny job's dictionary into ``target`` and check it: its files, its evaluation, its
    held-out FVU, activation stats and feature maxima recomputed from the raw cache, and that
    SAELens loads it with the same outputs."""
    import json

    import numpy as np
    import torch

    from activation_cache.manifest import load_manifest
    from activation_cache.plan import input_scale, split_holdout
    from activation_cache.reader import read_shard
    from activation_cache.store import open_store
    from cluster.cli import main as saeforge
    from trainer import layout
    from trainer.activation_stats import load_activation_stats
    from trainer.dictionary import load_dictionary

    argv = ["pull", dictionary_uri, str(target)]
    if s3_options.get("endpoint_url"):
        argv += ["--endpoint-url", s3_options["endpoint_url"]]
    assert saeforge(argv) == 0
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    assert {layout.WEIGHTS_FILE, layout.CONFIG_FILE, layout.SPARSITY_FILE, layout.EVAL_FILE, layout.CHECKSUMS_FILE,
            layout.TRAINING_CURVES_FILE, layout.REPORT_FILE, layout.ACTIVATION_STATS_FILE,
            layout.FEATURE_STATS_FILE} <= set(files)
    sae, cfg = load_dictionary(files)
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (32, 128, 8)
    evaluation = json.loads(files[layout.EVAL_FILE])
    assert {"fvu", "l0", "dead_fraction"} <= set(evaluation)
    lm = evaluation["lm"]  # spliced into the model on the held-out text
    assert lm["n_tokens"] > 0 and lm["kl_divergence"] >= 0 and lm["ablated_ce"] > 0
    assert evaluation["unexplained"]["worst_contexts"], "the contexts the SAE explains worst"
    report = files[layout.REPORT_FILE]
    assert b'id="evaluation"' in report and b"spliced LM: ce_recovered" in report
    assert evaluation["fvu"] < 1.0 and evaluation["l0"] <= 8
    assert sum(evaluation["firing_histogram"]["latents"]) == 128
    assert 0 <= evaluation["dense_fraction"] <= 1

    # Independently of the trainer's own figure: the saved dictionary, applied to RAW held-out
    # activations, reconstructs them better than their mean does.
    store = open_store(cache_uri, s3_options=s3_options)
    manifest = load_manifest(store)
    _, holdout = split_holdout(manifest.shards, 0.1)
    x = torch.cat([read_shard(store, e).activations for e in holdout])
    with torch.no_grad():
        recon = sae(x).reconstruction
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.9, f"held-out FVU {fvu:.3f} of the pulled dictionary"
    assert abs(fvu.item() - evaluation["fvu"]) < 1e-3, "eval.json must describe the saved dictionary on raw activations"
    assert input_scale(manifest, True) != 1.0, "the test must exercise the normalisation fold"

    # The held-out stats observe measures relative errors against: those of the same raw rows
    # (not scaled), recomputed here in float64; the file stores float32.
    stats = load_activation_stats(files[layout.ACTIVATION_STATS_FILE])
    rows = x.double().numpy()
    rows = rows[np.isfinite(rows).all(axis=1)]
    assert stats.n_tokens == len(rows) == evaluation["n_tokens"]
    np.testing.assert_allclose(stats.mean.numpy(), rows.mean(axis=0), rtol=1e-5, atol=1e-6 * np.abs(rows).max())
    np.testing.assert_allclose(stats.variance.numpy(), rows.var(axis=0), rtol=1e-5, atol=1e-7 * rows.var(axis=0).max())

    # The pulled folder loads in SAELens and computes the same reconstruction.
    from sae_lens import SAE

    saelens_sae = SAE.load_from_disk(str(target), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(saelens_sae(x), recon, rtol=1e-4, atol=1e-4)

    # Each feature's recorded maximum (what a steer's --value 10x multiplies) is its largest
    # activation in SAELens's encoding of the raw held-out rows by the saved dictionary, 0 where it
    # never fired: the saved dictionary's units, not the training's scaled ones.
    from trainer.activation_stats import load_feature_stats

    maxima = load_feature_stats(files[layout.FEATURE_STATS_FILE])
    with torch.no_grad():
        saelens_acts = saelens_sae.encode(x[torch.isfinite(x).all(dim=1)])
    assert maxima.n_tokens == evaluation["n_tokens"] and saelens_acts.shape == (maxima.n_tokens, 128)
    expected_max = saelens_acts.amax(dim=0).clamp_min(0)
    assert (expected_max > 0).sum() > 16, "the check must cover many live features"
    torch.testing.assert_close(maxima.max_activation, expected_max, rtol=1e-4, atol=1e-4)
    from interp.loading import read_dictionary_folder

    assert read_dictionary_folder(str(target)).feature_max.equal(maxima.max_activation)


def run_until_checkpoint(job, checkpoints_uri: str, *, timeout_s: float = 300) -> tuple:
    """``run_job(job)`` started in a thread, returned once the run's first complete checkpoint is
    under ``checkpoints_uri`` (the run folder): the thread, the dict its result lands in
    (``result``), and the run folder's store."""
    import threading
    import time

    from activation_cache.store import open_store
    from cluster.driver import run_job
    from trainer.layout import CHECKPOINTS_DIR, COMPLETE_FILE

    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_job(job)), daemon=True)
    runner.start()
    checkpoints = open_store(checkpoints_uri)
    deadline = time.monotonic() + timeout_s
    while not any(k.endswith(COMPLETE_FILE) for k in checkpoints.list(f"{CHECKPOINTS_DIR}/")):
        assert time.monotonic() < deadline and runner.is_alive(), "no checkpoint was written"
        time.sleep(0.05)
    return runner, outcome, checkpoints
