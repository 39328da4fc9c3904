#!/usr/bin/env python
"""The activation cache's read path against the trainer's appetite and the store's raw bandwidth.

Takes real activations from a cache ``make run`` built (SmolLM2-135M, layer 15 residual, d_model
576), re-encodes the same rows as every stored dtype x compression variant into fresh local
caches, and measures per variant, in one run:

* encoding cost (``encode_shard`` rows/s) and bytes per row: what compression buys and costs;
* raw read bandwidth: ``store.get_bytes`` of every shard, nothing else (the page cache is warm
  after the first pass, so this is the bound the reader could reach on this disk);
* the reader: ``ActivationReader`` one rank, shuffle buffer, checksum verification, decoding,
  float32 batches; rows/s, median of ``--epochs`` epochs after one warm-up epoch;
* the reader's rows/s as a multiple of the trainer's tokens/s (``--trainer-tokens-per-s``, from
  ``bench_trainer.py``'s saeforge bf16 row at 16,384 latents, d_model 768).

    .venv/bin/python benchmarks/bench_cache.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activation_cache.manifest import (  # noqa: E402
    ActivationStats,
    Manifest,
    ShardEntry,
    commit_manifest,
    load_manifest,
)
from activation_cache.reader import ActivationReader, read_shard  # noqa: E402
from activation_cache.schema import ShardMeta, encode_shard, sha256_hex  # noqa: E402
from activation_cache.store import LocalStore, open_store  # noqa: E402
from benchmarks.results import write_block  # noqa: E402

VARIANTS = [(dtype, compression) for dtype in ("float32", "bfloat16") for compression in (None, "lz4", "zstd")]


def load_rows(source: str, rows: int) -> tuple[torch.Tensor, Manifest]:
    store = open_store(source)
    manifest = load_manifest(store)
    if manifest is None:
        raise SystemExit(f"{source}: no cache there; run `make run` first, or pass --source")
    chunks, held = [], 0
    for entry in manifest.shards:
        chunks.append(read_shard(store, entry).activations)
        held += entry.rows
        if held >= rows:
            break
    return torch.cat(chunks)[:rows], manifest


def build_variant(root: Path, acts: torch.Tensor, meta: ShardMeta, rows_per_shard: int, compression) -> tuple[LocalStore, float]:
    """A complete cache of ``acts``; returns it and the encoding rate (rows/s, encode only)."""
    store = LocalStore(root)
    manifest = Manifest(cache_key=meta.cache_key, key_inputs={}, model=meta.model, revision=meta.revision,
                        hookpoint=meta.hookpoint, d_model=meta.d_model, dtype=meta.dtype)
    encode_s = 0.0
    for i, start in enumerate(range(0, len(acts), rows_per_shard)):
        part = acts[start : start + rows_per_shard]
        n = len(part)
        t = time.perf_counter()
        data = encode_shard(part, np.zeros(n), np.full(n, i), np.arange(n), meta, compression=compression)
        encode_s += time.perf_counter() - t
        name = f"shards/unit-{i:06d}.arrow"
        store.put_bytes(name, data)
        entry = ShardEntry(name=name, rows=n, size_bytes=len(data), sha256=sha256_hex(data),
                           first_sequence_id=i, n_sequences=1)
        manifest = manifest.with_shard(entry, ActivationStats.of(part.numpy()))
    manifest.complete = True
    commit_manifest(store, manifest)
    return store, len(acts) / encode_s


def raw_read_bytes_per_s(store: LocalStore, names: list[str], repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        total = sum(len(store.get_bytes(name)) for name in names)
        rates.append(total / (time.perf_counter() - t))
    return statistics.median(rates)


def reader_rows_per_s(store: LocalStore, args: argparse.Namespace) -> tuple[float, int]:
    reader = ActivationReader(store, rank=0, world_size=1, batch_size=args.batch_size, seed=0,
                              shuffle_buffer_rows=args.shuffle_buffer_rows, read_threads=args.read_threads)
    rates, rows = [], 0
    for epoch in range(args.epochs + 1):
        t = time.perf_counter()
        rows = sum(len(batch) for batch in reader.epoch(epoch))
        if epoch:  # epoch 0 warms the page cache and the allocator
            rates.append(rows / (time.perf_counter() - t))
    return statistics.median(rates), rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=None, help="cache to take rows from (default: the newest under store/caches)")
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--rows-per-shard", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--shuffle-buffer-rows", type=int, default=16384)
    parser.add_argument("--read-threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trainer-tokens-per-s", type=float, default=9351.0,
                        help="the trainer's rate to compare with (bench_trainer.py, saeforge bf16, 16,384 latents)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    source = args.source
    if source is None:
        caches = sorted((ROOT / "store" / "caches").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
        if not caches:
            raise SystemExit("no cache under store/caches: run `make run` first, or pass --source")
        source = str(caches[-1].parent)
    command = " ".join([".venv/bin/python", "benchmarks/bench_cache.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    acts, manifest = load_rows(source, args.rows)
    print(f"{len(acts):,} rows of d_model {acts.shape[1]} from {manifest.model} {manifest.hookpoint}", file=sys.stderr)
    lines = []
    with tempfile.TemporaryDirectory(prefix="saeforge-bench-cache-") as tmp:
        for dtype, compression in VARIANTS:
            meta = ShardMeta(model=manifest.model, revision=manifest.revision, hookpoint=manifest.hookpoint,
                             d_model=manifest.d_model, dtype=dtype, cache_key="bench")
            store, encode_rate = build_variant(Path(tmp) / f"{dtype}-{compression}", acts, meta,
                                               args.rows_per_shard, compression)
            stored = load_manifest(store)
            assert stored is not None
            names = [s.name for s in stored.shards]
            raw = raw_read_bytes_per_s(store, names, repeats=3)
            rate, rows = reader_rows_per_s(store, args)
            bytes_per_row = stored.size_bytes / stored.rows
            line = (dtype, compression or "none", bytes_per_row, encode_rate, raw, raw / bytes_per_row, rate,
                    rate / args.trainer_tokens_per_s, rows)
            print(f"  {line}", file=sys.stderr)
            lines.append(line)
    base = lines[0][2]
    table = [
        "| stored as | compression | bytes / row | vs float32 | encode rows/s | raw read GB/s "
        "(rows/s) | reader rows/s | reader / raw | reader / trainer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype, compression, bpr, enc, raw, raw_rows, rate, multiple, _ in lines:
        table.append(
            f"| {dtype} | {compression} | {bpr:,.0f} | {bpr / base:.2f} | {enc:,.0f} | {raw / 1e9:.2f} "
            f"({raw_rows:,.0f}) | {rate:,.0f} | {rate / raw_rows:.0%} | {multiple:.1f}x |"
        )
    block = "\n".join([
        f"Run {started}, `{command}`: {len(acts):,} rows of {manifest.model} `{manifest.hookpoint}` "
        f"(d_model {manifest.d_model}) in shards of {args.rows_per_shard:,} rows, on a local disk; reader: "
        f"one rank, batches of {args.batch_size:,}, shuffle buffer {args.shuffle_buffer_rows:,} rows, "
        f"{args.read_threads} read threads, sha256 verified, median of {args.epochs} epochs after a warm-up "
        f"epoch; trainer: {args.trainer_tokens_per_s:,.0f} tokens/s.",
        "",
        *table,
    ])
    print(block)
    if args.write is not None:
        write_block(args.write, "bench_cache", block)


if __name__ == "__main__":
    main()
