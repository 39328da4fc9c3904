"""benchmarks/gpu_check.sh, the pure-torch check for a lent GPU, runs (on the CPU, tiny sizes): a
session that is lent a device has minutes of it, none to spend finding the script broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_reports_agreeing_kernels(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--small"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = [row for row in report["steps"] if "error" not in row]
    assert {(row["n_latents"], row["kernel"]) for row in steps} >= {(n, k) for n in (1024, 2048) for k in ("sparse", "dense")}
    assert all(row["ms"] > 0 for row in steps)
    # The sparse kernels train as their dense twins: the same loss after the same 5 steps.
    assert len(report["agreement"]) == 4
    for row in report["agreement"]:
        assert row["rel_diff"] < (1e-3 if row["gemm"] == "bf16" else 1e-5), row
    assert report["gemm"] and report["producer"] is not None
