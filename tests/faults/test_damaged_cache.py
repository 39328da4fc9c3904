"""A job that reuses a damaged cache stops with one line naming the damaged object and what is
wrong with it, and trains nothing on it: a shard whose bytes were altered, a truncated
manifest, a manifest listing a shard the store no longer has.

One cache is filled for the module; each test damages its own copy and runs ``saeforge train``
on it with the same inputs, so the job finds the cache by its key and reuses it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from tiny_job import tiny_job, tiny_overrides

from activation_cache.manifest import load_manifest
from activation_cache.store import open_store
from cluster.cli import main as saeforge
from cluster.driver import absolute_uri, build_caches, plan_caches

pytestmark = pytest.mark.integration

_OPTIONS = ("eval=off", "logging.wandb_mode=disabled", "run.name=damaged")


@pytest.fixture(scope="module")
def complete_store(ray_cluster, tmp_path_factory, tiny_model_dir, tiny_corpus_dir) -> Path:
    """A store holding the tiny job's complete cache (filled once for the module)."""
    root = tmp_path_factory.mktemp("complete")
    job = tiny_job(str(root / "store"), root, tiny_model_dir, tiny_corpus_dir)
    [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
    assert build_caches(job, [plan]).manifests[plan.hookpoint].complete
    return root / "store"


def _copy(complete_store: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(store, cache folder) of a fresh copy of the complete cache."""
    store = tmp_path / "store"
    shutil.copytree(complete_store, store)
    [cache] = (store / "caches").iterdir()
    return store, cache


def _train(store: Path, tmp_path: Path, model_dir, corpus_dir, capsys) -> str:
    """``saeforge train`` on ``store``; it must fail (exit 2): its one error line."""
    code = saeforge(["train", *tiny_overrides(str(store), tmp_path, model_dir, corpus_dir, *_OPTIONS)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saeforge train: error:")]
    assert code == 2 and len(errors) == 1, f"exit {code}, error lines {errors}"
    return errors[0]


def _assert_nothing_trained(store: Path) -> None:
    run = store / "runs" / "damaged"
    written = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) if run.exists() else []
    assert not [p for p in written if p.startswith(("dictionary", "checkpoints"))], f"written from a damaged cache: {written}"


def test_a_shard_with_altered_bytes_stops_training_naming_it(complete_store, tmp_path, tiny_model_dir, tiny_corpus_dir, capsys):
    """Same size, other bytes: only the checksum tells. The reader checks it before any row of
    the shard is used; the job stops with the shard's name, whatever rank read it and however
    often Ray Train restarted the workers."""
    store, cache = _copy(complete_store, tmp_path)
    name = "shards/unit-000002.arrow"  # a training shard (the last two are held out)
    data = bytearray((cache / name).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    (cache / name).write_bytes(bytes(data))

    line = _train(store, tmp_path, tiny_model_dir, tiny_corpus_dir, capsys)
    uri = f"file://{cache}"
    assert re.fullmatch(
        rf"saeforge train: error: cache {uri}: shard {name}: checksum [0-9a-f]{{12}}… expected [0-9a-f]{{12}}… "
        rf"\(training stopped, no dictionary written; `saeforge cache verify {uri}` checks every shard\) "
        rf"\(the job's log: {tmp_path}/outputs/damaged/saeforge\.log\)", line
    ), line
    _assert_nothing_trained(store)
    # The command the error suggests finds that shard, and only it.
    assert saeforge(["cache", "verify", uri]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and name in bad[0], bad


def test_a_truncated_manifest_is_refused_before_anything_starts(complete_store, tmp_path, tiny_model_dir, tiny_corpus_dir, capsys):
    store, cache = _copy(complete_store, tmp_path)
    manifest = cache / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])

    line = _train(store, tmp_path, tiny_model_dir, tiny_corpus_dir, capsys)
    assert re.fullmatch(rf"saeforge train: error: file://{manifest}: not a valid saeforge manifest \(.+\)", line), line
    assert not (store / "runs").exists(), "refused before the run's first file is written"
    assert manifest.stat().st_size < (complete_store / manifest.relative_to(store)).stat().st_size, "left as found"


def test_a_manifest_naming_a_missing_shard_is_refused_before_anything_starts(complete_store, tmp_path, tiny_model_dir, tiny_corpus_dir, capsys):
    store, cache = _copy(complete_store, tmp_path)
    listed = [entry.name for entry in load_manifest(open_store(str(cache))).shards]
    (cache / listed[5]).unlink()

    line = _train(store, tmp_path, tiny_model_dir, tiny_corpus_dir, capsys)
    uri = f"file://{cache}"
    assert line == (f"saeforge train: error: shard {listed[5]}: listed in {uri}/manifest.json but missing from the "
                    f"store; `saeforge cache verify {uri}` checks every shard, deleting the cache rebuilds it"), line
    assert not (store / "runs").exists(), "refused before the run's first file is written"
