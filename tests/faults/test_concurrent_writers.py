"""Two jobs writing the same cache key at once: one cache, no duplicates.

The writer lease (``activation_cache.lease``) on a real local directory and a real S3 endpoint,
then two ``saeforge train`` processes started together on the same inputs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny_job import SEQUENCES, tiny_overrides

from activation_cache.lease import LEASE_KEY, Holder, LeaseClaim, LeaseLost
from activation_cache.manifest import load_manifest
from activation_cache.reader import read_shard
from activation_cache.store import LocalStore, open_store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "cache")
    return open_store(request.getfixturevalue("s3_bucket_uri") + "/cache")


def test_a_conditional_put_lets_exactly_one_writer_through(store):
    first = store.put_if("k", b"one", version=None)
    assert first is not None
    assert store.put_if("k", b"two", version=None) is None, "only if absent: the key exists"
    assert store.put_if("k", b"two", version="not-the-version") is None
    assert store.get_bytes("k") == b"one"
    second = store.put_if("k", b"two", version=first)
    assert second is not None and second != first
    assert store.put_if("k", b"three", version=first) is None, "a stale version must lose"
    assert store.get_versioned("k") == (b"two", second)


def test_of_two_jobs_one_holds_the_lease_until_it_lets_go(store):
    a = LeaseClaim(store, job="a", ttl_s=60).try_acquire()
    b_claim = LeaseClaim(store, job="b", ttl_s=60)
    assert a is not None
    assert b_claim.try_acquire() is None
    assert b_claim.holder is not None and b_claim.holder.job == "a" and b_claim.holder.pid == os.getpid()
    assert a.renew() and a.holder.beat == 1
    assert b_claim.try_acquire() is None, "a renewed lease is not abandoned"
    a.release()
    assert not store.exists(LEASE_KEY)
    b = b_claim.try_acquire()
    assert b is not None
    b.check()
    b.release()


def test_a_lease_not_renewed_for_its_ttl_is_taken_over_and_its_holder_stops(store):
    a = LeaseClaim(store, job="a", ttl_s=60, renew_every_s=3600).try_acquire()
    # The holder's host is another machine as far as the taker can tell: only the ttl counts.
    data, version = store.get_versioned(LEASE_KEY)
    elsewhere = Holder(**{**json.loads(data), "host": "some-other-node"})
    a._version = store.put_if(LEASE_KEY, elsewhere.to_json(), version=version)
    taker = LeaseClaim(store, job="b", ttl_s=1.5)
    assert taker.try_acquire() is None, "first sighting: the ttl starts now"
    time.sleep(0.5)
    assert taker.try_acquire() is None
    time.sleep(1.2)
    b = taker.try_acquire()
    assert b is not None and b.holder.job == "b"
    assert not a.renew(), "the old holder's heartbeat must find the lease gone"
    with pytest.raises(LeaseLost, match=r"taken over by job 'b' \(pid \d+ on "):
        a.check()
    a.release()
    assert Holder.from_json(store.get_bytes(LEASE_KEY)).owner == b.holder.owner, "the loser must not delete it"
    b.release()


def _hold_lease(cache_dir: Path, job: str) -> subprocess.Popen:
    """A process that takes the cache's lease as job ``job`` and keeps it until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from activation_cache.lease import LeaseClaim
            from activation_cache.store import LocalStore
            lease = LeaseClaim(LocalStore({str(cache_dir)!r}), job={job!r}, ttl_s=3600).try_acquire()
            print("held" if lease else "refused", flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_lease_of_a_killed_job_on_this_host_is_taken_over_at_once(tmp_path):
    holder = _hold_lease(tmp_path / "cache", "doomed")
    try:
        claim = LeaseClaim(LocalStore(tmp_path / "cache"), job="next", ttl_s=3600)
        assert claim.try_acquire() is None, "a live holder keeps its lease"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        lease = claim.try_acquire()
        assert lease is not None, "a dead process on this host holds nothing"
        lease.release()
    finally:
        holder.kill()


def _train(tmp_path: Path, name: str, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "train", *overrides, f"run.name={name}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def _wait_for_logs(paths: list[Path], text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(text in p.read_text() for p in paths):
        assert time.monotonic() < deadline, f"{text!r} not in every log of {paths} after {timeout_s} s"
        time.sleep(0.5)


def test_two_jobs_on_one_cache_key_build_one_cache_without_duplicates(tmp_path, tiny_model_dir, tiny_corpus_dir):
    """Both jobs find the cache held by a third that then dies: they race for its lease, one fills
    the cache, the other waits for it, both train on it."""
    store_root = tmp_path / "store"
    overrides = tiny_overrides(
        store_root, tmp_path, tiny_model_dir, tiny_corpus_dir,
        "cluster.num_cpus=2", "cluster.num_producers=1", "cluster.num_train_workers=1",
        "cluster.object_store_memory_bytes=104857600", "train.epochs=1", "eval=off",
        "logging.wandb_mode=disabled", "cache.lease_ttl_s=8",
    )
    # The cache key comes from the job's inputs: ask the job itself where its cache lives.
    from cluster.config import compose_job
    from cluster.driver import expected_shards, plan_caches

    job_cfg = compose_job(overrides)
    plan = plan_caches(job_cfg, LocalStore(store_root))[0]
    cache_dir = Path(plan.uri.removeprefix("file://"))
    holder = _hold_lease(cache_dir, "doomed")
    try:
        jobs = {name: _train(tmp_path, name, overrides) for name in ("first", "second")}
        _wait_for_logs([tmp_path / f"{n}.log" for n in jobs], "is being filled by job 'doomed'", timeout_s=240)
        os.kill(holder.pid, signal.SIGKILL)
        for process in jobs.values():
            process.wait(timeout=600)
    finally:
        holder.kill()
        for process in locals().get("jobs", {}).values():
            process.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in jobs}
    for name, process in jobs.items():
        assert process.returncode == 0, f"job {name} failed:\n{logs[name][-3000:]}"

    store = LocalStore(cache_dir)
    manifest = load_manifest(store)
    assert [p.name for p in (store_root / "caches").iterdir()] == [cache_dir.name]
    assert manifest.complete and not store.exists(LEASE_KEY)
    assert sorted(store.list("shards/")) == [s.name for s in manifest.shards]
    positions = []
    for entry in manifest.shards:
        shard = read_shard(store, entry)  # checksums: what is listed is what was written
        positions += list(zip(shard.sequence_ids.tolist(), shard.positions.tolist(), strict=True))
    assert len(positions) == len(set(positions)) == manifest.rows
    assert {s for s, _ in positions} == set(range(SEQUENCES))
    assert {s.name: s.rows for s in manifest.shards} == expected_shards(job_cfg, plan)
    # Exactly one job won the lease and filled the cache; the other then waited for the winner.
    fillers = [name for name, text in logs.items() if _filled(text)]
    assert len(fillers) == 1, {n: _filled(t) for n, t in logs.items()}
    loser = ({"first", "second"} - set(fillers)).pop()
    assert f"being filled by job {fillers[0]!r} (pid {jobs[fillers[0]].pid} on {socket.gethostname()})" in logs[loser]
    for name in jobs:
        assert (store_root / "runs" / name / "dictionary").is_dir()


def _filled(log: str) -> bool:
    """Whether the job's log shows producers committing shards."""
    return re.search(r"cache: \d+ of \d+ units, \d+ rows cached", log) is not None
