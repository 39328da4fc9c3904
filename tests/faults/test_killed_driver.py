"""The driver of ``saeforge train`` killed with SIGKILL, then the same command run again (issue 23).

Each job is the venv's ``saeforge train`` as a user runs it: the tiny job's overrides without
``run.name``, a local Ray cluster of the job's own (the default), one producer filling one unit at a
time (so the kill lands between commits). What is proven, for a driver killed

- mid-cache, once 4 of the 12 shards are committed: within seconds every process of the job that
  runs its code is gone (the driver, the GCS, the raylet, the producer, the trainer workers; Ray's
  two node agents and a worker still starting up, which never ran a task, wait about a minute for
  the dead GCS, and are gone by the end) and nothing more is committed; the same command run again
  continues the same run (one log line says so), takes the writer lease over at once (its holder,
  the killed driver on this host, is gone: no wait for ``cache.lease_ttl_s``), produces only the
  uncommitted units (the committed shards are neither rewritten nor re-listed), the cache holds every
  row exactly once, and the dictionary equals, bit for bit, that of an uninterrupted run on the
  same cache (``run.name=reference``);
- mid-training, once a complete checkpoint exists: the same, and the run again resumes from the
  newest complete checkpoint and ends with the uninterrupted run's weights, bit for bit.

Run after the first, the second scenario also shows that the same command, once its run has
finished, starts a new run rather than continuing the finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from ray_head import ray_environment
from tiny_job import PER_SHARD, SEQUENCES, assert_same_weights, check_tiny_cache, tiny_overrides

from activation_cache.lease import LEASE_KEY
from activation_cache.manifest import load_manifest
from activation_cache.store import LocalStore
from trainer.checkpoint import newest_complete_checkpoint
from trainer.layout import (
    CHECKPOINTS_DIR,
    CHECKSUMS_FILE,
    COMPLETE_FILE,
    RUNS_IN_PROGRESS_DIR,
    read_eval,
)

pytestmark = pytest.mark.integration

SAEFORGE = Path(sys.executable).parent / "saeforge"  # the command a user runs, in this venv
HOOKPOINT = "model.layers.2"
UNITS = SEQUENCES // PER_SHARD
KILL_AT_SHARDS = 4
LINGERING = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
"""Ray's node agents notice their raylet is gone within seconds, then try to tell the dead GCS
(about a minute of retries) before they exit; they run none of the job's code."""
QUICK_DEATH_S = 20.0
ALL_GONE_S = 150.0


@dataclass(frozen=True)
class Setup:
    """The job's command and where it writes."""

    cwd: Path
    store: Path
    overrides: list[str]
    ray_tmpdir: str
    jobs: list[subprocess.Popen] = field(default_factory=list)
    """Every driver started, killed at the end if a failed test left it running."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tiny_corpus_dir):
    """The tiny job's command without ``run.name``, and a Ray temp dir of the module's own."""
    cwd = tmp_path_factory.mktemp("killed-driver")
    overrides = [o for o in tiny_overrides(cwd / "store", cwd, tiny_model_dir, tiny_corpus_dir) if not o.startswith("run.name=")]
    overrides += ["cluster.num_producers=1", "cluster.units_per_producer=1", "cluster.object_store_memory_bytes=104857600",
                  "eval=off", "logging.wandb_mode=disabled", "train.histogram_every_steps=0",
                  # 800 steps, about 10 s: the trainer workers outlive their driver by a second or two
                  # (they notice the raylet is gone), and the kill must still land mid-training.
                  "train.epochs=40", "run.checkpoint_every_steps=50", "train.log_every_steps=100"]
    # Ray's unix sockets live under its temp dir and their paths must stay under 108 bytes.
    ray_tmpdir = tempfile.mkdtemp(prefix="sf-kd-", dir="/tmp")
    setup = Setup(cwd, cwd / "store", overrides, ray_tmpdir)
    yield setup
    for process in setup.jobs:
        process.kill()
        process.wait(timeout=30)
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


@dataclass
class Job:
    """One ``saeforge train`` process, its console in ``log``, its processes marked by ``marker``."""

    process: subprocess.Popen
    log: Path
    marker: str
    started: float

    def console(self) -> str:
        return self.log.read_text()

    def finish(self, timeout_s: float = 600) -> str:
        assert self.process.wait(timeout=timeout_s) == 0, self.console()[-4000:]
        return self.console()


def _start(setup: Setup, name: str, *extra: str) -> Job:
    """``saeforge train`` with the job's overrides; every process it starts inherits ``SAEFORGE_TEST_JOB``."""
    marker = f"{name}-{uuid.uuid4().hex[:8]}"
    env = ray_environment({"RAY_TMPDIR": setup.ray_tmpdir, "WANDB_MODE": "offline", "SAEFORGE_TEST_JOB": marker})
    log = setup.cwd / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(SAEFORGE), "train", *setup.overrides, *extra], cwd=setup.cwd, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    setup.jobs.append(process)
    return Job(process, log, marker, time.time())


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """The dictionary of a run never interrupted, on the same cache (built here if no test built it)."""
    _start(setup, "reference", "run.name=reference").finish()
    return setup.store / "runs" / "reference" / "dictionary" / HOOKPOINT


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SAEFORGE_TEST_JOB") == marker:
                found.append(process)
        except (psutil.Error, OSError):  # another user's, or gone
            continue
    return found


@dataclass
class Killed:
    """A job whose driver was killed: its processes when it was, and when."""

    processes: list[psutil.Process]
    marker: str
    at: float

    def alive(self) -> list[psutil.Process]:
        """Its processes still running (any started after the kill carry its marker)."""
        known = {p.pid for p in self.processes}
        return [p for p in [*self.processes, *(q for q in _marked(self.marker) if q.pid not in known)] if _running(p)]

    def wait_until_gone(self, *, within_s: float, but=lambda p: False) -> float:
        """Seconds from the kill until every process not excused by ``but`` is gone."""
        while left := [p for p in self.alive() if not but(p)]:
            assert time.monotonic() - self.at < within_s, "still running after the driver's death:\n" + "\n".join(
                _describe(p) for p in left)
            time.sleep(0.25)
        return time.monotonic() - self.at


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_driver(job: Job) -> Killed:
    """SIGKILL the driver alone, as the OOM killer or a lost terminal would."""
    driver = psutil.Process(job.process.pid)
    processes = [driver, *driver.children(recursive=True)]
    os.kill(job.process.pid, signal.SIGKILL)
    at = time.monotonic()
    job.process.wait(timeout=30)
    return Killed(processes, job.marker, at)


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:120]}"
    except psutil.Error:
        return f"{process.pid} (gone)"


def _runs_no_code(process: psutil.Process) -> bool:
    """Ray's node agents, or a worker process that never connected (Ray retitles it ``ray::...``
    when it does): neither can run a task of the job's."""
    try:
        cmdline = " ".join(process.cmdline())
    except psutil.Error:
        return True
    return cmdline.startswith(LINGERING) or "default_worker.py" in cmdline


def _cache_dir(store: Path, job: Job) -> Path:
    """The cache the job fills, once its first shard is committed."""
    while not (found := list((store / "caches").glob("*/manifest.json"))):
        assert job.process.poll() is None, job.console()[-4000:]
        time.sleep(0.05)
    return found[0].parent


def _log_time(console: str, text: str) -> float:
    """The time of the first log line holding ``text`` (``configure_logging``'s asctime)."""
    match = re.search(rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{{3}}) .*{re.escape(text)}", console, re.M)
    assert match, f"{text!r} not logged:\n{console[-4000:]}"
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000


def _the_run_in_progress(store: Path) -> str:
    """The run the record in the store names (one command, one record)."""
    [record] = (store / RUNS_IN_PROGRESS_DIR).glob("*.json")
    return json.loads(record.read_text())["run_name"]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """{path: (inode, size)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def _files(folder: Path) -> dict[str, tuple[int, str]]:
    """{name: (inode, sha256)} of the files in ``folder``: a rewrite (an atomic rename) changes the inode."""
    return {p.name: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest()) for p in folder.iterdir()}


def test_the_driver_killed_mid_cache_then_the_same_command_produces_only_the_uncommitted_units(setup, request):
    job = _start(setup, "cache-killed")
    cache = _cache_dir(setup.store, job)
    while len((manifest := load_manifest(LocalStore(cache))).shards) < KILL_AT_SHARDS:
        assert job.process.poll() is None, job.console()[-4000:]
        time.sleep(0.02)
    assert not manifest.complete, "the kill must land mid-cache"
    killed = _kill_driver(job)
    quick = killed.wait_until_gone(within_s=QUICK_DEATH_S, but=_runs_no_code)
    committed = load_manifest(LocalStore(cache))
    assert KILL_AT_SHARDS <= len(committed.shards) < UNITS and not committed.complete
    before, written = _files(cache / "shards"), _tree(cache)
    time.sleep(2)
    assert _tree(cache) == written, "nothing is written once the job's code is gone"
    assert (cache / LEASE_KEY).is_file(), "the killed driver's writer lease stays until it is taken over"
    run_name = _the_run_in_progress(setup.store)

    again = _start(setup, "cache-again")
    console = again.finish()
    assert f"continuing run {run_name} (started " in console, console[-4000:]
    assert f"{len(committed.shards)} shards already committed" in console
    # The lease's holder, the killed driver on this host, is gone: taken over on first sight.
    takeover_s = _log_time(console, "taking over the writer lease") - _log_time(console, "is being filled by job")
    assert takeover_s < 2, f"the lease was taken over {takeover_s:.1f} s after it was first seen, not at once"
    after = _files(cache / "shards")
    committed_names = {entry.name.removeprefix("shards/") for entry in committed.shards}
    assert {name: after[name] for name in committed_names} == {name: before[name] for name in committed_names}, \
        "a committed shard was rewritten"
    produced = {name for name in after if after[name] != before.get(name)}
    assert produced == set(after) - committed_names and len(produced) == UNITS - len(committed.shards)
    final = load_manifest(LocalStore(cache))
    assert [e for e in final.shards if e.name in {c.name for c in committed.shards}] == committed.shards
    check_tiny_cache(str(cache), {})
    assert not (cache / LEASE_KEY).exists() and not list((setup.store / RUNS_IN_PROGRESS_DIR).glob("*.json"))
    assert [p.name for p in (setup.store / "runs").iterdir()] == [run_name]

    reference = request.getfixturevalue("reference")  # trains on the cache completed above
    assert_same_weights(str(setup.store / "runs" / run_name / "dictionary" / HOOKPOINT), str(reference))
    all_gone = killed.wait_until_gone(within_s=ALL_GONE_S)
    print(f"\nmid-cache: killed at {len(committed.shards)} of {UNITS} shards committed; the job's code gone after "
          f"{quick:.1f} s, every process by {all_gone:.0f} s (checked then); lease taken over {takeover_s:.2f} s after first sight, "
          f"{_log_time(console, 'taking over the writer lease') - again.started:.1f} s after the rerun started; "
          f"{len(produced)} units produced on the rerun")


def test_the_driver_killed_mid_training_then_the_same_command_resumes_bit_identical(setup, reference):
    runs_before = {p.name for p in (setup.store / "runs").iterdir()}
    job = _start(setup, "training-killed")
    deadline = time.monotonic() + 600
    while not (checkpoints := [p for p in (setup.store / "runs").glob(f"*/{CHECKPOINTS_DIR}/*/{COMPLETE_FILE}")
                               if p.parents[2].name not in runs_before]):
        assert time.monotonic() < deadline and job.process.poll() is None, job.console()[-4000:]
        time.sleep(0.05)
    killed = _kill_driver(job)
    run, seen = checkpoints[0].parents[2], int(checkpoints[0].parent.name.removeprefix("step-"))
    assert run.name == _the_run_in_progress(setup.store), "a new run (the same command's last one finished)"
    quick = killed.wait_until_gone(within_s=QUICK_DEATH_S, but=_runs_no_code)
    assert not (run / "dictionary" / HOOKPOINT / CHECKSUMS_FILE).exists(), "the kill must land mid-training"
    written = _tree(run)
    time.sleep(2)
    assert _tree(run) == written, "nothing is written once the job's code is gone"
    store = LocalStore(run)
    newest = newest_complete_checkpoint(store.list(f"{CHECKPOINTS_DIR}/"), store.get_bytes)
    assert newest is not None and newest.step > 0

    again = _start(setup, "training-again")
    console = again.finish()
    assert f"continuing run {run.name} (started " in console, console[-4000:]
    assert re.search(r"cache \S+ is complete \(\d+ rows\): reusing it", console), "the cache is reused"
    evaluation = read_eval(LocalStore(run / "dictionary" / HOOKPOINT))
    straight = read_eval(LocalStore(reference))
    assert evaluation["resumed_from_step"] == newest.step
    assert evaluation["train_steps"] == straight["train_steps"] > newest.step
    assert_same_weights(str(run / "dictionary" / HOOKPOINT), str(reference))
    assert not list((setup.store / RUNS_IN_PROGRESS_DIR).glob("*.json"))
    all_gone = killed.wait_until_gone(within_s=ALL_GONE_S)
    print(f"\nmid-training: killed once the checkpoint at step {seen} was complete, the workers' last at step "
          f"{newest.step} of {straight['train_steps']}; the "
          f"job's code gone after {quick:.1f} s, every process by {all_gone:.0f} s (checked then); resumed from step {evaluation['resumed_from_step']}")
