"""trainer.memory: a trainer process faults its large tensors in by huge pages, and every worker
process of a job asks for them before torch allocates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.memory import HUGE_PAGES_VARIABLE, kernel_allows_huge_pages

ROOT = Path(__file__).resolve().parents[2]

# Allocate and fill a 256 MB tensor and free it, twice: what a step does with its gradients; the
# minor page faults of the second time.
_PROBE = """
import json, resource
from trainer.memory import huge_page_allocations
asked = huge_page_allocations()
import torch
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()
print(json.dumps({"asked": asked, "faults": faults_of_one_step()}))
"""


def _probe(value: str) -> dict:
    env = {**os.environ, HUGE_PAGES_VARIABLE: value, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                          timeout=120, env=env, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not kernel_allows_huge_pages(), reason="the kernel's transparent huge pages are off")
def test_large_tensors_fault_in_by_huge_pages() -> None:
    plain, huge = _probe("0"), _probe("1")
    assert plain["asked"] is False and huge["asked"] is True  # the environment's own value wins
    # 256 MB in 4 KiB pages is 65,536 faults; in 2 MiB pages, 128.
    assert plain["faults"] > 30_000, plain
    assert huge["faults"] < plain["faults"] / 20, (plain, huge)


def test_every_worker_process_of_a_job_asks_before_torch_is_imported() -> None:
    probe = ("import os, sys; from cluster import logs; logs.setup_worker_process(); "
             f"print(os.environ['{HUGE_PAGES_VARIABLE}'], 'torch' in sys.modules)")
    env = {key: value for key, value in os.environ.items() if key != HUGE_PAGES_VARIABLE}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120,
                          env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.stdout.split() == ["1", "False"]
    from cluster.logs import WORKER_SETUP_HOOK

    assert WORKER_SETUP_HOOK == "cluster.logs.setup_worker_process"
