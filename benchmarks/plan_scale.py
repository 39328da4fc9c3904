"""Memory per GPU for a very wide SAE, and for a cross-layer transcoder over all of a model's
layers, under each ZeRO stage and feature-parallel degree.

Arithmetic, not a measurement: ``python benchmarks/plan_scale.py [--latents 16777216 --d-model 4096]``
prints the SAE table that benchmarks/RESULTS.md records; ``python benchmarks/plan_scale.py --clt
[--write benchmarks/RESULTS.md]`` the CLT tables (written into the results file's ``plan_scale_clt``
block). The model:

* SAE parameters ``P = 2 * n * d + n + d`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``);
* bf16 mixed precision as DeepSpeed runs it: 2 bytes of bf16 weights, 2 of bf16 gradients and 12 of
  fp32 optimizer state (master weights, Adam's two moments) per parameter, 16 bytes in all; fp32
  training is also 16 (4 + 4 + 8) but splits them otherwise, which matters under ZeRO;
* feature parallelism over ``f`` ranks divides every one of these by ``f`` (each rank holds its slice
  of the latents; only ``b_dec``, d values, is replicated);
* ZeRO over the ``dp = N / f`` data-parallel ranks of each slice partitions the optimizer state
  (stage 1), also the gradients (stage 2), also the weights (stage 3);
* working memory of one step, per GPU: the batch in and its reconstruction (``2 * B * d`` fp32),
  the chunked encoder's pre-activations (``B * chunk`` bf16, chunk = 4,096 latents at a time; the
  full ``B x n/f`` matrix is never held), the k selected values and indices and their gradients;
* under ZeRO 3 the forward gathers the module's whole weights before it runs: ``W_enc`` and
  ``W_dec`` of the rank's slice, ``2 * 2 * n * d / f`` bytes in bf16, on top of the partitioned state.
  Without feature parallelism that is the whole dictionary on every GPU: ZeRO 3 alone does not
  make a single SAE layer fit, feature parallelism does.

A JumpReLU CLT over ``L`` layers, ``n`` latents per layer, reading each layer's MLP input and
writing MLP outputs (both ``d`` wide), has ``L d n`` encoder weights, ``n d L (L + 1) / 2`` decoder
weights (layer l's features write to the ``L - l`` outputs from l on), ``L n`` encoder biases,
``L n`` thresholds and ``L d`` decoder biases; all but the decoder biases are split with the latents
(each layer's n over the f ranks). The same per-byte model and ZeRO divisors (``state_bytes``)
apply. Its step's working memory differs from the SAE's: JumpReLU latents are dense, so each rank
holds its slice's pre-activations, activations and their gradient for all L layers
(``3 * B * L * n / f`` values), beside the inputs and targets as the reader yields them
(``2 * B * L * d`` fp32) and the prediction, its all-reduced sum and its gradient (``3 * B * L * d``),
activations in the training precision (2 bytes in bf16, 4 in fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results import write_block  # noqa: E402

GIB = 2**30
BYTES = {"bf16": {"weights": 2, "grads": 2, "optimizer": 12}, "fp32": {"weights": 4, "grads": 4, "optimizer": 8}}
"""Bytes per trained parameter in a DeepSpeed engine with Adam (16 in all either way)."""


def state_bytes(sliced: float, replicated: float, *, feature_parallel: int, data_parallel: int, zero_stage: int,
                precision: str = "bf16") -> float:
    """Weights, gradients and Adam state on one rank: ``sliced`` parameters split over the
    feature-parallel ranks, ``replicated`` ones on each, ZeRO partitioning over the data-parallel ones."""
    params = sliced / feature_parallel + replicated
    divisors = {
        "weights": data_parallel if zero_stage >= 3 else 1,
        "grads": data_parallel if zero_stage >= 2 else 1,
        "optimizer": data_parallel if zero_stage >= 1 else 1,
    }
    per_byte = BYTES[precision]
    return sum(params * per_byte[part] / divisors[part] for part in per_byte)


def per_gpu_bytes(n: int, d: int, *, gpus: int, feature_parallel: int, zero_stage: int, batch: int, k: int,
                  precision: str = "bf16") -> float:
    state = state_bytes(2 * n * d + n, d, feature_parallel=feature_parallel, data_parallel=gpus // feature_parallel,
                        zero_stage=zero_stage, precision=precision)
    working = 2 * batch * d * 4 + batch * 4096 * 2 + 4 * batch * k * 8
    if zero_stage == 3:
        working += 2 * BYTES[precision]["weights"] * n * d / feature_parallel
    return state + working


def table(n: int, d: int, *, batch: int, k: int, gpu_counts: list[int], gpu_gib: float) -> str:
    lines = [
        f"{n:,} latents x d_model {d:,}: {2 * n * d + n + d:,} parameters, "
        f"{(2 * n * d + n + d) * 16 / GIB:,.0f} GiB of weights, gradients and optimizer state in all "
        f"(16 bytes each); batch {batch:,} tokens, k {k}.",
        "",
        "| GPUs | feature parallel | data parallel | ZeRO 0 | ZeRO 1 | ZeRO 2 | ZeRO 3 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for gpus in gpu_counts:
        f = 1
        while f <= gpus:
            cells = []
            for stage in range(4):
                gib = per_gpu_bytes(n, d, gpus=gpus, feature_parallel=f, zero_stage=stage, batch=batch, k=k) / GIB
                mark = "" if gib <= gpu_gib else " ✗"
                cells.append(f"{gib:,.1f}{mark}")
            lines.append(f"| {gpus} | {f} | {gpus // f} | " + " | ".join(cells) + " |")
            f *= 2
    lines.append("")
    lines.append(f"GiB per GPU; ✗: over {gpu_gib:g} GiB (an 80 GB H100 leaves about that for the job).")
    return "\n".join(lines)


MODELS = {"SmolLM2-135M": (30, 576), "Llama-3.2-1B": (16, 2048), "Llama-3.1-8B": (32, 4096)}
"""(layers, d_model) of the packaged model, a 1B and an 8B model: a CLT over all their layers. Their
MLPs' hidden widths (1,536, 8,192, 14,336) do not enter: the CLT reads an MLP's input and writes its
output, both d_model wide."""
CLT_GPUS = {"SmolLM2-135M": [1, 8], "Llama-3.2-1B": [8, 64], "Llama-3.1-8B": [64, 256]}
"""The GPU counts each model's table shows (a node of 8, and the smallest counts near where it fits)."""
MAX_FEATURE_PARALLEL = 64


def clt_parameters(n: int, d: int, layers: int) -> tuple[int, int]:
    """(split with the latents, replicated) parameters of a JumpReLU CLT: ``W_enc``, the decoders,
    ``b_enc`` and the thresholds; ``b_dec``."""
    return layers * d * n + n * d * layers * (layers + 1) // 2 + 2 * layers * n, layers * d


def clt_working_bytes(n: int, d: int, layers: int, *, feature_parallel: int, zero_stage: int, batch: int,
                      precision: str) -> float:
    """One step's activations on one rank (see the module docstring), plus under ZeRO 3 the slice's
    gathered weights."""
    value = BYTES[precision]["weights"]
    working = 2 * batch * layers * d * 4 + 3 * batch * layers * d * value + 3 * batch * layers * n / feature_parallel * value
    if zero_stage == 3:
        working += value * (clt_parameters(n, d, layers)[0] - 2 * layers * n) / feature_parallel
    return working


def clt_per_gpu_bytes(n: int, d: int, layers: int, *, gpus: int, feature_parallel: int, zero_stage: int, batch: int,
                      precision: str = "bf16") -> float:
    sliced, replicated = clt_parameters(n, d, layers)
    state = state_bytes(sliced, replicated, feature_parallel=feature_parallel, data_parallel=gpus // feature_parallel,
                        zero_stage=zero_stage, precision=precision)
    return state + clt_working_bytes(n, d, layers, feature_parallel=feature_parallel, zero_stage=zero_stage,
                                     batch=batch, precision=precision)


def _arrangements(gpus: int, n: int) -> list[int]:
    """Feature-parallel degrees 1, 2, 4, ... up to 64 that split ``gpus`` and each layer's ``n``."""
    return [f for f in (2**i for i in range(7)) if f <= min(gpus, MAX_FEATURE_PARALLEL) and gpus % f == 0 and n % f == 0]


def fewest_gpus(n: int, d: int, layers: int, *, batch: int, gpu_gib: float, precision: str = "bf16") -> tuple[int, int, int] | None:
    """(GPUs, feature parallel, ZeRO stage) of the smallest power-of-two GPU count that holds the
    CLT, its lowest feature-parallel degree, then its lowest stage; None beyond 4,096 GPUs."""
    for gpus in (2**i for i in range(13)):
        for f in _arrangements(gpus, n):
            for stage in range(4):
                size = clt_per_gpu_bytes(n, d, layers, gpus=gpus, feature_parallel=f, zero_stage=stage, batch=batch,
                                         precision=precision)
                if size <= gpu_gib * GIB:
                    return gpus, f, stage
    return None


def clt_summary(multiples: list[int], *, batch: int, gpu_gib: float) -> str:
    lines = [
        "| model | layers | d_model | latents per layer | parameters | state (16 bytes each) | "
        "fewest GPUs, bf16 (feature parallel, ZeRO) | the same, fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, (layers, d) in MODELS.items():
        for multiple in multiples:
            n = multiple * d
            params = sum(clt_parameters(n, d, layers))
            cells = []
            for precision in ("bf16", "fp32"):
                fit = fewest_gpus(n, d, layers, batch=batch, gpu_gib=gpu_gib, precision=precision)
                cells.append("over 4,096" if fit is None else f"{fit[0]:,} (f {fit[1]}, ZeRO {fit[2]})")
            lines.append(f"| {name} | {layers} | {d:,} | {n:,} ({multiple}x) | {params / 1e9:,.2f} B | "
                         f"{params * 16 / GIB:,.0f} GiB | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def clt_table(name: str, multiples: list[int], *, batch: int, gpu_gib: float) -> str:
    layers, d = MODELS[name]
    stages = " | ".join(f"{p} ZeRO {s}" for p in ("bf16", "fp32") for s in range(4))
    lines = [
        f"{name}: a CLT over all {layers} layers, d_model {d:,}; batch {batch:,} tokens per rank.",
        "",
        f"| latents per layer | GPUs | feature parallel | data parallel | {stages} | of which one step's activations, bf16 |",
        "| ---: | ---: | ---: | ---: |" + " ---: |" * 9,
    ]
    for multiple in multiples:
        n = multiple * d
        for gpus in CLT_GPUS[name]:
            for f in _arrangements(gpus, n):
                cells = []
                for precision in ("bf16", "fp32"):
                    for stage in range(4):
                        gib = clt_per_gpu_bytes(n, d, layers, gpus=gpus, feature_parallel=f, zero_stage=stage,
                                                batch=batch, precision=precision) / GIB
                        cells.append(f"{gib:,.1f}" + ("" if gib <= gpu_gib else " ✗"))
                act = clt_working_bytes(n, d, layers, feature_parallel=f, zero_stage=0, batch=batch,
                                        precision="bf16") / GIB
                lines.append(f"| {n:,} | {gpus} | {f} | {gpus // f} | " + " | ".join(cells) + f" | {act:,.1f} |")
    return "\n".join(lines)


def clt_plan(multiples: list[int], *, batch: int, gpu_gib: float) -> str:
    parts = [
        f"Arithmetic (`python benchmarks/plan_scale.py --clt --write benchmarks/RESULTS.md`): a JumpReLU "
        f"CLT over every layer, latents per layer {' and '.join(f'{m}x' for m in multiples)} d_model; GiB per "
        f"GPU of weights, gradients and Adam state plus one step's working memory; ✗: over {gpu_gib:g} GiB. "
        f"Fewest GPUs: the smallest power of two, feature parallel at most {MAX_FEATURE_PARALLEL}, data "
        f"parallel the rest.",
        "",
        clt_summary(multiples, batch=batch, gpu_gib=gpu_gib),
    ]
    for name in MODELS:
        parts += ["", clt_table(name, multiples, batch=batch, gpu_gib=gpu_gib)]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=16 * 2**20)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--gpu-gib", type=float, default=74.0)
    parser.add_argument("--clt", action="store_true", help="the CLT plan over all layers of three models instead")
    parser.add_argument("--multiples", type=int, nargs="+", default=[8, 32], help="CLT latents per layer, x d_model")
    parser.add_argument("--write", type=Path, default=None, help="with --clt: the results file to write into")
    args = parser.parse_args()
    if not args.clt:
        print(table(args.latents, args.d_model, batch=args.batch, k=args.k, gpu_counts=args.gpus, gpu_gib=args.gpu_gib))
        return
    block = clt_plan(args.multiples, batch=args.batch, gpu_gib=args.gpu_gib)
    print(block)
    if args.write:
        write_block(args.write, "plan_scale_clt", block)


if __name__ == "__main__":
    main()
