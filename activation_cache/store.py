"""Object-store access behind one small protocol with ``str`` keys.

Two implementations: a local directory (the embedded default, used by tests and the default
run) and S3 (``activation_cache.s3``, the only module that imports boto3); the protocol, its
errors and the key rules they share are ``activation_cache.store_protocol``'s. URIs:
``file:///abs/path``, plain paths (absolute or relative), and ``s3://bucket/prefix``.

Keys are ``/``-separated paths relative to the store's root. Every ``put`` is atomic: a reader
sees either the whole previous object or the whole new one, never a partial write (a rename on
a file system, a single PUT on S3).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from activation_cache.store_protocol import (  # noqa: F401 - the store's public names, re-exported
    ObjectNotFound,
    ObjectStore,
    StoreError,
    StoreFull,
    check_key,
    join_uri,
)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _os_cause(err: OSError) -> str:
    """``no space left on device (ENOSPC)``: what the file system said, without the path."""
    if err.errno is None:
        return str(err)
    return f"{os.strerror(err.errno).lower()} ({errno.errorcode.get(err.errno, err.errno)})"


def _replace_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; objects are as readable as any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial object behind
        raise


class LocalStore:
    """A directory on a local (or shared) file system."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            _replace_atomically(self._path(key), data)
        except OSError as err:  # ENOSPC, EDQUOT, EROFS, ...: one line naming the object and the cause
            error = StoreFull if err.errno in (errno.ENOSPC, errno.EDQUOT) else StoreError
            raise error(f"{join_uri(self.uri, key)}: cannot write {len(data):,} bytes: {_os_cause(err)}") from err

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{join_uri(self.uri, key)}: no such object") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if not base.exists():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self.root / check_key(prefix))

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, _content_version(data)

    def put_if(self, key: str, data: bytes, *, version: str | None) -> str | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Check and replace under an exclusive lock on a side file: every conditional writer of
        # this key takes it, on this host and (with working NFS locks) across hosts.
        with open(path.parent / f".{path.name}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = _content_version(path.read_bytes())
            except FileNotFoundError:
                current = None
            if current != version:
                return None
            self.put_bytes(key, data)
            return _content_version(data)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_store(uri: str, *, s3_options: dict | None = None) -> ObjectStore:
    """The store for ``uri``: ``s3://bucket/prefix``, ``file:///path`` or a plain path.

    ``s3_options`` (endpoint_url, region, ...) apply to S3 only; credentials come from the
    standard AWS environment variables / config files and are never stored on the object.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from activation_cache.s3 import S3Store

        return S3Store(uri, **(s3_options or {}))
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(uri)
    raise ValueError(f"store uri {uri!r}: unknown scheme {parsed.scheme!r}, expected s3://, file:// or a path")
