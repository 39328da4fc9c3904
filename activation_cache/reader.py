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

Pairs and groups (a transcoder's ``(x, y)``, a cross-layer transcoder's L inputs and L
targets): with ``target_store`` (or ``input_stores`` and ``target_stores``) the epoch is planned
on the first input cache alone, exactly as above, and each batch is gathered from every cache of
the group at the same row indices: ``x`` the input caches' rows side by side in layer order,
``y`` the target caches'. The caches come from one forward pass, so a shard of one has the same
name, rows, sequences and positions as that shard of every other; each shard of the group is
checked against the first input's when it is read. A tailing reader counts a shard as committed
once every manifest of the group lists it.
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

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A reader's batch: the activations, or a paired (grouped) reader's ``(x, y)``."""


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


def check_shard_pair(x: DecodedShard, y: DecodedShard, *, name: str, input_uri: str, target_uri: str) -> None:
    """Refuse a shard pair whose rows are not the same tokens: equal row counts and equal
    ``sequence_id``, ``position`` and ``token_id`` columns."""
    if len(x.sequence_ids) != len(y.sequence_ids):
        raise CorruptShardError(f"shard {name}: {len(x.sequence_ids)} rows in cache {input_uri} but "
                                f"{len(y.sequence_ids)} in cache {target_uri}: not the same tokens")
    for column in ("sequence_ids", "positions", "token_ids"):
        a, b = getattr(x, column), getattr(y, column)
        if not np.array_equal(a, b):
            row = int(np.flatnonzero(a != b)[0])
            raise CorruptShardError(f"shard {name}: row {row} has {column[:-1]} {a[row]} in cache {input_uri} but "
                                    f"{b[row]} in cache {target_uri}: not the same tokens")


def check_shard_group(shards: Sequence[DecodedShard], *, name: str, uris: Sequence[str]) -> None:
    """Refuse a group of one shard's copies (one per cache, ``uris`` in the same order) unless
    every copy holds the first's tokens (``check_shard_pair`` against the first)."""
    for shard, uri in zip(shards[1:], uris[1:], strict=True):
        check_shard_pair(shards[0], shard, name=name, input_uri=uris[0], target_uri=uri)


def read_shards(
    stores: Sequence[ObjectStore], entries: Sequence[ShardEntry], *, as_float32: bool = True,
) -> tuple[DecodedShard, ...]:
    """One shard from each cache of a group (an input cache first), each verified against its
    manifest entry and every one against the first (``check_shard_group``)."""
    shards = tuple(read_shard(store, entry, as_float32=as_float32) for store, entry in zip(stores, entries, strict=True))
    check_shard_group(shards, name=entries[0].name, uris=[store.uri for store in stores])
    return shards


def read_shard_pair(
    input_store: ObjectStore, target_store: ObjectStore, input_entry: ShardEntry, target_entry: ShardEntry,
    *, as_float32: bool = True,
) -> tuple[DecodedShard, DecodedShard]:
    """One shard of an input cache and the same shard of its target cache, each verified against
    its manifest entry and the two against each other (``check_shard_pair``)."""
    x, y = read_shards((input_store, target_store), (input_entry, target_entry), as_float32=as_float32)
    return x, y


def read_shard_group(
    input_stores: Sequence[ObjectStore], target_stores: Sequence[ObjectStore], name: str,
    input_manifests: Sequence[Manifest], target_manifests: Sequence[Manifest],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard ``name`` of a cross-layer transcoder's caches as float32 ``(x, y)`` rows: ``x`` the L
    input caches' rows side by side in layer order (rows, L * d_in), ``y`` the L target caches'
    (rows, L * d_out). Each cache's copy is verified against its manifest's entry and every copy
    against the first input's, token by token (``read_shards``)."""
    if not len(input_stores) == len(target_stores) == len(input_manifests) == len(target_manifests) > 0:
        raise ValueError(f"{len(input_stores)} input caches, {len(target_stores)} target caches, "
                         f"{len(input_manifests)} and {len(target_manifests)} manifests: expected one of each per layer")
    stores, manifests = [*input_stores, *target_stores], [*input_manifests, *target_manifests]
    entries = []
    for store, manifest in zip(stores, manifests, strict=True):
        entry = next((s for s in manifest.shards if s.name == name), None)
        if entry is None:
            raise ValueError(f"shard {name} is not in the manifest of cache {store.uri}")
        entries.append(entry)
    shards = read_shards(stores, entries)
    n_layers = len(input_stores)
    return (torch.cat([s.activations for s in shards[:n_layers]], dim=1),
            torch.cat([s.activations for s in shards[n_layers:]], dim=1))


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


def _group(
    store: ObjectStore, target_store: ObjectStore | None,
    input_stores: Sequence[ObjectStore] | None, target_stores: Sequence[ObjectStore] | None,
) -> tuple[list[ObjectStore], list[ObjectStore]]:
    """A reader's (input caches, target caches) from its arguments, refused unless they make one
    group: ``store`` first among the inputs, as many targets as inputs."""
    if target_store is not None and (target_stores is not None or input_stores is not None):
        raise ValueError("target_store is a transcoder's one target cache: give it, or input_stores and "
                         "target_stores, not both")
    targets = [target_store] if target_store is not None else list(target_stores or [])
    inputs = list(input_stores) if input_stores is not None else [store]
    if not inputs or inputs[0].uri != store.uri:
        first = inputs[0].uri if inputs else None
        raise ValueError(f"input_stores start with {first} but the reader's store is {store.uri}: the epoch is "
                         "planned on the first input cache")
    if (len(inputs) > 1 or targets) and len(targets) != len(inputs):
        raise ValueError(f"{len(inputs)} input caches but {len(targets)} target caches: a cross-layer transcoder "
                         "reads one input and one target cache per layer")
    return inputs, targets


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
    whatever the budget. Nothing is read for rows the plan skips (a resumed reader).

    ``stores`` are the caches of a group (one for an unpaired reader; an input cache first): each
    shard is read from every one of them, each copy by its own thread, and the copies are checked
    against the first (``check_shard_group``) when the shard is first used; the budget counts all."""

    def __init__(self, stores: Sequence[ObjectStore], *, threads: int, budget_bytes: int):
        self._stores = list(stores)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="saeforge-read")
        self._budget = budget_bytes
        self._entries: list[tuple[ShardEntry, ...]] = []
        self._sizes: list[int] = []
        self._remaining: list[int] = []
        self._futures: dict[int, list[Future]] = {}
        self._checked: set[int] = set()
        self._held_bytes = 0
        self._next = 0
        """Position of the next shard ``top_up`` considers reading."""

    def add(self, entries: Sequence[ShardEntry], rows_needed: int) -> None:
        """Register the next shard of the plan, in first-need order: its position is the count
        of shards added before it. ``entries`` are its entries in each store, in store order."""
        if len(entries) != len(self._stores):
            raise ValueError(f"shard {entries[0].name}: {len(entries)} entries for {len(self._stores)} caches")
        self._entries.append(tuple(entries))
        self._sizes.append(sum(entry.size_bytes for entry in entries))
        self._remaining.append(rows_needed)

    def _submit(self, pos: int) -> list[Future]:
        if pos not in self._futures:
            self._futures[pos] = [self._pool.submit(read_shard, store, entry, as_float32=False)
                                  for store, entry in zip(self._stores, self._entries[pos], strict=True)]
            self._held_bytes += self._sizes[pos]
        return self._futures[pos]

    def _release(self, pos: int) -> None:
        futures = self._futures.pop(pos, None)
        if futures is not None:
            for future in futures:
                future.cancel()
            self._held_bytes -= self._sizes[pos]

    def top_up(self) -> None:
        """Start reading the next needed shards while the budget allows (at least one in flight)."""
        while self._next < len(self._entries):
            pos = self._next
            if self._remaining[pos] > 0 and pos not in self._futures:
                size = self._sizes[pos]
                if self._futures and self._held_bytes + size > self._budget:
                    return
                self._submit(pos)
            self._next += 1

    def shard(self, pos: int) -> tuple[np.ndarray, ...]:
        """The activations of shard ``pos`` as stored (bfloat16 as its int16 bits), one array per
        store, waiting for the reads if need be."""
        shards = [future.result() for future in self._submit(pos)]
        if pos not in self._checked:
            check_shard_group(shards, name=self._entries[pos][0].name, uris=[store.uri for store in self._stores])
            self._checked.add(pos)
        return tuple(shard.activations for shard in shards)

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

    With ``target_store`` (a transcoder's target cache, filled by the same forward pass) each
    batch is an ``(x, y)`` tuple of float32 tensors, (batch_size, d_in) and (batch_size, d_out):
    the rows of both caches at the same row indices, planned on the input cache exactly as an
    unpaired reader plans it (so its ``x`` are the unpaired reader's batches). ``target_shards``
    are the target's entries of the same shards (default: the target's committed manifest).

    With ``input_stores`` and ``target_stores`` (a cross-layer transcoder's L input caches, in
    layer order with ``store`` first, and its L target caches) ``x`` is the L input caches' rows
    side by side, (batch_size, L * d_in), and ``y`` the L target caches', (batch_size, L * d_out);
    ``target_stores=[t]`` alone is ``target_store=t``. The group's other caches' entries come from
    their committed manifests. The epoch is planned on ``store``, so ``x[:, :d_in]`` are the
    unpaired reader's batches.
    """

    def __init__(
        self,
        store: ObjectStore,
        shards: Sequence[ShardEntry] | None = None,
        *,
        target_store: ObjectStore | None = None,
        target_shards: Sequence[ShardEntry] | None = None,
        input_stores: Sequence[ObjectStore] | None = None,
        target_stores: Sequence[ObjectStore] | None = None,
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
        if follow and (shards is not None or target_shards is not None):
            raise ValueError("follow=True reads the manifest as it grows: pass shard_filter, not shards")
        if target_shards is not None and target_store is None:
            raise ValueError("target_shards were given without the target_store they belong to")
        self.input_stores, self.target_stores = _group(store, target_store, input_stores, target_stores)
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
        self._twins: list[dict[str, ShardEntry]] = [{} for _ in self._stores[1:]]
        """The entries of the group's other caches (``_stores[1:]``) by shard name."""
        if not follow:
            if shards is None:
                shards = self._committed(self._manifest(), store).shards
            self._set_shards(shards, self._twin_shards(target_shards))
        # Position: the epoch being read and the batches of it already yielded.
        self._epoch, self._batches_done = 0, 0
        self._restored: tuple[int, int] | None = None
        # Tailing: the shards epoch 0 has taken, in order (replayed on resume).
        self._followed: list[str] = []

    # ------------------------------------------------------------------ the shard list

    @property
    def paired(self) -> bool:
        """Whether batches are ``(x, y)`` read from input and target caches."""
        return bool(self.target_stores)

    @property
    def n_layers(self) -> int:
        """Input caches read side by side into ``x`` (1 but for a cross-layer transcoder's reader)."""
        return len(self.input_stores)

    @property
    def target_store(self) -> ObjectStore | None:
        """The first target cache (a transcoder's one), None for an unpaired reader."""
        return self.target_stores[0] if self.target_stores else None

    @property
    def _stores(self) -> list[ObjectStore]:
        """Every cache of the group in the order batches are gathered: inputs, then targets."""
        return [*self.input_stores, *self.target_stores]

    def _manifest(self) -> Manifest | None:
        return load_manifest(self.store)

    @staticmethod
    def _committed(manifest: Manifest | None, store: ObjectStore) -> Manifest:
        if manifest is None:
            raise FileNotFoundError(f"no committed manifest in {store.uri}: not an activation cache")
        return manifest

    def _twin_shards(self, target_shards: Sequence[ShardEntry] | None) -> list[Sequence[ShardEntry]]:
        """The entries of the group's other caches: a pair's ``target_shards`` as given, else
        each cache's committed manifest's."""
        if target_shards is not None:
            return [target_shards]
        return [self._committed(load_manifest(other), other).shards for other in self._stores[1:]]

    def _set_shards(self, shards: Sequence[ShardEntry], twin_shards: Sequence[Sequence[ShardEntry]] = ()) -> None:
        """Read ``shards`` (those ``shard_filter`` keeps) of the first cache; ``twin_shards`` are
        more entries of the group's other caches, in ``_stores[1:]`` order."""
        selected = [s for s in shards if self.shard_filter is None or self.shard_filter(s)]
        if not selected:
            raise ValueError(f"no committed shards to read in {self.store.uri}")
        for twins, entries in zip(self._twins, twin_shards, strict=False):
            twins.update({s.name: s for s in entries})
        for other, twins in zip(self._stores[1:], self._twins, strict=True):
            missing = [s.name for s in selected if s.name not in twins]
            if missing:
                raise ValueError(f"shard {missing[0]} of cache {self.store.uri} is not in the manifest of cache "
                                 f"{other.uri}, read with it: not caches of one forward pass")
        self._shards = sorted(selected, key=lambda s: s.name)

    def _group_of(self, entry: ShardEntry) -> tuple[ShardEntry, ...]:
        """``entry`` and its twins: the same shard's entry in every cache of the group."""
        return (entry, *(twins[entry.name] for twins in self._twins))

    @property
    def shards(self) -> list[ShardEntry]:
        """The shards a planned epoch reads (for a tailing reader, once the cache is complete)."""
        if self._shards is None:
            manifests = [load_manifest(store) for store in self._stores]
            for manifest, store in zip(manifests, self._stores, strict=True):
                if manifest is None or not manifest.complete:
                    raise RuntimeError(f"cache {store.uri} is still being written: its shards are not final")
            self._set_shards(manifests[0].shards, [m.shards for m in manifests[1:]])
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
    ) -> Iterator[Batch]:
        """Turn batches of row ids (``offsets[pos] + row``) into activations (``(x, y)`` from a
        group's loader), skipping the first ``skip`` batches without reading them."""
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
            parts = []  # per shard: its rows of each cache, gathered at the same indices
            for p, where in groups:
                rows = ids[where] - offsets[p]
                parts.append([activations[rows] for activations in loader.shard(p)])
                loader.consume(p, len(where))
            columns = [_as_float32(np.concatenate(column)) for column in zip(*parts, strict=True)]
            self._batches_done = index + 1
            yield self._batch(columns)

    def _batch(self, columns: list[torch.Tensor]) -> Batch:
        """One batch from its rows of each cache (``_stores`` order): the rows, or ``(x, y)``
        with each side's caches side by side."""
        if not self.paired:
            return columns[0]
        x, y = columns[: self.n_layers], columns[self.n_layers :]
        return (x[0] if len(x) == 1 else torch.cat(x, dim=1)), (y[0] if len(y) == 1 else torch.cat(y, dim=1))

    def _loader(self) -> _ShardLoader:
        return _ShardLoader(self._stores, threads=self.read_threads, budget_bytes=self.prefetch_bytes)

    def _planned_epoch(self, epoch: int, skip: int) -> Iterator[Batch]:
        ordered, segments = self._segments(epoch)
        loader = self._loader()
        # Row ids number this rank's segments' shards in the order their rows enter the buffer.
        offsets, chunks, offset = [], [], 0
        for segment in segments:
            entry = ordered[segment.pos]
            loader.add(self._group_of(entry), segment.stop - segment.start)
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

    def _listed(self) -> tuple[dict[str, ShardEntry], Manifest | None, bool]:
        """The shards committed so far by name (a group's: those every manifest lists), the
        first cache's manifest, and whether the cache (every cache of the group) is complete."""
        manifest = self._manifest()
        listed = {} if manifest is None else {s.name: s for s in manifest.shards}
        complete = manifest is not None and manifest.complete
        for store, twins in zip(self._stores[1:], self._twins, strict=True):
            other = load_manifest(store)
            twins.update({} if other is None else {s.name: s for s in other.shards})
            listed = {name: s for name, s in listed.items() if name in twins}
            complete = complete and other is not None and other.complete
        return listed, manifest, complete

    def _tailed_epoch(self, skip: int, replay: list[str]) -> Iterator[Batch]:
        """Epoch 0 of a tailing reader: this rank's shards as manifests list them, after the
        ``replay`` ones (a restored reader's, in their order)."""
        loader = self._loader()
        offsets: list[int] = []
        self._followed = []

        def entries() -> Iterator[ShardEntry]:
            taken: set[str] = set()
            waited_since = time.monotonic()
            while True:
                reason = self.abort() if self.abort is not None else None
                if reason:
                    raise TailingAborted(f"cache {self.store.uri}: stopped reading a cache still being written: {reason}")
                listed, manifest, complete = self._listed()
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
                if complete:
                    assert manifest is not None
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
                loader.add(self._group_of(entry), entry.rows)
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

    def epoch(self, epoch: int) -> Iterator[Batch]:
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

    def __iter__(self) -> Iterator[Batch]:
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
        if self.paired:
            state["paired"] = True
        if self.n_layers > 1:
            state["n_layers"] = self.n_layers
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; it must come from a reader of the same rank, batch size,
        seed, shuffle buffer and shards, paired if this one is and unpaired if not, over as many
        layers' caches."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r}: expected {STATE_VERSION}")
        if bool(state.get("paired", False)) != self.paired:
            kinds = ("an unpaired", "a paired (x, y)")
            raise ValueError(f"reader state was taken by {kinds[bool(state.get('paired', False))]} reader "
                             f"but this is {kinds[self.paired]} reader: not the same job's data")
        if int(state.get("n_layers", 1)) != self.n_layers:
            raise ValueError(f"reader state was taken by a reader of {state.get('n_layers', 1)} layers' caches but "
                             f"this one reads {self.n_layers}: not the same job's data")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"reader state has {key}={state.get(key)!r} but this reader has {key}={value!r}")
        if "shards" in state and self._shards is not None and state["shards"] != [s.name for s in self._shards]:
            raise ValueError(f"reader state was taken over {len(state['shards'])} other shards than this "
                             f"reader's {len(self._shards)}: not the same cache or holdout split")
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
        self._restored = (self._epoch, self._batches_done)
        self._followed = list(state.get("followed", []))
