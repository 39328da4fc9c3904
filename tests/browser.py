"""Opening our pages in a real headless browser (Debian's chromium): the tests of the training
report and of observe's page check what the browser renders, not the HTML we meant to write.

Without chromium those tests skip, except under CI (``CI=true``), where a missing browser fails
them: CI must not pass by checking nothing.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
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
