"""``saeforge pull``: copy dictionaries out of the object store, verified, all or nothing.

``uri`` is one dictionary (``<run>/dictionary/<hookpoint>``), a run (every hookpoint's dictionary,
and every sweep variant's: ``<run>/sweep/<variant>/dictionary/<hookpoint>``) or anything between.
Each dictionary folder lands in ``target`` at its path below ``uri``. Every file is checked
against the folder's ``checksums.json`` and every dictionary must load (weights matching
cfg.json) before anything is moved into ``target``; on any failure ``target`` is left as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePosixPath

from torch import nn

from activation_cache.store import ObjectStore, open_store
from trainer.dictionary import load_dictionary
from trainer.layout import CHECKSUMS_FILE, DICTIONARY_MARKER, verify_checksums


def safe_relative_path(key: str, uri: str) -> PurePosixPath:
    """``key`` as a path that stays below the target directory, or a one-line refusal."""
    # Checked on the raw parts: PurePosixPath would fold "a//b" and "a/./b" into "a/b".
    if any(part in ("", ".", "..") for part in key.split("/")) or "\\" in key or "\x00" in key:
        raise ValueError(f"{uri}: object key {key!r} would escape the target directory: refused")
    return PurePosixPath(key)


def find_dictionaries(store: ObjectStore) -> dict[PurePosixPath, list[str]]:
    """{folder below the store's root: its keys} for every dictionary folder (one holding cfg.json)."""
    keys = [safe_relative_path(key, store.uri) for key in store.list()]
    folders = {key.parent for key in keys if key.name == DICTIONARY_MARKER}
    found: dict[PurePosixPath, list[str]] = {}
    for folder in sorted(folders, key=str):
        found[folder] = [str(k) for k in keys if k.parent == folder]
    return found


def _fetch_verified(store: ObjectStore, folder: PurePosixPath, keys: list[str]) -> dict[str, bytes]:
    prefix = "" if str(folder) == "." else f"{folder}/"
    where = f"{store.uri}/{prefix}".rstrip("/")
    if f"{prefix}{CHECKSUMS_FILE}" not in keys:
        raise FileNotFoundError(f"{where}: no {CHECKSUMS_FILE} (a dictionary still being written, or not one)")
    checksums = store.get_bytes(f"{prefix}{CHECKSUMS_FILE}")

    def read(name: str) -> bytes:
        safe_relative_path(name, where)
        return store.get_bytes(f"{prefix}{name}")

    files = verify_checksums(checksums, read, where=where)
    files[CHECKSUMS_FILE] = checksums
    return files


def pull(uri: str, target: Path, *, s3_options: dict | None = None) -> dict[str, tuple[nn.Module, dict]]:
    """Copy every dictionary at or below ``uri`` into ``target``; return ``{folder: (SAE, cfg)}``
    with each folder relative to ``target`` (``"."`` when ``uri`` is one dictionary).

    Nothing is written into ``target`` until every file has matched its checksum and every
    dictionary has loaded; the folders are then moved into place one rename each."""
    store = open_store(uri, s3_options=s3_options)
    found = find_dictionaries(store)
    if not found:
        raise FileNotFoundError(f"{uri}: no dictionary here (no {DICTIONARY_MARKER} at or below it)")
    fetched = {folder: _fetch_verified(store, folder, keys) for folder, keys in found.items()}
    loaded = {str(folder): load_dictionary(files) for folder, files in fetched.items()}
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saeforge-pull-", dir=target))
    try:
        for folder, files in fetched.items():
            for name, data in files.items():
                path = staging / folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        for folder in fetched:
            final = target / folder
            if str(folder) == ".":
                for path in (staging / folder).iterdir():
                    if not path.name.startswith(".saeforge-pull-"):
                        path.replace(target / path.name)
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            (staging / folder).replace(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return loaded
