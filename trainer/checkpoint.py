"""Training checkpoints as bytes: what one rank needs to continue bit-for-bit, and the layout of a
multi-rank checkpoint under ``<run>/checkpoints/``. The caller (``cluster/``) moves the bytes to
and from object storage; nothing here touches storage or imports deepspeed.

Nothing is ever unpickled: tensors travel as safetensors, everything else as JSON in the
safetensors header (``encode_state``). DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint``
are not used because they ``torch.load`` pickles.

Layout (keys relative to the run's root)::

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
import inspect
import json
import logging
import math
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

log = logging.getLogger(__name__)

STATE_FORMAT = "saeforge.state/1"
RANK_STATE_FORMAT = "saeforge.rank_state/1"
COMPLETE_FORMAT = "saeforge.checkpoint/1"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_FILE = "COMPLETE.json"

_METADATA_KEY = "saeforge.state"
_JSON_SCALARS = (type(None), bool, int, str)
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_STEP_DIR = re.compile(rf"^{CHECKPOINTS_DIR}/step-(\d{{9,}})/(.+)$")


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


# --------------------------------------------------------------------------- one rank's state


def save_rank_state(engine: Any, *, extra: Mapping[str, Any]) -> bytes:
    """Everything this rank needs to continue bit-for-bit, as bytes for
    ``rank_file_key(step, rank)``: the module's buffers, its parameters as this rank holds them
    (under ZeRO only the optimizer's fp32 partition of them: the files are sharded as the
    training is), the optimizer's state as this rank holds it, the lr scheduler,
    the engine's step counters, the RNG states (torch, CUDA, numpy, python) and ``extra``
    (the caller's state: reader position, the loop's step, tokens and dead-latent counters;
    anything ``flatten_state`` takes).

    Every rank calls it at the same step, between optimizer steps (with several ranks it holds a
    collective). It does not change the training: a run that saves continues exactly as one that
    does not.

    A state whose module, optimizer or scheduler holds a NaN or Inf is refused on every rank
    (``NonFiniteStateError`` naming the tensor), so it never becomes the newest complete checkpoint.
    """
    optimizer = engine.optimizer
    stage = int(engine.zero_optimization_stage())
    if stage == 3:
        optimizer.checkpoint_event_prologue()  # partitions the parameters, as DeepSpeed's own save does
    try:
        state = {
            "format": RANK_STATE_FORMAT,
            "identity": _identity(engine),
            "module": _module_state(engine.module, stage),
            "optimizer": _optimizer_state(optimizer),
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "engine": {name: int(getattr(engine, name)) for name in _ENGINE_COUNTERS},
            "rng": _rng_state(),
            "extra": dict(extra),
        }
        _refuse_non_finite({key: state[key] for key in ("module", "optimizer", "lr_scheduler")})
        return encode_state(state)
    finally:
        if stage == 3:
            optimizer.checkpoint_event_epilogue()


def load_rank_state(engine: Any, data: bytes) -> dict[str, Any]:
    """Restore what ``save_rank_state`` wrote into a freshly built ``engine`` (the same model,
    DeepSpeed config and world size) and return its ``extra``.

    Every rank calls it with its own rank's bytes (under ZeRO it holds collectives), after
    building everything that draws random numbers at construction: the RNG states come last.
    Refuses (``ValueError``) a state from another rank, world size, ZeRO stage, optimizer or
    parameter shapes, before changing anything.
    """
    state = decode_state(data)
    if not isinstance(state, dict) or state.get("format") != RANK_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"rank state format {found!r}: expected {RANK_STATE_FORMAT!r}")
    missing = sorted(set(_RANK_STATE_PARTS) - set(state))
    if missing:
        raise ValueError(f"rank state lacks {missing}")
    _check_identity(state["identity"], _identity(engine))
    _check_rng_devices(state["rng"])
    stage = int(engine.zero_optimization_stage())
    optimizer = engine.optimizer
    if stage == 3:
        optimizer.checkpoint_event_prologue()
    _load_module_state(engine.module, state["module"], stage)
    _load_optimizer_state(optimizer, state["optimizer"])
    if stage in (1, 2):
        # The low-precision (or fp32) weights the module computes with, from the fp32 partitions
        # just loaded: the copy and all-gather that end every ZeRO 1/2 step (a collective).
        optimizer.update_lp_params()
    if stage == 3:
        optimizer.checkpoint_event_epilogue()  # gathers the persistent (small) parameters again
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name in _ENGINE_COUNTERS:
        setattr(engine, name, int(state["engine"][name]))
    _set_rng_state(state["rng"])
    return state["extra"]


class NonFiniteStateError(ValueError):
    """``save_rank_state`` refused a state holding NaN or Inf in its weights, optimizer or scheduler."""


def _refuse_non_finite(state: Mapping[str, Any]) -> None:
    """Raise ``NonFiniteStateError`` on every rank if any rank's ``state`` holds a floating-point
    tensor with NaN or Inf (agreed, so no rank is left waiting in the checkpoint's barrier)."""
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


_RANK_STATE_PARTS = ("identity", "module", "optimizer", "lr_scheduler", "engine", "rng", "extra")
# The engine's own counters, which DeepSpeed's load_checkpoint restores too; micro_steps places
# the gradient-accumulation boundary.
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def _identity(engine: Any) -> dict[str, Any]:
    """What must match between the engine that saved and the one that loads."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    parameters = {
        name: [list(getattr(param, "ds_shape", param.shape)), str(param.dtype).removeprefix("torch.")]
        for name, param in engine.module.named_parameters()
    }
    return {
        "rank": rank,
        "world_size": world_size,
        "zero_stage": int(engine.zero_optimization_stage()),
        "optimizer": type(engine.optimizer).__name__,
        "lr_scheduler": type(engine.lr_scheduler).__name__ if engine.lr_scheduler is not None else None,
        "parameters": parameters,
    }


def _check_identity(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    if (saved.get("rank"), saved.get("world_size")) != (current["rank"], current["world_size"]):
        raise ValueError(
            f"checkpoint was written by rank {saved.get('rank')} of world_size={saved.get('world_size')}, "
            f"this is rank {current['rank']} of world_size={current['world_size']}"
        )
    for key in ("zero_stage", "optimizer", "lr_scheduler"):
        if saved.get(key) != current[key]:
            raise ValueError(f"checkpoint has {key}={saved[key]!r}, this engine has {key}={current[key]!r}")
    saved_params, params = saved.get("parameters", {}), current["parameters"]
    for name in sorted(set(saved_params) | set(params)):
        if saved_params.get(name) != params.get(name):
            raise ValueError(
                f"parameter {name!r}: checkpoint has [shape, dtype] {saved_params.get(name)}, "
                f"this engine has {params.get(name)}"
            )


def _module_state(module: torch.nn.Module, stage: int) -> dict[str, Tensor]:
    if stage == 0:
        return module.state_dict()
    # Under ZeRO the trainable parameters are restored from the optimizer's fp32 partitions
    # (``update_lp_params`` or ZeRO 3's own load): saving them again would put a full replica in
    # every rank's file. Buffers and frozen parameters are not partitioned (ZeRO 1 and 2).
    frozen = {name: param for name, param in module.named_parameters() if not param.requires_grad}
    if frozen and stage == 3:
        raise ValueError(f"ZeRO 3 with frozen parameters {sorted(frozen)}: not supported by trainer.checkpoint")
    return {**dict(module.named_buffers()), **frozen}


def _load_module_state(module: torch.nn.Module, saved: Mapping[str, Tensor], stage: int) -> None:
    if stage == 0:
        module.load_state_dict(dict(saved), strict=True)
        return
    current = _module_state(module, stage)
    if set(current) != set(saved):
        raise ValueError(f"checkpoint has module tensors {sorted(saved)}, this module has {sorted(current)}")
    with torch.no_grad():
        for name, tensor in current.items():
            tensor.copy_(saved[name])


# Keys of the ZeRO optimizers' state_dict that are not state: the loss scaler object (its scale is
# kept as a number instead), and the name -> slice maps that only DeepSpeed's universal
# checkpoint conversion reads.
_DROPPED_OPTIMIZER_KEYS = ("loss_scaler", "param_slice_mappings", "universal_checkpoint_info")


def _optimizer_state(optimizer: Any) -> dict[str, Any]:
    if getattr(optimizer, "elastic_checkpoint", False):
        raise ValueError("zero_optimization.elastic_checkpoint=true: its state spans all ranks; use the rigid layout")
    state = dict(optimizer.state_dict())
    for key in _DROPPED_OPTIMIZER_KEYS:
        state.pop(key, None)
    if "zero_stage" in state:  # a ZeroStageEnum
        state["zero_stage"] = int(state["zero_stage"])
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None:
        if getattr(scaler, "dynamic", False):
            raise ValueError("dynamic loss scaling (fp16) is not supported by trainer.checkpoint")
        state["saeforge.loss_scale"] = float(scaler.cur_scale)
    return state


def _load_optimizer_state(optimizer: Any, saved: Mapping[str, Any]) -> None:
    saved = dict(saved)
    loss_scale = saved.pop("saeforge.loss_scale", None)
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and loss_scale is not None:
        scaler.cur_scale = loss_scale
        saved["loss_scaler"] = scaler  # ZeRO 3's load reads the object back
    if not _takes_rank_list(optimizer):
        # torch's optimizers and DeepSpeed's stage-0 wrappers (FP16_UnfusedOptimizer under bf16,
        # which also restores its fp32 master copies from the state).
        optimizer.load_state_dict(saved)
        return
    # ZeRO 1-3 and BF16_Optimizer take every rank's state (to re-partition on a new world size);
    # with the same world size each reads only its own, so the others are left out: a code path
    # that read them would fail instead of silently mixing ranks.
    group = getattr(optimizer, "dp_process_group", None)
    states: list[Any] = [None] * dist.get_world_size(group=group)
    states[dist.get_rank(group=group)] = saved
    # load_from_fp32_weights: the fp32 master partition from the checkpoint, bit-exact, instead
    # of rebuilding it from the bf16 weights.
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


def _takes_rank_list(optimizer: Any) -> bool:
    parameters = inspect.signature(optimizer.load_state_dict).parameters
    return "state_dict_list" in parameters


def _rng_state() -> dict[str, Any]:
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


def _check_rng_devices(saved: Mapping[str, Any]) -> None:
    n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved["cuda"]) not in (0, n_devices):
        raise ValueError(f"checkpoint holds CUDA RNG states of {len(saved['cuda'])} devices, this process sees {n_devices}")


def _set_rng_state(saved: Mapping[str, Any]) -> None:
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


# --------------------------------------------------------------------------- the layout


def checkpoint_dir(step: int) -> str:
    """``checkpoints/step-000001200``: the folder (key prefix) of the checkpoint after ``step`` steps."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    return f"{CHECKPOINTS_DIR}/step-{step:09d}"


def rank_file_key(step: int, rank: int) -> str:
    """Where rank ``rank`` writes its ``save_rank_state`` bytes for ``step``."""
    if rank < 0:
        raise ValueError(f"rank={rank} must be >= 0")
    return f"{checkpoint_dir(step)}/rank-{rank:05d}.safetensors"


def complete_marker_key(step: int) -> str:
    """Where rank 0 writes ``complete_marker``'s bytes, last."""
    return f"{checkpoint_dir(step)}/{COMPLETE_FILE}"


@dataclass(frozen=True)
class RankFile:
    """One rank's file of a checkpoint, as ``COMPLETE.json`` lists it."""

    key: str
    """Key relative to the run's root (``rank_file_key``)."""
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
        """Rank ``rank``'s bytes for ``load_rank_state``, checked against ``COMPLETE.json``."""
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
        match = _STEP_DIR.match(key)
        if match:
            by_step.setdefault(int(match.group(1)), set()).add(key)
    return by_step


def newest_complete_checkpoint(
    keys: Iterable[str], read: Callable[[str], bytes], *, verify_contents: bool = True
) -> Checkpoint | None:
    """The newest complete checkpoint among ``keys`` (the run's keys under ``checkpoints/``,
    relative to the run's root), or ``None``.

    Steps without ``COMPLETE.json``, with one that does not parse, or with a listed file missing
    from ``keys`` are skipped (with a warning for the damaged ones); so, with ``verify_contents``,
    are those whose files ``read(key)`` does not match in size and sha256. Without it only
    ``COMPLETE.json`` is read; ``Checkpoint.read_rank_state`` checks each file when it is loaded.
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
            if verify_contents:
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
