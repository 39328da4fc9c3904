#!/usr/bin/env python
"""TopK SAE training steps side by side, in one process, on the same synthetic activations.

Contenders, each with its own SAE module and its own training step:

* ``saeforge`` ``TopKSAE`` with the sparse kernels (``trainer/kernels.py``), fp32 and with the
  encoder GEMM in bf16; plain ``torch.optim.Adam(fused=True)`` and gradient clipping at 1.0, the
  step our trainer takes, without DeepSpeed;
* ``saeforge`` ``TopKSAE(kernel="dense")``: the plain dense PyTorch TopK (same step);
* EleutherAI sparsify ``SparseCoder``: its training step (unit-norm decoder, FVU loss, gradient
  projection, Adam at its width-scaled lr; the 1000-step lr warm-up off);
* SAELens ``TopKTrainingSAE`` through ``SAETrainer._train_step`` (its defaults; constant lr),
  and again with ``use_sparse_activations=True, rescale_acts_by_decoder_norm=False``;
* dictionary_learning ``AutoEncoderTopK`` through ``TopKTrainer.update`` (its 1000-step lr
  warm-up off).

Every contender trains for the same steps on the same batches; the step time is the median over
the steps after ``--warmup-steps``; FVU and L0 are measured on held-out tokens at the end. The
bound is the machine's GEMM rate for the encoder's shape, measured here:
``tokens/s <= GEMM FLOP/s / (2 * d_model * n_latents)``.

    .venv/bin/python benchmarks/bench_trainer.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# sparsify picks a Triton decoder if it can import one; its eager embedding_bag path is the CPU one.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results import write_block  # noqa: E402
from trainer.sae import TopKSAE  # noqa: E402
from trainer.synthetic import SparseFeatureData  # noqa: E402


@dataclass
class BenchConfig:
    """What is measured, and on what."""

    sizes: list[int]
    """n_latents values to benchmark."""
    steps: dict[int, int]
    """Training steps per size for the contenders not in ``slow``."""
    slow_steps: dict[int, int]
    """Training steps per size for the contenders in ``slow``; every contender is also evaluated
    after this many steps, so that FVU is compared on equal tokens."""
    slow: list[str]
    """Contenders that take several seconds per step: they train ``slow_steps`` only."""
    warmup_steps: int
    """Leading steps left out of the median step time."""
    contenders: list[str]
    """Names from ``CONTENDERS`` to run."""
    d_model: int = 768
    k: int = 32
    batch_size: int = 4096
    threads: int = 2
    n_features: int = 3072
    """True dictionary size of the synthetic data (4x overcomplete in d_model)."""
    mean_active: float = 24.0
    """True features firing per token, on average (power-law frequencies)."""
    heldout_tokens: int = 8192
    data_seed: int = 20261124
    """Seeds the data generator (hashed, see ``SparseFeatureData``); never the model seed."""
    model_seed: int = 0

    def steps_for(self, name: str, n: int) -> int:
        return self.slow_steps[n] if name in self.slow else self.steps[n]


@dataclass
class Result:
    """One contender at one size."""

    key: str
    name: str
    n_latents: int
    step_s: list[float] = field(default_factory=list)
    quality: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Steps trained -> (held-out FVU, L0)."""
    error: str | None = None

    def median_step_s(self, warmup_steps: int) -> float:
        timed = self.step_s[warmup_steps:] or self.step_s
        return statistics.median(timed) if timed else math.nan


class Contender:
    """A model plus its library's training step."""

    name = ""
    gemm_dtype = torch.float32
    """dtype of the encoder GEMM (which bound applies)."""

    def step(self, x: Tensor, step: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction, firing latents per token)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- contenders


def width_scaled_lr(n_latents: int) -> float:
    """2e-4 / sqrt(n / 2**14): Gao et al. 2024, the default of saeforge, sparsify, dictionary_learning."""
    return 2e-4 / (n_latents / 2**14) ** 0.5


def clipped_adam_step(loss: Tensor, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Our trainer's step without DeepSpeed: backward, clip the gradient norm at 1.0, Adam."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Saeforge(Contender):
    def __init__(
        self, cfg: BenchConfig, n: int, first: Tensor, *, kernel: str, gemm_dtype
    ) -> None:
        self.name = f"saeforge {kernel}" + (" bf16 GEMM" if gemm_dtype == torch.bfloat16 else " fp32")
        self.gemm_dtype = gemm_dtype
        compute = gemm_dtype if gemm_dtype != torch.float32 else None
        self.sae = TopKSAE(cfg.d_model, n, cfg.k, seed=cfg.model_seed, kernel=kernel, compute_dtype=compute)
        self.sae.init_b_dec(first, method="mean")  # the trainer's init: the cache mean
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=width_scaled_lr(n), fused=True)

    def step(self, x: Tensor, step: int) -> None:
        clipped_adam_step(self.sae(x).loss, self.sae, self.optimizer)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.sae(x)
        return out.reconstruction, (out.latent_acts > 0).sum(dim=-1)


class Sparsify(Contender):
    name = "sparsify 1.3.3"

    def __init__(self, cfg: BenchConfig, n: int, first: Tensor) -> None:
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(cfg.model_seed)
        self.sae = SparseCoder(cfg.d_model, SparseCoderConfig(num_latents=n, k=cfg.k))
        self.sae.b_dec.data = first.mean(dim=0)  # as Trainer.fit does at step 0
        # Trainer.fit's "adam" branch: torch Adam (no bitsandbytes here) at the width-scaled lr,
        # linear warm-up over lr_warmup_steps (1000) disabled.
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=width_scaled_lr(n))

    def step(self, x: Tensor, step: int) -> None:
        # Trainer.fit's per-batch work for an autoencoder with loss_fn="fvu", in its order.
        self.sae.set_decoder_norm_to_unit_norm()
        out = self.sae(x)
        out.fvu.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.sae(x)
        return out.sae_out, (out.latent_acts > 0).sum(dim=-1)


class SAELens(Contender):
    def __init__(self, cfg: BenchConfig, n: int, first: Tensor, *, sparse: bool) -> None:
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.name = "SAELens 6.54.12" + (" sparse acts" if sparse else "")
        torch.manual_seed(cfg.model_seed)
        sae_cfg = TopKTrainingSAEConfig(d_in=cfg.d_model, d_sae=n, k=cfg.k)
        if sparse:  # its sparse backward crashes on CPU unless rescale_acts_by_decoder_norm is off
            sae_cfg.use_sparse_activations = True
            sae_cfg.rescale_acts_by_decoder_norm = False
        self.sae = TopKTrainingSAE(sae_cfg)
        steps = max(cfg.steps.values())
        defaults = SAETrainerConfig(total_training_samples=1, train_batch_size_samples=1)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=steps * cfg.batch_size,
            train_batch_size_samples=cfg.batch_size,
            lr_scheduler_name="constant",
            lr_warm_up_steps=0,
            lr_end=defaults.lr,  # the runner config fills this in; constant lr ignores it
        )
        self.trainer = SAETrainer(trainer_cfg, self.sae, data_provider=iter(()))

    def step(self, x: Tensor, step: int) -> None:
        self.trainer._train_step(self.sae, x)
        self.trainer.n_training_steps += 1

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acts = self.sae.encode(x)
        if acts.is_sparse:
            acts = acts.to_dense()
        return self.sae.decode(acts), (acts > 0).sum(dim=-1)


class DictionaryLearning(Contender):
    name = "dictionary_learning 0.1.0"

    def __init__(self, cfg: BenchConfig, n: int, first: Tensor) -> None:
        from dictionary_learning.trainers.top_k import TopKTrainer

        self.trainer = TopKTrainer(
            steps=max(cfg.steps.values()),
            activation_dim=cfg.d_model,
            dict_size=n,
            k=cfg.k,
            layer=0,
            lm_name="synthetic",
            warmup_steps=0,
            seed=cfg.model_seed,
            device="cpu",
        )

    def step(self, x: Tensor, step: int) -> None:
        self.trainer.update(step, x)  # step 0 sets b_dec to the batch's geometric median

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.trainer.ae.encode(x)
        return self.trainer.ae.decode(features), (features > 0).sum(dim=-1)


CONTENDERS: dict[str, Callable[[BenchConfig, int, Tensor], Contender]] = {
    "saeforge-bf16": lambda c, n, f: Saeforge(c, n, f, kernel="sparse", gemm_dtype=torch.bfloat16),
    "saeforge-fp32": lambda c, n, f: Saeforge(c, n, f, kernel="sparse", gemm_dtype=torch.float32),
    "sparsify": Sparsify,
    "saelens": lambda c, n, f: SAELens(c, n, f, sparse=False),
    "saelens-sparse": lambda c, n, f: SAELens(c, n, f, sparse=True),
    "dictionary_learning": DictionaryLearning,
    "dense-torch": lambda c, n, f: Saeforge(c, n, f, kernel="dense", gemm_dtype=torch.float32),
}


# --------------------------------------------------------------------------- measurement


def make_data(cfg: BenchConfig, n_batches: int) -> tuple[list[Tensor], Tensor]:
    """Held-out tokens and ``n_batches`` training batches from one sparse-superposition source."""
    source = SparseFeatureData(
        d_in=cfg.d_model,
        n_features=cfg.n_features,
        mean_active=cfg.mean_active,
        seed=cfg.data_seed,
        offset_norm=1.0,
        noise_std=0.01,
    )
    heldout = source.sample(cfg.heldout_tokens).x
    batches = [source.sample(cfg.batch_size).x for _ in range(n_batches)]
    # Everyone gets what saeforge's trainer feeds its SAE: activations scaled to mean norm
    # sqrt(d_model) (``sae.normalize``, as SAELens's ``expected_average_only_in``). FVU is
    # scale-free; what it changes is the gradient scale against Adam's eps for MSE losses.
    scale = cfg.d_model**0.5 / batches[0].norm(dim=1).mean()
    return [x * scale for x in batches], heldout * scale


def measure_gemm_rates(cfg: BenchConfig, n: int) -> dict[str, float]:
    return {label: gemm_flops_per_s(cfg, n, dtype) for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def gemm_flops_per_s(cfg: BenchConfig, n: int, dtype: torch.dtype, *, reps: int = 7) -> float:
    """Median rate of the encoder's GEMM, (batch x d_model) @ (d_model x n), into a reused output."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch_size, cfg.d_model, generator=generator).to(dtype)
    w = torch.randn(cfg.d_model, n, generator=generator).div_(cfg.d_model**0.5).to(dtype)
    out = torch.empty(cfg.batch_size, n, dtype=dtype)
    torch.mm(x, w, out=out)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(x, w, out=out)
        seconds.append(time.perf_counter() - start)
    return 2 * cfg.batch_size * cfg.d_model * n / statistics.median(seconds)


@torch.no_grad()
def heldout_quality(contender: Contender, heldout: Tensor, *, chunk: int = 1024) -> tuple[float, float]:
    """Pooled FVU (squared error over variance around the held-out mean) and mean L0."""
    squared_error, firing = 0.0, 0
    for x in heldout.split(chunk):
        reconstruction, l0 = contender.reconstruct(x)
        squared_error += (reconstruction.double() - x.double()).pow(2).sum().item()
        firing += int(l0.sum().item())
    variance = (heldout.double() - heldout.double().mean(dim=0)).pow(2).sum().item()
    return squared_error / variance, firing / heldout.shape[0]


def run_contender(
    name: str, cfg: BenchConfig, n: int, batches: list[Tensor], heldout: Tensor, log: Callable
) -> Result:
    """Train ``name`` for its steps, timing each; held-out quality at the common step count and
    at the end."""
    result = Result(name, name, n)
    try:
        contender = CONTENDERS[name](cfg, n, batches[0])
    except Exception as error:  # a peer that cannot run is reported, not dropped
        result.error = f"{type(error).__name__}: {error}"
        log(f"  {name}: cannot run: {result.error}")
        return result
    result.name = contender.name
    checkpoints = {cfg.slow_steps[n], cfg.steps_for(name, n)}
    try:
        for step, x in enumerate(batches[: cfg.steps_for(name, n)]):
            start = time.perf_counter()
            contender.step(x, step)
            result.step_s.append(time.perf_counter() - start)
            if step + 1 in checkpoints:
                result.quality[step + 1] = heldout_quality(contender, heldout)
    except Exception as error:
        result.error = f"{type(error).__name__} at step {len(result.step_s)}: {error}"
    median = result.median_step_s(cfg.warmup_steps)
    quality = ", ".join(f"FVU {f:.4f} L0 {l0:.1f} @ {s}" for s, (f, l0) in sorted(result.quality.items()))
    log(
        f"  {result.name}: {len(result.step_s)} steps, median {median:.3f} s "
        f"({cfg.batch_size / median:,.0f} tokens/s); {quality}"
        + (f"  [{result.error}]" if result.error else "")
    )
    del contender
    gc.collect()
    return result


# --------------------------------------------------------------------------- report


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def markdown_table(cfg: BenchConfig, results: list[Result], rates: dict[tuple[int, str], float]) -> str:
    """One row per contender and size; the bound uses the GEMM dtype of that contender."""
    lines = [
        "| n_latents | contender | step (s) | tokens/s | vs fastest peer | % of GEMM bound "
        "| FVU, L0 at the common step | FVU, L0 at the last step | steps (timed) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in cfg.sizes:
        rows = [r for r in results if r.n_latents == n]
        peers = [r for r in rows if not r.key.startswith(("saeforge", "dense")) and r.step_s]
        fastest_peer = max(
            (cfg.batch_size / r.median_step_s(cfg.warmup_steps) for r in peers), default=math.nan
        )
        for r in rows:
            if not r.step_s:
                lines.append(f"| {n:,} | {r.name} | – | – | – | – | – | – | cannot run: {r.error} |")
                continue
            tokens_per_s = cfg.batch_size / r.median_step_s(cfg.warmup_steps)
            dtype = "bf16" if "bf16" in r.name else "fp32"
            bound = rates[(n, dtype)] / (2 * cfg.d_model * n)
            common = quality_cell(r.quality.get(cfg.slow_steps[n]), cfg.slow_steps[n])
            last_step = len(r.step_s)
            last = quality_cell(r.quality.get(last_step), last_step) if last_step != cfg.slow_steps[n] else "–"
            timed = max(len(r.step_s) - cfg.warmup_steps, 0)
            lines.append(
                f"| {n:,} | {r.name} | {r.median_step_s(cfg.warmup_steps):.3f} | {tokens_per_s:,.0f} | "
                f"{tokens_per_s / fastest_peer:.2f}x | {100 * tokens_per_s / bound:.0f}% ({dtype}) | "
                f"{common} | {last} | {len(r.step_s)} ({timed})"
                + (f" {r.error}" if r.error else "")
                + " |"
            )
    return "\n".join(lines)


def quality_cell(quality: tuple[float, float] | None, steps: int) -> str:
    if quality is None:
        return "–"
    fvu, l0 = quality
    return f"{fvu:.4f}, {l0:.1f} ({steps})"


def rates_table(cfg: BenchConfig, rates: dict, rate_log: dict) -> str:
    lines = [
        "| n_latents | fp32 GFLOP/s (before / after) | bound fp32 tokens/s "
        "| bf16 GFLOP/s (before / after) | bound bf16 tokens/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in cfg.sizes:
        per_token = 2 * cfg.d_model * n
        cells = []
        for label in ("fp32", "bf16"):
            before, after = rate_log[(n, label)]
            cells += [f"{before / 1e9:.0f} / {after / 1e9:.0f}", f"{rates[(n, label)] / per_token:,.0f}"]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(
    cfg: BenchConfig, results, rates, rate_log, command: str, started: str, elapsed_s: float, loads
) -> str:
    steps = "; ".join(
        f"{n:,} latents: {cfg.steps[n]} steps ({cfg.slow_steps[n]} for {', '.join(cfg.slow)})"
        for n in cfg.sizes
    )
    return "\n".join([
        f"Measured {started} with `{command}` ({elapsed_s / 60:.1f} min).",
        "",
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"`torch.set_num_threads({cfg.threads})`; load average (1/5/15 min) before each size: "
        + "; ".join(f"{n:,}: {loads[n]}" for n in cfg.sizes) + ".",
        f"d_model {cfg.d_model}, k {cfg.k}, batch {cfg.batch_size:,} tokens, the same batches in "
        f"the same order for every contender. {steps}. Step time: median over all steps but the "
        f"first {cfg.warmup_steps}. FVU (pooled) and L0 on {cfg.heldout_tokens:,} held-out tokens, "
        "after the common step count and after the last step. Synthetic data: "
        f"{cfg.n_features:,} true features (power-law frequencies, {cfg.mean_active:g} active per "
        "token on average, magnitudes 0.5-1.5), offset norm 1, noise 0.01; then scaled to mean norm "
        "sqrt(d_model), as the trainer normalises.",
        "",
        markdown_table(cfg, results, rates),
        "",
        "Encoder GEMM, (batch x d_model) @ (d_model x n_latents), measured before and after each "
        "size's contenders (median of 7, output reused); the bound uses the higher of the two:",
        "",
        rates_table(cfg, rates, rate_log),
    ])


# --------------------------------------------------------------------------- entry point


def _per_size(parser: argparse.ArgumentParser, flag: str, pairs: list[str], sizes: list[int]) -> dict[int, int]:
    values = {int(n): int(v) for n, v in (pair.split(":") for pair in pairs)}
    missing = [n for n in sizes if n not in values]
    if missing:
        parser.error(f"{flag} has no entry for sizes {missing}")
    return values


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument(
        "--steps", nargs="+", default=["16384:100", "65536:22"],
        help="N_LATENTS:STEPS pairs: training steps per size for the contenders not in --slow",
    )
    parser.add_argument(
        "--slow-steps", nargs="+", default=["16384:22", "65536:4"],
        help="N_LATENTS:STEPS pairs: steps for the --slow contenders; everyone is evaluated here too",
    )
    parser.add_argument(
        "--slow", nargs="*", default=["saelens", "saelens-sparse", "dictionary_learning", "dense-torch"],
        choices=list(CONTENDERS),
    )
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--write", type=Path, default=None, help="results file to update")
    args = parser.parse_args(argv)
    steps = _per_size(parser, "--steps", args.steps, args.sizes)
    slow_steps = _per_size(parser, "--slow-steps", args.slow_steps, args.sizes)
    for n in args.sizes:
        if not args.warmup_steps < slow_steps[n] <= steps[n]:
            parser.error(
                f"at {n} latents need --warmup-steps={args.warmup_steps} < "
                f"--slow-steps={slow_steps[n]} <= --steps={steps[n]}"
            )
    cfg = BenchConfig(args.sizes, steps, slow_steps, args.slow, args.warmup_steps, args.contenders)
    return cfg, args.write


def main(argv: list[str] | None = None) -> None:
    cfg, write = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    command = " ".join([".venv/bin/python", "benchmarks/bench_trainer.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    batches, heldout = make_data(cfg, max(cfg.steps[n] for n in cfg.sizes))
    log(f"{len(batches)} batches of synthetic activations ready ({time.perf_counter() - t0:.0f} s)")
    results, rates, rate_log, loads = [], {}, {}, {}
    for n in cfg.sizes:
        loads[n] = load_average()
        log(f"n_latents {n:,} (load {loads[n]})")
        before = measure_gemm_rates(cfg, n)
        for name in cfg.contenders:
            results.append(run_contender(name, cfg, n, batches, heldout, log))
        after = measure_gemm_rates(cfg, n)
        for label in before:
            # The higher of the two: the bound should not drop because the machine got busier.
            rates[(n, label)] = max(before[label], after[label])
            rate_log[(n, label)] = (before[label], after[label])
        log("  GEMM GFLOP/s before/after: " + ", ".join(
            f"{label} {before[label] / 1e9:.0f}/{after[label] / 1e9:.0f}" for label in before
        ))
    block = report(cfg, results, rates, rate_log, command, started, time.perf_counter() - t0, loads)
    print(block)
    if write is not None:
        write_block(write, "bench_trainer", block)


if __name__ == "__main__":
    main()
