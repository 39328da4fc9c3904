"""The activation shard: one Arrow IPC file, one row per token at one hookpoint.

Columns: ``activation`` (``fixed_size_list<d_model>`` of float32, float16, or bfloat16 kept
bit-exact as uint16), ``token_id``, ``sequence_id``, ``position``. Schema metadata names the
model, its revision, the hookpoint, d_model, the stored dtype and the cache key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from activation_cache.errors import CorruptShardError

FORMAT_VERSION = "1"
_ARROW_VALUE_TYPE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPRESSIONS = (None, "lz4", "zstd")


@dataclass(frozen=True)
class ShardMeta:
    """What every shard of one cache says about itself."""

    model: str
    revision: str
    hookpoint: str
    d_model: int
    dtype: str
    cache_key: str

    def to_arrow(self) -> dict[bytes, bytes]:
        fields = {**self.__dict__, "format_version": FORMAT_VERSION}
        return {f"saeforge.{k}".encode(): str(v).encode() for k, v in fields.items()}

    @classmethod
    def from_arrow(cls, metadata: dict[bytes, bytes]) -> ShardMeta:
        get = {k.decode().removeprefix("saeforge."): v.decode() for k, v in metadata.items()}
        return cls(
            model=get["model"], revision=get["revision"], hookpoint=get["hookpoint"],
            d_model=int(get["d_model"]), dtype=get["dtype"], cache_key=get["cache_key"],
        )


def shard_schema(meta: ShardMeta) -> pa.Schema:
    return pa.schema(
        [
            pa.field("activation", pa.list_(_ARROW_VALUE_TYPE[meta.dtype], meta.d_model), nullable=False),
            pa.field("token_id", pa.int32(), nullable=False),
            pa.field("sequence_id", pa.int64(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
        ],
        metadata=meta.to_arrow(),
    )


def _activation_values(acts: torch.Tensor, dtype: str) -> np.ndarray:
    stored = acts.detach().to("cpu", _TORCH_DTYPE[dtype]).contiguous()
    if dtype == "bfloat16":
        return stored.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    return stored.numpy().reshape(-1)


def encode_shard(
    acts: torch.Tensor,
    token_ids: np.ndarray,
    sequence_ids: np.ndarray,
    positions: np.ndarray,
    meta: ShardMeta,
    *,
    compression: str | None = None,
) -> bytes:
    """Arrow IPC file bytes for ``acts`` (n_rows, d_model) and their provenance.

    ``compression`` (``"lz4"`` or ``"zstd"``) compresses the IPC buffers; readers decompress
    whatever they find, so it is a writer's choice that does not change the cache's content or
    key (cost and gain: benchmarks/RESULTS.md)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: expected one of {sorted(map(str, COMPRESSIONS))}")
    n_rows = acts.shape[0]
    if acts.ndim != 2 or acts.shape[1] != meta.d_model:
        raise ValueError(f"activations of shape {tuple(acts.shape)}: expected (n_rows, {meta.d_model})")
    if not len(token_ids) == len(sequence_ids) == len(positions) == n_rows:
        raise ValueError(f"provenance lengths {len(token_ids)}/{len(sequence_ids)}/{len(positions)} != rows {n_rows}")
    schema = shard_schema(meta)
    values = pa.array(_activation_values(acts, meta.dtype), type=_ARROW_VALUE_TYPE[meta.dtype])
    batch = pa.record_batch(
        [
            pa.FixedSizeListArray.from_arrays(values, meta.d_model),
            pa.array(np.asarray(token_ids, dtype=np.int32)),
            pa.array(np.asarray(sequence_ids, dtype=np.int64)),
            pa.array(np.asarray(positions, dtype=np.int32)),
        ],
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, schema, options=options) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


@dataclass
class DecodedShard:
    """A shard read back: activations plus provenance."""

    activations: torch.Tensor | np.ndarray
    """(rows, d_model) as a float32 tensor; with ``decode_shard(as_float32=False)`` the rows as
    stored, a read-only NumPy view of the Arrow buffer (bfloat16 as its int16 bits)."""
    token_ids: np.ndarray
    sequence_ids: np.ndarray
    positions: np.ndarray
    meta: ShardMeta


def read_table(data: bytes, *, name: str) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptShardError(f"shard {name}: not a readable Arrow IPC file ({err})") from None


def decode_shard(data: bytes, *, name: str = "<bytes>", as_float32: bool = True) -> DecodedShard:
    """Decode shard bytes; the activations come back as a new float32 tensor (bit-exact for every
    stored dtype). With ``as_float32=False`` they stay as stored, a read-only NumPy view of the
    Arrow buffer without a copy, for readers that only gather rows from them (a tensor cannot be
    made read-only, so torch warns when it wraps one)."""
    table = read_table(data, name=name)
    meta = ShardMeta.from_arrow(table.schema.metadata or {})
    flat = table.column("activation").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    flat = flat.reshape(len(table), meta.d_model)
    if meta.dtype == "bfloat16":
        flat = flat.view(np.int16)
    activations: torch.Tensor | np.ndarray = flat
    if as_float32:
        stored = torch.from_numpy(np.array(flat, copy=True))
        activations = (stored.view(torch.bfloat16) if meta.dtype == "bfloat16" else stored).float()
    return DecodedShard(
        activations=activations,
        token_ids=table.column("token_id").to_numpy(),
        sequence_ids=table.column("sequence_id").to_numpy(),
        positions=table.column("position").to_numpy(),
        meta=meta,
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
