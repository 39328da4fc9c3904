"""What the code before issue 15 wrote still works: its cache, its run and its checkpoint.

``tests/fixtures/legacy/bucket`` was written by ``saeforge train`` at the commit named in
``legacy.json`` (``make_legacy_fixtures.py`` regenerates it): a complete activation cache, the
run's config, its dictionary folder and a checkpoint at step 40 of 76. Each test copies it beside
the rebuilt tiny model and corpus (the job's paths are relative to that folder) and drives the
current code through the ``saeforge`` command line, as a user would; the committed fixture is
never written to.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "legacy"
LEGACY = json.loads((FIXTURE / "legacy.json").read_text())
SEQUENCES, CONTEXT = 48, 32  # the legacy job: data.max_tokens = 48 sequences of 32 tokens


def _maker():
    """``make_legacy_fixtures.py`` as a module: the job's overrides and the tiny model's builder,
    frozen as they were when the fixture was written."""
    spec = importlib.util.spec_from_file_location("make_legacy_fixtures", FIXTURE / "make_legacy_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()


@pytest.fixture(scope="module")
def model_and_corpus(tmp_path_factory) -> Path:
    """The tiny model and corpus, rebuilt once per module (the fixture stores neither)."""
    return MAKER.prepare(tmp_path_factory.mktemp("legacy-inputs"))


@pytest.fixture
def workspace(tmp_path, model_and_corpus) -> Path:
    """A folder laid out as the legacy job ran: ``model/``, ``corpus/`` and a copy of ``bucket/``."""
    for name in ("model", "corpus"):
        shutil.copytree(model_and_corpus / name, tmp_path / name)
    shutil.copytree(FIXTURE / MAKER.BUCKET, tmp_path / MAKER.BUCKET)
    return tmp_path


def saeforge(folder: Path, *argv: str, timeout_s: int = 900) -> subprocess.CompletedProcess:
    """The current ``saeforge`` command line, run in ``folder``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "disabled",
           "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *argv], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def _dictionary(folder: Path) -> Path:
    return folder / LEGACY["dictionary"]


def _cache(folder: Path) -> Path:
    return folder / MAKER.BUCKET / "caches" / LEGACY["cache_key"]


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_the_rebuilt_tiny_model_and_the_cache_key_are_the_legacy_ones(model_and_corpus):
    """The test's inputs are the fixture's: the rebuilt model has the weights fingerprint the
    legacy cache was keyed on, and the current key of the legacy key inputs is the legacy key."""
    from activation_cache.keys import cache_key, weights_fingerprint

    manifest = json.loads((FIXTURE / "bucket" / "caches" / LEGACY["cache_key"] / "manifest.json").read_text())
    assert weights_fingerprint(model_and_corpus / "model") == manifest["key_inputs"]["revision"], (
        "the tiny model rebuilt with other bytes (torch, transformers or tokenizers changed): regenerate "
        "the fixture with make_legacy_fixtures.py")
    assert cache_key(manifest["key_inputs"]) == manifest["cache_key"] == LEGACY["cache_key"]


def test_the_legacy_cache_is_read_listed_and_verified(workspace):
    """Every row of every legacy shard reads back (checksums checked by the reader), and
    ``saeforge cache ls`` / ``verify`` accept the cache."""
    from activation_cache.manifest import load_manifest
    from activation_cache.reader import read_shard
    from activation_cache.store import open_store

    store = open_store(str(_cache(workspace)))
    manifest = load_manifest(store)
    assert manifest.complete and manifest.cache_key == LEGACY["cache_key"] and manifest.d_model == 32
    assert len(manifest.shards) == 12 and manifest.rows == SEQUENCES * (CONTEXT - 1)
    seen = Counter()
    for entry in manifest.shards:
        shard = read_shard(store, entry)
        assert shard.activations.shape == (entry.rows, 32) and shard.activations.isfinite().all()
        seen.update(zip(shard.sequence_ids.tolist(), shard.positions.tolist(), strict=True))
    assert set(seen.values()) == {1}
    assert set(seen) == {(s, p) for s in range(SEQUENCES) for p in range(1, CONTEXT)}

    listed = saeforge(workspace, "cache", "ls", MAKER.BUCKET, "--json")
    assert listed.returncode == 0, listed.stderr
    [record] = json.loads(listed.stdout)
    assert record["cache_key"] == LEGACY["cache_key"] and record["hookpoint"] == "model.layers.2"
    verified = saeforge(workspace, "cache", "verify", str(_cache(workspace)))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_damaged_legacy_shard_is_caught(workspace):
    """The legacy manifest's checksums are still checked: one flipped byte fails ``verify``."""
    shard = sorted((_cache(workspace) / "shards").iterdir())[3]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    verified = saeforge(workspace, "cache", "verify", str(_cache(workspace)))
    assert verified.returncode == 1 and shard.name in verified.stdout + verified.stderr


def test_the_legacy_run_pulls_and_its_dictionary_loads(workspace, tmp_path):
    """``saeforge pull`` of the legacy run copies its dictionary, verified against its
    checksums.json; the current loader computes what the saved weights compute by hand (TopK in
    plain torch), and SAELens agrees."""
    import torch

    from trainer.dictionary import load_dictionary

    target = tmp_path / "pulled"
    pulled = saeforge(workspace, "pull", str(workspace / LEGACY["run"]), str(target))
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled topk dictionary d_in=32 d_sae=64" in pulled.stdout
    [folder] = (weights.parent for weights in target.rglob("sae_weights.safetensors"))
    legacy = _dictionary(workspace)
    assert {p.name for p in folder.iterdir()} == {p.name for p in legacy.iterdir()}
    for path in legacy.iterdir():
        assert (folder / path.name).read_bytes() == path.read_bytes(), path.name

    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    sae, cfg = load_dictionary(files)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", 32, 64, 8)
    weights = _tensors(folder / "sae_weights.safetensors")
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1)) * 5
    pre = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    values, indices = pre.topk(8, dim=-1)
    latents = torch.zeros_like(pre).scatter_(-1, indices, values)
    expected = latents @ weights["W_dec"] + weights["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae(x).reconstruction, expected, rtol=1e-5, atol=1e-5)

    from sae_lens import SAE

    with torch.no_grad():
        torch.testing.assert_close(SAE.load_from_disk(str(folder), device="cpu")(x), expected, rtol=1e-4, atol=1e-4)


def test_a_legacy_dictionary_whose_bytes_changed_is_refused_by_pull(workspace, tmp_path):
    """The legacy checksums.json still guards a pull: a changed weights file stops it, naming it."""
    weights = _dictionary(workspace) / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    pulled = saeforge(workspace, "pull", str(workspace / LEGACY["run"]), str(tmp_path / "pulled"))
    assert pulled.returncode == 2 and "sae_weights.safetensors" in pulled.stderr


def test_saeforge_eval_on_the_legacy_dictionary_gives_the_legacy_figures(workspace):
    """``saeforge eval`` rebuilds the held-out text from the legacy run's config.json, splices the
    legacy dictionary into the tiny model and finds the figures the legacy job wrote; the rest of
    eval.json is kept."""
    legacy_eval = json.loads((FIXTURE / LEGACY["dictionary"] / "eval.json").read_text())
    (_dictionary(workspace) / "eval.json").write_text(json.dumps({k: v for k, v in legacy_eval.items() if k != "lm"}))
    evaluated = saeforge(workspace, "eval", str(_dictionary(workspace)))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "held-out units of corpus (240 tokens scored)" in evaluated.stdout
    merged = json.loads((_dictionary(workspace) / "eval.json").read_text())
    lm, legacy_lm = merged["lm"], legacy_eval["lm"]
    assert (lm["text"], lm["n_tokens"]) == (legacy_lm["text"], legacy_lm["n_tokens"])
    for name in ("clean_ce", "spliced_ce", "ablated_ce", "ce_recovered", "kl_divergence"):
        assert lm[name] == pytest.approx(legacy_lm[name], rel=1e-5, abs=1e-7), name
    assert merged["fvu"] == legacy_eval["fvu"] and merged["resumed_from_step"] == 0


LEGACY_DEFAULTS = ("model.dtype=float32", "sae.encoder_gemm=param", "deepspeed.partition_min_mb=0")


@pytest.mark.integration
def test_the_legacy_job_reuses_its_cache_and_resumes_its_checkpoint_to_the_same_weights(workspace):
    """The legacy job started again by the current code: its cache key is the legacy one, so the
    cache is reused (not rebuilt); training resumes from the legacy checkpoint at step 40 and ends
    with exactly the weights of the legacy code's uninterrupted run."""
    import torch

    shards_before = {p.name: p.stat().st_mtime_ns for p in (_cache(workspace) / "shards").iterdir()}
    # The defaults of the legacy code where they have changed since: the model and the encoder
    # GEMM in float32 (now auto), ZeRO partitioning however small the state (now from 256 MiB)
    trained = saeforge(workspace, "train", *LEGACY["overrides"], *LEGACY_DEFAULTS, timeout_s=1200)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-6000:]
    assert re.search(rf"cache\s+\S*/caches/{LEGACY['cache_key']} \(reused\)", trained.stdout), trained.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (_cache(workspace) / "shards").iterdir()} == shards_before
    assert sorted(p.name for p in (workspace / MAKER.BUCKET / "caches").iterdir()) == [LEGACY["cache_key"]]

    evaluation = json.loads((_dictionary(workspace) / "eval.json").read_text())
    assert evaluation["resumed_from_step"] == 40 and evaluation["train_steps"] == 76
    assert LEGACY["checkpoints"] == ["step-000000040"] and LEGACY["old_code_resumed_to_same_weights"]
    resumed = _tensors(_dictionary(workspace) / "sae_weights.safetensors")
    uninterrupted = _tensors(FIXTURE / LEGACY["dictionary"] / "sae_weights.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs from the legacy run's"
