"""What our self-contained pages share (the training report, observe's page, the steer audit's
page): the base stylesheet, tokens made visible, data embedded as JSON in a ``<script>`` block, and
where a dictionary acts, in words (also the terminal's).

Pure string building, no torch: the training report imports it to redraw its page cheaply.
"""

from __future__ import annotations

import json
import unicodedata

__all__ = ["BASE_CSS", "describe_hookpoints", "script_json", "visible"]


def describe_hookpoints(hookpoint: str, hookpoint_out: str | None,
                        layer_hookpoints: list[tuple[str, str]] | None = None) -> str:
    """Where a dictionary acts: its hookpoint, ``reads <in> -> writes <out>`` for a transcoder, or
    ``reads <first in> .. <last in> -> writes <first out> .. <last out> (L layers, cross-layer)``
    for a cross-layer transcoder (``layer_hookpoints``: its (input, output) per covered layer)."""
    if layer_hookpoints:
        (first_in, first_out), (last_in, last_out) = layer_hookpoints[0], layer_hookpoints[-1]
        return (f"reads {first_in} .. {last_in} -> writes {first_out} .. {last_out} "
                f"({len(layer_hookpoints)} layers, cross-layer)")
    return hookpoint if hookpoint_out is None else f"reads {hookpoint} -> writes {hookpoint_out}"

BASE_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;margin:18px 0;padding:14px 20px}
h2{margin:4px 0 10px;font-size:18px}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid #e6e9ed;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#5b6470;font-size:13px}
"""
"""The page, its sections, headings, tables and notes: each page adds its own rules after it."""

_SHOWN_CONTROLS = {"\n": "⏎", "\t": "⇥", "\r": "␍"}


def visible(token: str) -> str:
    """``token`` with control characters shown as symbols or escapes (HTML cannot carry most)."""
    return "".join(
        _SHOWN_CONTROLS.get(ch, f"\\x{ord(ch):02x}") if unicodedata.category(ch) == "Cc" else ch for ch in token
    )


# A <script> data block ends at the first "</script"; "<!--" changes how it is parsed; U+2028 and
# U+2029 end a line in older JavaScript. Escaped as JSON escapes, the data reads back unchanged.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def script_json(data: object) -> str:
    """``data`` as JSON that can sit inside ``<script type="application/json">`` and read back unchanged."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).translate(_SCRIPT_SAFE)
