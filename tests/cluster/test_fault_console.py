"""What ``saeforge train`` prints when a fault hits (issue 23): one line per event, saying what was
lost and what the job does, and later what it cost; Ray's dumps and tracebacks, Ray Train's account
of the failure and third-party chatter go to the job's log (``<logging.dir>/<run>/saeforge.log``),
never to the console.

The faulted run: a worker node of a 3-node Ray cluster on this machine (``ray_head.started_ray_cluster``:
a head without CPUs, where the job's driver connects, and two worker nodes of 2 CPUs) killed the
way a machine dies, SIGKILL to every process it started, while a trainer worker runs on it.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import ray.exceptions
from ray_head import ray_environment, started_ray_cluster
from tiny_job import tiny_overrides

from cluster.logs import JOB_LOG_FILE, job_logging, keep_job_log_in
from cluster.train import failure_cause
from trainer.layout import CHECKPOINTS_DIR, COMPLETE_FILE, TRAINING_TIMES_FILE
from trainer.loggers import NullLogger, make_logger

FAULT_NOISE = (
    "[state-dump]",  # a dead raylet's last log lines, which its agent pushes to every driver
    "Raylet is terminated",
    "has been marked dead",  # the GCS's notice of a lost node, in Ray's words
    "Error Snippet",  # Ray Train's account of each rank's failure, twice
    "FailurePolicy",
    "WorkerGroupError",
    "Traceback",
    "Failed to remove",  # the GCS removing a placement group's bundles from the dead node
    "PreemptionWatcher",  # Ray core's warning at each worker group's start
    "core_worker.cc",
    "git root",  # wandb's
    "wandb:",
    "Setting accelerator to CPU",  # DeepSpeed's import
    "Connecting to existing Ray cluster",
)
"""Third-party output the console of a faulted run must not show."""


def test_the_driver_prints_its_workers_lines_and_logs_ray_s_notices(tmp_path, capfd):
    """Ray's printing on the driver, fed what a cluster sends it (a trainer worker's lines, the
    GCS's notice of a dead node with a raylet's dump): our lines reach the console, with one line
    of ours for the lost node; the rest is in the job's log. The process's logging is as it was
    after the job."""
    from ray._private import worker

    root, print_worker_logs = logging.getLogger(), worker.print_worker_logs
    before = (list(root.handlers), root.level, list(logging.getLogger("ray").handlers))
    ours = "2026-12-06 17:22:35,415 INFO trainer.loop: step 10/76  loss 0.4665  fvu 0.5019"
    theirs = [f"wandb: WARNING git root {tmp_path} does not exist", "Traceback (most recent call last):"]
    notice = ("The node with node id: 5b5e299532167ded9a5d93402f14fe10b295b9dab851f7d09a444874 and address: 127.0.0.1 "
              "and node name: 127.0.0.1 has been marked dead because the detector has missed too many heartbeats "
              "from it. This can happen when a \t(1) raylet crashes unexpectedly (OOM, etc.)\n    [state-dump] NodeManager:")
    with job_logging("INFO"):
        assert keep_job_log_in(tmp_path) == tmp_path / JOB_LOG_FILE
        worker.print_to_stdstream({"lines": [ours, *theirs], "pid": 4242, "ip": "127.0.0.1", "localhost": "127.0.0.1",
                                   "actor_name": "RayTrainWorker", "is_err": True}, ignore_prefix=False)
        worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    captured = capfd.readouterr()
    console = captured.out + captured.err
    assert ours in console
    assert re.search(r"WARNING cluster\.logs: Ray node 127\.0\.0\.1 \(node id 5b5e2995\) lost: marked dead because "
                     r"the detector has missed too many heartbeats from it$", console, re.M), console
    heard = [noise for noise in FAULT_NOISE if noise in console]
    assert not heard, console
    logged = (tmp_path / JOB_LOG_FILE).read_text()
    for line in [*theirs, "[state-dump] NodeManager:", "Ray node 127.0.0.1 (node id 5b5e2995) lost"]:
        assert line in logged, f"{line!r} not in the job's log:\n{logged}"
    assert (list(root.handlers), root.level, list(logging.getLogger("ray").handlers)) == before
    assert worker.print_worker_logs is print_worker_logs


def test_a_failure_s_cause_is_one_line_naming_the_lost_ranks_first():
    """The cause in the fault line: the ranks lost, grouped, and what the others raised after
    the loss by its type alone (a gloo error's text runs to several hundred characters)."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    lost = WorkerHealthCheckFailedError("A worker health check failed.",
                                        ray.exceptions.ActorUnavailableError("The actor is unavailable", None))
    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:21920. " + "x" * 400)
    assert failure_cause({1: lost, 0: lost}) == "ranks 0, 1: process or node lost, ActorUnavailableError"
    assert failure_cause({0: lost, 1: gloo}) == ("rank 0: process or node lost, ActorUnavailableError; "
                                                 "rank 1: RuntimeError, after the loss")
    assert failure_cause({1: ValueError("shard p0-3: bad\nsecond line")}) == "rank 1: ValueError: shard p0-3: bad"


def test_wandb_disabled_starts_no_run(tmp_path):
    """``logging.wandb_mode=disabled``: no wandb run at all (which would still look for a git
    repository, and print about it)."""
    assert isinstance(make_logger(rank=0, wandb_mode="disabled", dir=str(tmp_path / "wandb")), NullLogger)
    assert not (tmp_path / "wandb").exists()


# --------------------------------------------------------------------------- the faulted run


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_node_lost_mid_training_shows_one_line_per_event(tmp_path, tiny_model_dir, tiny_corpus_dir):
    """The node of a trainer worker killed after the first checkpoint. The console says, each in
    one line of ours: the worker group failed (the ranks lost) and restarts from checkpoint step N
    (attempt 2 of 3); the node was lost; the new group resumed at step N after X s; and none of
    ``FAULT_NOISE``. The job's log has Ray's and Ray Train's account; ``training-times.json`` the
    restart: when it failed, the step resumed from and the seconds it cost."""
    overrides = tiny_overrides(
        str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir, "eval=off", "train.epochs=25",
        "run.checkpoint_every_steps=40", "train.log_every_steps=40", "train.histogram_every_steps=0",
        "cluster=existing", "cluster.producer_num_cpus=2", "cluster.train_max_failures=2")
    run = tmp_path / "store" / "runs" / "tiny"
    with started_ray_cluster(worker_nodes=2, worker_cpus=2) as cluster, ExitStack() as stack:
        env = ray_environment({"WANDB_MODE": "offline"})
        del env["DS_ACCELERATOR"]  # DeepSpeed left to find the CPU itself, as on a user's machine
        console_path = tmp_path / "console.txt"
        with console_path.open("w") as console_file:
            job = subprocess.Popen([str(Path(sys.executable).parent / "saeforge"), "train", *overrides,
                                    f"cluster.address={cluster.head.gcs_address}"], cwd=tmp_path, env=env,
                                   stdout=console_file, stderr=subprocess.STDOUT)
        stack.callback(lambda: job.poll() is None and job.kill())
        deadline = time.monotonic() + 400
        while not list((run / CHECKPOINTS_DIR).glob(f"*/{COMPLETE_FILE}")):
            assert job.poll() is None and time.monotonic() < deadline, console_path.read_text()[-4000:]
            time.sleep(0.05)
        victims = cluster.nodes_running(b"ray::RayTrainWorker")
        assert victims, "a trainer worker runs on a worker node"
        cluster.kill_node(victims[0])
        assert job.wait(timeout=420) == 0, console_path.read_text()[-4000:]
    console = console_path.read_text()

    heard = [line for line in console.splitlines() if any(noise in line for noise in FAULT_NOISE)]
    assert not heard, "\n".join(heard)
    failed = re.search(r"cluster\.train: tiny: trainer worker group failed \((ranks? [\d, ]+: [^)]*)\): restarting "
                       r"from checkpoint step (\d+) \(attempt 2 of 3\)$", console, re.M)
    assert failed, console[-4000:]
    step = int(failed[2])
    assert step >= 40
    # The address is the node's as the GCS knows it (the machine's, though the node listens on 127.0.0.1)
    assert re.search(r"cluster\.logs: Ray node \S+ \(node id [0-9a-f]{8}\) lost: marked dead", console), console
    assert re.search(rf"cluster\.train: tiny: trainer worker group resumed at step {step} after \d+\.\d s "
                     r"\(attempt 2 of 3\)$", console, re.M), console[-4000:]
    assert len(re.findall("cluster.train: tiny: trainer worker group (failed|resumed)", console)) == 2, \
        "one line per event"
    assert re.search(r"^tokens trained +\d", console, re.M), console[-4000:]
    # The closing summary counts the fault and its cost: the seconds until the new group stepped
    summary = re.search(r"^faults survived +1, costing (\d+\.\d) s:\n +training +(\d+\.\d) s +tiny: trainer worker group "
                        rf"failed \(ranks? [\d, ]+: [^)]*\): resumed from checkpoint step {step} \(attempt 2\)$",
                        console, re.M)
    assert summary and summary[1] == summary[2], console[-3000:]

    logged = (tmp_path / "outputs" / "tiny" / JOB_LOG_FILE).read_text()
    assert "Error Snippet" in logged and "has been marked dead" in logged, "Ray's account is in the job's log"
    assert "git root" not in logged, "wandb found the run's folder"

    [restart] = json.loads((run / TRAINING_TIMES_FILE).read_text())["restarts"]
    assert restart.keys() == {"failed_at", "cause", "attempt", "checkpoint_step", "resumed_from_step", "resumed_at",
                              "seconds"}
    assert (restart["attempt"], restart["checkpoint_step"], restart["resumed_from_step"]) == (2, step, step)
    assert restart["cause"] == failed[1]
    assert 0 < restart["seconds"] == pytest.approx(restart["resumed_at"] - restart["failed_at"])
    assert f"{restart['seconds']:.1f}" == summary[1]
