"""``saeforge pull``: copy a dictionary out of the object store and verify it loads."""

from __future__ import annotations

from pathlib import Path

from activation_cache.store import open_store
from trainer.dictionary import load_dictionary

DICTIONARY_FILES = ("sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "eval.json")
REQUIRED_FILES = ("sae_weights.safetensors", "cfg.json")


def pull_dictionary(uri: str, target: Path, *, s3_options: dict | None = None) -> dict:
    """Copy the dictionary at ``uri`` into ``target`` and return its cfg.json.

    Only the known dictionary files are copied (names fixed here, so nothing can land outside
    ``target``); the weights are verified to load and to match cfg.json before any file is written.
    """
    store = open_store(uri, s3_options=s3_options)
    present = set(store.list())
    missing = [name for name in REQUIRED_FILES if name not in present]
    if missing:
        raise FileNotFoundError(f"{uri}: not a dictionary (missing {', '.join(missing)})")
    files = {name: store.get_bytes(name) for name in DICTIONARY_FILES if name in present}
    _, cfg = load_dictionary(files)
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = target / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(target / name)
    return cfg
