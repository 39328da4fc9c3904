"""What every object store shares: the ``ObjectStore`` protocol, its errors and its key rules.

``activation_cache.store`` (the local directory and ``open_store``) and ``activation_cache.s3``
both build on this module and neither imports the other at module level; ``open_store`` loads
the S3 store only for an ``s3://`` URI, so boto3 is imported only where S3 is used.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class StoreError(RuntimeError):
    """An object-store operation failed; the message names the key and never a credential."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


class StoreFull(StoreError):
    """The store has no room for a write (a full disk or quota, a full bucket): retrying the same
    write cannot help until space is freed."""


@runtime_checkable
class ObjectStore(Protocol):
    """A flat key -> bytes store rooted at ``uri``."""

    uri: str

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically, replacing any previous object."""

    def get_bytes(self, key: str) -> bytes:
        """Read the whole object; raises ObjectNotFound if absent."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` names an object."""

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (recursive), sorted."""

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def child(self, prefix: str) -> ObjectStore:
        """A store rooted at ``<uri>/<prefix>``."""

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object and an opaque version tag; raises ObjectNotFound if absent."""

    def put_if(self, key: str, data: bytes, *, version: str | None) -> str | None:
        """Write ``data`` only if ``key`` is still at ``version`` (``None``: only if absent),
        atomically against other writers; the new version, or None when the condition failed."""


def join_uri(uri: str, *parts: str) -> str:
    """``join_uri("s3://b/p", "x", "y") == "s3://b/p/x/y"``."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def check_key(key: str) -> str:
    """``key`` normalised (no leading or trailing ``/``); a ValueError for an empty key or ``.``/``..`` parts."""
    parts = key.strip("/").split("/")
    if not key.strip("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object key {key!r} must be a relative path without '.' or '..' parts")
    return "/".join(parts)
