#!/usr/bin/env python
"""The real job's training throughput: ``saeforge train`` on the packaged model with one
worker, two data-parallel workers and two feature-parallel workers, against the single-process
step on the same shapes, with where each step's time goes.

Every job trains the same dictionary (SmolLM2-135M's residual stream after layer 15, d_model
576, ``--latents`` TopK latents, k 32, 4,096 tokens a step, the encoder GEMM in bf16) on the
same cache, which the first job fills and the others reuse (its fill is not timed). What the
table reports comes from the job itself: ``training_curves.json``, the metrics each log window
sends to wandb: ``tokens_per_second`` and the phases of a step (``forward_ms``, ``backward_ms``
with ZeRO's and data parallelism's gradient reduction over gloo, ``optimizer_ms`` with clipping,
Adam and ZeRO's gathers, ``between_steps_ms`` with the reader's next batch and the loop's
checks), medians over the windows after the first. The single-process step is
``bench_step``'s bare step on random activations of the same width, in this process, one
thread per worker as the jobs run.

    .venv/bin/python benchmarks/bench_job.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.memory import huge_page_allocations  # noqa: E402

huge_page_allocations()  # before torch allocates, as in the jobs' workers

import torch  # noqa: E402

from benchmarks.common import cpu_description, progress  # noqa: E402
from benchmarks.results import write_block  # noqa: E402

D_MODEL = 576
PHASES = ("forward_ms", "backward_ms", "optimizer_ms", "between_steps_ms")

# (label, overrides): the layouts compared.
LAYOUTS = [
    ("1 worker (one replica: ZeRO 0)", ["cluster.num_train_workers=1"]),
    ("2 data-parallel workers (ZeRO 2)", ["cluster.num_train_workers=2"]),
    ("2 feature-parallel workers (one replica: ZeRO 0)",
     ["cluster.num_train_workers=2", "deepspeed.feature_parallel=2", "sae.auxk_coefficient=0"]),
]


def job_overrides(args: argparse.Namespace, folder: Path, name: str) -> list[str]:
    return [
        f"sae.n_latents={args.latents}", "sae.k=32", "sae.encoder_gemm=bf16", "train.batch_size=4096",
        f"data.max_tokens={args.tokens}", f"train.epochs={args.epochs}", "train.log_every_steps=5",
        "run.checkpoint_every_steps=100000", "eval=off", "logging=disabled", f"cache.uri={folder / 'store'}",
        f"run.name={name}",
    ]


def run_job(args: argparse.Namespace, folder: Path, name: str, extra: list[str]) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", *job_overrides(args, folder, name), *extra],
                          cwd=folder, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"saeforge train {name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    curves_files = list((folder / "store" / "runs" / name).rglob("training_curves.json"))
    if len(curves_files) != 1:
        raise RuntimeError(f"{name}: expected one training_curves.json, found {curves_files}")
    windows = json.loads(curves_files[0].read_text())[1:]  # the first window holds the start-up
    figures = {key: statistics.median(w[key] for w in windows) for key in ("tokens_per_second", *PHASES)}
    figures["wall_s"] = time.perf_counter() - started
    figures["windows"] = len(windows)
    return figures


def single_process_step(args: argparse.Namespace, threads: int) -> float:
    """Median seconds of the bare bf16 step at the jobs' shape: bench_step's ``bare-bf16``
    contender, timed by bench_step's own loop."""
    from benchmarks.bench_step import run
    from benchmarks.bench_trainer import BenchConfig, make_data

    torch.set_num_threads(threads)
    cfg = BenchConfig(sizes=[args.latents], steps={}, slow_steps={}, slow=[], warmup_steps=3, contenders=[],
                      d_model=D_MODEL, heldout_tokens=1024)
    batches, heldout = make_data(cfg, 12)
    result = run("bare-bf16", cfg, args.latents, len(batches), batches, heldout)
    if result.error:
        raise RuntimeError(f"the single-process step failed: {result.error}")
    return result.median(cfg.warmup_steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=131072, help="data.max_tokens of the cache")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--folder", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--write", type=Path, help="replace the bench_job block of this markdown file")
    args = parser.parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="saeforge-bench-job-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        progress("filling the cache (untimed)")
        run_job(args, folder, "fill", ["cluster.num_train_workers=1", "train.epochs=1"])
        results = []
        for i, (label, extra) in enumerate(LAYOUTS):
            figures = run_job(args, folder, f"layout{i}", extra)
            progress(f"  {label}: {figures['tokens_per_second']:,.0f} tokens/s")
            results.append((label, figures))
        one_thread = single_process_step(args, threads=1)
        two_threads = single_process_step(args, threads=2)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    lines = [
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, `python benchmarks/bench_job.py"
        f"{' --write benchmarks/RESULTS.md' if args.write else ''}` ({(time.time() - started) / 60:.1f} min). "
        f"{cpu_description()}; torch {torch.__version__}.",
        f"SmolLM2-135M `model.layers.15` (d_model {D_MODEL}), {args.latents:,} TopK latents, k 32, 4,096 tokens a step, "
        f"`sae.encoder_gemm=bf16`, one thread per worker; {args.tokens:,} cached tokens x {args.epochs} epochs; "
        "medians over the log windows (5 steps each) after the first.",
        "",
        "| layout | tokens/s (job's log) | forward ms | backward ms | optimizer ms | between steps ms | windows |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, f in results:
        lines.append(f"| {label} | {f['tokens_per_second']:,.0f} | {f['forward_ms']:.0f} | {f['backward_ms']:.0f} | "
                     f"{f['optimizer_ms']:.0f} | {f['between_steps_ms']:.0f} | {f['windows']} |")
    lines += [
        f"| single-process bare step, 1 thread | {4096 / one_thread:,.0f} | | | | | |",
        f"| single-process bare step, 2 threads | {4096 / two_threads:,.0f} | | | | | |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_block(args.write, "bench_job", text)


if __name__ == "__main__":
    main()
