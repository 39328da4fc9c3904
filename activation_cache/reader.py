"""Reading a cache: rank-sharded, shuffled, prefetching, checksum-verified.

Each epoch permutes the committed shards with a seed shared by every rank and deals them
round-robin to ranks, so each row goes to exactly one rank once per epoch. Inside a rank, a
shuffle buffer mixes rows across shards. Every rank yields the same number of batches per
epoch (the smallest rank's count), because data-parallel steps must match across ranks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from activation_cache.manifest import ShardEntry
from activation_cache.schema import CorruptShardError, DecodedShard, decode_shard, sha256_hex
from activation_cache.store import ObjectNotFound, ObjectStore


def read_shard(store: ObjectStore, entry: ShardEntry) -> DecodedShard:
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
    shard = decode_shard(data, name=entry.name)
    if len(shard.activations) != entry.rows:
        raise CorruptShardError(f"shard {entry.name}: {len(shard.activations)} rows, manifest says {entry.rows}")
    return shard


def shuffle_rows(chunks: Iterator[torch.Tensor], *, buffer_rows: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield the rows of ``chunks`` as shuffled chunks; a row waits in a buffer of up to
    ``buffer_rows`` rows and leaves in random order, so rows from different shards mix."""
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


def rebatch(chunks: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Cut a stream of row chunks into batches of exactly ``batch_size`` (the tail is dropped)."""
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


class _Prefetcher:
    """Reads shards on a background thread, at most ``depth`` decoded shards ahead."""

    _DONE = object()

    def __init__(self, store: ObjectStore, entries: Sequence[ShardEntry], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(store, entries), daemon=True)
        self._thread.start()

    def _run(self, store: ObjectStore, entries: Sequence[ShardEntry]) -> None:
        try:
            for entry in entries:
                item = read_shard(store, entry).activations
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # surfaced in the consumer's thread
            self._queue.put(err)
            return
        self._queue.put(self._DONE)

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()


class ActivationReader:
    """Batches of activations for one rank of a data-parallel group."""

    def __init__(
        self,
        store: ObjectStore,
        shards: Sequence[ShardEntry],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        shuffle_buffer_rows: int = 16384,
        prefetch_shards: int = 2,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shards cannot feed world_size={world_size} ranks: need at least one shard per rank")
        self.store = store
        self.shards = sorted(shards, key=lambda s: s.name)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.shuffle_buffer_rows, self.prefetch_shards = shuffle_buffer_rows, prefetch_shards

    def _assignment(self, epoch: int) -> list[list[ShardEntry]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [[self.shards[i] for i in order[r :: self.world_size]] for r in range(self.world_size)]

    def batches_per_epoch(self, epoch: int) -> int:
        """Batches every rank yields in ``epoch``: the smallest rank's full batches."""
        return min(sum(s.rows for s in mine) // self.batch_size for mine in self._assignment(epoch))

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        """This rank's batches (batch_size, d_model), float32, for one epoch."""
        mine = self._assignment(epoch)[self.rank]
        seed = int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        chunks = iter(_Prefetcher(self.store, mine, self.prefetch_shards))
        batches = rebatch(shuffle_rows(chunks, buffer_rows=self.shuffle_buffer_rows, generator=generator), self.batch_size)
        for _, batch in zip(range(self.batches_per_epoch(epoch)), batches, strict=False):
            yield batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches over epochs 0, 1, 2, ... forever; the caller decides when to stop."""
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1
