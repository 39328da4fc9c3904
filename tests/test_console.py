"""The console of a training job shows our progress, our log lines and the final figures, and none
of the third-party noise a user can do nothing about (issue 15)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_job import tiny_overrides

pytestmark = pytest.mark.integration

NOISE = (
    "PlacementGroupCleaner",  # Ray Train's cleaner polling a State API the local cluster lacks
    "State API may be temporarily unavailable",
    "Setting accelerator to CPU",  # DeepSpeed's import on a machine without a GPU
    "non-writable",  # torch wrapping a read-only NumPy array of ours
    "not writable",
    "all_gather_into_tensor",  # torch's deprecation, called by DeepSpeed's ZeRO
    "Traceback",
)


def test_the_tiny_job_console_has_our_lines_and_no_third_party_noise(tmp_path, tiny_model_dir, tiny_corpus_dir):
    env = {name: value for name, value in os.environ.items() if name not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline")  # DeepSpeed left to find the CPU itself
    overrides = tiny_overrides(str(tmp_path / "store"), tmp_path, tiny_model_dir, tiny_corpus_dir,
                               "cluster.object_store_memory_bytes=209715200", "cluster.num_cpus=2",
                               "run.checkpoint_every_steps=30")
    saeforge = Path(sys.executable).parent / "saeforge"  # the command a user runs, in this environment
    done = subprocess.run([str(saeforge), "train", *overrides], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    heard = [line for line in console.splitlines() if any(noise in line for noise in NOISE)]
    assert not heard, "\n".join(heard)
    for ours in (r"caching: 100%", r"step (\d+)/\1 +loss", r"checkpoint at step 30", r"held-out FVU +0\.\d+",
                 r"CE recovered +-?\d", r"dictionary +file://", r"wall time +\d+ s"):
        assert re.search(ours, console), f"{ours!r} missing from the console:\n{console[-4000:]}"
