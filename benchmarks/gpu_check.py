"""A five-minute check of the trainer on one GPU, in pure torch (issue 20, "On a GPU").

The machine it is written for has python and torch and nothing else of the project's stack (no
Ray, DeepSpeed, Hydra, wandb, pyarrow; perhaps no transformers), and nothing can be downloaded. So
it imports only ``trainer.sae`` (whose imports are ``trainer.kernels`` and ``trainer.losses``,
pure torch: checked on ``sys.modules`` at the start and reported) and builds everything else here.

What it measures, on ``--device cuda`` by default:

* the training step of ``TopKSAE`` with ``kernel="sparse"`` against its dense twin
  (``kernel="dense"``): forward, ``loss.backward()``, ``clip_grad_norm_(1.0)``, ``torch.optim.Adam``
  (``fused=True`` on CUDA), ``zero_grad(set_to_none=True)``; d_model 768, k 32, batches of 4,096
  synthetic tokens, at 16,384 and 65,536 latents, fp32 parameters with the encoder GEMM in bf16
  (``compute_dtype=torch.bfloat16``) and in plain fp32. Median step time (each step between two
  ``torch.cuda.synchronize()``) after warm-up, tokens/s, peak memory
  (``torch.cuda.max_memory_allocated``), and the two kernels' agreement: the loss on a held batch
  after the same 5 steps from the same seed and batches, as a relative difference;
* the encoder GEMM, ``addmm((4096 x 768) @ (768 x n))``, in bf16 and in fp32 at torch's default
  matmul precision (and, on CUDA, fp32 with TF32 allowed, for information): the bound on a step's
  tokens/s, and each step's time as a fraction of it (the GEMM's time over the step's);
* a producer forward: a Llama-style causal LM of SmolLM2-135M's shape built from a config with
  random weights (``transformers``, no download), bf16, 8 x 1,024 tokens under
  ``torch.inference_mode``; skipped, and said so, where transformers does not import.

It prints markdown tables (GPU name, torch version, every figure) and, with ``OUT`` set, writes the
same as JSON to ``$OUT/gpu_check.json``. A wall-clock guard (``--budget``, 270 s) stops measuring
and reports what it has; SIGTERM (``timeout`` in gpu_check.sh) does the same.

    bash benchmarks/gpu_check.sh                              # on a lent GPU
    python benchmarks/gpu_check.py --device cpu --small       # tiny sizes, a smoke run on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

_BEFORE_PROJECT = set(sys.modules)
from trainer.sae import TopKSAE  # noqa: E402

# Modules that importing trainer.sae loaded beyond the standard library, torch and the project's
# own (nothing, when trainer.sae is pure torch as this check needs).
FOREIGN_IMPORTS = sorted(
    {name.split(".")[0] for name in set(sys.modules) - _BEFORE_PROJECT}
    - set(sys.stdlib_module_names) - {"torch", "trainer"}
)

JSON_NAME = "gpu_check.json"
GIB = 2**30


class OutOfTime(BaseException):
    """Raised by the alarm or SIGTERM: stop measuring, report what there is. A BaseException so
    that the per-measurement ``except Exception`` does not swallow it."""


@dataclass(frozen=True)
class Sizes:
    d_model: int
    k: int
    batch: int
    widths: tuple[int, ...]
    agree_steps: int  # steps from the same seed and batches before the kernels' losses are compared
    extra_warmup: int  # further untimed steps before timing
    timed_steps: int  # at most, each case also stops at case_seconds
    case_seconds: float
    producer_layers: int
    producer_batch: int
    producer_seq: int
    producer_reps: int


FULL = Sizes(d_model=768, k=32, batch=4096, widths=(16384, 65536), agree_steps=5, extra_warmup=2,
             timed_steps=20, case_seconds=8.0, producer_layers=30, producer_batch=8,
             producer_seq=1024, producer_reps=10)
SMALL = Sizes(d_model=768, k=32, batch=512, widths=(1024, 2048), agree_steps=5, extra_warmup=1,
              timed_steps=3, case_seconds=2.0, producer_layers=2, producer_batch=2,
              producer_seq=128, producer_reps=2)

# SmolLM2-135M's shape (its config.json), the project's packaged model; layers from Sizes.
PRODUCER_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}  # the encoder GEMM's compute_dtype


# --------------------------------------------------------------------------- timing


class Clock:
    """The global deadline and the device's synchronisation."""

    def __init__(self, device: torch.device, budget_s: float) -> None:
        self.device = device
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.stopped: str | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# --------------------------------------------------------------------------- data


def synthetic_batches(sizes: Sizes, n_batches: int, device: torch.device, *, seed: int = 12345) -> list:
    """Sparse superposition, as bench_trainer's data: 3,072 unit features (4x d_model) firing with
    power-law frequencies, about 24 per token, magnitudes in [0.5, 1.5], plus an offset and a
    little noise; scaled to mean norm sqrt(d_model) as the trainer feeds its SAE. Drawn on the
    device from one seeded generator, so every case gets the same batches."""
    generator = torch.Generator(device=device).manual_seed(seed)
    d, n_features = sizes.d_model, 4 * sizes.d_model
    features = torch.randn(n_features, d, generator=generator, device=device)
    features /= features.norm(dim=1, keepdim=True)
    frequency = (torch.arange(n_features, device=device, dtype=torch.float32) + 1) ** -0.5
    frequency = (frequency * 24 / frequency.sum()).clamp(max=1.0)
    offset = torch.randn(d, generator=generator, device=device)
    offset *= 2.0 / offset.norm()
    batches = []
    for _ in range(n_batches):
        fires = torch.rand(sizes.batch, n_features, generator=generator, device=device) < frequency
        magnitude = 0.5 + torch.rand(sizes.batch, n_features, generator=generator, device=device)
        x = (fires * magnitude) @ features + offset
        x += 0.05 * torch.randn(sizes.batch, d, generator=generator, device=device)
        batches.append(x)
    scale = d**0.5 / batches[0].norm(dim=1).mean()
    return [x * scale for x in batches]


# --------------------------------------------------------------------------- the encoder GEMM


def matmul_precision() -> str:
    try:
        return torch.get_float32_matmul_precision()
    except Exception as error:  # an old or new torch without the call
        return f"unknown ({error_text(error)})"


def gemm_seconds(clock: Clock, sizes: Sizes, n: int, dtype: torch.dtype, *, calls: int) -> float:
    """Median seconds of one encoder GEMM, ``addmm(b, x, W)`` into a reused output, over 5
    samples of ``calls`` back-to-back calls each."""
    generator = torch.Generator(device=clock.device).manual_seed(1)
    x = torch.randn(sizes.batch, sizes.d_model, generator=generator, device=clock.device).to(dtype)
    w = torch.randn(sizes.d_model, n, generator=generator, device=clock.device).div_(sizes.d_model**0.5).to(dtype)
    b = torch.zeros(n, dtype=dtype, device=clock.device)
    out = torch.empty(sizes.batch, n, dtype=dtype, device=clock.device)

    def run() -> None:
        for _ in range(calls):
            torch.addmm(b, x, w, out=out)

    run()
    run()
    samples = []
    for _ in range(5):
        samples.append(clock.timed(run) / calls)
        if clock.left() < 0:
            break
    return statistics.median(samples)  # the tensors go with this frame


def measure_gemms(clock: Clock, sizes: Sizes, report: dict) -> None:
    cuda = clock.device.type == "cuda"
    variants = [("bf16", torch.bfloat16, None), ("fp32", torch.float32, None)]
    if cuda:
        variants.append(("fp32 (TF32 allowed)", torch.float32, "high"))
    for n in sizes.widths:
        for label, dtype, precision in variants:
            if clock.left() < 0:
                raise OutOfTime("budget spent")
            row: dict[str, Any] = {"n_latents": n, "gemm": label}
            default = matmul_precision()
            try:
                if precision is not None:
                    torch.set_float32_matmul_precision(precision)
                row["precision"] = matmul_precision() if dtype == torch.float32 else "bf16"
                seconds = gemm_seconds(clock, sizes, n, dtype, calls=20 if cuda else 3)
                free_memory(clock.device)
                flops = 2 * sizes.batch * sizes.d_model * n
                row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, bound_tokens_s=sizes.batch / seconds)
            except Exception as error:
                row["error"] = error_text(error)
            finally:
                if precision is not None and not default.startswith("unknown"):
                    torch.set_float32_matmul_precision(default)
            report["gemm"].append(row)
            log(f"GEMM n={n} {label}: {row.get('tflops', float('nan')):.2f} TFLOP/s {row.get('error', '')}")


def gemm_bound(report: dict, n: int, precision: str) -> dict | None:
    """The GEMM row that bounds a step: bf16 for the bf16 step, fp32 at the default precision
    (what the fp32 step runs) for the fp32 one."""
    for row in report["gemm"]:
        if row["n_latents"] == n and row["gemm"] == precision and "ms" in row:
            return row
    return None


# --------------------------------------------------------------------------- the training step


def make_step(model: TopKSAE, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], torch.Tensor]:
    params = list(model.parameters())

    def step(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def width_scaled_lr(n_latents: int) -> float:
    """2e-4 / sqrt(n / 2**14): the trainer's default (and bench_trainer's)."""
    return 2e-4 / (n_latents / 2**14) ** 0.5


def measure_step(clock: Clock, sizes: Sizes, n: int, precision: str, kernel: str, batches: list) -> dict:
    """One case: build from seed 0, ``agree_steps`` steps on batches 0.., the loss on the held
    batch (the last one), more warm-up, then timed steps cycling through the training batches."""
    row: dict[str, Any] = {"n_latents": n, "gemm": precision, "kernel": kernel}
    device, train, held = clock.device, batches[:-1], batches[-1]
    model = optimizer = step = None
    try:
        free_memory(device)
        reset_peak(device)
        model = TopKSAE(sizes.d_model, n, sizes.k, seed=0, kernel=kernel,
                        compute_dtype=PRECISIONS[precision]).to(device)
        model.init_b_dec(train[0], method="mean")
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.Adam(model.parameters(), lr=width_scaled_lr(n), **fused)
        row["adam"] = "fused" if fused else "default"
        step = make_step(model, optimizer)
        losses = [step(train[i % len(train)]) for i in range(sizes.agree_steps)]
        row["losses"] = [float(loss) for loss in losses]
        with torch.no_grad():
            row["loss_after"] = float(model(held).loss)
        for i in range(sizes.extra_warmup):
            step(train[(sizes.agree_steps + i) % len(train)])
        case_end = time.monotonic() + sizes.case_seconds
        seconds = []
        for i in range(sizes.timed_steps):
            if seconds and (time.monotonic() > case_end or clock.left() < 0):
                break
            x = train[i % len(train)]
            seconds.append(clock.timed(lambda x=x: step(x)))
        median = statistics.median(seconds)
        row.update(steps_timed=len(seconds), ms=median * 1e3, tokens_s=sizes.batch / median,
                   peak_gib=peak_gib(device))
    except Exception as error:
        row["error"] = error_text(error)
    finally:
        model = optimizer = step = None  # the step's closure holds both: all go before emptying the cache
        free_memory(device)
    return row


def measure_steps(clock: Clock, sizes: Sizes, report: dict) -> None:
    batches = synthetic_batches(sizes, n_batches=6, device=clock.device)
    report["meta"]["batch_pool_mib"] = sum(x.numel() * x.element_size() for x in batches) / 2**20
    for n in sizes.widths:
        for precision in PRECISIONS:
            pair = {}
            for kernel in ("sparse", "dense"):
                if clock.left() < 0:
                    raise OutOfTime("budget spent")
                row = measure_step(clock, sizes, n, precision, kernel, batches)
                bound = gemm_bound(report, n, precision)
                if bound is not None and "ms" in row:
                    row["gemm_fraction"] = bound["ms"] / row["ms"]
                    row["bound_tokens_s"] = bound["bound_tokens_s"]
                report["steps"].append(row)
                pair[kernel] = row
                log(f"step n={n} {precision} {kernel}: {row.get('ms', float('nan')):.2f} ms "
                    f"{row.get('error', '')}")
            sparse, dense = pair["sparse"], pair["dense"]
            if "loss_after" in sparse and "loss_after" in dense:
                agreement = {
                    "n_latents": n, "gemm": precision,
                    "loss_sparse": sparse["loss_after"], "loss_dense": dense["loss_after"],
                    "rel_diff": abs(sparse["loss_after"] - dense["loss_after"]) / abs(dense["loss_after"]),
                    "max_step_rel_diff": max(abs(a - b) / abs(b) for a, b in
                                             zip(sparse["losses"], dense["losses"], strict=True)),
                }
                if "ms" in sparse and "ms" in dense:
                    agreement["sparse_speedup"] = dense["ms"] / sparse["ms"]
                report["agreement"].append(agreement)


# --------------------------------------------------------------------------- the producer


def measure_producer(clock: Clock, sizes: Sizes, report: dict) -> None:
    producer: dict[str, Any] = {"layers": sizes.producer_layers, "batch": sizes.producer_batch,
                                "seq": sizes.producer_seq, "dtype": "bf16"}
    report["producer"] = producer
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as error:
        producer["skipped"] = f"transformers not importable ({error_text(error)})"
        log(producer["skipped"])
        return
    producer["transformers"] = transformers.__version__
    model = None
    try:
        config = LlamaConfig(num_hidden_layers=sizes.producer_layers, **PRODUCER_SHAPE)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with clock.device:  # weights drawn where they run: no fp32 copy on the host
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model = model.to(device=clock.device, dtype=torch.bfloat16).eval()
        producer["params"] = sum(p.numel() for p in model.parameters())
        producer["attention"] = getattr(model.config, "_attn_implementation", None)
        generator = torch.Generator(device=clock.device).manual_seed(3)
        ids = torch.randint(0, config.vocab_size, (sizes.producer_batch, sizes.producer_seq),
                            generator=generator, device=clock.device)

        def forward() -> None:
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)

        reset_peak(clock.device)
        forward()
        forward()
        seconds = []
        for _ in range(sizes.producer_reps):
            if seconds and clock.left() < 0:
                break
            seconds.append(clock.timed(forward))
        median = statistics.median(seconds)
        tokens = sizes.producer_batch * sizes.producer_seq
        producer.update(reps=len(seconds), ms=median * 1e3, tokens_s=tokens / median,
                        approx_tflops=2 * producer["params"] * tokens / median / 1e12,
                        peak_gib=peak_gib(clock.device))
    except Exception as error:
        producer["error"] = error_text(error)
    finally:
        model = None  # before emptying the cache
        free_memory(clock.device)
    log(f"producer: {producer.get('tokens_s', float('nan')):.0f} tokens/s {producer.get('error', '')}")


# --------------------------------------------------------------------------- the report


def environment(device: torch.device, sizes: Sizes, small: bool, budget: float) -> dict:
    meta: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "host": platform.node(), "cpu_threads": torch.get_num_threads(),
        "fp32_matmul_precision": matmul_precision(), "small": small, "budget_s": budget,
        "foreign_imports": FOREIGN_IMPORTS,
        "sizes": {"d_model": sizes.d_model, "k": sizes.k, "batch": sizes.batch, "widths": list(sizes.widths)},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=props.total_memory / GIB,
                    capability=f"{props.major}.{props.minor}")
    else:
        meta["gpu"] = None
    return meta


def fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = ["## gpu_check", "", "| | |", "| --- | --- |"]
    for label, value in (
        ("GPU", meta.get("gpu") or f"none ({meta['device']})"),
        ("torch", f"{meta['torch']} (CUDA {meta['cuda']})"),
        ("python", meta["python"]),
        ("fp32 matmul precision (default)", meta["fp32_matmul_precision"]),
        ("sizes", f"d_model {meta['sizes']['d_model']}, k {meta['sizes']['k']}, batch {meta['sizes']['batch']}"
                  + (" (--small)" if meta["small"] else "")),
        ("non-torch imports of trainer.sae", ", ".join(meta["foreign_imports"]) or "none"),
        ("date (UTC)", meta["date_utc"]),
        ("elapsed", f"{meta.get('elapsed_s', 0):.0f} s of a {meta['budget_s']:.0f} s budget"),
        ("stopped early", meta.get("stopped") or "no"),
    ):
        lines.append(f"| {label} | {value} |")

    lines += ["", "### Encoder GEMM (batch x d_model) @ (d_model x n)", "",
              "| latents | GEMM | ms | TFLOP/s | bound tokens/s |", "| ---: | --- | ---: | ---: | ---: |"]
    for row in report["gemm"]:
        if "error" in row:
            lines.append(f"| {row['n_latents']:,} | {row['gemm']} | {row['error']} | | |")
        else:
            lines.append(f"| {row['n_latents']:,} | {row['gemm']} | {fmt(row['ms'], '.3f')} | "
                         f"{fmt(row['tflops'], '.2f')} | {fmt(row['bound_tokens_s'])} |")

    lines += ["", "### Training step (forward, backward, clip 1.0, Adam, zero_grad)", "",
              "| latents | encoder GEMM | kernel | Adam | steps | median ms | tokens/s | of the GEMM bound "
              "| peak GiB | loss after 5 steps |",
              "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["steps"]:
        if "error" in row:
            lines.append(f"| {row['n_latents']:,} | {row['gemm']} | {row['kernel']} | | | {row['error']} "
                         "| | | | |")
            continue
        fraction = row.get("gemm_fraction")
        lines.append(
            f"| {row['n_latents']:,} | {row['gemm']} | {row['kernel']} | {row['adam']} | {row['steps_timed']} | "
            f"{fmt(row['ms'], '.2f')} | {fmt(row['tokens_s'])} | "
            f"{fmt(None if fraction is None else 100 * fraction, '.1f')}% | {fmt(row['peak_gib'], '.2f')} | "
            f"{fmt(row['loss_after'], '.6f')} |")

    lines += ["", "### Sparse against dense: the same 5 steps from the same seed and batches", "",
              "| latents | encoder GEMM | loss sparse | loss dense | relative difference | max over the 5 "
              "steps | sparse speed-up |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["agreement"]:
        lines.append(f"| {row['n_latents']:,} | {row['gemm']} | {fmt(row['loss_sparse'], '.6f')} | "
                     f"{fmt(row['loss_dense'], '.6f')} | {fmt(row['rel_diff'], '.2e')} | "
                     f"{fmt(row['max_step_rel_diff'], '.2e')} | {fmt(row.get('sparse_speedup'), '.2f')}x |")

    producer = report.get("producer")
    lines += ["", "### Producer forward (Llama, SmolLM2-135M's shape, random weights, bf16)", ""]
    if producer is None:
        lines.append("not reached")
    elif "skipped" in producer:
        lines.append(f"skipped: {producer['skipped']}")
    else:
        lines += ["| layers | params | batch | attention | median ms | tokens/s | TFLOP/s (2 x params x tokens) "
                  "| peak GiB |", "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
        if "error" in producer:
            lines.append(f"| {producer['layers']} | {fmt(producer.get('params'))} | "
                         f"{producer['batch']} x {producer['seq']} | | {producer['error']} | | | |")
        else:
            lines.append(f"| {producer['layers']} | {fmt(producer['params'])} | {producer['batch']} x "
                         f"{producer['seq']} | {producer['attention']} | {fmt(producer['ms'], '.2f')} | "
                         f"{fmt(producer['tokens_s'])} | {fmt(producer['approx_tflops'], '.2f')} | "
                         f"{fmt(producer['peak_gib'], '.2f')} |")
        lines.append(f"\ntransformers {producer.get('transformers')}")
    if meta.get("batch_pool_mib") is not None and meta.get("gpu"):
        lines.append(f"\nPeak memory includes the {meta['batch_pool_mib']:.0f} MiB of synthetic batches.")
    return "\n".join(lines)


def _raise_out_of_time(signum: int, _frame: Any) -> None:
    raise OutOfTime(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke run on a CPU")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds before measuring stops")
    parser.add_argument("--skip-producer", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device} but torch {torch.__version__} sees no CUDA device "
              "(use --device cpu --small for a smoke run)", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = SMALL if args.small else FULL
    clock = Clock(device, args.budget)
    # A last resort past the budget (one long call the checks between steps cannot stop).
    signal.signal(signal.SIGTERM, _raise_out_of_time)
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _raise_out_of_time)
        signal.alarm(int(args.budget) + 15)

    report: dict[str, Any] = {"meta": environment(device, sizes, args.small, args.budget), "gemm": [],
                              "steps": [], "agreement": [], "producer": None}
    if FOREIGN_IMPORTS:
        log(f"trainer.sae imported non-torch modules: {FOREIGN_IMPORTS}")
    log(f"device {device} ({report['meta']['gpu'] or 'no GPU'}), torch {torch.__version__}")
    try:
        measure_gemms(clock, sizes, report)
        measure_steps(clock, sizes, report)
        if args.skip_producer:
            report["producer"] = {"skipped": "--skip-producer"}
        elif clock.left() < 0:
            raise OutOfTime("budget spent")
        else:
            measure_producer(clock, sizes, report)
    except OutOfTime as stop:
        report["meta"]["stopped"] = f"{stop} after {clock.elapsed():.0f} s"
        log(f"stopped: {report['meta']['stopped']}")
    except Exception as error:  # a failure outside one measurement: still report what there is
        report["meta"]["stopped"] = f"{error_text(error)} after {clock.elapsed():.0f} s"
        log(f"stopped: {report['meta']['stopped']}")
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report["meta"]["elapsed_s"] = clock.elapsed()
    print(markdown(report), flush=True)
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / JSON_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
