"""Which run a job without ``run.name`` trains (``cluster.runs``): the record that names the run in
progress, on a real local directory, without Ray. The whole of it, a driver killed and the same
``saeforge train`` run again, is tests/faults/test_killed_driver.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import subprocess

import pytest
from tiny_job import tiny_overrides

from activation_cache.lease import Holder
from activation_cache.store import LocalStore
from cluster.config import compose_job
from cluster.runs import RunRecord, job_identity, start_run

KEYS = ["0123456789abcdef0123"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    overrides = [o for o in tiny_overrides(tmp / "store", tmp, tmp / "model", tmp / "corpus") if not o.startswith("run.name=")]
    return compose_job(overrides)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _rewrite_holder(root: LocalStore, key: str, **changes) -> None:
    record = RunRecord.from_json(root.get_bytes(key))
    root.put_bytes(key, dataclasses.replace(record, holder=dataclasses.replace(record.holder, **changes)).to_json())


def test_the_identity_is_the_command_without_the_run_name(job):
    named = dataclasses.replace(job, run=dataclasses.replace(job.run, name="mine"))
    other = dataclasses.replace(job, train=dataclasses.replace(job.train, lr=1e-3))
    assert job_identity(job, KEYS) == job_identity(named, KEYS)
    assert job_identity(job, KEYS) != job_identity(other, KEYS)
    assert job_identity(job, KEYS) != job_identity(job, ["another-cache-key-000"]), "the text's content counts"


def test_a_run_is_recorded_until_it_finishes(job, tmp_path):
    root = LocalStore(tmp_path)
    run = start_run(job, root, KEYS)
    record = RunRecord.from_json(root.get_bytes(run.key))
    assert record.run_name == run.name and run.name.endswith(f"-{KEYS[0][:8]}")
    assert record.holder == Holder(record.holder.owner, run.name, socket.gethostname(), record.holder.pid)
    run.finished()
    assert not root.exists(run.key), "the same command, run again, starts a new run"


def test_the_same_command_continues_a_run_whose_driver_is_gone(job, tmp_path, caplog):
    root = LocalStore(tmp_path)
    first = start_run(job, root, KEYS)
    _rewrite_holder(root, first.key, pid=_dead_pid())
    with caplog.at_level(logging.INFO, logger="cluster.runs"):
        again = start_run(job, root, KEYS)
    assert again.name == first.name
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"continuing run {first.name} (started ") and "run.name=<a new name> to start another" in line
    assert RunRecord.from_json(root.get_bytes(again.key)).holder.owner == again.owner, "taken over"


@pytest.mark.parametrize("where", ["alive", "another host"])
def test_a_run_whose_driver_may_be_alive_is_left_alone(job, tmp_path, caplog, where):
    root = LocalStore(tmp_path)
    first = start_run(job, root, KEYS)  # this process: alive
    if where == "another host":
        _rewrite_holder(root, first.key, host="some-other-node", pid=_dead_pid())
    held = root.get_bytes(first.key)
    with caplog.at_level(logging.INFO, logger="cluster.runs"):
        beside = start_run(job, root, KEYS)
    assert beside.name != first.name and beside.owner is None
    assert f"run {first.name} of the same command is in progress" in caplog.text
    beside.finished()
    assert root.get_bytes(first.key) == held, "the record stays the other driver's"


def test_finishing_the_interrupted_run_by_its_name_removes_its_record(job, tmp_path):
    root = LocalStore(tmp_path)
    first = start_run(job, root, KEYS)
    _rewrite_holder(root, first.key, pid=_dead_pid())
    resumed = dataclasses.replace(job, resume=first.name, run=dataclasses.replace(job.run, name=first.name))
    run = start_run(resumed, root, KEYS)
    assert run.name == first.name and run.key == first.key
    run.finished()
    assert not root.exists(first.key)


def test_an_unreadable_record_is_replaced_by_a_new_run(job, tmp_path):
    root = LocalStore(tmp_path)
    key = start_run(job, root, KEYS).key
    root.put_bytes(key, b"{not json")
    run = start_run(job, root, KEYS)
    assert json.loads(root.get_bytes(key))["run_name"] == run.name
