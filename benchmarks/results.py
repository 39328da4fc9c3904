"""Generated blocks in ``benchmarks/RESULTS.md``: each benchmark owns the text between its markers."""

from __future__ import annotations

import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def write_block(path: Path, name: str, block: str) -> None:
    """Replace ``name``'s generated block of ``path`` (between its markers), or append one;
    the text around the blocks is left alone."""
    begin, end = markers(name)
    block = f"{begin}\n{block}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
