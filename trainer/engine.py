"""The DeepSpeed engine wrapper: the only module that imports deepspeed."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from trainer.config import TrainConfig

log = logging.getLogger(__name__)

# Marks engines whose process group wrap_in_deepspeed created (and shutdown_engine may destroy).
_OWNS_GROUP_ATTR = "_saeforge_owns_process_group"


def deepspeed_config(*, train_cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``train_cfg`` on ``world_size`` data-parallel ranks."""
    if world_size <= 0:
        raise ValueError(f"world_size={world_size} must be positive")
    if train_cfg.batch_size % world_size != 0:
        raise ValueError(
            f"train.batch_size={train_cfg.batch_size} is not divisible by world_size={world_size}"
        )
    config: dict[str, Any] = {
        "train_batch_size": train_cfg.batch_size,
        "train_micro_batch_size_per_gpu": train_cfg.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train_cfg.max_grad_norm,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        # ZeRO refuses optimizers it has not tested unless told; torch's fused Adam is the client
        # optimizer because DeepSpeed's fused and CPU Adams JIT-compile for 60-100 s on first use.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if train_cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def wrap_in_deepspeed(
    model: nn.Module,
    *,
    train_cfg: TrainConfig,
    lr: float,
    world_size: int,
    lr_multiplier: Callable[[int], float] | None = None,
) -> deepspeed.DeepSpeedEngine:
    """Wrap ``model`` in a DeepSpeed engine with torch Adam for data-parallel training.

    Preconditions: every rank calls this with the same arguments, after anything that changes
    the weights (``init_b_dec``): DeepSpeed copies them into its master weights here and
    broadcasts rank 0's to the other ranks.
    An existing torch.distributed process group (Ray Train makes one) is reused and left alone;
    otherwise one is made with gloo from the ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
    ``MASTER_PORT`` environment, or, for ``world_size=1`` without it, on a free local port.
    ``train_cfg.batch_size`` is the global batch: each rank feeds ``batch_size // world_size`` rows.
    ``lr_multiplier(step)`` scales ``lr`` at each optimizer step (warmup and decay); the engine
    steps it, and it is saved with the engine's checkpoints.
    """
    if not lr > 0:
        raise ValueError(f"lr={lr} must be positive")
    config = deepspeed_config(train_cfg=train_cfg, world_size=world_size)
    _skip_shm_comm_build()
    owns_group = _ensure_process_group(world_size)
    # fused: one multi-tensor kernel per step instead of torch's per-parameter loop (on CPU since
    # torch 2.4); 12 against 93 ms per step for a 16,384 x 768 SAE here (benchmarks/RESULTS.md).
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier) if lr_multiplier else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    setattr(engine, _OWNS_GROUP_ATTR, owns_group)
    log.info(
        "DeepSpeed engine: ZeRO stage %d, %s, %d ranks x %d rows",
        train_cfg.zero_stage, train_cfg.precision, world_size, config["train_micro_batch_size_per_gpu"],
    )
    return engine


def shutdown_engine(engine: deepspeed.DeepSpeedEngine) -> None:
    """Release the engine so the interpreter exits cleanly (ZeRO-3 could abort at exit otherwise):
    ``engine.destroy()``, a barrier, then destroy the process group only if
    ``wrap_in_deepspeed`` created it (a group made by Ray Train belongs to Ray Train)."""
    engine.destroy()
    if not dist.is_initialized():
        return
    dist.barrier()
    if getattr(engine, _OWNS_GROUP_ATTR, False):
        dist.destroy_process_group()
        # DeepSpeed caches a clone of the world group at module level (utils/groups.py
        # _clone_world_group); a later engine in this process would reuse the destroyed one.
        deepspeed.utils.groups._WORLD_GROUP = None


def master_weights(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """The module's parameters in full fp32 (CPU), from the optimizer's master copy under bf16.

    Export from these, not from ``engine.module``, whose bf16 parameters have lost the low bits.
    A collective under ZeRO 1 and 2 (the master copy is partitioned): every rank must call it.
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
    lows_by_group = getattr(optimizer, "fp16_groups", [])
    highs_by_group = getattr(optimizer, "fp32_groups", [])
    pairs = zip(lows_by_group, highs_by_group, strict=True)
    return {id(low): high for lows, highs in pairs for low, high in zip(lows, highs, strict=True)}


def _ensure_process_group(world_size: int) -> bool:
    """Join or make the process group; True when this call made it."""
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing group
        created = False
    elif world_size == 1 and not _has_rendezvous_env():
        # deepspeed.initialize asserts LOCAL_RANK is set, as every launcher does.
        os.environ.setdefault("LOCAL_RANK", "0")
        port = _free_port()
        deepspeed.init_distributed(
            dist_backend="gloo", auto_mpi_discovery=False,
            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
        )
        created = True
    else:
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
