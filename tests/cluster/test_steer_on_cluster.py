"""``saeforge steer --address``: the steer runs as one Ray task on an existing cluster (a head
started with ``ray start``) and gives what it gives here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray_head import ray_environment, started_ray_head

from interp.observe import open_observer
from interp.steering import FeatureEdit, GenerationSettings, Steerer

pytestmark = pytest.mark.integration

PROMPT = "To be, or not to be, that is the question"


def test_steer_runs_as_a_ray_task_on_the_cluster_and_matches_a_local_steer(tiny_dictionaries, tmp_path):
    with_stats, _ = tiny_dictionaries
    written = tmp_path / "remote.json"
    saeforge = Path(sys.executable).parent / "saeforge"
    with started_ray_head(dashboard=True) as head:
        run = subprocess.run([str(saeforge), "steer", str(with_stats), "--feature", "3", "--value", "4", "--prompt", PROMPT,
                              "--max-new-tokens", "8", "--json", str(written), "--address", head.gcs_address],
                             env=ray_environment(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        ray.init(address=head.gcs_address)
        try:
            from ray.util.state import list_tasks

            tasks = list_tasks(address=head.dashboard_url, filters=[("name", "=", "run_steer")], raise_on_missing_output=False)
        finally:
            ray.shutdown()
    assert [t.state for t in tasks] == ["FINISHED"], tasks
    local = Steerer(open_observer(str(with_stats))).steer(PROMPT, FeatureEdit((3,), (4.0,)), GenerationSettings(max_new_tokens=8))
    [remote] = json.loads(written.read_text())["continuations"]
    assert remote["steered_ids"] == local.continuations[0].steered_ids
    assert remote["unedited_ids"] == local.continuations[0].unedited_ids
    assert "| steered" in run.stdout
