"""Running a test's ranks as processes on this machine and collecting what each one saved."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from trainer.engine import free_port

__all__ = ["free_port", "launch_ranks", "run_grid", "run_ranks"]


def launch_ranks(worker: Callable, *args: object, nprocs: int, out_dir: Path, preload: list[str]) -> None:
    """Run ``worker(rank, *args, out_dir)`` in ``nprocs`` fresh processes until every one returns.

    The processes come from a fork server that imports ``preload`` once for all of them: with
    spawn, each rank importing torch, torch._dynamo and deepspeed took seconds on 2 busy cores.
    Each is forked from the server, never from an earlier test's ranks: nothing survives from
    one launch to the next but the files."""
    multiprocessing.set_forkserver_preload(preload)
    mp.start_processes(worker, args=(*args, str(out_dir)), nprocs=nprocs, start_method="forkserver")


def run_ranks(worker: Callable, *args: object, nprocs: int, out_dir: Path, preload: list[str]) -> list:
    """``launch_ranks``, then what each rank saved to ``out_dir / f"rank{rank}.pt"``, in rank order."""
    launch_ranks(worker, *args, nprocs=nprocs, out_dir=out_dir, preload=preload)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(nprocs)]


def run_grid(worker: Callable, grid: tuple[int, int], *, out_dir: Path, preload: list[str]) -> tuple[tuple[int, int], list]:
    """``(grid, per-rank results)`` of ``worker(rank, world_size, data_parallel, port, out_dir)``
    on a ``(data_parallel, feature_parallel)`` grid of ranks."""
    data_parallel, feature_parallel = grid
    world_size = data_parallel * feature_parallel
    results = run_ranks(worker, world_size, data_parallel, free_port(), nprocs=world_size, out_dir=out_dir, preload=preload)
    return grid, results
