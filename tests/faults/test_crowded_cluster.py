"""A trainer worker group that finds no room on the cluster (its CPUs held by another job's
placement group, or gone with a lost node) does not wait for ever inside Ray Train: it says so
once per try, and after ``cluster.placement_timeout_s`` the job stops with one line naming what
the group needed and what the cluster had, with nothing committed lost."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from tiny_job import check_tiny_cache, tiny_job

from activation_cache.store import open_store
from cluster.driver import absolute_uri, build_caches, plan_caches, run_job
from cluster.errors import JobFailed

pytestmark = pytest.mark.integration

TIMEOUT_S = 6


def _lines_in_ray_logs(session_dir: str, text: str, *, wait_s: float = 15) -> list[str]:
    """The lines of the cluster's logs (every worker's stdout and stderr) holding ``text``, once
    at least one does or ``wait_s`` has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [line for path in Path(session_dir, "logs").rglob("*") if path.is_file()
                 for line in path.read_text(errors="replace").splitlines() if text in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_a_worker_group_with_no_room_stops_the_job_naming_what_it_needed(
        ray_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    options = ("eval=off", "logging.wandb_mode=disabled", f"cluster.placement_timeout_s={TIMEOUT_S}")
    job = tiny_job(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir, *options)
    [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
    build_caches(job, [plan])  # the cache first: training is all the job has left to start

    held = placement_group([{"CPU": 2}])  # the local cluster's 2 CPUs, as another job would hold them
    ray.get(held.ready())
    try:
        started = time.monotonic()
        with pytest.raises(JobFailed) as failed:
            run_job(job)
        took = time.monotonic() - started
    finally:
        remove_placement_group(held)

    message = str(failed.value)
    assert "\n" not in message, message
    assert (f"training tiny failed: no room on the cluster for the trainer worker group (2 workers x 1 CPU) "
            f"in {TIMEOUT_S} s (cluster.placement_timeout_s={TIMEOUT_S}); the cluster has 0 of 2 CPUs free now"
            ) in message, message
    # The tries (2 of 3 s) and the job's own start and shut-down; not Ray Train's default of for ever.
    assert took < TIMEOUT_S + 60, f"the job stopped {took:.0f} s after it started"
    waits = _lines_in_ray_logs(ray_cluster, "no room on the cluster for the trainer worker group")
    assert any(f"after 3 s; waiting on (3 of {TIMEOUT_S} s, cluster.placement_timeout_s)" in line for line in waits), waits
    check_tiny_cache(plan.uri, {})  # what was committed is intact
