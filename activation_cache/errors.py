"""The cache's errors, in a module that imports nothing: the command line names them in its one-line
report without loading pyarrow or torch (``saeforge --help`` and a config error load neither)."""

from __future__ import annotations


class CorruptShardError(RuntimeError):
    """A shard's bytes do not match the manifest, or cannot be decoded."""
