"""A cache directory whose disk fills up mid-fill: the fill stops with one line naming the shard
it could not write and why, the manifest keeps only complete shards, and once there is room a
rerun resumes and completes the cache.

The small disk is a tmpfs mounted in a private mount namespace (``unshare -rm``), so the fill,
Ray cluster included, runs inside it in a subprocess: this file run as a script. It writes what
it saw to ``result.json`` and copies the cache out (as the failure left it, and once complete)
for the test to check here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# 12 shards of about 20 KB (5 pages) each: three fit beside the manifest, the fourth does not.
SMALL_DISK, LARGE_DISK = "80k", "8m"


def _in_namespace(mount: Path, *command: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``command`` in a new user + mount namespace with a tmpfs of SMALL_DISK at ``mount``."""
    script = f'mount -t tmpfs -o size={SMALL_DISK} tmpfs "$0" && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(mount), *command],
                          capture_output=True, text=True, timeout=timeout_s)


def _fill_until_full_then_resume(mount: Path, model_dir: Path, corpus_dir: Path, out: Path) -> dict:
    """The scenario, inside the namespace: fill, fail on the full disk, grow the disk, fill again."""
    import ray
    from tiny_job import tiny_job

    from activation_cache.manifest import load_manifest
    from activation_cache.store import open_store
    from cluster.driver import absolute_uri, build_caches, plan_caches

    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    # One producer with one unit in flight: each shard is written, then committed, in turn.
    job = tiny_job(str(mount / "store"), out, model_dir, corpus_dir,
                   "cluster.num_producers=1", "cluster.units_per_producer=1")
    [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
    cache_dir = Path(plan.uri.removeprefix("file://"))
    try:
        build_caches(job, [plan])
        error = None
    except Exception as err:  # noqa: BLE001 - reported to the test
        error = f"{type(err).__name__}: {err}"
    shutil.copytree(cache_dir, out / "after-failure")
    committed = load_manifest(open_store(plan.uri))
    inodes = {e.name: (cache_dir / e.name).stat().st_ino for e in committed.shards} if committed else {}

    subprocess.run(["mount", "-o", f"remount,size={LARGE_DISK}", str(mount)], check=True)
    produced: list[int] = []
    report = build_caches(job, [plan], on_commit=lambda manifests, producers: produced.append(1))
    shutil.copytree(cache_dir, out / "resumed")
    ray.shutdown()
    return {
        "error": error,
        "committed_before": sorted(inodes),
        "rewritten": sorted(n for n, ino in inodes.items() if (cache_dir / n).stat().st_ino != ino),
        "units_produced_on_resume": len(produced),
        "complete": report.manifests[plan.hookpoint].complete,
    }


def test_a_full_disk_stops_the_fill_in_one_line_and_the_cache_resumes(tmp_path, tiny_model_dir, tiny_corpus_dir):
    from tiny_job import PER_SHARD, SEQUENCES, check_tiny_cache

    from activation_cache.manifest import load_manifest
    from activation_cache.reader import read_shard
    from activation_cache.store import open_store

    mount = tmp_path / "small-disk"
    mount.mkdir()
    probe = _in_namespace(mount, "true", timeout_s=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a new user + mount namespace here: {probe.stderr.strip()}")
    run = _in_namespace(mount, sys.executable, __file__, str(mount), str(tiny_model_dir), str(tiny_corpus_dir),
                        str(tmp_path), timeout_s=600)
    assert run.returncode == 0, f"the scenario failed:\n{run.stderr[-4000:]}"
    result = json.loads((tmp_path / "result.json").read_text())

    # The fill stopped with one line naming the shard it could not write and the cause.
    error = result["error"]
    assert error is not None, "a cache larger than the disk was filled without an error"
    assert "\n" not in error, f"the error is not one line: {error!r}"
    assert re.search(r"/shards/unit-\d{6}\.arrow: cannot write [\d,]+ bytes: no space left on device", error), error
    assert re.match(r"ProducerFailed: work unit shards/unit-\d{6}\.arrow: StoreFull: ", error), "stopped at once, not retried"

    # What the failure left: the manifest lists only shards that are whole and verify; no
    # temporary file of the failed write stayed behind.
    failed = open_store(str(tmp_path / "after-failure"))
    manifest = load_manifest(failed)
    assert not manifest.complete and 0 < len(manifest.shards) < SEQUENCES // PER_SHARD
    assert [e.name for e in manifest.shards] == result["committed_before"]
    for entry in manifest.shards:
        read_shard(failed, entry)  # raises CorruptShardError on a partial or damaged shard
    leftovers = [p.name for p in (tmp_path / "after-failure").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files of failed writes stayed behind: {leftovers}"

    # With room again the fill resumes: the committed shards are kept as they were (not
    # rewritten), only the missing units are produced, and the cache holds every token once.
    assert result["complete"] and result["rewritten"] == []
    assert result["units_produced_on_resume"] == SEQUENCES // PER_SHARD - len(manifest.shards)
    check_tiny_cache(f"file://{tmp_path / 'resumed'}", {})


if __name__ == "__main__":  # the scenario, inside the namespace the test made
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_job
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    mount_arg, model_arg, corpus_arg, out_arg = (Path(a) for a in sys.argv[1:5])
    outcome = _fill_until_full_then_resume(mount_arg, model_arg, corpus_arg, out_arg)
    (out_arg / "result.json").write_text(json.dumps(outcome))
