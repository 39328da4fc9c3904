"""Opening our pages in a real headless browser (Debian's chromium): the tests of the training
report, of observe's page and of the steer audit's page check what the browser renders, not the
HTML we meant to write (``parse`` reads the DOM chromium's ``--dump-dom`` prints back as a tree).

Without chromium those tests skip, except under CI (``CI=true``), where a missing browser fails
them: CI must not pass by checking nothing.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest


def chromium_path() -> str:
    """The chromium executable; skips the calling test without one (fails it under ``CI=true``)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = ("Debian's chromium is not installed: `make setup` installs it when run as root with apt-get "
                   "(or: apt-get install chromium)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def browse(chromium: str, profile: Path, *args: str) -> str:
    """Run headless chromium with its profile in ``profile`` and ``args`` (``--dump-dom URL``,
    ``--screenshot=PATH URL``, ...); its stdout. Fails the test if chromium exits non-zero."""
    command = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def png_size_and_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, filtered scanlines) of a PNG such as chromium's ``--screenshot`` writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return *size, zlib.decompress(idat)


# --------------------------------------------------------------------------- reading a page


@dataclass
class Element:
    """An element of a page parsed by ``parse`` (what ``--dump-dom`` printed): its tag, attributes and children."""

    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> Iterator[Element]:
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.walk()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        def matches(e: Element) -> bool:
            return (tag is None or e.tag == tag) and all(
                (v in e.attrs.get(k.rstrip("_"), "").split()) if k == "class_" else e.attrs.get(k.replace("_", "-")) == v
                for k, v in attrs.items())
        return [e for e in self.walk() if matches(e)]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}>"
        return found[0]


_VOID = {"br", "meta", "link", "img", "input", "hr", "wbr", "source", "area", "base", "col", "embed", "track"}


class _TreeBuilder(HTMLParser):
    """The page as a tree, character references decoded: what a script reading the DOM sees."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in _VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root
