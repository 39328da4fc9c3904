#!/usr/bin/env python
"""Step time and memory of a cross-layer transcoder over 2 to 12 of the packaged model's layers,
split over 2 feature-parallel ranks.

SmolLM2-135M's MLPs read and write d_model 576; a JumpReLU ``CrossLayerTranscoder`` (trainer.clt)
over L of its layers has 4,608 latents per layer (8x d_model) and ``L d n + n d L (L + 1) / 2``
weights, so its decoders grow with the square of L. Each L runs in 2 fresh processes (gloo, one
torch thread each: this machine has 2 cores), each rank holding half of every layer's latents, split
by ``parallelize_features`` inside the DeepSpeed engine the job builds (``wrap_in_deepspeed(...,
grid=...)``, fp32, ZeRO 0: with one data-parallel rank per slice ZeRO has nothing to partition).
Each rank trains ``--steps`` steps on batches of ``--batch`` synthetic rows after one warm-up step:
Gaussian MLP inputs and targets of the right widths (L x 576 each, the flat concatenation the
reader yields), not harvested activations. The time of a step does not depend on their values
beyond how many latents fire: JumpReLU encodes and decodes densely, but the split gathers every
rank's firing latents, so the thresholds start where about ``--l0`` (64) latents per layer fire on
these rows, as in a trained CLT, instead of the half that the initial threshold lets through; the
table reports the L0 measured. Each rank reports its median
step time, its peak resident memory (``ru_maxrss``, which includes building the whole CLT before the
split keeps its half) and its resident memory after training (its slice's weights, gradients and
Adam's two moments).

The hardware bound: a rank's dense GEMM work per step, the encoders ``2 B d (n/2) L`` forward and
``2 B d (n/2) L`` for their weight gradient (the input needs none), the decoders
``2 B (n/2) d L (L + 1) / 2`` forward and twice that backward, at the fp32 GEMM rate one thread
reaches on a ``batch x d_model @ d_model x 4096`` product (measured in the same run). With
``--architecture topk`` the decoders run sparse (k per layer), so that bound counts work TopK skips.

    .venv/bin/python benchmarks/bench_clt.py --write benchmarks/RESULTS.md   # about 5 minutes
    .venv/bin/python benchmarks/bench_clt.py --quick                         # a minute: tiny sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import cpu_description, progress  # noqa: E402
from benchmarks.results import write_block  # noqa: E402
from trainer.engine import free_port  # noqa: E402

GIB = 2**30
FEATURE_PARALLEL = 2


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build_clt(config: dict) -> torch.nn.Module:
    """The CLT every rank builds (seed 0) before the split; JumpReLU thresholds set so that about
    ``l0`` latents per layer fire on the synthetic rows (see ``jumprelu_threshold``)."""
    from trainer.clt import CrossLayerTranscoder
    from trainer.config import SAEConfig

    sae_cfg = SAEConfig(architecture=config["architecture"], n_latents=config["n_per_layer"], k=config["k"],
                        auxk_coefficient=0)
    clt = CrossLayerTranscoder.from_config(sae_cfg, layers=config["layers"], d_in=config["d_model"],
                                           d_out=config["d_model"], seed=0, dtype=torch.float32)
    if config["architecture"] == "jumprelu":
        with torch.no_grad():
            clt.log_threshold.fill_(math.log(jumprelu_threshold(config["l0"], config["n_per_layer"])))
    return clt


def jumprelu_threshold(l0: int, n_per_layer: int) -> float:
    """The threshold above which ``l0`` of ``n_per_layer`` standard normal pre-activations lie on
    average: a JumpReLU CLT's encoder columns start at unit norm, so on Gaussian rows of unit
    variance (norm about sqrt(d), what the trainer's normalisation gives) its pre-activations are
    standard normal. A trained CLT fires tens of latents per layer, not the half of them that the
    initial threshold lets through, and the split's gather of the firing latents grows with L0."""
    return float(torch.special.ndtri(torch.tensor(1 - l0 / n_per_layer, dtype=torch.float64)))


def _worker(rank: int, port: int, config: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from trainer.config import DeepSpeedConfig, TrainConfig
    from trainer.engine import shutdown_engine, wrap_in_deepspeed
    from trainer.feature_parallel import build_grid, parallelize_features

    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=FEATURE_PARALLEL)
    grid = build_grid(data_parallel=1, feature_parallel=FEATURE_PARALLEL)
    width, batch = config["layers"] * config["d_model"], config["batch"]
    start = time.perf_counter()
    clt = parallelize_features(_build_clt(config), group=grid.feature_group)
    init_s = time.perf_counter() - start
    engine = wrap_in_deepspeed(
        clt, train_cfg=TrainConfig(batch_size=batch, max_grad_norm=1.0),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=0, feature_parallel=FEATURE_PARALLEL),
        lr=1e-4, world_size=FEATURE_PARALLEL, grid=grid,
    )
    generator = torch.Generator().manual_seed(1)  # the same batches on both ranks of the feature group
    times, l0 = [], []
    for step in range(config["steps"] + 1):
        x = torch.randn(batch, width, generator=generator)
        y = torch.randn(batch, width, generator=generator)
        t = time.perf_counter()
        out = engine(x, target=y)
        engine.backward(out.loss)
        engine.step()
        if step:  # the first step allocates Adam's state
            times.append(time.perf_counter() - t)
            l0.append(out.l0.item() / config["layers"])
    result = {
        "step_s": statistics.median(times), "init_s": init_s, "loss": out.loss.item(),
        "l0_per_layer": statistics.mean(l0),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_after": _rss_bytes(),
    }
    shutdown_engine(engine)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _gemm_rate(batch: int, d: int) -> float:
    """fp32 flops/s of one thread on ``(batch, d) @ (d, 4096)``, median of 10."""
    torch.set_num_threads(1)
    a, b = torch.randn(batch, d), torch.randn(d, 4096)
    times = []
    for _ in range(11):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * batch * d * 4096 / statistics.median(times[1:])


def rank_parameters(n: int, d: int, layers: int) -> int:
    """One rank's parameters: its half of every layer's encoder, decoders, ``b_enc`` and thresholds,
    and the replicated ``b_dec``."""
    half = n // FEATURE_PARALLEL
    return layers * d * half + half * d * layers * (layers + 1) // 2 + 2 * layers * half + layers * d


def gemm_flops(n: int, d: int, layers: int, batch: int) -> int:
    """One rank's dense GEMM flops per step (see the module docstring)."""
    half = n // FEATURE_PARALLEL
    return 4 * batch * d * half * layers + 6 * batch * half * d * layers * (layers + 1) // 2


def run_layers(layers: int, args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    config = {"layers": layers, "d_model": args.d_model, "n_per_layer": args.latents, "k": args.k,
              "architecture": args.architecture, "l0": args.l0, "batch": args.batch,
              "steps": args.steps if layers < 8 else args.steps_large}
    progress(f"{layers} layers: {config['steps']} steps")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(free_port(), config, out), nprocs=FEATURE_PARALLEL, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(FEATURE_PARALLEL)]
    progress(f"{layers} layers: {time.perf_counter() - started:.0f} s")
    return {"layers": layers, "steps": config["steps"], "ranks": ranks}


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def report(rows: list[dict], args: argparse.Namespace, *, rate: float, command: str, started: str, load: str) -> str:
    lines = [
        "| layers | params per rank | step (median) | tokens/s | dense GEMM bound | of bound | L0 per layer | "
        "peak RSS per rank | RSS after training per rank |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        layers, ranks = row["layers"], row["ranks"]
        step = max(r["step_s"] for r in ranks)
        bound = gemm_flops(args.latents, args.d_model, layers, args.batch) / rate
        lines.append(
            f"| {layers} | {rank_parameters(args.latents, args.d_model, layers) / 1e6:,.1f} M | {step:.3f} s | "
            f"{args.batch / step:,.0f} | {bound:.3f} s | {bound / step:.0%} | {ranks[0]['l0_per_layer']:,.0f} | "
            f"{max(r['peak_rss'] for r in ranks) / GIB:.2f} GiB | {max(r['rss_after'] for r in ranks) / GIB:.2f} GiB |"
        )
    sparsity = (f"thresholds set for {args.l0} firing latents per layer" if args.architecture == "jumprelu"
                else f"k {args.k} per layer")
    return "\n".join([
        f"Run {started}, `{command}` on {cpu_description()}; load average before: {load}. "
        f"{args.architecture} CLT, {args.latents:,} latents per layer, d_model {args.d_model} in and out, "
        f"batch {args.batch:,} synthetic rows (Gaussian inputs and targets; {sparsity}), {FEATURE_PARALLEL} "
        f"feature-parallel ranks (1 thread each), fp32, ZeRO 0; median of {args.steps} steps ({args.steps_large} "
        f"from 8 layers) after one warm-up step. fp32 GEMM rate of one thread: {rate / 1e9:.0f} GFLOP/s.",
        "",
        *lines,
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6, 8, 12])
    parser.add_argument("--latents", type=int, default=4608, help="latents per layer")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--architecture", default="jumprelu", choices=["jumprelu", "topk"])
    parser.add_argument("--k", type=int, default=32, help="topk: per layer")
    parser.add_argument("--l0", type=int, default=64, help="jumprelu: latents per layer the thresholds let fire")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--steps-large", type=int, default=4, help="steps from 8 layers on")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.latents, args.d_model, args.batch, args.steps, args.steps_large = [2, 3], 64, 32, 64, 2, 2
        args.l0 = args.k = 8
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_clt.py", *given])
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = _load_average()
    rate_before = _gemm_rate(args.batch, args.d_model)
    rows = [run_layers(layers, args) for layers in args.layers]
    rate = max(rate_before, _gemm_rate(args.batch, args.d_model))
    block = report(rows, args, rate=rate, command=command, started=started, load=load)
    print(block)
    if args.write:
        write_block(args.write, "bench_clt", block)


if __name__ == "__main__":
    main()
