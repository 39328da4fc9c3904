"""``saeforge cache ls | inspect | verify``: what a cache holds and whether its shards are intact.

The looking is done by ``activation_cache.inspection``; this module only formats it. Every
command returns its exit status: 0, or 1 when ``verify`` finds a bad shard.
"""

from __future__ import annotations

import json
import math
import sys

import pyarrow as pa
from tqdm import tqdm

from activation_cache.inspection import (
    CacheListing,
    check_shards,
    find_caches,
    first_shard_schema,
    open_cache,
)
from activation_cache.manifest import ActivationStats
from activation_cache.schema import CorruptShardError
from activation_cache.store import ObjectStore, StoreError, open_store

_LS_COLUMNS = ("KEY", "MODEL", "HOOKPOINT", "D_MODEL", "DTYPE", "SHARDS", "ROWS", "SIZE", "STATE", "ORPHANS")


def human_bytes(size_bytes: int) -> str:
    """``1536 -> "1.5 KiB"``; whole bytes below 1 KiB."""
    if size_bytes < 1024:
        return f"{size_bytes} B"
    exponent = min(int(math.log(size_bytes, 1024)), 5)
    return f"{size_bytes / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB', 'PiB')[exponent - 1]}"


def _state(cache: CacheListing) -> str:
    if cache.manifest is None:
        return "no manifest"
    return "complete" if cache.manifest.complete else "incomplete"


def _ls_record(cache: CacheListing) -> dict:
    m = cache.manifest
    return {
        "uri": cache.uri, "cache_key": m.cache_key if m else cache.name,
        "model": m.model if m else None, "revision": m.revision if m else None,
        "hookpoint": m.hookpoint if m else None, "d_model": m.d_model if m else None,
        "dtype": m.dtype if m else None, "shards": len(m.shards) if m else 0,
        "rows": m.rows if m else 0, "size_bytes": m.size_bytes if m else 0,
        "complete": bool(m and m.complete), "state": _state(cache), "orphans": len(cache.orphans),
    }


def _ls_row(record: dict) -> tuple[str, ...]:
    values = (
        record["cache_key"], record["model"], record["hookpoint"], record["d_model"], record["dtype"],
        f"{record['shards']:,}", f"{record['rows']:,}", human_bytes(record["size_bytes"]),
        record["state"], f"{record['orphans']:,}",
    )
    return tuple("-" if v is None else str(v) for v in values)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows))


def ls_caches(uri: str, *, s3_options: dict, as_json: bool) -> int:
    records = [_ls_record(c) for c in find_caches(open_store(uri, s3_options=s3_options))]
    if as_json:
        sys.stdout.write(json.dumps(records, indent=1) + "\n")
    else:
        sys.stdout.write(_table(_LS_COLUMNS, [_ls_row(r) for r in records]) + "\n")
    return 0


def _stats_record(stats: ActivationStats) -> dict:
    if not stats.rows:
        return {"rows": 0, "mean_norm": None, "mean_of_dim_means": None, "mean_of_dim_variances": None}
    return {
        "rows": stats.rows, "mean_norm": stats.mean_norm,
        "mean_of_dim_means": float(stats.mean().mean()), "mean_of_dim_variances": float(stats.var().mean()),
    }


def _schema_record(schema: pa.Schema) -> dict:
    return {
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
        "metadata": {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()},
    }


def _inspect_record(store: ObjectStore, cache: CacheListing) -> dict:
    m = cache.manifest
    record = {
        "uri": cache.uri, "cache_key": m.cache_key, "model": m.model, "revision": m.revision,
        "hookpoint": m.hookpoint, "d_model": m.d_model, "dtype": m.dtype, "complete": m.complete,
        "format_version": m.format_version, "shards": len(m.shards), "rows": m.rows,
        "nonfinite_rows": m.nonfinite_rows, "nonfinite_shards": [s.name for s in m.shards if s.nonfinite_rows],
        "size_bytes": m.size_bytes, "stats": _stats_record(m.stats), "key_inputs": m.key_inputs,
        "schema": None, "schema_error": None, "orphans": list(cache.orphans),
    }
    try:
        schema = first_shard_schema(store, m)
        record["schema"] = _schema_record(schema) if schema is not None else None
    except (StoreError, CorruptShardError) as err:  # inspect still describes a damaged cache
        record["schema_error"] = str(err)
    return record


def _number(value: float | None, fmt: str = ".4g") -> str:
    return "n/a" if value is None else format(value, fmt)


def _inspect_text(r: dict) -> str:
    s = r["stats"]
    lines = [
        f"cache        {r['cache_key']}",
        f"uri          {r['uri']}",
        f"model        {r['model']} @ {r['revision']}",
        f"hookpoint    {r['hookpoint']}",
        f"d_model      {r['d_model']}",
        f"dtype        {r['dtype']}",
        f"state        {'complete' if r['complete'] else 'incomplete'}",
        f"shards       {r['shards']:,}",
        f"rows         {r['rows']:,}",
        f"non-finite   {r['nonfinite_rows']:,} rows with NaN or Inf (in {len(r['nonfinite_shards']):,} shards; "
        "kept, left out of the statistics, skipped in training)",
        f"size         {human_bytes(r['size_bytes'])} ({r['size_bytes']:,} bytes)",
        "statistics",
        f"  mean norm                 {_number(s['mean_norm'])}",
        f"  mean of per-dim mean      {_number(s['mean_of_dim_means'])}",
        f"  mean of per-dim variance  {_number(s['mean_of_dim_variances'])}",
        "key inputs",
        *(f"  {k}: {json.dumps(v)}" for k, v in sorted(r["key_inputs"].items())),
    ]
    if r["schema"] is not None:
        lines.append("schema (first shard)")
        lines += [f"  {f['name']}: {f['type']}{'' if f['nullable'] else ' not null'}" for f in r["schema"]["fields"]]
        lines += [f"  metadata {k}: {v}" for k, v in sorted(r["schema"]["metadata"].items())]
    else:
        lines.append(f"schema       unavailable: {r['schema_error'] or 'no shards committed'}")
    lines.append(f"orphans      {len(r['orphans'])} under shards/ not in the manifest")
    lines += [f"  {name}" for name in r["orphans"]]
    return "\n".join(lines)


def inspect_cache(uri: str, *, s3_options: dict, as_json: bool) -> int:
    store = open_store(uri, s3_options=s3_options)
    record = _inspect_record(store, open_cache(store))
    sys.stdout.write((json.dumps(record, indent=1) if as_json else _inspect_text(record)) + "\n")
    return 0


def verify_cache(uri: str, *, s3_options: dict, workers: int) -> int:
    store = open_store(uri, s3_options=s3_options)
    cache = open_cache(store)
    n_ok = n_bad = 0
    checks = check_shards(store, cache.manifest, workers=workers)
    with tqdm(checks, total=len(cache.manifest.shards), unit="shard", desc="verify", disable=None, file=sys.stderr) as bar:
        for check in bar:
            if check.error is None:
                n_ok += 1
            else:
                n_bad += 1
                bar.write(f"BAD {check.error}", file=sys.stdout)
    if cache.orphans:
        sys.stdout.write(f"note: {len(cache.orphans)} objects under shards/ are not in the manifest (not checked)\n")
    sys.stdout.write(f"{n_ok} shards ok, {n_bad} bad\n")
    return 1 if n_bad else 0
