"""Looking into caches without training on them: find, describe and verify.

A URI may name a store root (holding ``caches/``), a ``caches/`` folder or one cache. Only the
manifest says which shards a cache holds; objects under ``shards/`` that it does not list are
orphans (a shard whose commit has not happened yet, or one left by a failed producer).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import pyarrow as pa

from activation_cache.manifest import MANIFEST_KEY, Manifest, ShardEntry, load_manifest
from activation_cache.reader import read_shard
from activation_cache.schema import CorruptShardError, read_table
from activation_cache.store import ObjectStore

CACHES_DIR = "caches"
SHARDS_DIR = "shards"


@dataclass(frozen=True)
class CacheListing:
    """One cache as the store shows it."""

    uri: str
    name: str
    """The cache's folder name (its cache key when the driver wrote it)."""
    manifest: Manifest | None
    """None when shards exist but no manifest was ever committed."""
    orphans: tuple[str, ...]
    """Keys under ``shards/`` that the manifest does not list, relative to the cache."""


@dataclass(frozen=True)
class ShardCheck:
    """The outcome of reading one listed shard back."""

    name: str
    error: str | None
    """None when size, checksum, Arrow decoding and row count all match the manifest; else a
    sentence naming the shard."""
    missing: bool = False
    """The store has no object of this name."""


def _orphans(keys: list[str], manifest: Manifest | None) -> tuple[str, ...]:
    listed = {entry.name for entry in manifest.shards} if manifest else set()
    return tuple(k for k in keys if k.startswith(f"{SHARDS_DIR}/") and k not in listed)


def _listing(store: ObjectStore, name: str, keys: list[str]) -> CacheListing:
    """``keys`` are relative to the cache folder ``store``."""
    manifest = load_manifest(store) if MANIFEST_KEY in keys else None
    return CacheListing(store.uri, name, manifest, _orphans(keys, manifest))


def _caches_in(store: ObjectStore, keys: list[str]) -> list[CacheListing]:
    """Caches one level below ``store``, whose objects are ``keys`` (relative to ``store``)."""
    by_folder: dict[str, list[str]] = {}
    for key in keys:
        folder, _, rest = key.partition("/")
        if rest:
            by_folder.setdefault(folder, []).append(rest)
    return [
        _listing(store.child(folder), folder, rest)
        for folder, rest in sorted(by_folder.items())
        if MANIFEST_KEY in rest or any(k.startswith(f"{SHARDS_DIR}/") for k in rest)
    ]


def find_caches(store: ObjectStore) -> list[CacheListing]:
    """Every cache at ``store``: the store itself, ``<store>/caches/*`` or ``<store>/*``.

    Raises FileNotFoundError naming the URI when there is none, so a mistyped URI is not
    mistaken for an empty store.
    """
    keys = store.list()
    if MANIFEST_KEY in keys or any(k.startswith(f"{SHARDS_DIR}/") for k in keys):
        return [_listing(store, store.uri.rstrip("/").rsplit("/", 1)[-1], keys)]
    under_caches = [k.removeprefix(f"{CACHES_DIR}/") for k in keys if k.startswith(f"{CACHES_DIR}/")]
    caches = _caches_in(store.child(CACHES_DIR), under_caches) if under_caches else _caches_in(store, keys)
    if not caches:
        raise FileNotFoundError(
            f"{store.uri}: no cache found (no {MANIFEST_KEY}, {CACHES_DIR}/<key>/{MANIFEST_KEY} "
            f"or <key>/{MANIFEST_KEY} below it)"
        )
    return caches


def open_cache(store: ObjectStore) -> CacheListing:
    """The one cache rooted at ``store``; raises FileNotFoundError if it has no manifest."""
    manifest = load_manifest(store)
    if manifest is None:
        raise FileNotFoundError(
            f"{store.uri}: no {MANIFEST_KEY}, so not a committed cache "
            f"(`saeforge cache ls {store.uri}` lists the caches below a store)"
        )
    name = store.uri.rstrip("/").rsplit("/", 1)[-1]
    return CacheListing(store.uri, name, manifest, _orphans(store.list(SHARDS_DIR), manifest))


def first_shard_schema(store: ObjectStore, manifest: Manifest) -> pa.Schema | None:
    """The Arrow schema (fields and metadata) of the cache's first listed shard, if any.

    The whole shard is read: the store protocol has no ranged reads.
    """
    if not manifest.shards:
        return None
    entry = manifest.shards[0]
    return read_table(store.get_bytes(entry.name), name=entry.name).schema


def _check(store: ObjectStore, entry: ShardEntry) -> ShardCheck:
    try:
        read_shard(store, entry)  # the decoded rows are dropped at once: only the verdict is kept
    except CorruptShardError as err:
        return ShardCheck(entry.name, str(err))
    return ShardCheck(entry.name, None)


def check_shards(store: ObjectStore, manifest: Manifest, *, workers: int = 8) -> Iterator[ShardCheck]:
    """Read back every shard the manifest lists, ``workers`` at a time, in completion order.

    Missing shards come first, found with one listing rather than one request each. A store
    error other than a missing object (credentials, network) is raised, not reported as a bad
    shard: it says nothing about the shard.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    present = set(store.list(SHARDS_DIR))
    to_read = []
    for entry in manifest.shards:
        if entry.name in present:
            to_read.append(entry)
        else:
            message = f"shard {entry.name}: listed in the manifest but missing from {store.uri}"
            yield ShardCheck(entry.name, message, missing=True)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify")
    try:
        futures = [pool.submit(_check, store, entry) for entry in to_read]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
