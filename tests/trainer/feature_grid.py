"""The feature-parallel tests' shared dictionary, grids and slicing: which rows of a global batch a
data rank takes, which latents a feature rank holds, and how its slices compare with the single
process (test_feature_parallel.py without DeepSpeed, test_feature_parallel_engine.py through it)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from ranks import run_grid

D_IN, N_LATENTS, K = 16, 64, 4
GLOBAL_BATCH = 32
SAE_SEED, DATA_SEED = 0, 123
PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
# (data_parallel, feature_parallel) of each spawned run.
GRIDS = {"feature": (1, 2), "grid": (2, 2)}


def data_rows(data_rank: int, data_parallel: int) -> slice:
    """The rows of a global batch that one data rank takes."""
    local = GLOBAL_BATCH // data_parallel
    return slice(data_rank * local, (data_rank + 1) * local)


def latent_slice(feature_rank: int, feature_parallel: int) -> slice:
    """The latents one feature rank holds."""
    local = N_LATENTS // feature_parallel
    return slice(feature_rank * local, (feature_rank + 1) * local)


def slice_of(name: str, full: torch.Tensor, latents: slice) -> torch.Tensor:
    """The part of a full parameter (or its gradient) that one feature rank holds."""
    if name == "b_dec":
        return full
    return full[:, latents] if name == "W_enc" else full[latents]


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Equal up to sums of the same terms in another order (per-slice partials, all-reduces,
    ZeRO partitions)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=msg)


def grid_runs(worker: Callable, *, preload: list[str]) -> Callable:
    """A module fixture ``run``: ``((data_parallel, feature_parallel), per-rank results)`` of
    ``worker`` launched on each grid of ``GRIDS`` (see ``ranks.run_grid``)."""

    @pytest.fixture(scope="module", params=sorted(GRIDS))
    def run(request, tmp_path_factory) -> tuple[tuple[int, int], list[dict[str, object]]]:
        return run_grid(worker, GRIDS[request.param], out_dir=tmp_path_factory.mktemp(request.param), preload=preload)

    return run
