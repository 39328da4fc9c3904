#!/usr/bin/env python
"""What the producer path costs over the model's own forward pass, on the same batches.

The packaged model (SmolLM2-135M, GGUF) over the packaged text, one producer's work unit at a
time (``--sequences-per-unit`` sequences of ``--context`` tokens, ``--batch-size`` per forward), in
one process, each unit measured three ways in turn (the order rotates from unit to unit):

* bare forward: ``model(input_ids)`` over the whole model, no hooks, output discarded;
* bare forward to the hookpoint: the ``ActivationHarvester`` alone (the forward stops at the
  hookpoint, as a producer's does), activations discarded;
* the producer path: ``produce_shard`` (harvest, float32 conversion, special-token exclusion,
  statistics, Arrow encoding, sha256, write to a local store).

The overhead the issue bounds is (producer path - bare forward to the hookpoint) / bare forward
to the hookpoint; the full bare forward is reported beside it (stopping at the hookpoint is the
producer's saving, not an overhead). Medians over units.

    .venv/bin/python benchmarks/bench_producer.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activation_cache.config import DataConfig, ModelConfig  # noqa: E402
from activation_cache.hooking import (  # noqa: E402
    ActivationHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.producing import produce_shard, split_units  # noqa: E402
from activation_cache.schema import ShardMeta  # noqa: E402
from activation_cache.store import LocalStore  # noqa: E402
from benchmarks.results import write_block  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--sequences-per-unit", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hookpoint", default="resid_post.mid")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a producer actor's CPUs)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python", "benchmarks/bench_producer.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    model_cfg = ModelConfig(hookpoint=args.hookpoint, dtype=args.dtype, batch_size=args.batch_size)
    source = resolve_model_source(model_cfg)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=args.dtype)
    harvester = ActivationHarvester(model, args.hookpoint)
    n_tokens = args.units * args.sequences_per_unit * args.context
    tokens = pack_tokens(tokenizer, args.context, n_tokens)
    units = split_units(tokens, args.sequences_per_unit)[: args.units]
    excluded = frozenset(int(t) for t in tokenizer.all_special_ids)
    meta = ShardMeta(model=source.model_id, revision=source.revision, hookpoint=harvester.hookpoint,
                     d_model=harvester.d_model, dtype="float32", cache_key="bench")

    def bare_forward(unit) -> None:
        with torch.inference_mode():
            for lo in range(0, len(unit.tokens), args.batch_size):
                model(input_ids=torch.from_numpy(unit.tokens[lo : lo + args.batch_size]), use_cache=False)

    def to_hookpoint(unit) -> None:
        for lo in range(0, len(unit.tokens), args.batch_size):
            harvester(torch.from_numpy(unit.tokens[lo : lo + args.batch_size]))

    with tempfile.TemporaryDirectory(prefix="saeforge-bench-producer-") as tmp:
        store = LocalStore(tmp)

        def producer_path(unit) -> None:
            produce_shard(unit, harvester=harvester, store=store, meta=meta, excluded_token_ids=excluded,
                          batch_size=args.batch_size)

        ways = {"bare forward (whole model)": bare_forward, "bare forward to the hookpoint": to_hookpoint,
                "producer path": producer_path}
        names = list(ways)
        to_hookpoint(units[0])  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for i, unit in enumerate(units):
            for name in names[i % 3 :] + names[: i % 3]:
                t = time.perf_counter()
                ways[name](unit)
                seconds[name].append(time.perf_counter() - t)
            print(f"  unit {i}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names), file=sys.stderr, flush=True)

    unit_tokens = args.sequences_per_unit * args.context
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    base = medians["bare forward to the hookpoint"]
    rows = [
        "| way | median s / unit | tokens/s | vs bare forward to the hookpoint |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in names:
        rows.append(f"| {name} | {medians[name]:.3f} | {unit_tokens / medians[name]:,.0f} | "
                    f"{(medians[name] / base - 1) * 100:+.1f}% |")
    block = "\n".join([
        f"Run {started}, `{command}`: {source.model_id} ({args.dtype}), hookpoint `{harvester.hookpoint}`, "
        f"{args.units} units of {args.sequences_per_unit} sequences x {args.context} tokens, forward batches "
        f"of {args.batch_size}, `torch.set_num_threads({args.threads})` (one producer actor's CPU); medians over units.",
        "",
        *rows,
    ])
    print(block)
    if args.write is not None:
        write_block(args.write, "bench_producer", block)


def pack_tokens(tokenizer, context: int, n_tokens: int):
    from activation_cache.text import pack_sequences

    return pack_sequences(DataConfig(context_length=context, max_tokens=n_tokens), tokenizer)


if __name__ == "__main__":
    main()
