#!/usr/bin/env python
"""Step time and memory of wide TopK SAEs split over 2 feature-parallel ranks, 16k to 1M latents.

Each width runs in 2 fresh processes (gloo, one torch thread each: this machine has 2 cores), each
rank holding half the latents of one ``TopKSAE`` split by ``parallelize_features`` inside the
DeepSpeed engine the job builds (``wrap_in_deepspeed(..., grid=...)``, fp32, ZeRO stage
``--zero-stage``: with one data-parallel rank per slice there is nothing for ZeRO to partition,
and stage 0 keeps no second fp32 copy). Each rank trains ``--steps`` steps on Gaussian batches of ``--batch`` tokens after one
warm-up step and reports the median step time, its peak resident memory (``ru_maxrss``, which
includes the one-off full-size draw of the tied initialisation) and its resident memory after
training (weights, gradients and Adam's two moments of its slice).

The hardware bound: each rank's encoder GEMM, ``2 * batch * d_model * n_latents / 2`` flops at the
fp32 GEMM rate one core reaches on a ``batch x d_model @ d_model x 4096`` product (measured in the
same run); the sparse kernels make everything else (top-k, decoder, backward) small beside it.

    .venv/bin/python benchmarks/bench_scale.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
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

from benchmarks.common import cpu_description  # noqa: E402
from benchmarks.results import write_block  # noqa: E402
from trainer.engine import free_port  # noqa: E402
from trainer.memory import huge_page_allocations  # noqa: E402

GIB = 2**30


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, port: int, args: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from trainer.config import DeepSpeedConfig, TrainConfig
    from trainer.engine import shutdown_engine, wrap_in_deepspeed
    from trainer.feature_parallel import build_grid, parallelize_features
    from trainer.sae import TopKSAE

    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grid = build_grid(data_parallel=1, feature_parallel=2)
    d, n, batch = args["d_model"], args["n_latents"], args["batch"]
    start = time.perf_counter()
    # No AuxK, as the job's feature-parallel runs (sae.auxk_coefficient=0).
    sae = parallelize_features(TopKSAE(d, n, args["k"], seed=0, auxk_coefficient=0), group=grid.feature_group)
    init_s = time.perf_counter() - start
    engine = wrap_in_deepspeed(
        sae, train_cfg=TrainConfig(batch_size=batch, max_grad_norm=1.0),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=args["zero_stage"], feature_parallel=2),
        lr=1e-4, world_size=2, grid=grid,
    )
    generator = torch.Generator().manual_seed(1)  # the same batches on both ranks of the feature group
    times = []
    for step in range(args["steps"] + 1):
        x = torch.randn(batch, d, generator=generator) + 0.1
        t = time.perf_counter()
        out = engine(x)
        engine.backward(out.loss)
        engine.step()
        if step:  # the first step allocates Adam's state
            times.append(time.perf_counter() - t)
    result = {
        "step_s": statistics.median(times), "init_s": init_s, "loss": out.loss.item(),
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


def run_width(n_latents: int, args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    config = {"d_model": args.d_model, "n_latents": n_latents, "k": args.k, "batch": args.batch,
              "steps": args.steps if n_latents < 2**19 else args.steps_large, "zero_stage": args.zero_stage}
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(free_port(), config, out), nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    return {"n_latents": n_latents, "steps": config["steps"], "ranks": ranks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[2**14, 2**16, 2**18, 2**20])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--steps-large", type=int, default=4, help="steps at 512k latents and more")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    huge_page_allocations()  # in the spawned ranks, as in the job's trainer workers (trainer.memory)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rate_before = _gemm_rate(args.batch, args.d_model)
    rows = [run_width(n, args) for n in args.widths]
    rate = max(rate_before, _gemm_rate(args.batch, args.d_model))
    lines = [
        "| latents | params per rank | step (median) | tokens/s | encoder GEMM bound | of bound | "
        "step per latent, against the narrowest | peak RSS per rank | RSS after training per rank |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    narrowest = None
    for row in rows:
        n, ranks = row["n_latents"], row["ranks"]
        step = max(r["step_s"] for r in ranks)
        narrowest = narrowest or step / n
        bound = 2 * args.batch * args.d_model * (n // 2) / rate
        params = (2 * n // 2 * args.d_model + n // 2 + args.d_model) / 1e6
        lines.append(
            f"| {n:,} | {params:,.0f} M | {step:.3f} s | {args.batch / step:,.0f} | {bound:.3f} s | "
            f"{bound / step:.0%} | {step / n / narrowest:.2f}x | {max(r['peak_rss'] for r in ranks) / GIB:.2f} GiB | "
            f"{max(r['rss_after'] for r in ranks) / GIB:.2f} GiB |"
        )
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_scale.py", *given])
    block = "\n".join([
        f"Run {started}, `{command}`: d_model {args.d_model}, k {args.k}, batch {args.batch} tokens, "
        f"2 feature-parallel ranks (1 thread each), fp32, ZeRO {args.zero_stage}; median of "
        f"{args.steps} steps ({args.steps_large} from 512k latents) after one warm-up step. "
        f"fp32 GEMM rate of one thread: {rate / 1e9:.0f} GFLOP/s. {cpu_description()}.",
        "",
        *lines,
    ])
    print(block)
    if args.write:
        write_block(args.write, "bench_scale", block)


if __name__ == "__main__":
    main()
