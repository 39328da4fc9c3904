"""What the benchmarks that run the packaged model share: timing, the CPU they ran on, progress,
and a dictionary folder written without training (a TopK dictionary's encode and decode time does
not depend on its weights' values)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from activation_cache.store import LocalStore
from trainer.activation_stats import (
    ActivationStats,
    FeatureStats,
    activation_stats_file,
    feature_stats_file,
)
from trainer.dictionary import dictionary_files
from trainer.layout import ACTIVATION_STATS_FILE, FEATURE_STATS_FILE, write_dictionary
from trainer.sae import TopKSAE

__all__ = ["cpu_description", "median_ratio", "progress", "timed", "write_untrained_dictionary"]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_ratio(over: list[float], under: list[float]) -> float:
    """The median of each round's ``over / under``: a slow round slows both sides alike."""
    return statistics.median(a / b for a, b in zip(over, under, strict=True))


def cpu_description() -> str:
    """lscpu's model name and the matrix / bf16 extensions among its flags."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "CPU unknown (no lscpu)"
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    present = [flag for flag in wanted if flag in flags]
    absent = [flag for flag in wanted if flag not in flags]
    return (f"{fields.get('Model name', 'unknown CPU')}, {fields.get('CPU(s)', '?')} CPUs; flags: "
            f"{', '.join(present) or 'none'} present" + (f", {', '.join(absent)} absent" if absent else ""))


def write_untrained_dictionary(folder: Path, sae: TopKSAE, *, hookpoint: str, model_name: str, metadata: dict,
                               stats: ActivationStats, feature_stats: FeatureStats | None = None) -> None:
    """``sae`` as a dictionary folder with the held-out statistics a training job records (the
    activation moments; the feature maxima where given, so a steer's ``10x`` resolves)."""
    files = dictionary_files(sae, hookpoint=hookpoint, model_name=model_name, scale=1.0, extra_metadata=metadata,
                             sparsity=None, eval_metrics={})
    files[ACTIVATION_STATS_FILE] = activation_stats_file(stats)
    if feature_stats is not None:
        files[FEATURE_STATS_FILE] = feature_stats_file(feature_stats)
    write_dictionary(LocalStore(folder), files)
