"""Memory per GPU for a very wide SAE under each ZeRO stage and feature-parallel degree.

Arithmetic, not a measurement: ``python benchmarks/plan_scale.py [--latents 16777216 --d-model 4096]``
prints the table that benchmarks/RESULTS.md records. The model:

* parameters ``P = 2 * n * d + n + d`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``);
* bf16 mixed precision as DeepSpeed runs it: 2 bytes of bf16 weights, 2 of bf16 gradients and 12 of
  fp32 optimizer state (master weights, Adam's two moments) per parameter, 16 bytes in all (fp32
  training is also 16: 4 + 4 + 8);
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
"""

from __future__ import annotations

import argparse

GIB = 2**30
BYTES = {"weights": 2, "grads": 2, "optimizer": 12}


def per_gpu_bytes(n: int, d: int, *, gpus: int, feature_parallel: int, zero_stage: int, batch: int, k: int) -> float:
    params = (2 * n * d + n) / feature_parallel + d
    dp = gpus // feature_parallel
    divisors = {
        "weights": dp if zero_stage >= 3 else 1,
        "grads": dp if zero_stage >= 2 else 1,
        "optimizer": dp if zero_stage >= 1 else 1,
    }
    state = sum(params * BYTES[part] / divisors[part] for part in BYTES)
    working = 2 * batch * d * 4 + batch * 4096 * 2 + 4 * batch * k * 8
    if zero_stage == 3:
        working += 2 * BYTES["weights"] * n * d / feature_parallel
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=16 * 2**20)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--gpu-gib", type=float, default=74.0)
    args = parser.parse_args()
    print(table(args.latents, args.d_model, batch=args.batch, k=args.k, gpu_counts=args.gpus, gpu_gib=args.gpu_gib))


if __name__ == "__main__":
    main()
