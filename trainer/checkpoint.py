"""Training checkpoints: the pickle-free storage format, the layout of a multi-rank checkpoint
under ``<run>/checkpoints/``, and the ``Checkpointer`` that saves and restores a run's stateful
objects there. Nothing here knows DeepSpeed: ``trainer.engine`` makes an engine one more stateful
object (``EngineState``), and its rank state one file of this format (``save_rank_state``).

Nothing is ever unpickled: tensors travel as safetensors, everything else as JSON in the
safetensors header (``encode_state``). DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint``
are not used because they ``torch.load`` pickles.

Layout (keys relative to the folder holding ``checkpoints/``; the names are ``trainer.layout``'s)::

    checkpoints/step-000001200/rank-00000.safetensors   one per rank, each written by its rank
    checkpoints/step-000001200/rank-00001.safetensors
    checkpoints/step-000001200/COMPLETE.json            written last, by rank 0, listing the rank
                                                        files with their sizes and sha256

A checkpoint is complete iff its ``COMPLETE.json`` parses and every file it lists exists with
that size and checksum; a crash at any point leaves either the previous complete checkpoint as
the newest, or the new one complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from trainer.layout import CHECKPOINTS_DIR, complete_marker_key, parse_checkpoint_key, rank_file_key

log = logging.getLogger(__name__)

STATE_FORMAT = "saeforge.state/1"
RANK_STATE_FORMAT = "saeforge.rank_state/1"
COMPLETE_FORMAT = "saeforge.checkpoint/1"

_METADATA_KEY = "saeforge.state"
_JSON_SCALARS = (type(None), bool, int, str)
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# --------------------------------------------------------------------------- nested state


def flatten_state(state: Any) -> tuple[dict[str, Tensor], Any]:
    """Split ``state`` into its tensors (CPU, detached, named by their path) and a JSON-able
    skeleton that ``unflatten_state`` rebuilds it from.

    Accepts dicts with ``str`` or ``int`` keys, lists, tuples, tensors, and the JSON leaves
    ``None``, ``bool``, ``int``, ``float`` (``nan`` and ``inf`` too) and ``str``; the skeleton
    records which is which, so int keys and tuples come back as such. Anything else raises a
    ``TypeError`` naming its path. A tensor reached twice is stored twice (aliasing is not kept).
    """
    tensors: dict[str, Tensor] = {}
    return tensors, _flatten(state, (), tensors)


def _flatten(obj: Any, path: tuple, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        name = _tensor_name(path, tensors)
        tensors[name] = obj.detach().cpu()
        return {"tensor": name}
    if type(obj) in _JSON_SCALARS:
        return obj
    if type(obj) is float:
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if type(obj) in (dict, OrderedDict):
        items = []
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{_path_text(path)}: dict key {key!r} of type {type(key).__name__} (only str and int keys)")
            items.append([key, _flatten(value, (*path, key), tensors)])
        return {"dict": items}
    if type(obj) in (list, tuple):
        values = [_flatten(value, (*path, i), tensors) for i, value in enumerate(obj)]
        return {type(obj).__name__: values}
    raise TypeError(f"{_path_text(path)}: {type(obj).__qualname__} is not serialisable without pickle")


def _tensor_name(path: tuple, taken: Mapping[str, Tensor]) -> str:
    base = "/".join(str(part) for part in path) or "tensor"
    name, n = base, 1
    while name in taken or name == "__metadata__":
        name, n = f"{base}~{n}", n + 1
    return name


def _path_text(path: tuple) -> str:
    return "state" + "".join(f"[{part!r}]" for part in path)


def unflatten_state(tensors: Mapping[str, Tensor], skeleton: Any) -> Any:
    """Rebuild what ``flatten_state`` split. Raises ``ValueError`` on a skeleton it did not write,
    a tensor the skeleton names but ``tensors`` lacks, or a tensor no node names."""
    used: set[str] = set()
    state = _unflatten(skeleton, (), tensors, used)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{len(unused)} tensors are not named by the skeleton (first: {unused[0]!r})")
    return state


def _unflatten(node: Any, path: tuple, tensors: Mapping[str, Tensor], used: set[str]) -> Any:
    if type(node) in _JSON_SCALARS or type(node) is float:
        return node
    if not (isinstance(node, dict) and len(node) == 1):
        raise ValueError(f"skeleton at {_path_text(path)}: unexpected node {node!r:.80}")
    (kind, body), = node.items()
    if kind == "tensor" and isinstance(body, str):
        if body not in tensors:
            raise ValueError(f"skeleton at {_path_text(path)} names tensor {body!r}, which is missing")
        used.add(body)
        return tensors[body]
    if kind == "float" and body in _NON_FINITE:
        return _NON_FINITE[body]
    if kind in ("list", "tuple") and isinstance(body, list):
        values = [_unflatten(value, (*path, i), tensors, used) for i, value in enumerate(body)]
        return values if kind == "list" else tuple(values)
    if kind == "dict" and isinstance(body, list):
        result = {}
        for item in body:
            if not (isinstance(item, list) and len(item) == 2 and type(item[0]) in (str, int)):
                raise ValueError(f"skeleton at {_path_text(path)}: bad dict item {item!r:.80}")
            result[item[0]] = _unflatten(item[1], (*path, item[0]), tensors, used)
        return result
    raise ValueError(f"skeleton at {_path_text(path)}: unexpected node {node!r:.80}")


def encode_state(state: Any) -> bytes:
    """``state`` (see ``flatten_state``) as one safetensors file; the skeleton rides in its header."""
    tensors, skeleton = flatten_state(state)
    header = json.dumps({"format": STATE_FORMAT, "skeleton": skeleton}, allow_nan=False)
    return save_safetensors(_without_overlaps(tensors), metadata={_METADATA_KEY: header})


def decode_state(data: bytes) -> Any:
    """The state ``encode_state`` wrote, read with safetensors and json only (no pickle)."""
    metadata = _safetensors_metadata(data)
    try:
        header = json.loads(metadata[_METADATA_KEY])
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a saeforge state file: no readable {_METADATA_KEY!r} header ({err})") from None
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise ValueError(f"state format {header.get('format') if isinstance(header, dict) else header!r}: expected {STATE_FORMAT!r}")
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(f"state file: unreadable tensors ({err})") from None
    return unflatten_state(tensors, header["skeleton"])


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # safetensors' torch API has no reader of the metadata from bytes; the format is documented:
    # an 8-byte little-endian header length, then the JSON header with "__metadata__".
    if len(data) < 8:
        raise ValueError(f"not a safetensors file: {len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"not a safetensors file: header of {n} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as err:
        raise ValueError(f"not a safetensors file: header is not JSON ({err})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _without_overlaps(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors of which none overlaps another in memory (safetensors refuses those,
    and views into DeepSpeed's flat buffers are common); only the overlapping ones are copied."""
    result: dict[str, Tensor] = {}
    ends: dict[int, list[tuple[int, int]]] = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            start = tensor.data_ptr()
            span = (start, start + tensor.numel() * tensor.element_size())
            spans = ends.setdefault(storage, [])
            if any(span[0] < end and begin < span[1] for begin, end in spans):
                tensor = tensor.clone()
            else:
                spans.append(span)
        result[name] = tensor
    return result


# --------------------------------------------------------------------------- stateful objects


@runtime_checkable
class Stateful(Protocol):
    """An object that saves and restores itself, as torch modules and optimizers do: the reader,
    the training loop, ``trainer.engine.EngineState``. Its state is anything ``flatten_state`` takes."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def capture_state(states: Mapping[str, Any]) -> dict[str, Any]:
    """``states`` (names to ``Stateful`` objects, or to mappings of them) with each object
    replaced by its ``state_dict()``: what ``restore_state`` puts back."""
    captured = {}
    for name, obj in states.items():
        if isinstance(obj, Mapping):
            captured[name] = capture_state(obj)
        elif isinstance(obj, Stateful):
            captured[name] = obj.state_dict()
        else:
            raise TypeError(f"{name!r}: {type(obj).__qualname__} has no state_dict() / load_state_dict()")
    return captured


def restore_state(states: Mapping[str, Any], saved: Mapping[str, Any], *, where: str = "saved state") -> None:
    """Load ``saved`` (``capture_state``'s result) into the objects of ``states``, in their order.
    A name of ``states`` that ``saved`` lacks raises ``ValueError`` naming it and ``where``;
    names only ``saved`` has are left alone."""
    _restore(states, saved, (), where)


def _restore(states: Mapping[str, Any], saved: Any, path: tuple, where: str) -> None:
    for name, obj in states.items():
        if not isinstance(saved, Mapping) or name not in saved:
            raise ValueError(f"{where} has no {_path_text((*path, name))}")
        if isinstance(obj, Mapping):
            _restore(obj, saved[name], (*path, name), where)
        else:
            obj.load_state_dict(saved[name])


class AttributeState:
    """One attribute of an object, as a ``Stateful`` whose state is the attribute's value
    (a number, say, that a run must keep across a restart)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def state_dict(self) -> Any:
        return getattr(self.obj, self.name)

    def load_state_dict(self, state: Any) -> None:
        setattr(self.obj, self.name, state)


# --------------------------------------------------------------------------- one rank's state

RANK_STATE_PARTS = ("identity", "module", "optimizer", "lr_scheduler", "engine", "rng", "extra")
"""The parts of a rank state file, in order: an engine's (``trainer.engine.EngineState``), the
RNG states (``RNGState``) and the caller's ``extra``."""


def encode_rank_state(parts: Mapping[str, Any]) -> bytes:
    """One rank's state file: ``parts`` (every one of ``RANK_STATE_PARTS``) under the rank state
    format, as ``encode_state`` writes it."""
    missing = sorted(set(RANK_STATE_PARTS) - set(parts))
    if missing:
        raise ValueError(f"rank state lacks {missing}")
    return encode_state({"format": RANK_STATE_FORMAT, **{name: parts[name] for name in RANK_STATE_PARTS}})


def decode_rank_state(data: bytes) -> dict[str, Any]:
    """The parts ``encode_rank_state`` wrote; ``ValueError`` for any other file."""
    state = decode_state(data)
    if not isinstance(state, dict) or state.get("format") != RANK_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"rank state format {found!r}: expected {RANK_STATE_FORMAT!r}")
    missing = sorted(set(RANK_STATE_PARTS) - set(state))
    if missing:
        raise ValueError(f"rank state lacks {missing}")
    return state


class RNGState:
    """This process's random number generators (torch, CUDA, numpy, python) as a ``Stateful``.
    Restore it after building everything that draws random numbers at construction."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = random.getstate()
        numpy_state = np.random.get_state(legacy=False)
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "bit_generator": numpy_state["bit_generator"],
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                "pos": int(numpy_state["state"]["pos"]),
                "has_gauss": int(numpy_state["has_gauss"]),
                "gauss": float(numpy_state["gauss"]),
            },
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        }

    @staticmethod
    def check(saved: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if ``saved`` cannot be restored here (CUDA states of another
        number of devices), before anything changes."""
        n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(saved["cuda"]) not in (0, n_devices):
            raise ValueError(f"checkpoint holds CUDA RNG states of {len(saved['cuda'])} devices, this process sees {n_devices}")

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.check(saved)
        torch.set_rng_state(saved["torch"])
        if saved["cuda"]:
            torch.cuda.set_rng_state_all(saved["cuda"])
        numpy_saved = saved["numpy"]
        np.random.set_state({
            "bit_generator": numpy_saved["bit_generator"],
            "state": {"key": numpy_saved["key"].numpy().astype(np.uint32), "pos": numpy_saved["pos"]},
            "has_gauss": numpy_saved["has_gauss"],
            "gauss": numpy_saved["gauss"],
        })
        python = saved["python"]
        random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))


class NonFiniteStateError(ValueError):
    """A state holding NaN or Inf in its weights, optimizer or scheduler was refused a checkpoint."""


def refuse_non_finite(state: Mapping[str, Any]) -> None:
    """Raise ``NonFiniteStateError`` on every rank if any rank's ``state`` holds a floating-point
    tensor with NaN or Inf (agreed, so no rank is left waiting in the checkpoint's barrier).
    A collective when a process group exists: every rank calls it."""
    found = _first_non_finite(state, ())
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n_bad = torch.tensor([0 if found is None else 1], dtype=torch.int64, device=_collective_device())
    if world_size > 1:
        dist.all_reduce(n_bad)
    if found is not None:
        path, tensor = found
        n_values = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteStateError(
            f"rank {rank}: {_path_text(path)} holds {n_values} NaN or Inf values of {tensor.numel()}: "
            "refusing to checkpoint a non-finite state (expected every weight and optimizer value finite)"
        )
    if n_bad.item():
        raise NonFiniteStateError(
            f"rank {rank}: {n_bad.item()} of {world_size} ranks hold NaN or Inf in their weights or "
            "optimizer state: refusing to checkpoint a non-finite state"
        )


def _first_non_finite(obj: Any, path: tuple) -> tuple[tuple, Tensor] | None:
    if isinstance(obj, Tensor):
        return (path, obj) if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, (*path, key))
        if found is not None:
            return found
    return None


def _collective_device() -> torch.device:
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


# --------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class RankFile:
    """One rank's file of a checkpoint, as ``COMPLETE.json`` lists it."""

    key: str
    """Key relative to the checkpoints' folder (``trainer.layout.rank_file_key``)."""
    size_bytes: int
    """Length of the file."""
    sha256: str
    """Hex sha256 of the file."""

    @classmethod
    def of(cls, key: str, data: bytes) -> RankFile:
        return cls(key=key, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def verify(self, data: bytes) -> None:
        """Raise ``ValueError`` unless ``data`` is this file."""
        if len(data) != self.size_bytes:
            raise ValueError(f"checkpoint file {self.key}: {len(data)} bytes, expected {self.size_bytes}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise ValueError(f"checkpoint file {self.key}: checksum {digest[:12]}… expected {self.sha256[:12]}…")


def gather_rank_files(step: int, data: bytes) -> list[RankFile]:
    """Every rank's ``RankFile`` for ``step``, on every rank, from each rank's own bytes.

    A collective: call it on every rank once its file is written; it is the barrier after which
    rank 0 writes ``complete_marker``. Sizes and digests travel as tensors, not pickled objects.
    """
    own = RankFile.of(rank_file_key(step, dist.get_rank() if dist.is_initialized() else 0), data)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [own]
    device = _collective_device()
    packed = torch.tensor([own.size_bytes, *bytes.fromhex(own.sha256)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, packed)
    files = []
    for rank, row in enumerate(gathered):
        size, *digest = row.tolist()
        files.append(RankFile(key=rank_file_key(step, rank), size_bytes=size, sha256=bytes(digest).hex()))
    return files


def complete_marker(step: int, rank_files: Sequence[RankFile]) -> tuple[str, bytes]:
    """``(key, bytes)`` of the ``COMPLETE.json`` that makes ``step``'s checkpoint complete: written
    by rank 0, after every rank's file (``gather_rank_files``), as the checkpoint's last object."""
    expected = [rank_file_key(step, rank) for rank in range(len(rank_files))]
    keys = [f.key for f in rank_files]
    if keys != expected:
        raise ValueError(f"rank files {keys} are not ranks 0..{len(rank_files) - 1} of step {step}")
    record = {
        "format": COMPLETE_FORMAT,
        "step": step,
        "world_size": len(rank_files),
        "rank_files": [{"key": f.key, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in rank_files],
    }
    return complete_marker_key(step), json.dumps(record, indent=1).encode()


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint, as its ``COMPLETE.json`` describes it."""

    step: int
    """Optimizer steps taken when it was written."""
    rank_files: tuple[RankFile, ...]
    """One per rank, rank order; the world size is their number."""

    @property
    def world_size(self) -> int:
        return len(self.rank_files)

    def read_rank_state(self, rank: int, read: Callable[[str], bytes]) -> bytes:
        """Rank ``rank``'s file, checked against ``COMPLETE.json``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank}: checkpoint at step {self.step} has world_size={self.world_size}")
        rank_file = self.rank_files[rank]
        data = read(rank_file.key)
        rank_file.verify(data)
        return data


def parse_complete_marker(step: int, data: bytes) -> Checkpoint:
    """The ``Checkpoint`` a ``COMPLETE.json`` of ``step`` describes; ``ValueError`` if malformed."""
    try:
        record = json.loads(data)
        if record["format"] != COMPLETE_FORMAT or record["step"] != step:
            raise ValueError(f"format {record['format']!r}, step {record['step']!r}")
        files = tuple(
            RankFile(key=str(f["key"]), size_bytes=int(f["size_bytes"]), sha256=str(f["sha256"]))
            for f in record["rank_files"]
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{complete_marker_key(step)}: not a complete marker of step {step} ({err})") from None
    expected = [rank_file_key(step, rank) for rank in range(len(files))]
    if not files or [f.key for f in files] != expected or record["world_size"] != len(files):
        raise ValueError(f"{complete_marker_key(step)}: lists {[f.key for f in files]}, expected {expected}")
    return Checkpoint(step=step, rank_files=files)


def _files_by_step(keys: Iterable[str]) -> dict[int, set[str]]:
    by_step: dict[int, set[str]] = {}
    for key in keys:
        parsed = parse_checkpoint_key(key)
        if parsed is not None:
            by_step.setdefault(parsed[0], set()).add(key)
    return by_step


def newest_complete_checkpoint(keys: Iterable[str], read: Callable[[str], bytes]) -> Checkpoint | None:
    """The newest complete checkpoint among ``keys`` (the keys under ``checkpoints/``, relative to
    the folder holding it), or ``None``.

    Steps without ``COMPLETE.json``, with one that does not parse, with a listed file missing
    from ``keys``, or with a file that ``read(key)`` does not match in size and sha256, are
    skipped (with a warning for the damaged ones).
    """
    key_set = set(keys)
    for step, step_keys in sorted(_files_by_step(key_set).items(), reverse=True):
        marker = complete_marker_key(step)
        if marker not in step_keys:
            continue
        try:
            checkpoint = parse_complete_marker(step, read(marker))
            missing = [f.key for f in checkpoint.rank_files if f.key not in key_set]
            if missing:
                raise ValueError(f"checkpoint at step {step}: listed files missing: {missing}")
            for rank_file in checkpoint.rank_files:
                rank_file.verify(read(rank_file.key))
        except ValueError as err:
            log.warning("skipping damaged checkpoint: %s", err)
            continue
        return checkpoint
    return None


def superseded_checkpoint_keys(keys: Iterable[str], *, keep: int) -> list[str]:
    """Keys to delete so that only the newest ``keep`` checkpoints that have a ``COMPLETE.json``
    remain, plus any newer step still being written. Older incomplete steps (left by a crash) go
    too. Each step's ``COMPLETE.json`` comes first in the list, so a deletion cut short never
    leaves a marker pointing at missing files. The markers are not read: keep at least 2 so a
    damaged newest checkpoint still leaves a good one.
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    by_step = _files_by_step(keys)
    complete = sorted((step for step, ks in by_step.items() if complete_marker_key(step) in ks), reverse=True)
    if not complete:
        return []
    kept = set(complete[:keep])
    doomed = []
    for step in sorted(by_step):
        if step in kept or step > complete[0]:
            continue
        marker = complete_marker_key(step)
        doomed += [marker] if marker in by_step[step] else []
        doomed += sorted(by_step[step] - {marker})
    return doomed


# --------------------------------------------------------------------------- saving and resuming a run


class CheckpointStore(Protocol):
    """What a ``Checkpointer`` needs of the folder that holds ``checkpoints/``
    (``activation_cache.store.ObjectStore`` has it)."""

    uri: str

    def get_bytes(self, key: str) -> bytes: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None: ...


class Checkpointer:
    """A run's checkpoints in ``store``: every ``every_steps`` steps each rank writes the state of
    the run's stateful objects (``capture_state``) to its own file, and rank 0, after all have,
    the marker that makes the checkpoint complete; on start the newest complete one comes back.

    Every rank builds one with the same arguments (its own ``rank``) and makes the same calls:
    ``save`` and ``restore`` are collectives when ``world_size > 1``.
    """

    def __init__(self, store: CheckpointStore, *, rank: int, world_size: int, every_steps: int, keep: int) -> None:
        if every_steps < 0:
            raise ValueError(f"every_steps={every_steps} must be >= 0 (0: never)")
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.every_steps, self.keep = every_steps, keep

    def due(self, step: int, *, last_step: int) -> bool:
        """Whether to save after ``step``: each ``every_steps``-th step before ``last_step`` (the
        end of training writes the run's result instead)."""
        return bool(self.every_steps) and step % self.every_steps == 0 and step < last_step

    def save(self, step: int, states: Mapping[str, Any]) -> None:
        """Write this rank's state of ``states`` for ``step``; rank 0 then writes the marker and
        drops the checkpoints beyond the newest ``keep``."""
        data = encode_state(capture_state(states))
        self.store.put_bytes(rank_file_key(step, self.rank), data)
        files = gather_rank_files(step, data)  # also the barrier: every rank's file is written
        if self.rank == 0:
            self.store.put_bytes(*complete_marker(step, files))
            for key in superseded_checkpoint_keys(self.store.list(f"{CHECKPOINTS_DIR}/"), keep=self.keep):
                self.store.delete(key)
            log.info("checkpoint at step %d: %s", step, self.store.uri)

    def restore(self, states: Mapping[str, Any]) -> int:
        """Load the newest complete checkpoint, if any, into ``states`` (``restore_state``); return
        the steps it had taken (0 without one). A checkpoint of another world size is refused."""
        checkpoint = self._newest_on_every_rank()
        if checkpoint is None:
            return 0
        where = f"checkpoint at step {checkpoint.step} in {self.store.uri}"
        if checkpoint.world_size != self.world_size:
            raise ValueError(f"{where} was written by {checkpoint.world_size} ranks, this run has "
                             f"{self.world_size}: resume with {checkpoint.world_size} training ranks")
        saved = decode_state(checkpoint.read_rank_state(self.rank, self.store.get_bytes))
        restore_state(states, saved, where=where)
        if self.rank == 0:  # one line for the group, as for a checkpoint written
            log.info("resumed from the %s", where)
        return checkpoint.step

    def _newest_on_every_rank(self) -> Checkpoint | None:
        """Rank 0 picks the newest complete checkpoint (verifying every file) and broadcasts its
        step, so every rank loads the same one."""
        step = torch.tensor([-1], dtype=torch.int64, device=_collective_device())
        if self.rank == 0:
            found = newest_complete_checkpoint(self.store.list(f"{CHECKPOINTS_DIR}/"), self.store.get_bytes)
            step[0] = found.step if found is not None else -1
        if self.world_size > 1:
            dist.broadcast(step, src=0)
        if step.item() < 0:
            return None
        found_step = int(step.item())
        return parse_complete_marker(found_step, self.store.get_bytes(complete_marker_key(found_step)))
