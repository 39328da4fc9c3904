"""A worker node lost mid-cache and mid-training on a 3-node Ray cluster of the test's own: the
scenarios are in ``lost_node_scenarios.py``, run here in a fresh Python process.

Their driver is this test process itself (``build_caches``/``run_job`` called with hooks that
kill a node at the right moment); a process that has already been the driver of another Ray
cluster (the ``ray_cluster`` fixture of an earlier module) sees the producers it creates on the
new cluster die before they start ("all references to the actor were removed ... cancelled before
it started running", Ray 2.60), so the scenarios get a process of their own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCENARIOS = Path(__file__).with_name("lost_node_scenarios.py")


@pytest.mark.timeout(1200)
def test_a_lost_node_costs_one_unit_mid_cache_and_a_checkpoint_mid_training():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(SCENARIOS)],
                         cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=1150)
    report = _without_ray_forwarding(run.stdout + run.stderr)
    print(report[-3000:])
    assert run.returncode == 0, report[-6000:]
    assert "2 passed" in report, report[-3000:]


def _without_ray_forwarding(report: str) -> str:
    """The scenarios' pytest report without the lines Ray forwards from the cluster's daemons
    (``(raylet) ...``): a dying raylet's stack trace is dozens of lines and would push the failing
    assertion out of the tail this test shows."""
    return "\n".join(line for line in report.splitlines() if "(raylet)" not in line and "(gcs_server)" not in line)
