"""Running a test's ranks as processes on this machine and collecting what each one saved."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from trainer.engine import free_port

__all__ = ["free_port", "run_grid", "run_ranks"]


def run_ranks(worker: Callable, *args: object, nprocs: int, out_dir: Path, preload: list[str]) -> list:
    """Start ``worker(rank, *args, out_dir)`` in ``nprocs`` processes and return what each saved
    to ``out_dir / f"rank{rank}.pt"``, in rank order.

    The processes come from a fork server that imports ``preload`` once for all of them: with
    spawn, each rank importing torch, torch._dynamo and deepspeed took seconds on 2 busy cores."""
    multiprocessing.set_forkserver_preload(preload)
    mp.start_processes(worker, args=(*args, str(out_dir)), nprocs=nprocs, start_method="forkserver")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(nprocs)]


def run_grid(worker: Callable, grid: tuple[int, int], *, out_dir: Path, preload: list[str]) -> tuple[tuple[int, int], list]:
    """``(grid, per-rank results)`` of ``worker(rank, world_size, data_parallel, port, out_dir)``
    on a ``(data_parallel, feature_parallel)`` grid of ranks."""
    data_parallel, feature_parallel = grid
    world_size = data_parallel * feature_parallel
    results = run_ranks(worker, world_size, data_parallel, free_port(), nprocs=world_size, out_dir=out_dir, preload=preload)
    return grid, results
