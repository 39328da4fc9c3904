"""The DeepSpeed engine wrapper: the only module that imports deepspeed.

It wraps a model in an engine (``wrap_in_deepspeed``), exports the fp32 master weights
(``master_weights``), releases the engine (``shutdown_engine``), and saves and restores the
engine's state for a checkpoint (``EngineState``, ``save_rank_state`` / ``load_rank_state``):
whatever knows how DeepSpeed's optimizers partition and hold their state is here, while
``trainer.checkpoint`` owns the file format and the checkpoints' layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from torch import nn
from torch.distributed import ProcessGroup

from trainer.checkpoint import (
    RNGState,
    capture_state,
    decode_rank_state,
    encode_rank_state,
    refuse_non_finite,
    restore_state,
)
from trainer.config import DeepSpeedConfig, TrainConfig
from trainer.feature_parallel import ParallelGrid, feature_shard

log = logging.getLogger(__name__)

# Marks engines whose process group wrap_in_deepspeed created (and shutdown_engine may destroy).
_OWNS_GROUP_ATTR = "_saeforge_owns_process_group"


def distributed_backend() -> str:
    """The torch.distributed backend for this machine: ``nccl`` where CUDA is available, else
    ``gloo``; ``gloo`` too where DeepSpeed is told to run on the CPU (``DS_ACCELERATOR=cpu``)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def deepspeed_config(
    *, train_cfg: TrainConfig, deepspeed_cfg: DeepSpeedConfig, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``world_size`` ranks in all, of which
    ``world_size / deepspeed_cfg.feature_parallel`` are data-parallel replicas."""
    if world_size <= 0:
        raise ValueError(f"world_size={world_size} must be positive")
    if world_size % deepspeed_cfg.feature_parallel:
        raise ValueError(
            f"world_size={world_size} is not divisible by deepspeed.feature_parallel={deepspeed_cfg.feature_parallel}"
        )
    data_parallel = world_size // deepspeed_cfg.feature_parallel
    if train_cfg.batch_size % data_parallel != 0:
        raise ValueError(
            f"train.batch_size={train_cfg.batch_size} is not divisible by the {data_parallel} data-parallel ranks"
        )
    config: dict[str, Any] = {
        # DeepSpeed counts data-parallel ranks only: with an mpu its world size is the data group's.
        "train_batch_size": train_cfg.batch_size,
        "train_micro_batch_size_per_gpu": train_cfg.batch_size // data_parallel,
        "gradient_accumulation_steps": 1,
        # Where the optimizer clips itself (ClippedAdam), DeepSpeed must not clip a second time.
        "gradient_clipping": 0.0 if clips_in_optimizer(deepspeed_cfg) else train_cfg.max_grad_norm,
        "zero_optimization": _zero_section(deepspeed_cfg),
        # ZeRO refuses optimizers it has not tested unless told; torch's fused Adam is the client
        # optimizer because DeepSpeed's fused and CPU Adams JIT-compile for 60-100 s on first use.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if deepspeed_cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def clips_in_optimizer(cfg: DeepSpeedConfig) -> bool:
    """Whether the engine's optimizer clips the gradients itself (``ClippedAdam``): at ZeRO 0 in
    fp32, where DeepSpeed hands the module's gradients straight to the client optimizer. ZeRO 1-3
    clip their own flat fp32 partitions, and bf16 its optimizer wrapper's copies."""
    return cfg.zero_stage == 0 and cfg.precision == "fp32"


class ClippedAdam(torch.optim.Adam):
    """torch's fused Adam with gradient clipping inside its kernel: the clip goes in as the
    kernel's ``grad_scale`` (each gradient divided by it as it is read, the path torch's
    GradScaler uses), instead of a pass that multiplies every gradient in place before the step
    (DeepSpeed's ``clip_grad_norm_``: a read and a write of every gradient, about half of the 48 ms
    clipping takes in a 65,536-latent step: bench_step in benchmarks/RESULTS.md). The same update:
    gradients scaled by ``max_grad_norm / (norm + 1e-6)`` when that is below 1.

    The norm is the whole dictionary's: with feature parallelism the parameters marked
    ``model_parallel`` (each rank's slice) sum their squares over ``model_parallel_group`` and the
    others (replicated) count once, as DeepSpeed counts them.
    """

    def __init__(self, params: Any, *, lr: float, max_grad_norm: float, model_parallel_group: Any = None) -> None:
        super().__init__(params, lr=lr, fused=True)
        self.max_grad_norm = max_grad_norm
        self.model_parallel_group = model_parallel_group

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if self.max_grad_norm > 0:
            norm = self.grad_norm()
            self.grad_scale = torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)
        return super().step(closure)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of every gradient of the (whole, unsliced) model, fp32."""
        sliced: list[torch.Tensor] = []
        whole: list[torch.Tensor] = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    split = self.model_parallel_group is not None and getattr(param, "model_parallel", False)
                    (sliced if split else whole).append(param.grad)
        device = self.param_groups[0]["params"][0].device
        squares = torch.zeros((), dtype=torch.float32, device=device)
        if sliced:
            local = torch.stack(torch._foreach_norm(sliced)).float().square().sum()
            dist.all_reduce(local, group=self.model_parallel_group)
            squares = squares + local
        if whole:
            squares = squares + torch.stack(torch._foreach_norm(whole)).float().square().sum()
        return squares.sqrt()


def single_replica_config(cfg: DeepSpeedConfig, *, world_size: int) -> DeepSpeedConfig:
    """``cfg`` as a job runs it on ``world_size`` ranks: ZeRO stage 1 or 2 over ONE data-parallel
    replica becomes stage 0.

    ZeRO partitions the optimizer state (and at stage 2 the gradients) over the data-parallel
    ranks; over one it partitions nothing, holds the same bytes, and still copies every gradient
    into its flat buffers and every updated weight back into the module each step (ZeRO 2 over one
    replica took 30-50% longer a step than stage 0 at 16,384 and 65,536 latents: bench_step in
    benchmarks/RESULTS.md).
    Stage 3 is left as asked, and so is bf16 with feature parallelism and clipping, which
    stage 0 refuses (``DeepSpeedConfig.check_clipping``). A checkpoint records the stage the
    engine ran, so a run resumes on the stage it saved with."""
    data_parallel = world_size // cfg.feature_parallel
    if data_parallel != 1 or cfg.zero_stage not in (1, 2):
        return cfg
    if cfg.precision == "bf16" and cfg.feature_parallel > 1:
        return cfg
    return dataclasses.replace(cfg, zero_stage=0)


def job_config(cfg: DeepSpeedConfig, *, world_size: int, parameters: int) -> DeepSpeedConfig:
    """``cfg`` as a job runs it on ``world_size`` ranks holding ``parameters`` parameters each:
    ``single_replica_config``, and ZeRO 1 or 2 whose partitioned state (gradients and Adam
    moments: 12 bytes a parameter in fp32, 14 in bf16) would be under
    ``cfg.partition_min_mb`` MiB a rank runs stage 0 (the exceptions are
    ``single_replica_config``'s)."""
    cfg = single_replica_config(cfg, world_size=world_size)
    if cfg.zero_stage not in (1, 2) or (cfg.precision == "bf16" and cfg.feature_parallel > 1):
        return cfg
    state_mb = parameters * (14 if cfg.precision == "bf16" else 12) / 2**20
    return dataclasses.replace(cfg, zero_stage=0) if state_mb < cfg.partition_min_mb else cfg


def _zero_section(cfg: DeepSpeedConfig) -> dict[str, Any]:
    section: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "reduce_bucket_size": cfg.reduce_bucket_size,
        "allgather_bucket_size": cfg.allgather_bucket_size,
        "contiguous_gradients": cfg.contiguous_gradients,
    }
    if cfg.overlap_comm is not None:
        section["overlap_comm"] = cfg.overlap_comm
    if cfg.zero_stage == 3:
        section.update(
            stage3_prefetch_bucket_size=cfg.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=cfg.stage3_param_persistence_threshold,
            stage3_max_live_parameters=cfg.stage3_max_live_parameters,
        )
    return section


def wrap_in_deepspeed(
    model: nn.Module,
    *,
    train_cfg: TrainConfig,
    deepspeed_cfg: DeepSpeedConfig,
    lr: float,
    world_size: int,
    grid: ParallelGrid | None = None,
    lr_multiplier: Callable[[int], float] | None = None,
) -> deepspeed.DeepSpeedEngine:
    """Wrap ``model`` in a DeepSpeed engine with torch Adam.

    Preconditions: every rank calls this with the same arguments, after anything that changes
    the weights (``init_b_dec``): DeepSpeed copies them into its master weights here and
    broadcasts the first data-parallel rank's to the others.
    An existing torch.distributed process group (Ray Train makes one) is reused and left alone;
    otherwise one is made with ``distributed_backend()`` from the ``RANK`` / ``WORLD_SIZE`` /
    ``MASTER_ADDR`` / ``MASTER_PORT`` environment, or, for ``world_size=1`` without it, on a free
    local port. ``train_cfg.batch_size`` is the global batch: each data-parallel replica feeds
    ``batch_size / data_parallel`` rows, and every rank of one feature group the same rows.
    ``lr_multiplier(step)`` scales ``lr`` at each optimizer step (warmup and decay); the engine
    steps it, and it is saved with the engine's checkpoints.

    Feature parallelism (``deepspeed_cfg.feature_parallel > 1``): ``model`` is this rank's slice,
    split by ``trainer.feature_parallel.parallelize_features`` over ``grid.feature_group`` (from
    ``build_grid``, which needs the process group first); DeepSpeed's data parallelism and ZeRO partitioning then run over
    ``grid.data_group`` only, and gradient clipping uses the norm of the whole dictionary.
    """
    if not lr > 0:
        raise ValueError(f"lr={lr} must be positive")
    config = deepspeed_config(train_cfg=train_cfg, deepspeed_cfg=deepspeed_cfg, world_size=world_size)
    deepspeed_cfg.check_clipping(max_grad_norm=train_cfg.max_grad_norm)
    _check_grid(model, deepspeed_cfg=deepspeed_cfg, world_size=world_size, grid=grid)
    _skip_shm_comm_build()
    owns_group = _ensure_process_group(world_size)
    mpu = None
    if grid is not None and grid.feature_parallel > 1:
        mpu = _GridMPU(grid)
        for param in model.sliced_parameters():  # type: ignore[operator]  # split: _check_grid
            # DeepSpeed's gradient-norm code (runtime/utils.py is_model_parallel_parameter) counts
            # marked parameters on every model-parallel rank and the others on its first only.
            param.model_parallel = True
    # fused: one multi-tensor kernel per step instead of torch's per-parameter loop (on CPU since
    # torch 2.4); 12 against 93 ms per step for a 16,384 x 768 SAE here (benchmarks/RESULTS.md).
    if clips_in_optimizer(deepspeed_cfg):
        optimizer: torch.optim.Optimizer = ClippedAdam(
            model.parameters(), lr=lr, max_grad_norm=train_cfg.max_grad_norm,
            model_parallel_group=grid.feature_group if mpu is not None else None,
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier) if lr_multiplier else None
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, mpu=mpu
    )
    setattr(engine, _OWNS_GROUP_ATTR, owns_group)
    if deepspeed_cfg.zero_stage == 0 and world_size // deepspeed_cfg.feature_parallel == 1:
        # One data-parallel replica: the backward's gradient all-reduce would average each gradient
        # with itself, after flattening every gradient into one buffer and back (a copy of them all).
        engine.enable_backward_allreduce = False
    log.info(
        "DeepSpeed engine: ZeRO stage %d, %s, %d data x %d feature ranks, %d rows per replica",
        deepspeed_cfg.zero_stage, deepspeed_cfg.precision, world_size // deepspeed_cfg.feature_parallel,
        deepspeed_cfg.feature_parallel, config["train_micro_batch_size_per_gpu"],
    )
    return engine


def _check_grid(
    model: nn.Module, *, deepspeed_cfg: DeepSpeedConfig, world_size: int, grid: ParallelGrid | None
) -> None:
    feature_parallel = deepspeed_cfg.feature_parallel
    if grid is None:
        if feature_parallel > 1:
            raise ValueError(
                f"deepspeed.feature_parallel={feature_parallel} needs grid= (build_grid) and a model split by "
                "parallelize_features"
            )
        return
    if (grid.data_parallel, grid.feature_parallel) != (world_size // feature_parallel, feature_parallel):
        raise ValueError(
            f"grid of {grid.data_parallel} data x {grid.feature_parallel} feature ranks, but world_size="
            f"{world_size} with deepspeed.feature_parallel={feature_parallel}"
        )
    if feature_parallel == 1:
        return
    shard = feature_shard(model)
    if shard is None:
        raise ValueError(
            f"deepspeed.feature_parallel={feature_parallel} needs a model split by parallelize_features, "
            f"got an unsplit {type(model).__name__}"
        )
    if shard.group is not grid.feature_group:
        raise ValueError("the model's feature group is not grid.feature_group: split it with group=grid.feature_group")


class _GridMPU:
    """A ``ParallelGrid`` as DeepSpeed's ``mpu`` argument (Megatron's parallel-state interface):
    the feature group is its model-parallel (tensor-parallel) group, the data group its
    data-parallel group; no pipeline stages. DeepSpeed reduces gradients, partitions ZeRO state
    and broadcasts initial weights within the data group, and sums gradient norms over the
    model-parallel group (runtime/utils.py ``clip_grad_norm_``, ZeRO's ``get_grad_norm_direct``)."""

    def __init__(self, grid: ParallelGrid) -> None:
        self._grid = grid

    def get_model_parallel_rank(self) -> int:
        return self._grid.feature_rank

    def get_model_parallel_world_size(self) -> int:
        return self._grid.feature_parallel

    def get_model_parallel_group(self) -> ProcessGroup:
        return self._grid.feature_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self._grid.feature_group, 0)

    def get_data_parallel_rank(self) -> int:
        return self._grid.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self._grid.data_parallel

    def get_data_parallel_group(self) -> ProcessGroup:
        return self._grid.data_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._grid.data_group)

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def shutdown_engine(engine: deepspeed.DeepSpeedEngine) -> None:
    """Release the engine so the interpreter exits cleanly (ZeRO-3 could abort at exit otherwise):
    ``engine.destroy()``, a barrier, then destroy the process group only if
    ``wrap_in_deepspeed`` created it (a group made by Ray Train belongs to Ray Train)."""
    engine.destroy()
    # DeepSpeed keeps the mpu of the last engine given one at module level (utils/groups.py) and
    # consults it for every later engine in this process, grid or not.
    deepspeed.utils.groups.mpu = None
    if not dist.is_initialized():
        return
    dist.barrier()
    if getattr(engine, _OWNS_GROUP_ATTR, False):
        dist.destroy_process_group()
        # DeepSpeed caches a clone of the world group at module level (utils/groups.py
        # _clone_world_group); a later engine in this process would reuse the destroyed one.
        deepspeed.utils.groups._WORLD_GROUP = None


def master_weights(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """The module's parameters in full fp32 (CPU), from the optimizer's master copy.

    Export from these, not from ``engine.module``: its bf16 parameters have lost the low bits,
    and under ZeRO 3 it holds only empty placeholders outside the forward and backward passes.
    A collective over the data-parallel group under ZeRO 1-3 (the master copy is partitioned):
    every rank must call it. With feature parallelism each rank gets its own slice
    (the model's ``full_state_dict`` assembles the dictionary from them).
    """
    unfused_masters = _unfused_master_copies(engine.optimizer)
    weights = {}
    for name, param in engine.module.named_parameters():
        master = deepspeed.utils.safe_get_full_fp32_param(param)
        if master is None:
            master = unfused_masters.get(id(param), param.detach())
        weights[name] = master.float().cpu().clone()
    return weights


def _unfused_master_copies(optimizer: Any) -> dict[int, torch.Tensor]:
    # ZeRO stage 0 with bf16 runs FP16_UnfusedOptimizer, which keeps fp32 copies in fp32_groups
    # beside the low-precision fp16_groups and has no _hp_mapping for safe_get_full_fp32_param.
    # (ZeRO 3's optimizer has attributes of the same names holding partitions.)
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return {}
    pairs = zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
    return {id(low): high for lows, highs in pairs for low, high in zip(lows, highs, strict=True)}


def _ensure_process_group(world_size: int) -> bool:
    """Join or make the process group; True when this call made it."""
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing group
        created = False
    elif world_size == 1 and not _has_rendezvous_env():
        # deepspeed.initialize asserts LOCAL_RANK is set, as every launcher does.
        os.environ.setdefault("LOCAL_RANK", "0")
        port = free_port()
        deepspeed.init_distributed(
            dist_backend=distributed_backend(), auto_mpi_discovery=False,
            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
        )
        created = True
    else:
        deepspeed.init_distributed(dist_backend=distributed_backend(), auto_mpi_discovery=False)
        created = True
    if dist.get_world_size() != world_size:
        raise ValueError(
            f"world_size={world_size} but the process group has {dist.get_world_size()} ranks"
        )
    return created


def _skip_shm_comm_build() -> None:
    # On the CPU accelerator, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op
    # (``deepspeed_shm_comm``) when it first initialises: 25-70 s on a fresh machine. That op
    # serves only ``inference_all_reduce``; training collectives go through torch.distributed.
    # Marking it incompatible makes ``build_shm_op`` return None (deepspeed/comm/torch.py); the
    # dict is probed once and cached, and DeepSpeed documents that edits to it persist.
    if get_accelerator().device_name() != "cpu":
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _has_rendezvous_env() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- the engine's state
#
# Everything that knows how DeepSpeed's optimizers hold their state lives here; trainer.checkpoint
# owns the file format and the checkpoints' layout.

# The engine's own counters, which DeepSpeed's load_checkpoint restores too; micro_steps places
# the gradient-accumulation boundary.
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
# Keys of the ZeRO optimizers' state_dict that are not state: the loss scaler object (its scale is
# kept as a number instead), and the name -> slice maps that only DeepSpeed's universal
# checkpoint conversion reads.
_DROPPED_OPTIMIZER_KEYS = ("loss_scaler", "param_slice_mappings", "universal_checkpoint_info")
_LOSS_SCALE_KEY = "saeforge.loss_scale"


class EngineState:
    """A DeepSpeed engine as a ``trainer.checkpoint.Stateful``: this rank's part of what the run
    needs to continue bit-for-bit, sharded as the training is. Its state's parts:

    - ``identity``: what must match between the engine that saved and the one that loads (rank,
      world size, ZeRO stage, optimizer and scheduler classes, parameter shapes and dtypes);
    - ``module``: the module's buffers, and its parameters at stage 0 only: under ZeRO they come
      back from the optimizer's fp32 partitions, so no rank's file holds a full replica;
    - ``optimizer``: the optimizer's state as this rank holds it (under ZeRO its fp32 partition
      of the weights with their moments), the loss scale as a number;
    - ``lr_scheduler`` and ``engine`` (the engine's step counters).

    ``state_dict`` and ``load_state_dict`` run on every rank at the same step, between optimizer
    steps (under ZeRO they hold collectives). Saving does not change the training.
    """

    def __init__(self, engine: deepspeed.DeepSpeedEngine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        engine, stage = self.engine, self._stage()
        with _zero3_checkpoint_event(engine.optimizer, stage):
            return {
                "identity": self.identity(),
                "module": _module_state(engine.module, stage),
                "optimizer": _optimizer_state(engine.optimizer),
                "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
                "engine": {name: int(getattr(engine, name)) for name in _ENGINE_COUNTERS},
            }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore ``saved`` into this freshly built engine (the same model, DeepSpeed config and
        world size); refuses (``ValueError``) another rank's, world size's, ZeRO stage's,
        optimizer's or parameter shapes' state before changing anything."""
        self.check(saved)
        engine, stage = self.engine, self._stage()
        with _zero3_checkpoint_event(engine.optimizer, stage):
            _load_module_state(engine.module, saved["module"], stage)
            _load_optimizer_state(engine.optimizer, saved["optimizer"])
            if stage in (1, 2):
                # The low-precision (or fp32) weights the module computes with, from the fp32
                # partitions just loaded: the copy and all-gather that end every ZeRO 1/2 step.
                engine.optimizer.update_lp_params()
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        for name in _ENGINE_COUNTERS:
            setattr(engine, name, int(saved["engine"][name]))

    def identity(self) -> dict[str, Any]:
        """What must match between the engine that saved and the one that loads."""
        engine = self.engine
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        parameters = {
            # ZeRO 3 leaves empty placeholders in the module; ds_shape is the parameter's shape.
            name: [list(getattr(param, "ds_shape", param.shape)), str(param.dtype).removeprefix("torch.")]
            for name, param in engine.module.named_parameters()
        }
        return {
            "rank": rank,
            "world_size": world_size,
            "zero_stage": self._stage(),
            # ClippedAdam's state is torch Adam's: a checkpoint of either loads into the other.
            "optimizer": "Adam" if isinstance(engine.optimizer, ClippedAdam) else type(engine.optimizer).__name__,
            "lr_scheduler": type(engine.lr_scheduler).__name__ if engine.lr_scheduler is not None else None,
            "parameters": parameters,
        }

    def check(self, saved: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``saved`` was written by an engine like this one."""
        _check_identity(saved["identity"], self.identity())

    def _stage(self) -> int:
        return int(self.engine.zero_optimization_stage())


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


@contextmanager
def _zero3_checkpoint_event(optimizer: Any, stage: int) -> Iterator[None]:
    """Under ZeRO 3, every parameter partitioned for the block (as DeepSpeed's own save and load
    do), and the persistent (small) ones gathered again after it."""
    if stage != 3:
        yield
        return
    assert isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)
    optimizer.checkpoint_event_prologue()
    try:
        yield
    finally:
        optimizer.checkpoint_event_epilogue()


def _module_state(module: nn.Module, stage: int) -> dict[str, torch.Tensor]:
    if stage == 0:
        return module.state_dict()
    # Under ZeRO the trainable parameters are restored from the optimizer's fp32 partitions
    # (update_lp_params or ZeRO 3's own load): saving them again would put a full replica in
    # every rank's file. Buffers and frozen parameters are not partitioned (ZeRO 1 and 2).
    frozen = {name: param for name, param in module.named_parameters() if not param.requires_grad}
    if frozen and stage == 3:
        raise ValueError(f"ZeRO 3 with frozen parameters {sorted(frozen)}: not supported by the checkpoints")
    return {**dict(module.named_buffers()), **frozen}


def _load_module_state(module: nn.Module, saved: Mapping[str, torch.Tensor], stage: int) -> None:
    if stage == 0:
        module.load_state_dict(dict(saved), strict=True)
        return
    current = _module_state(module, stage)
    if set(current) != set(saved):
        raise ValueError(f"checkpoint has module tensors {sorted(saved)}, this module has {sorted(current)}")
    with torch.no_grad():
        for name, tensor in current.items():
            tensor.copy_(saved[name])


def _optimizer_state(optimizer: Any) -> dict[str, Any]:
    if getattr(optimizer, "elastic_checkpoint", False):
        raise ValueError("zero_optimization.elastic_checkpoint=true: its state spans all ranks; use the rigid layout")
    state = dict(optimizer.state_dict())
    for key in _DROPPED_OPTIMIZER_KEYS:
        state.pop(key, None)
    if "zero_stage" in state:  # a ZeroStageEnum
        state["zero_stage"] = int(state["zero_stage"])
    scaler = getattr(optimizer, "loss_scaler", None)  # DeepSpeed's optimizers, not torch's
    if scaler is not None:
        if getattr(scaler, "dynamic", False):
            raise ValueError("dynamic loss scaling (fp16) is not supported by the checkpoints")
        state[_LOSS_SCALE_KEY] = float(scaler.cur_scale)
    return state


def _load_optimizer_state(optimizer: Any, saved: Mapping[str, Any]) -> None:
    saved = dict(saved)
    loss_scale = saved.pop(_LOSS_SCALE_KEY, None)
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and loss_scale is not None:
        scaler.cur_scale = loss_scale
        saved["loss_scaler"] = scaler  # ZeRO 3's load reads the object back
    if not isinstance(optimizer, ZeROOptimizer):
        # torch's optimizers and DeepSpeed's stage-0 wrappers (FP16_UnfusedOptimizer under bf16,
        # which also restores its fp32 master copies from the state).
        optimizer.load_state_dict(saved)
        return
    # ZeRO 1-3 and BF16_Optimizer take every rank's state (to re-partition on a new world size);
    # with the same world size each reads only its own, so the others are left out: a code path
    # that read them would fail instead of silently mixing ranks.
    group = optimizer.dp_process_group
    states: list[Any] = [None] * dist.get_world_size(group=group)
    states[dist.get_rank(group=group)] = saved
    # load_from_fp32_weights: the fp32 master partition from the checkpoint, bit-exact, instead
    # of rebuilding it from the bf16 weights.
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


# --------------------------------------------------------------------------- one rank's file


def save_rank_state(engine: deepspeed.DeepSpeedEngine, *, extra: Mapping[str, Any]) -> bytes:
    """Everything this rank needs to continue bit-for-bit, as one ``trainer.checkpoint`` rank
    state file: the engine's state (``EngineState``), the RNG states and ``extra`` (the caller's
    state: anything ``flatten_state`` takes).

    Every rank calls it at the same step, between optimizer steps. A state whose module,
    optimizer or scheduler holds a NaN or Inf is refused on every rank (``NonFiniteStateError``
    naming the tensor), so it never becomes the newest complete checkpoint.
    """
    state = EngineState(engine).state_dict()
    refuse_non_finite({key: state[key] for key in ("module", "optimizer", "lr_scheduler")})
    return encode_rank_state({**state, "rng": RNGState().state_dict(), "extra": dict(extra)})


def load_rank_state(engine: deepspeed.DeepSpeedEngine, data: bytes) -> dict[str, Any]:
    """Restore what ``save_rank_state`` wrote into a freshly built ``engine`` and return its
    ``extra``. Every rank calls it with its own rank's bytes, after building everything that
    draws random numbers at construction: the RNG states come last. A file that does not fit
    this engine is refused (``ValueError``) before anything changes."""
    state = decode_rank_state(data)
    engine_state, rng = EngineState(engine), RNGState()
    engine_state.check(state)
    rng.check(state["rng"])
    engine_state.load_state_dict(state)
    rng.load_state_dict(state["rng"])
    return state["extra"]


class EngineRankState:
    """``save_rank_state`` of ``engine`` with the state of ``extra``'s stateful objects, as one
    ``Stateful`` whose state is those bytes in a uint8 tensor: how a worker's checkpoint holds
    each dictionary it trains (one rank state file nested in the worker's file)."""

    def __init__(self, engine: deepspeed.DeepSpeedEngine, *, extra: Mapping[str, Any]) -> None:
        self.engine, self.extra = engine, extra

    def state_dict(self) -> torch.Tensor:
        data = save_rank_state(self.engine, extra=capture_state(self.extra))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def load_state_dict(self, saved: torch.Tensor) -> None:
        restore_state(self.extra, load_rank_state(self.engine, saved.numpy().tobytes()))
