"""Reading a cache: rank-sharded, shuffled, prefetching, checksum-verified, resumable, tailing.

An epoch is planned on row indices before any byte is read, from the manifest's row counts
alone. The committed shards are permuted with a seed shared by every rank; their rows, in that
order, form one row space that is cut into ``world_size`` contiguous ranges of equal length (to
one row), one per rank, so each row goes to exactly one rank once per epoch. A rank streams its
range shard by shard through a shuffle buffer and cuts the result into batches; only then are
the rows fetched, from shards that background threads read, verify and decode ahead of need
within a byte budget. Because the plan needs no data, a reader resumed from ``state_dict()``
skips the batches already yielded without reading them and continues with exactly the batches an
uninterrupted reader would have yielded.

Tailing (``follow=True``) reads a cache that is still being written: epoch 0 takes committed
shards as manifests listing them appear (each shard to the rank ``shard_rank(name)``, by default
``crc32(name) % world_size``, which every rank computes alone), and ends when the manifest says
complete and every shard has been read; later epochs are planned as above over the complete cache. A resumed tailing reader
replays the shards it had taken, in their order, so no row is lost or repeated; the shards after
them come in the order the resumed reader finds them committed.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from activation_cache.manifest import Manifest, ShardEntry, load_manifest
from activation_cache.schema import CorruptShardError, DecodedShard, decode_shard, sha256_hex
from activation_cache.store import ObjectNotFound, ObjectStore

STATE_VERSION = 1


class TailingAborted(RuntimeError):
    """A tailing reader was told to stop (its ``abort`` gave a reason): the cache will not complete."""


def read_shard(store: ObjectStore, entry: ShardEntry, *, as_float32: bool = True) -> DecodedShard:
    """Fetch one committed shard and verify it against its manifest entry."""
    try:
        data = store.get_bytes(entry.name)
    except ObjectNotFound:
        raise CorruptShardError(f"shard {entry.name}: listed in the manifest but missing from {store.uri}") from None
    if len(data) != entry.size_bytes:
        raise CorruptShardError(f"shard {entry.name}: {len(data)} bytes, manifest says {entry.size_bytes}")
    digest = sha256_hex(data)
    if digest != entry.sha256:
        raise CorruptShardError(f"shard {entry.name}: checksum {digest[:12]}… expected {entry.sha256[:12]}…")
    shard = decode_shard(data, name=entry.name, as_float32=as_float32)
    if len(shard.activations) != entry.rows:
        raise CorruptShardError(f"shard {entry.name}: {len(shard.activations)} rows, manifest says {entry.rows}")
    return shard


def shuffle_rows(chunks: Iterator[torch.Tensor], *, buffer_rows: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield the rows of ``chunks`` as shuffled chunks; a row waits in a buffer of up to
    ``buffer_rows`` rows and leaves in random order, so rows from different shards mix.
    The permutations depend only on the chunk lengths and ``generator``."""
    buffer: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        buffer.append(chunk)
        held += len(chunk)
        if held >= 2 * buffer_rows:
            pool = torch.cat(buffer)
            pool = pool[torch.randperm(len(pool), generator=generator)]
            yield pool[buffer_rows:]
            buffer, held = [pool[:buffer_rows]], buffer_rows
    if buffer:
        pool = torch.cat(buffer)
        yield pool[torch.randperm(len(pool), generator=generator)]


def rebatch(chunks: Iterator[torch.Tensor], batch_size: int, *, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Cut a stream of row chunks into batches of ``batch_size``; the short tail is dropped, or
    yielded last with ``drop_last=False``."""
    pending: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held < batch_size:
            continue
        pool = torch.cat(pending)
        n_full = len(pool) // batch_size
        yield from pool[: n_full * batch_size].split(batch_size)
        pending, held = [pool[n_full * batch_size :]], len(pool) - n_full * batch_size
    if not drop_last and held:
        yield torch.cat(pending)


def _as_float32(rows: np.ndarray) -> torch.Tensor:
    """Gathered rows in their stored form as a float32 tensor. No stored dtype is int16, so
    int16 rows are bfloat16 bits (``_ShardLoader.shard``)."""
    tensor = torch.from_numpy(rows)
    if tensor.dtype == torch.int16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


@dataclass(frozen=True)
class _Segment:
    """Rows ``start:stop`` of the shard at ``pos`` in the epoch's shard list."""

    pos: int
    start: int
    stop: int


class _ShardLoader:
    """Decoded shards of one epoch for one rank: read, verified and decoded by background
    threads in the order the plan first needs them, kept while the plan still needs rows of them.

    Reads run ahead of need while the shards held or in flight fit ``budget_bytes`` (measured as
    stored bytes, about the decoded size in the stored dtype); a shard the plan needs now is read
    whatever the budget. Nothing is read for rows the plan skips (a resumed reader)."""

    def __init__(self, store: ObjectStore, *, threads: int, budget_bytes: int):
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="saeforge-read")
        self._budget = budget_bytes
        self._entries: list[ShardEntry] = []
        self._remaining: list[int] = []
        self._futures: dict[int, Future] = {}
        self._held_bytes = 0
        self._next = 0
        """Position of the next shard ``top_up`` considers reading."""

    def add(self, entry: ShardEntry, rows_needed: int) -> None:
        """Register the next shard of the plan, in first-need order: its position is the count
        of shards added before it."""
        self._entries.append(entry)
        self._remaining.append(rows_needed)

    def _submit(self, pos: int) -> Future:
        if pos not in self._futures:
            entry = self._entries[pos]
            self._futures[pos] = self._pool.submit(read_shard, self._store, entry, as_float32=False)
            self._held_bytes += entry.size_bytes
        return self._futures[pos]

    def _release(self, pos: int) -> None:
        future = self._futures.pop(pos, None)
        if future is not None:
            future.cancel()
            self._held_bytes -= self._entries[pos].size_bytes

    def top_up(self) -> None:
        """Start reading the next needed shards while the budget allows (at least one in flight)."""
        while self._next < len(self._entries):
            pos = self._next
            if self._remaining[pos] > 0 and pos not in self._futures:
                size = self._entries[pos].size_bytes
                if self._futures and self._held_bytes + size > self._budget:
                    return
                self._submit(pos)
            self._next += 1

    def shard(self, pos: int) -> np.ndarray:
        """The activations of shard ``pos`` as stored (bfloat16 as its int16 bits), waiting for
        its read if need be."""
        return self._submit(pos).result().activations

    def consume(self, pos: int, n: int) -> None:
        """Count ``n`` rows of shard ``pos`` as used (read or skipped); the shard is let go when
        the plan needs no more rows of it."""
        self._remaining[pos] -= n
        if self._remaining[pos] <= 0:
            self._release(pos)

    def close(self) -> None:
        for pos in list(self._futures):
            self._release(pos)
        self._pool.shutdown(wait=False, cancel_futures=True)


class ActivationReader:
    """Batches of activations for one rank of a data-parallel group.

    ``store`` is the cache root; ``shards`` the committed shards to read (default: every shard
    of the committed manifest). Each batch is (batch_size, d_model) float32. ``epoch(e)`` yields
    one epoch; iterating the reader yields epochs 0, 1, 2, ... from the current position, which
    ``state_dict()`` captures and ``load_state_dict()`` restores.

    ``drop_last=True`` drops each rank's short last batch of an epoch, so every batch has the
    same shape; with ``False`` it is yielded, and every committed row is yielded exactly once
    per epoch across the ranks. ``prefetch_bytes`` bounds the shards read ahead;
    ``read_threads`` read (and verify, decode) them in parallel. ``follow=True`` tails a cache
    that is still being written (module docstring); it polls the manifest every
    ``poll_seconds`` and gives up with ``TimeoutError`` after ``follow_timeout_s`` without a new
    shard.
    """

    def __init__(
        self,
        store: ObjectStore,
        shards: Sequence[ShardEntry] | None = None,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        shuffle_buffer_rows: int = 16384,
        prefetch_bytes: int = 256 << 20,
        read_threads: int = 2,
        drop_last: bool = True,
        follow: bool = False,
        poll_seconds: float = 1.0,
        follow_timeout_s: float = 3600.0,
        shard_filter: Callable[[ShardEntry], bool] | None = None,
        shard_rank: Callable[[str], int] | None = None,
        abort: Callable[[], str | None] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        for name, value in (("batch_size", batch_size), ("shuffle_buffer_rows", shuffle_buffer_rows),
                            ("read_threads", read_threads), ("prefetch_bytes", prefetch_bytes)):
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if follow and shards is not None:
            raise ValueError("follow=True reads the manifest as it grows: pass shard_filter, not shards")
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.prefetch_bytes, self.read_threads = prefetch_bytes, read_threads
        self.drop_last = drop_last
        self.follow, self.poll_seconds, self.follow_timeout_s = follow, poll_seconds, follow_timeout_s
        self.shard_filter = shard_filter
        self.shard_rank = shard_rank or (lambda name: zlib.crc32(name.encode()) % world_size)
        self.abort = abort
        self._shards: list[ShardEntry] | None = None
        if shards is not None:
            self._set_shards(shards)
        elif not follow:
            manifest = self._manifest()
            if manifest is None:
                raise FileNotFoundError(f"no committed manifest in {store.uri}: not an activation cache")
            self._set_shards(manifest.shards)
        # Position: the epoch being read and the batches of it already yielded.
        self._epoch, self._batches_done = 0, 0
        self._restored: tuple[int, int] | None = None
        # Tailing: the shards epoch 0 has taken, in order (replayed on resume).
        self._followed: list[str] = []

    # ------------------------------------------------------------------ the shard list

    def _manifest(self) -> Manifest | None:
        return load_manifest(self.store)

    def _set_shards(self, shards: Sequence[ShardEntry]) -> None:
        selected = [s for s in shards if self.shard_filter is None or self.shard_filter(s)]
        if not selected:
            raise ValueError(f"no committed shards to read in {self.store.uri}")
        self._shards = sorted(selected, key=lambda s: s.name)

    @property
    def shards(self) -> list[ShardEntry]:
        """The shards a planned epoch reads (for a tailing reader, once the cache is complete)."""
        if self._shards is None:
            manifest = self._manifest()
            if manifest is None or not manifest.complete:
                raise RuntimeError(f"cache {self.store.uri} is still being written: its shards are not final")
            self._set_shards(manifest.shards)
        assert self._shards is not None
        return self._shards

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    # ------------------------------------------------------------------ planning

    def _ranges(self, epoch: int) -> tuple[list[ShardEntry], list[tuple[int, int]]]:
        """The epoch's shard order and each rank's [first, last) rows of the row space."""
        shards = self.shards
        order = np.random.default_rng([self.seed, epoch]).permutation(len(shards))
        ordered = [shards[i] for i in order]
        total = sum(s.rows for s in ordered)
        base, extra = divmod(total, self.world_size)
        bounds = [r * base + min(r, extra) for r in range(self.world_size + 1)]
        return ordered, list(zip(bounds[:-1], bounds[1:], strict=True))

    def _segments(self, epoch: int) -> tuple[list[ShardEntry], list[_Segment]]:
        ordered, ranges = self._ranges(epoch)
        first, last = ranges[self.rank]
        segments, offset = [], 0
        for pos, entry in enumerate(ordered):
            start, stop = max(first - offset, 0), min(last - offset, entry.rows)
            if start < stop:
                segments.append(_Segment(pos, start, stop))
            offset += entry.rows
        return ordered, segments

    def batches_per_epoch(self, epoch: int) -> int:
        """Batches every rank yields in a planned ``epoch`` with ``drop_last`` (the same on every
        rank); without it, the fewest any rank yields (a rank holding one row more than another
        may yield one batch more)."""
        _, ranges = self._ranges(epoch)
        rows = min(last - first for first, last in ranges)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _generator(self, epoch: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ reading

    def _materialise(
        self, id_batches: Iterator[torch.Tensor], loader: _ShardLoader, offsets: list[int], skip: int
    ) -> Iterator[torch.Tensor]:
        """Turn batches of row ids (``offsets[pos] + row``) into activations, skipping the first
        ``skip`` batches without reading them."""
        starts = np.asarray(offsets)
        for index, id_batch in enumerate(id_batches):
            # numpy, not torch, from here: on a small CPU torch's thread pool spins after each
            # of these small ops and takes the cores the read threads need (1.4x slower epochs).
            ids = id_batch.numpy()
            if len(starts) != len(offsets):  # a tailing epoch registers shards as it goes
                starts = np.asarray(offsets)
            pos = np.searchsorted(starts, ids, side="right") - 1
            # The batch's rows grouped by shard, one gather from each. Which rows make the batch
            # is the shuffle's choice; their order inside it changes nothing a step computes.
            order = np.argsort(pos, kind="stable")
            shard_pos, first, counts = np.unique(pos[order], return_index=True, return_counts=True)
            groups = [(int(p), order[f : f + c]) for p, f, c in zip(shard_pos, first, counts, strict=True)]
            if index < skip:
                for p, where in groups:
                    loader.consume(p, len(where))
                continue
            loader.top_up()
            parts = []
            for p, where in groups:
                parts.append(loader.shard(p)[ids[where] - offsets[p]])
                loader.consume(p, len(where))
            batch = _as_float32(np.concatenate(parts))
            self._batches_done = index + 1
            yield batch

    def _planned_epoch(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        ordered, segments = self._segments(epoch)
        loader = _ShardLoader(self.store, threads=self.read_threads, budget_bytes=self.prefetch_bytes)
        # Row ids number this rank's segments' shards in the order their rows enter the buffer.
        offsets, chunks, offset = [], [], 0
        for segment in segments:
            entry = ordered[segment.pos]
            loader.add(entry, segment.stop - segment.start)
            offsets.append(offset)
            chunks.append(torch.arange(segment.start, segment.stop, dtype=torch.int64) + offset)
            offset += entry.rows
        shuffled = shuffle_rows(iter(chunks), buffer_rows=self.shuffle_buffer_rows, generator=self._generator(epoch))
        id_batches = rebatch(shuffled, self.batch_size, drop_last=self.drop_last)
        if self.drop_last:  # equal step counts on every rank
            id_batches = (b for _, b in zip(range(self.batches_per_epoch(epoch)), id_batches, strict=False))
        try:
            yield from self._materialise(id_batches, loader, offsets, skip)
        finally:
            loader.close()

    def _tailed_epoch(self, skip: int, replay: list[str]) -> Iterator[torch.Tensor]:
        """Epoch 0 of a tailing reader: this rank's shards as manifests list them, after the
        ``replay`` ones (a restored reader's, in their order)."""
        loader = _ShardLoader(self.store, threads=self.read_threads, budget_bytes=self.prefetch_bytes)
        offsets: list[int] = []
        self._followed = []

        def entries() -> Iterator[ShardEntry]:
            taken: set[str] = set()
            waited_since = time.monotonic()
            while True:
                reason = self.abort() if self.abort is not None else None
                if reason:
                    raise TailingAborted(f"cache {self.store.uri}: stopped reading a cache still being written: {reason}")
                manifest = self._manifest()
                listed = {} if manifest is None else {s.name: s for s in manifest.shards}
                missing = [name for name in replay if name not in listed]
                if missing:
                    raise CorruptShardError(f"shard {missing[0]}: read before, no longer in {self.store.uri}'s manifest")
                fresh = [listed[name] for name in replay if name not in taken]
                fresh += [
                    s for name, s in sorted(listed.items())
                    if name not in taken and name not in replay and self._mine(s)
                ]
                for entry in fresh:
                    taken.add(entry.name)
                    self._followed.append(entry.name)
                    yield entry
                if manifest is not None and manifest.complete:
                    self._set_shards(manifest.shards)
                    return
                if fresh:
                    waited_since = time.monotonic()
                elif time.monotonic() - waited_since > self.follow_timeout_s:
                    raise TimeoutError(
                        f"cache {self.store.uri}: no new shard for {self.follow_timeout_s:.0f} s and the "
                        "manifest is not complete (are the producers running?)"
                    )
                else:
                    time.sleep(self.poll_seconds)

        def chunks() -> Iterator[torch.Tensor]:
            offset = 0
            for entry in entries():
                loader.add(entry, entry.rows)
                offsets.append(offset)
                yield torch.arange(offset, offset + entry.rows, dtype=torch.int64)
                offset += entry.rows

        shuffled = shuffle_rows(chunks(), buffer_rows=self.shuffle_buffer_rows, generator=self._generator(0))
        try:
            yield from self._materialise(rebatch(shuffled, self.batch_size, drop_last=self.drop_last), loader, offsets, skip)
        finally:
            loader.close()

    def _mine(self, entry: ShardEntry) -> bool:
        if self.shard_filter is not None and not self.shard_filter(entry):
            return False
        return self.shard_rank(entry.name) == self.rank

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        """This rank's batches for one epoch: from its start, or, for the epoch of a position
        restored by ``load_state_dict``, from that position."""
        skip, replay = 0, []
        if self._restored is not None:
            restored_epoch, restored_batches = self._restored
            self._restored = None
            if restored_epoch == epoch:
                skip, replay = restored_batches, list(self._followed)
        self._epoch, self._batches_done = epoch, 0
        if self.follow and epoch == 0:
            yield from self._tailed_epoch(skip, replay)
        else:
            yield from self._planned_epoch(epoch, skip)
        self._epoch, self._batches_done = epoch + 1, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches over epochs from the current position onward, forever; the caller stops."""
        epoch = self._restored[0] if self._restored is not None else self._epoch
        while True:
            yield from self.epoch(epoch)
            epoch += 1

    # ------------------------------------------------------------------ resuming

    def _identity(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "seed": self.seed, "shuffle_buffer_rows": self.shuffle_buffer_rows,
                "drop_last": self.drop_last, "follow": self.follow}

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded (JSON-serialisable)."""
        state = {"version": STATE_VERSION, **self._identity(), "epoch": self._epoch,
                 "batches_done": self._batches_done, "followed": list(self._followed)}
        if self._shards is not None:
            state["shards"] = [s.name for s in self._shards]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; it must come from a reader of the same rank, batch size,
        seed, shuffle buffer and shards."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r}: expected {STATE_VERSION}")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"reader state has {key}={state.get(key)!r} but this reader has {key}={value!r}")
        if "shards" in state and self._shards is not None and state["shards"] != [s.name for s in self._shards]:
            raise ValueError(f"reader state was taken over {len(state['shards'])} other shards than this "
                             f"reader's {len(self._shards)}: not the same cache or holdout split")
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
        self._restored = (self._epoch, self._batches_done)
        self._followed = list(state.get("followed", []))
