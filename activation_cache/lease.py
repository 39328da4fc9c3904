"""One writer per cache: a lease object the filling job holds.

Two jobs with the same inputs derive the same cache key, so they would fill the same cache. Shard
names are deterministic, but each job holds its own copy of the manifest: left alone, the last
commit would drop the other job's entries, and a shard rewritten by the other job (bitwise different
on another machine) would no longer match the checksum committed for it. So a job fills a cache only
while it holds ``<cache>/writer-lease.json``:

- taken with a conditional put (only if absent, or only if still at the version an abandoned holder
  left), so of two jobs racing for it exactly one wins;
- renewed by its holder every ``renew_every_s`` with a conditional put on the version it last wrote;
  a renewal that finds another version means the lease was taken over, and the holder stops before
  its next commit (:class:`LeaseLost`);
- taken over when the holder is gone: its version has not changed for ``ttl_s`` by the waiting job's
  own clock (no clocks are compared across machines), or, on the same host, its process is dead.

The job that does not hold the lease waits for the cache to complete (or tails it while training).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from activation_cache.store import ObjectNotFound, ObjectStore, StoreError

log = logging.getLogger(__name__)

LEASE_KEY = "writer-lease.json"


class LeaseLost(RuntimeError):
    """Another job took over the lease of a cache this job was filling."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: what ``writer-lease.json`` says."""

    owner: str
    """Unique per acquisition."""
    job: str
    host: str
    pid: int
    beat: int = 0
    """Incremented by every renewal."""

    @classmethod
    def this_process(cls, job: str) -> Holder:
        """A holder naming this process on this host for ``job``, with an owner id of its own."""
        return cls(owner=uuid.uuid4().hex, job=job, host=socket.gethostname(), pid=os.getpid())

    def describe(self) -> str:
        return f"job {self.job!r} (pid {self.pid} on {self.host})"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder | None:
        """The holder, or None for an unreadable lease (treated as abandoned once it is old)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def process_is_gone(self) -> bool:
        """True only when the holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class WriterLease:
    """A held lease, renewed by a daemon thread until :meth:`release`."""

    def __init__(self, store: ObjectStore, holder: Holder, version: str, *, renew_every_s: float):
        self.store = store
        self.holder = holder
        self._version = version
        self._renew_every_s = renew_every_s
        self._lost_to: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{holder.owner[:8]}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._renew_every_s):
            if not self.renew():
                return

    def renew(self) -> bool:
        """One heartbeat; False once the lease is lost (a store error is logged and retried later)."""
        beat = Holder(**{**asdict(self.holder), "beat": self.holder.beat + 1})
        try:
            version = self.store.put_if(LEASE_KEY, beat.to_json(), version=self._version)
        except StoreError as err:
            log.warning("cache %s: could not renew the writer lease (%s); retrying", self.store.uri, err)
            return True
        if version is None:
            self._lost_to = _current_holder(self.store)
            log.error("cache %s: writer lease taken over by %s", self.store.uri, self._lost_to)
            return False
        self.holder, self._version = beat, version
        return True

    def check(self) -> None:
        """Raise LeaseLost if another job has taken the lease over."""
        if self._lost_to is not None:
            raise LeaseLost(
                f"cache {self.store.uri}: the writer lease was taken over by {self._lost_to} "
                "(this job's heartbeat stalled); stopped before committing more"
            )

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        self._thread.join()
        if self._lost_to is not None:
            return
        try:
            data, _ = self.store.get_versioned(LEASE_KEY)
            current = Holder.from_json(data)
            if current is not None and current.owner == self.holder.owner:
                self.store.delete(LEASE_KEY)
        except ObjectNotFound:
            pass
        except StoreError as err:  # an abandoned lease is taken over after its ttl anyway
            log.warning("cache %s: could not remove the writer lease (%s)", self.store.uri, err)


def _owner(holder: Holder | None) -> str | None:
    return holder.owner if holder is not None else None


def _current_holder(store: ObjectStore) -> str:
    try:
        holder = Holder.from_json(store.get_versioned(LEASE_KEY)[0])
    except StoreError:
        return "another job"
    return holder.describe() if holder is not None else "another job"


class LeaseClaim:
    """One job's claim on one cache: :meth:`try_acquire` takes the lease when it is free or its
    holder is gone, else remembers who holds it (``holder``)."""

    def __init__(self, store: ObjectStore, *, job: str, ttl_s: float, renew_every_s: float | None = None):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s={ttl_s} must be positive")
        self.store = store
        self.job = job
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s if renew_every_s is not None else ttl_s / 4
        self.holder: Holder | None = None
        self._seen: tuple[str, float] | None = None  # (version, monotonic time first seen)

    def try_acquire(self) -> WriterLease | None:
        mine = Holder.this_process(self.job)
        try:
            data, version = self.store.get_versioned(LEASE_KEY)
        except ObjectNotFound:
            data, version = None, None
        if version is not None:
            holder = Holder.from_json(data)
            if self._seen is None or _owner(holder) != _owner(self.holder):
                log.info("cache %s is being filled by %s: waiting for it (taken over if its lease is "
                         "not renewed for %.0f s)", self.store.uri,
                         holder.describe() if holder else "another job", self.ttl_s)
            self.holder = holder
            if not self._abandoned(version):
                return None
            log.warning("cache %s: taking over the writer lease of %s", self.store.uri,
                        self.holder.describe() if self.holder else "an unreadable lease")
        new_version = self.store.put_if(LEASE_KEY, mine.to_json(), version=version)
        if new_version is None:  # another job got there first
            return None
        self.holder = None
        return WriterLease(self.store, mine, new_version, renew_every_s=self.renew_every_s)

    def _abandoned(self, version: str) -> bool:
        now = time.monotonic()
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, now)
        if self.holder is not None and self.holder.process_is_gone():
            return True
        return now - self._seen[1] >= self.ttl_s
