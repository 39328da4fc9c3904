"""Feature parallelism on CPU with gloo: 2 processes splitting the latents (1 x 2), and 4 as a
2 x 2 (data x feature) grid.

Each configuration runs one forward, backward and Adam step of a ``TopKSAE`` split by
``parallelize_features`` on one global batch (each data rank taking its share); every figure must
match the single-process ``TopKSAE`` on the whole batch: loss, selected latents, reconstruction,
each slice's gradients and updated weights, the gathered dictionary and the firing counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from feature_grid import (
    D_IN,
    DATA_SEED,
    GLOBAL_BATCH,
    N_LATENTS,
    PARAMETERS,
    SAE_SEED,
    K,
    close,
    data_rows,
    grid_runs,
    latent_slice,
    slice_of,
)

from trainer.feature_parallel import ParallelGrid, build_grid, feature_shard, parallelize_features
from trainer.metrics import latent_fire_counts
from trainer.sae import ForwardOutput, TopKSAE

LR = 1e-2

# The tie case: W_enc = 0, so every token's pre-activations are b_enc. Latents 5 and 40 tie for
# first (one in each slice), 10 is third, and 20 and 45 tie for the fourth and last place.
TIED_FIRST, THIRD, TIED_LAST = (5, 40), 10, (20, 45)
# A dictionary whose slices (under feature_parallel=2) hold fewer than k latents each.
NARROW_LATENTS, NARROW_K = 4, 3


def _global_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(DATA_SEED)
    return torch.randn(GLOBAL_BATCH, D_IN, generator=generator) * 2 + 0.5


def _detached(out: ForwardOutput) -> dict[str, torch.Tensor]:
    return {field: value.detach() for field, value in out._asdict().items()}


def _split(sae: TopKSAE, grid: ParallelGrid) -> TopKSAE:
    return parallelize_features(sae, group=grid.feature_group)


def _average_gradients(module: torch.nn.Module, group) -> None:
    """What data parallelism (DeepSpeed, in the job) does: every gradient averaged over ``group``."""
    for param in module.parameters():
        dist.all_reduce(param.grad, group=group)
        param.grad /= dist.get_world_size(group)


def _tied_state_dict() -> dict[str, torch.Tensor]:
    state = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED).state_dict()
    state["W_enc"] = torch.zeros_like(state["W_enc"])
    state["b_enc"][list(TIED_FIRST)] = 3.0
    state["b_enc"][THIRD] = 2.0
    state["b_enc"][list(TIED_LAST)] = 1.0
    # Identical decoder rows: whichever of the two the reference keeps, its output is the same.
    state["W_dec"][TIED_LAST[1]] = state["W_dec"][TIED_LAST[0]]
    return state


# --------------------------------------------------------------------------- what each rank runs


def _train_step(grid: ParallelGrid) -> dict[str, object]:
    sae = _split(TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED, auxk_coefficient=0), grid)
    assert isinstance(sae, TopKSAE) and sae.n_latents == N_LATENTS
    shard = feature_shard(sae)
    initial = {name: getattr(sae, name).detach().clone() for name in PARAMETERS}
    batch = _global_batch()[data_rows(grid.data_rank, grid.data_parallel)]
    with torch.no_grad():  # a non-zero b_dec, so the encoder input depends on it
        sae.b_dec.copy_(_global_batch().mean(dim=0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    out = sae(batch)
    out.loss.backward()
    _average_gradients(sae, grid.data_group)
    grads = {name: getattr(sae, name).grad.clone() for name in PARAMETERS}
    optimizer.step()
    # The selection (global indices) is the same on every rank of a feature group: the loop's
    # counting, summed over the data group, holds the whole dictionary's counts on every rank.
    counts = latent_fire_counts(out.latent_indices, out.latent_acts, N_LATENTS)
    dist.all_reduce(counts, group=grid.data_group)
    return {
        "slice": (shard.latent_start, shard.latent_start + shard.n_local),
        "initial": initial,
        "out": _detached(out),
        "grads": grads,
        "updated": {name: getattr(sae, name).detach().clone() for name in PARAMETERS},
        "fire_counts": counts,
        "full_state_dict": sae.full_state_dict(),
    }


def _tie_case(grid: ParallelGrid) -> dict[str, torch.Tensor]:
    sae = TopKSAE(D_IN, N_LATENTS, K, auxk_coefficient=0)
    sae.load_state_dict(_tied_state_dict())
    return _detached(_split(sae, grid)(_global_batch()[:4]))


def _slices_narrower_than_k(grid: ParallelGrid) -> dict[str, torch.Tensor]:
    # Two latents per slice, k = 3: each slice offers all it has and the top k spans both.
    sae = _split(TopKSAE(D_IN, NARROW_LATENTS, NARROW_K, seed=SAE_SEED, auxk_coefficient=0), grid)
    return _detached(sae(_global_batch()))


def _indivisible_error(grid: ParallelGrid) -> str:
    # Far too many latents to allocate: built on the meta device, the model holds no memory and
    # only a check made before the slices are copied can answer.
    with torch.device("meta"):
        sae = TopKSAE(D_IN, 2**36 + 1, K, auxk_coefficient=0)
    try:
        _split(sae, grid)
    except ValueError as error:
        return str(error)
    return "no error"


def _refusals(grid: ParallelGrid) -> list[str]:
    """What ``parallelize_features`` will not split: AuxK, a model split already."""
    errors = []
    for make in (lambda: TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED),
                 lambda: _split(TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED, auxk_coefficient=0), grid)):
        try:
            _split(make(), grid)
        except ValueError as error:
            errors.append(str(error))
    return errors


def _worker(rank: int, world_size: int, data_parallel: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    grid = build_grid(data_parallel=data_parallel, feature_parallel=world_size // data_parallel)
    results: dict[str, object] = {
        "position": (grid.data_rank, grid.feature_rank),
        "feature_group": dist.get_process_group_ranks(grid.feature_group),
        "data_group": dist.get_process_group_ranks(grid.data_group),
        "step": _train_step(grid),
        "ties": _tie_case(grid),
        "narrow": _slices_narrower_than_k(grid),
        "indivisible": _indivisible_error(grid),
        "refusals": _refusals(grid),
    }
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


run = grid_runs(_worker, preload=["torch", "torch._dynamo", "trainer.feature_parallel"])


# --------------------------------------------------------------------------- the reference


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    """One process, the whole batch: the same step on the plain ``TopKSAE``."""
    sae = TopKSAE(D_IN, N_LATENTS, K, seed=SAE_SEED)
    initial = {name: value.clone() for name, value in sae.state_dict().items()}
    batch = _global_batch()
    with torch.no_grad():
        sae.b_dec.copy_(batch.mean(dim=0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    out = sae(batch)
    out.loss.backward()
    grads = {name: getattr(sae, name).grad.clone() for name in PARAMETERS}
    optimizer.step()
    return {
        "initial": initial,
        "out": out,
        "grads": grads,
        "updated": {name: value.clone() for name, value in sae.state_dict().items()},
        "fire_counts": latent_fire_counts(out.latent_indices, out.latent_acts, N_LATENTS),
    }


def _fired(acts: torch.Tensor, indices: torch.Tensor) -> list[list[int]]:
    """Per token, the latents selected with a positive value, ascending (which of several
    zero-valued latents fills the top k is unspecified)."""
    return [sorted(indices[token][acts[token] > 0].tolist()) for token in range(len(indices))]


def _by_value(acts: torch.Tensor) -> torch.Tensor:
    return acts.detach().sort(dim=1, descending=True).values


# --------------------------------------------------------------------------- tests


def test_ranks_sit_on_the_grid_they_were_given(run) -> None:
    (data_parallel, feature_parallel), ranks = run
    for rank, results in enumerate(ranks):
        data_rank, feature_rank = results["position"]
        assert rank == data_rank * feature_parallel + feature_rank
        assert results["feature_group"] == [data_rank * feature_parallel + f for f in range(feature_parallel)]
        assert results["data_group"] == [d * feature_parallel + feature_rank for d in range(data_parallel)]
        assert results["step"]["slice"] == (latent_slice(feature_rank, feature_parallel).start,
                                            latent_slice(feature_rank, feature_parallel).stop)


def test_slices_start_as_the_single_process_init(run, reference) -> None:
    (_, feature_parallel), ranks = run
    for results in ranks:
        latents = latent_slice(results["position"][1], feature_parallel)
        for name in ("W_enc", "b_enc", "W_dec"):
            expected = slice_of(name, reference["initial"][name], latents)
            torch.testing.assert_close(results["step"]["initial"][name], expected, rtol=0, atol=0)


def test_step_gives_the_single_process_loss_selection_and_reconstruction(run, reference) -> None:
    (data_parallel, _), ranks = run
    expected = reference["out"]
    losses = {results["position"][0]: results["step"]["out"]["loss"] for results in ranks}
    assert torch.stack(list(losses.values())).mean().item() == pytest.approx(expected.loss.item(), rel=1e-5)
    for results in ranks:
        out, rows = results["step"]["out"], data_rows(results["position"][0], data_parallel)
        assert (out["latent_acts"] > 0).all()  # so every selected latent is determined
        assert out["latent_indices"].shape == (GLOBAL_BATCH // data_parallel, K)
        assert _fired(out["latent_acts"], out["latent_indices"]) == _fired(
            expected.latent_acts[rows], expected.latent_indices[rows]
        )
        close(out["latent_acts"], _by_value(expected.latent_acts[rows]), "latent_acts")
        close(out["reconstruction"], expected.reconstruction[rows].detach(), "reconstruction")


def test_every_slice_gets_the_single_process_gradient_and_update(run, reference) -> None:
    (_, feature_parallel), ranks = run
    for results in ranks:
        latents = latent_slice(results["position"][1], feature_parallel)
        for name in PARAMETERS:
            close(results["step"]["grads"][name], slice_of(name, reference["grads"][name], latents), f"grad {name}")
            close(results["step"]["updated"][name], slice_of(name, reference["updated"][name], latents), name)


def test_replicated_b_dec_and_selection_agree_bit_for_bit(run) -> None:
    _, ranks = run
    first = ranks[0]["step"]
    for results in ranks:
        assert torch.equal(results["step"]["grads"]["b_dec"], first["grads"]["b_dec"])
        assert torch.equal(results["step"]["updated"]["b_dec"], first["updated"]["b_dec"])
        same_batch = next(r for r in ranks if r["position"][0] == results["position"][0])["step"]["out"]
        for field in ("latent_indices", "latent_acts", "reconstruction", "loss"):
            assert torch.equal(results["step"]["out"][field], same_batch[field]), field


def test_fire_counts_agree_with_the_reference(run, reference) -> None:
    _, ranks = run
    for results in ranks:
        assert torch.equal(results["step"]["fire_counts"], reference["fire_counts"])


def test_gathered_dictionary_is_the_single_process_one_after_the_step(run, reference) -> None:
    _, ranks = run
    for results in ranks:
        full = results["step"]["full_state_dict"]
        if results["position"][1] != 0:
            assert full is None
            continue
        assert sorted(full) == sorted(PARAMETERS)
        for name in PARAMETERS:
            close(full[name], reference["updated"][name], name)


def test_exact_ties_select_k_latents_like_the_single_process_sae(run) -> None:
    _, ranks = run
    expected = TopKSAE(D_IN, N_LATENTS, K)
    expected.load_state_dict(_tied_state_dict())
    expected_out = expected(_global_batch()[:4])
    for results in ranks:
        out = results["ties"]
        for token, expected_token in zip(out["latent_indices"].tolist(), expected_out.latent_indices.tolist(), strict=True):
            # Ties inside the top k: both latents, as the reference; across the cut: exactly one,
            # the lower global index (the reference's choice there is unspecified).
            assert sorted(token) == sorted([*TIED_FIRST, THIRD, TIED_LAST[0]])
            assert {*TIED_FIRST, THIRD} <= set(expected_token) <= {*TIED_FIRST, THIRD, *TIED_LAST}
        close(out["latent_acts"], _by_value(expected_out.latent_acts), "latent_acts")
        close(out["reconstruction"], expected_out.reconstruction.detach(), "reconstruction")
        assert out["loss"].item() == pytest.approx(expected_out.loss.item(), rel=1e-6)


def test_slices_holding_fewer_than_k_latents_still_select_the_global_top_k(run) -> None:
    (_, feature_parallel), ranks = run
    assert NARROW_LATENTS // feature_parallel < NARROW_K
    expected = TopKSAE(D_IN, NARROW_LATENTS, NARROW_K, seed=SAE_SEED)(_global_batch())
    for results in ranks:
        out = results["narrow"]
        assert _fired(out["latent_acts"], out["latent_indices"]) == _fired(
            expected.latent_acts, expected.latent_indices
        )
        close(out["latent_acts"], _by_value(expected.latent_acts), "latent_acts")
        close(out["reconstruction"], expected.reconstruction.detach(), "reconstruction")


def test_n_latents_not_divisible_by_the_feature_degree_is_rejected_before_allocating(run) -> None:
    (_, feature_parallel), ranks = run
    for results in ranks:
        assert results["indivisible"] == (
            f"n_latents={2**36 + 1} must be divisible by feature_parallel={feature_parallel}"
        )


def test_a_model_with_auxk_or_split_already_is_refused(run) -> None:
    _, ranks = run
    for results in ranks:
        with_auxk, split_twice = results["refusals"]
        assert "TopKSAE cannot be split over features" in with_auxk and "'auxk_coefficient': 0.03125" in with_auxk
        assert split_twice == "FeatureParallelTopKSAE is already split over features"
