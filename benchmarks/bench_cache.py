#!/usr/bin/env python
"""The activation cache's read path against the trainer's appetite and the store's raw bandwidth.

Takes real activations from a cache ``make run`` built (SmolLM2-135M, layer 15 residual, d_model
576), writes the same rows as every stored dtype x compression variant into fresh caches, on a
local directory and on a SeaweedFS S3 endpoint on loopback, and measures per variant, in one run:

* the writer: encoding rows/s, and rows/s of what a producer does per shard (statistics,
  encode, put, manifest commit), against the producers' own rate; bytes per row, which is what
  compression buys;
* raw read bandwidth: ``store.get_bytes`` of every shard in sequence and nothing else, from the
  page cache and (local store) from the disk after evicting the files;
* the reader: ``ActivationReader`` one rank, shuffle buffer, sha256 verification, decoding,
  float32 batches; rows/s, median of ``--epochs`` epochs after one warm-up epoch;
* the reader's rows/s as a multiple of the trainer's tokens/s (``--trainer-tokens-per-s``, from
  ``bench_trainer.py``'s saeforge bf16 row at 16,384 latents, d_model 768).

    .venv/bin/python benchmarks/bench_cache.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from s3_server import started_s3_server  # noqa: E402  (tests/s3_server.py)

from activation_cache.manifest import (  # noqa: E402
    ActivationStats,
    Manifest,
    ShardEntry,
    commit_manifest,
    load_manifest,
)
from activation_cache.reader import ActivationReader, read_shard  # noqa: E402
from activation_cache.s3 import S3Store  # noqa: E402
from activation_cache.schema import ShardMeta, encode_shard, sha256_hex  # noqa: E402
from activation_cache.store import LocalStore, ObjectStore, open_store  # noqa: E402
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


def build_variant(store: ObjectStore, acts: torch.Tensor, meta: ShardMeta, rows_per_shard: int, compression) -> tuple[float, float]:
    """Write a complete cache of ``acts`` as a producer does (statistics, encode, put, commit the
    manifest after each shard); returns (encode rows/s, whole writer rows/s)."""
    start = time.perf_counter()
    manifest = Manifest(cache_key=meta.cache_key, key_inputs={}, model=meta.model, revision=meta.revision,
                        hookpoint=meta.hookpoint, d_model=meta.d_model, dtype=meta.dtype)
    encode_s = 0.0
    for i, first in enumerate(range(0, len(acts), rows_per_shard)):
        part = acts[first : first + rows_per_shard]
        n = len(part)
        t = time.perf_counter()
        data = encode_shard(part, np.zeros(n), np.full(n, i), np.arange(n), meta, compression=compression)
        encode_s += time.perf_counter() - t
        name = f"shards/unit-{i:06d}.arrow"
        store.put_bytes(name, data)
        entry = ShardEntry(name=name, rows=n, size_bytes=len(data), sha256=sha256_hex(data),
                           first_sequence_id=i, n_sequences=1)
        manifest = manifest.with_shard(entry, ActivationStats.of(part.numpy()))
        commit_manifest(store, manifest)
    manifest.complete = True
    commit_manifest(store, manifest)
    return len(acts) / encode_s, len(acts) / (time.perf_counter() - start)


def evict(store: ObjectStore, names: list[str]) -> None:
    """Drop a local cache's shard files from the page cache (written back first), so the next
    read comes from the disk; no-op for other stores."""
    if not isinstance(store, LocalStore):
        return
    for name in names:
        fd = os.open(store.root / name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read_bytes_per_s(store: ObjectStore, names: list[str], repeats: int, *, cold: bool) -> float:
    """Bytes/s of reading every shard in sequence with ``get_bytes`` and nothing else."""
    rates = []
    for _ in range(repeats):
        if cold:
            evict(store, names)
        t = time.perf_counter()
        total = sum(len(store.get_bytes(name)) for name in names)
        rates.append(total / (time.perf_counter() - t))
    return statistics.median(rates)


def reader_rows_per_s(store: ObjectStore, names: list[str], args: argparse.Namespace, *, cold: bool) -> float:
    """Rows/s the reader delivers as shuffled float32 batches, median over epochs after one warm-up."""
    reader = ActivationReader(store, rank=0, world_size=1, batch_size=args.batch_size, seed=0,
                              shuffle_buffer_rows=args.shuffle_buffer_rows, read_threads=args.read_threads)
    rates = []
    for epoch in range(args.epochs + 1):
        if cold:
            evict(store, names)
        t = time.perf_counter()
        rows = sum(len(batch) for batch in reader.epoch(epoch))
        if epoch:  # epoch 0 warms the allocator (and, when warm, the page cache)
            rates.append(rows / (time.perf_counter() - t))
    return statistics.median(rates)


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
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (SeaweedFS) half")
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
    rows_out: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="saeforge-bench-cache-") as tmp, contextlib.ExitStack() as stack:
        stores: dict[str, Callable[[str], ObjectStore]] = {"local": lambda name: LocalStore(Path(tmp) / name)}
        if not args.no_s3:
            server = stack.enter_context(started_s3_server(Path(tmp) / "seaweedfs"))
            os.environ.update(server.env())
            S3Store("s3://bench").ensure_bucket()
            stores["S3 (SeaweedFS, loopback)"] = lambda name: S3Store(f"s3://bench/{name}")
        for where, make_store in stores.items():
            for dtype, compression in VARIANTS:
                meta = ShardMeta(model=manifest.model, revision=manifest.revision, hookpoint=manifest.hookpoint,
                                 d_model=manifest.d_model, dtype=dtype, cache_key="bench")
                store = make_store(f"{dtype}-{compression}")
                encode_rate, write_rate = build_variant(store, acts, meta, args.rows_per_shard, compression)
                stored = load_manifest(store)
                assert stored is not None
                names = [s.name for s in stored.shards]
                bpr = stored.size_bytes / stored.rows
                for cold in ([False, True] if isinstance(store, LocalStore) else [False]):
                    raw = raw_read_bytes_per_s(store, names, repeats=3, cold=cold)
                    rate = reader_rows_per_s(store, names, args, cold=cold)
                    line = (where, "disk" if cold else "page cache" if where == "local" else "-", dtype,
                            compression or "none", bpr, encode_rate, write_rate, raw, rate)
                    print(f"  {line}", file=sys.stderr, flush=True)
                    rows_out.append(line)
    base = rows_out[0][4]
    table = [
        "| store | read from | stored as | compression | bytes / row | vs float32 | encode rows/s "
        "| writer rows/s | raw read MB/s (rows/s) | reader rows/s (MB/s) | reader / raw | reader / trainer |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for where, source, dtype, compression, bpr, enc, write, raw, rate in rows_out:
        raw_rows = raw / bpr
        table.append(
            f"| {where} | {source} | {dtype} | {compression} | {bpr:,.0f} | {bpr / base:.2f} | {enc:,.0f} "
            f"| {write:,.0f} | {raw / 1e6:,.0f} ({raw_rows:,.0f}) | {rate:,.0f} ({rate * bpr / 1e6:,.0f}) "
            f"| {rate / raw_rows:.0%} | {rate / args.trainer_tokens_per_s:.0f}x |"
        )
    block = "\n".join([
        f"Run {started}, `{command}`: {len(acts):,} rows of {manifest.model} `{manifest.hookpoint}` "
        f"(d_model {manifest.d_model}) in shards of {args.rows_per_shard:,} rows. Writer: what a producer "
        "does per shard (statistics, encode, put, manifest commit). Raw read: `get_bytes` of every shard "
        "in sequence, median of 3 passes; \"disk\" rows evict the files from the page cache "
        "(`posix_fadvise(DONTNEED)`) before each pass and each epoch. Reader: one rank, batches of "
        f"{args.batch_size:,} float32 rows, shuffle buffer {args.shuffle_buffer_rows:,} rows, "
        f"{args.read_threads} read threads, sha256 verified; median of {args.epochs} epochs after a warm-up "
        f"epoch. Trainer: {args.trainer_tokens_per_s:,.0f} tokens/s (bench_trainer, saeforge bf16, 16,384 "
        "latents). MB/s counts stored bytes.",
        "",
        *table,
    ])
    print(block)
    if args.write is not None:
        write_block(args.write, "bench_cache", block)


if __name__ == "__main__":
    main()
