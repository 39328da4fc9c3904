#!/usr/bin/env python
"""The TopK training step against the hardware: the bare step and the job's step (DeepSpeed
engine + ``DictionaryTrainer``) beside sparsify in its fastest configuration on this CPU, the
encoder-GEMM bound and a memory roofline of each part of the step.

What one run measures, per width (default 16,384 and 65,536 latents; d_model 768, k 32,
4,096 tokens a step, bench_trainer's synthetic activations):

* the machine: the encoder GEMM's rate in bf16 and fp32 (before and after the contenders; the
  bound uses the higher) and the memory bandwidth (read, write, copy and triad over 256 MB;
  the roofline uses the highest);
* contenders, each training the same steps on the same batches: saeforge's bare step
  (``TopKSAE`` + ``clip_grad_norm_`` + fused Adam) with the encoder GEMM in bf16 and in fp32;
  the job's step (``wrap_in_deepspeed`` + ``DictionaryTrainer``) as a one-replica job runs it
  (``single_replica_config``: ZeRO 0) and with ZeRO 2 as configured; a transcoder and a skip
  transcoder (bare, bf16 GEMM); sparsify 1.3.3 in fp32 and under bf16 autocast. Median step
  time after the warm-up steps, tokens/s, and held-out FVU after the same steps;
* the roofline: the bare bf16 step under torch.profiler, cut into parts (the labels in
  ``trainer.kernels`` and the autograd nodes), each part's time beside its floor, the larger of
  its FLOPs at the GEMM rate and its DRAM bytes at the measured bandwidth.

    .venv/bin/python benchmarks/bench_step.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.memory import HUGE_PAGES_VARIABLE, huge_page_allocations, kernel_allows_huge_pages  # noqa: E402

HUGE_PAGES = huge_page_allocations()  # before torch allocates: as the job's trainer workers run

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.bench_trainer import (  # noqa: E402
    BenchConfig,
    Contender,
    Saeforge,
    Sparsify,
    clipped_adam_step,
    gemm_flops_per_s,
    heldout_quality,
    load_average,
    make_data,
    width_scaled_lr,
)
from benchmarks.common import cpu_description, progress  # noqa: E402
from benchmarks.results import write_block  # noqa: E402
from trainer.sae import TopKSAE  # noqa: E402

GB = 1e9


# --------------------------------------------------------------------------- contenders


class SparsifyBf16(Sparsify):
    """sparsify's step under CPU bf16 autocast: its encoder GEMM (``nn.Linear``) runs in bf16."""

    name = "sparsify 1.3.3, bf16 autocast"

    def step(self, x: Tensor, step: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().step(x, step)


class Transcoder(Saeforge):
    """A TopK transcoder (no ``b_dec`` on the input) started as the job starts one, bf16 GEMM, the
    bare step, predicting x rotated (FVU against that target)."""

    def __init__(self, cfg: BenchConfig, n: int, first: Tensor, *, skip: bool) -> None:
        self.name = "saeforge " + ("skip transcoder" if skip else "transcoder") + ", bare, bf16 GEMM"
        self.mix = _target_map(cfg.d_model)
        self.sae = TopKSAE(cfg.d_model, n, cfg.k, seed=cfg.model_seed, apply_b_dec_to_input=False,
                           skip_connection=skip, compute_dtype=torch.bfloat16)
        self.sae.start_free_decoder()  # the job's start for a TopK transcoder (build_sae)
        self.sae.init_b_enc(first)
        self.sae.init_b_dec(first @ self.mix, method="mean")
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=width_scaled_lr(n), fused=True)

    def step(self, x: Tensor, step: int) -> None:
        clipped_adam_step(self.sae(x, target=x @ self.mix).loss, self.sae, self.optimizer)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.sae(x)
        return out.reconstruction - (x @ self.mix) + x, (out.latent_acts > 0).sum(dim=-1)


def _target_map(d: int) -> Tensor:
    """A fixed rotation: the transcoder's target is its input rotated, as hard to predict."""
    generator = torch.Generator().manual_seed(7)
    return torch.linalg.qr(torch.randn(d, d, generator=generator)).Q


class CLTStep(Contender):
    """A TopK cross-layer transcoder over 2 layers with half the latents each (the same total),
    the bare step in fp32 (its GEMMs run in the parameters' dtype): layer 0 reads x and layer 1
    x rotated, and each predicts the other's input."""

    def __init__(self, cfg: BenchConfig, n: int, first: Tensor) -> None:
        from trainer.clt import CrossLayerTranscoder

        self.name = "saeforge cross-layer transcoder (TopK, 2 layers x n/2), bare, fp32"
        self.mix = _target_map(cfg.d_model)
        self.clt = CrossLayerTranscoder(2, cfg.d_model, n // 2, activation="topk", k=cfg.k, seed=cfg.model_seed)
        self.optimizer = torch.optim.Adam(self.clt.parameters(), lr=width_scaled_lr(n), fused=True)

    def pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rotated = x @ self.mix
        return torch.cat([x, rotated], dim=1), torch.cat([rotated, x], dim=1)

    def step(self, x: Tensor, step: int) -> None:
        inputs, target = self.pair(x)
        clipped_adam_step(self.clt(inputs, target=target).loss, self.clt, self.optimizer)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        inputs, target = self.pair(x)
        out = self.clt(inputs, target=target)
        # The first layer's prediction of x rotated, brought back to x's space (FVU against x).
        return out.reconstruction[:, : x.shape[1]] @ self.mix.T, (out.latent_acts > 0).sum(dim=-1) / 2


class JobStep(Contender):
    """The job's step: ``build_sae``'s TopK SAE in ``wrap_in_deepspeed`` (one rank) stepped by
    ``DictionaryTrainer`` (dead-latent tracking, non-finite checks, metric windows)."""

    def __init__(self, cfg: BenchConfig, n: int, first: Tensor, *, zero_stage: int, one_replica: bool) -> None:
        from trainer.config import DeepSpeedConfig, TrainConfig
        from trainer.engine import single_replica_config, wrap_in_deepspeed
        from trainer.loggers import NullLogger
        from trainer.loop import DictionaryTrainer
        from trainer.metrics import DeadLatentTracker

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed_cfg = DeepSpeedConfig(zero_stage=zero_stage)
        if one_replica:
            deepspeed_cfg = single_replica_config(deepspeed_cfg, world_size=1)
        self.name = f"saeforge job, bf16 GEMM, ZeRO {deepspeed_cfg.zero_stage}" + (
            " (one replica)" if one_replica else " (as configured)")
        sae = TopKSAE(cfg.d_model, n, cfg.k, seed=cfg.model_seed, compute_dtype=torch.bfloat16)
        sae.init_b_dec(first, method="mean")
        self.engine = wrap_in_deepspeed(sae, train_cfg=TrainConfig(batch_size=cfg.batch_size, max_grad_norm=1.0),
                                        deepspeed_cfg=deepspeed_cfg, lr=width_scaled_lr(n), world_size=1)
        self.trainer = DictionaryTrainer(self.engine, scale=1.0, max_steps=10**6, logger=NullLogger(), log_every=50,
                                         dead_tracker=DeadLatentTracker(n), dead_after_tokens=10**7, world_size=1)

    def step(self, x: Tensor, step: int) -> None:
        self.trainer.step(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.engine.module(x)
        return out.reconstruction, (out.latent_acts > 0).sum(dim=-1)

    def close(self) -> None:
        from trainer.engine import shutdown_engine

        shutdown_engine(self.engine)


CONTENDERS = {
    "bare-bf16": lambda cfg, n, first: Saeforge(cfg, n, first, kernel="sparse", gemm_dtype=torch.bfloat16),
    "bare-fp32": lambda cfg, n, first: Saeforge(cfg, n, first, kernel="sparse", gemm_dtype=torch.float32),
    "job-one-replica": lambda cfg, n, first: JobStep(cfg, n, first, zero_stage=2, one_replica=True),
    "job-zero2": lambda cfg, n, first: JobStep(cfg, n, first, zero_stage=2, one_replica=False),
    "transcoder": lambda cfg, n, first: Transcoder(cfg, n, first, skip=False),
    "skip-transcoder": lambda cfg, n, first: Transcoder(cfg, n, first, skip=True),
    "clt": CLTStep,
    "sparsify-fp32": Sparsify,
    "sparsify-bf16": SparsifyBf16,
}
PEERS = ("sparsify-fp32", "sparsify-bf16")


@dataclass
class Run:
    key: str
    name: str = ""
    step_s: list[float] = field(default_factory=list)
    fvu: float | None = None
    error: str | None = None

    def median(self, warmup: int) -> float:
        return statistics.median(self.step_s[warmup:]) if len(self.step_s) > warmup else float("nan")


def run(key: str, cfg: BenchConfig, n: int, steps: int, batches: list[Tensor], heldout: Tensor) -> Run:
    result = Run(key)
    contender = None
    try:
        contender = CONTENDERS[key](cfg, n, batches[0])
        result.name = contender.name
        for step, x in enumerate(batches[:steps]):
            start = time.perf_counter()
            contender.step(x, step)
            result.step_s.append(time.perf_counter() - start)
        result.fvu = heldout_quality(contender, heldout)[0]
    except Exception as error:  # reported, not dropped
        result.error = f"{type(error).__name__}: {error}"
    finally:
        if contender is not None and hasattr(contender, "close"):
            contender.close()
    del contender
    gc.collect()
    return result


# --------------------------------------------------------------------------- the machine


def bandwidth(*, megabytes: int = 256, reps: int = 5) -> dict[str, float]:
    """Bytes/s of read (sum), write (fill), copy, triad (c = a + 2 b) and an in-place add over fp32
    tensors of ``megabytes``, counting the bytes each names (the cache-line fill before a write to
    memory not read first is not counted: it is why copy and triad fall below the in-place add)."""
    n = megabytes * 2**20 // 4
    a, b, c = torch.ones(n), torch.ones(n), torch.empty(n)
    kernels = {
        "read": (lambda: a.sum(), 4 * n),
        "write": (lambda: c.fill_(1.0), 4 * n),
        "copy": (lambda: c.copy_(a), 8 * n),
        "triad": (lambda: torch.add(a, b, alpha=2.0, out=c), 12 * n),
        # In place, as Adam updates: no cache-line fill before each write.
        "a += b": (lambda: a.add_(b, alpha=1e-30), 12 * n),
    }
    rates = {}
    for name, (kernel, nbytes) in kernels.items():
        kernel()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            kernel()
            times.append(time.perf_counter() - start)
        rates[name] = nbytes / min(times)
    return rates


# --------------------------------------------------------------------------- roofline


@dataclass
class Part:
    name: str
    events: tuple[str, ...]
    """torch.profiler event names whose CPU time (inclusive) is this part's."""
    flops: float
    nbytes: float
    note: str


def step_parts(cfg: BenchConfig, n: int) -> list[Part]:
    """The bare bf16 step's parts with their FLOPs and the DRAM bytes each must move at least
    (fp32 parameters and gradients, bf16 GEMM operands; tensors under a few MB stay in cache)."""
    B, d, k = cfg.batch_size, cfg.d_model, cfg.k
    P = 2 * n * d  # parameters of W_enc and W_dec
    return [
        Part("encoder operands (fp32 W_enc -> bf16, bias folded)", ("saeforge.encoder.operands",), 0,
             4 * n * d + 2 * n * d, "read W_enc, write its bf16 copy"),
        Part("encoder GEMM (bf16)", ("saeforge.encoder.gemm",), 2 * B * d * n, 2 * n * d + 2 * B * n,
             "GEMM rate; writes the (B, n) pre-activations"),
        Part("top-k selection", ("saeforge.encoder.topk",), 0, 2 * B * n, "read the pre-activations once"),
        Part("decoder forward (gather k rows a token)", ("_SparseDecode",), 2 * B * k * d, 4 * n * d,
             "W_dec's row norms read it once; the rows gathered stay in cache"),
        Part("encoder backward (scatter into grad W_enc)", ("_SparseTopKEncodeBackward",), 2 * B * k * d,
             4 * n * d, "write the (d, n) gradient"),
        Part("decoder backward (gather-dot, scatter, radial)", ("_SparseDecodeBackward",), 4 * B * k * d,
             2 * 4 * n * d, "read W_dec, write its gradient"),
        Part("gradient clipping (norm + scale)", ("bench.clip",), 0, 3 * 4 * P, "read the gradients, then read and write them"),
        Part("Adam (fused)", ("Optimizer.step#Adam.step",), 0, 7 * 4 * P, "read p, g, m, v; write p, m, v"),
        Part("zero_grad (set_to_none)", ("Optimizer.zero_grad#Adam.zero_grad",), 0, 0, "frees"),
    ]


def profile_parts(cfg: BenchConfig, n: int, batches: list[Tensor], steps: int = 3) -> tuple[dict[str, float], float]:
    """ms per step of each profiler event of ``step_parts``, and the step under the profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    contender = Saeforge(cfg, n, batches[0], kernel="sparse", gemm_dtype=torch.bfloat16)

    def step(x: Tensor) -> None:
        out = contender.sae(x)
        out.loss.backward()
        with record_function("bench.clip"):
            torch.nn.utils.clip_grad_norm_(contender.sae.parameters(), 1.0)
        contender.optimizer.step()
        contender.optimizer.zero_grad(set_to_none=True)

    for x in batches[:3]:
        step(x)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        start = time.perf_counter()
        for x in batches[3:3 + steps]:
            step(x)
        total = (time.perf_counter() - start) / steps
    times: dict[str, float] = {}
    for event in trace.key_averages():
        times[event.key] = times.get(event.key, 0.0) + event.cpu_time_total / 1e3 / steps
    return times, total * 1e3


def roofline_table(cfg: BenchConfig, n: int, times: dict[str, float], total_ms: float, bf16_rate: float,
                   memory_rate: float) -> str:
    lines = [
        f"Roofline of the bare bf16 step at {n:,} latents (torch.profiler, {total_ms:.0f} ms a step under it; "
        f"floors at {bf16_rate / 1e9:,.0f} GFLOP/s bf16 and {memory_rate / GB:.1f} GB/s):",
        "",
        "| part | ms per step | floor (ms) | of floor | what bounds it |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    covered = 0.0
    for part in step_parts(cfg, n):
        ms = sum(times.get(event, 0.0) for event in part.events)
        covered += ms
        floor = max(part.flops / bf16_rate, part.nbytes / memory_rate) * 1e3
        share = f"{floor / ms:.0%}" if ms > 0 and floor > 0 else "–"
        bound = "GEMM" if part.flops / bf16_rate > part.nbytes / memory_rate else "memory"
        lines.append(f"| {part.name} | {ms:.1f} | {floor:.1f} | {share} | {bound}: {part.note} |")
    lines.append(f"| the rest (loss, small ops, Python) | {max(total_ms - covered, 0):.1f} | – | – | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def _huge_pages() -> str:
    if not HUGE_PAGES:
        return f"no ({HUGE_PAGES_VARIABLE}={os.environ.get(HUGE_PAGES_VARIABLE)})"
    return "yes" if kernel_allows_huge_pages() else "asked, but the kernel's THP setting is never"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 16], help="steps per size, in --sizes order")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--write", type=Path, help="replace the bench_step block of this markdown file")
    args = parser.parse_args(argv)
    if len(args.steps) != len(args.sizes):
        parser.error(f"--steps has {len(args.steps)} values for {len(args.sizes)} --sizes")
    torch.set_num_threads(2)
    cfg = BenchConfig(sizes=args.sizes, steps={}, slow_steps={}, slow=[], warmup_steps=args.warmup_steps,
                      contenders=[])
    started = time.time()
    sections = []
    for n, steps in zip(args.sizes, args.steps, strict=True):
        batches, heldout = make_data(cfg, steps)
        progress(f"{n:,} latents: load {load_average()}")
        before = {dt: gemm_flops_per_s(cfg, n, dt) for dt in (torch.bfloat16, torch.float32)}
        memory = bandwidth()
        runs = []
        for key in args.contenders:
            result = run(key, cfg, n, steps, batches, heldout)
            progress(f"  {result.name or key}: {result.median(args.warmup_steps):.3f} s, FVU {result.fvu}"
                     + (f" [{result.error}]" if result.error else ""))
            runs.append(result)
        times, total_ms = profile_parts(cfg, n, batches)
        after = {dt: gemm_flops_per_s(cfg, n, dt) for dt in (torch.bfloat16, torch.float32)}
        rates = {dt: max(before[dt], after[dt]) for dt in before}
        sections.append(size_section(cfg, n, steps, args.warmup_steps, runs, rates, before, after, memory, times,
                                     total_ms))
    header = (
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, `python benchmarks/bench_step.py"
        f"{' --write benchmarks/RESULTS.md' if args.write else ''}` ({(time.time() - started) / 60:.1f} min).\n\n"
        f"{cpu_description()}; torch {torch.__version__}, 2 threads; "
        f"huge pages for large tensors: {_huge_pages()} (`trainer.memory`).\n"
        f"d_model {cfg.d_model}, k {cfg.k}, {cfg.batch_size:,} tokens a step, bench_trainer's synthetic activations; "
        f"step time: median after {args.warmup_steps} warm-up steps; FVU pooled over {cfg.heldout_tokens:,} held-out "
        "tokens after the same steps."
    )
    text = header + "\n\n" + "\n\n".join(sections)
    print(text)
    if args.write:
        write_block(args.write, "bench_step", text)


def size_section(cfg: BenchConfig, n: int, steps: int, warmup: int, runs: list[Run], rates: dict, before: dict,
                 after: dict, memory: dict[str, float], times: dict[str, float], total_ms: float) -> str:
    bound_bf16 = rates[torch.bfloat16] / (2 * cfg.d_model * n)
    bound_fp32 = rates[torch.float32] / (2 * cfg.d_model * n)
    peers = [r for r in runs if r.key in PEERS and not r.error]
    fastest = max(peers, key=lambda r: 1 / r.median(warmup)) if peers else None
    lines = [
        f"**{n:,} latents**, {steps} steps. Encoder GEMM (before / after): bf16 "
        f"{before[torch.bfloat16] / 1e9:,.0f} / {after[torch.bfloat16] / 1e9:,.0f} GFLOP/s (bound "
        f"{bound_bf16:,.0f} tokens/s), fp32 {before[torch.float32] / 1e9:,.0f} / {after[torch.float32] / 1e9:,.0f} "
        f"(bound {bound_fp32:,.0f}). Memory: " + ", ".join(f"{k} {v / GB:.1f}" for k, v in memory.items()) + " GB/s.",
        "",
        "| contender | step (s) | tokens/s | vs fastest peer | of bf16 GEMM bound | held-out FVU |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        if r.error:
            lines.append(f"| {r.name or r.key} | – | – | – | – | {r.error} |")
            continue
        step = r.median(warmup)
        tokens = cfg.batch_size / step
        vs = f"{tokens / (cfg.batch_size / fastest.median(warmup)):.2f}x" if fastest else "–"
        lines.append(f"| {r.name} | {step:.3f} | {tokens:,.0f} | {vs} | {tokens / bound_bf16:.0%} | {r.fvu:.4f} |")
    memory_rate = max(memory.values())
    lines += ["", roofline_table(cfg, n, times, total_ms, rates[torch.bfloat16], memory_rate)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
