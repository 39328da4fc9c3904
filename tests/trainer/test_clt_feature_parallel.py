"""Feature parallelism of a cross-layer transcoder on CPU with gloo: 2 processes, each holding half
of every layer's latents (one feature group of 2), and 4 as a 2 x 2 (data x feature) grid through
DeepSpeed under ZeRO 2 and 3.

Each activation (JumpReLU with the L0 and with the tanh penalty, TopK per layer, TopK across
layers) runs one forward, backward and torch Adam step of ``parallelize_features(CrossLayerTranscoder)``
on one batch; every figure must match the single-process ``CrossLayerTranscoder`` on that batch:
the loss and its terms, the latents that fire, the prediction, each slice's gradients and updated
weights, and the dictionary gathered to the group's first rank (the unsplit state, buffers
included). The grid run takes a few steps with gradient clipping small enough to bite, each data
rank on its half of every global batch, against one process with torch Adam and ``clip_grad_norm_``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import free_port, run_ranks

from trainer.clt import CrossLayerTranscoder
from trainer.config import DeepSpeedConfig, TrainConfig
from trainer.engine import master_weights, shutdown_engine, wrap_in_deepspeed
from trainer.feature_parallel import build_grid, feature_shard, parallelize_features
from trainer.metrics import output_fire_counts

pytestmark = pytest.mark.integration

N_LAYERS, D_IN, D_OUT, N_PER_LAYER, K = 3, 8, 6, 8, 2
BATCH, CLT_SEED, DATA_SEED, LR = 16, 0, 123, 1e-2
INPUT_SCALES, TARGET_SCALES = (0.5, 1.0, 2.0), (1.5, 0.7, 1.2)
# name -> constructor options. Bandwidth and threshold put many pre-activations inside the
# straight-through window, so the thresholds get gradients.
MODELS = {
    "jumprelu_l0": dict(activation="jumprelu", bandwidth=0.5, init_threshold=0.2, sparsity_coefficient=0.1),
    "jumprelu_tanh": dict(activation="jumprelu", bandwidth=0.5, init_threshold=0.2, sparsity_coefficient=0.1,
                          sparsity_loss="tanh"),
    "topk_layer": dict(activation="topk", k=K, clt_topk="layer", auxk_coefficient=0),
    "topk_all": dict(activation="topk", k=K, clt_topk="all", auxk_coefficient=0),
}
GRID_MODELS = ("jumprelu_l0", "topk_layer")
GRID_STAGES = (2, 3)  # ZeRO 3 too: it partitions the decoders held in an nn.ParameterList
GRID_STEPS, MAX_GRAD_NORM = 3, 0.05


def _clt(name: str, seed: int = CLT_SEED) -> CrossLayerTranscoder:
    return CrossLayerTranscoder(N_LAYERS, D_IN, N_PER_LAYER, d_layer_out=D_OUT, seed=seed,
                                input_scales=INPUT_SCALES, target_scales=TARGET_SCALES, **MODELS[name])


def _batches(steps: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    return [(torch.randn(BATCH, N_LAYERS * D_IN, generator=generator) * (1 + step) + 0.3,
             torch.randn(BATCH, N_LAYERS * D_OUT, generator=generator) - 0.2) for step in range(steps)]


def _centred(clt: CrossLayerTranscoder) -> CrossLayerTranscoder:
    clt.init_b_dec(_batches()[0][1], method="mean")  # a non-zero b_dec
    return clt


def _slice(name: str, full: torch.Tensor, feature_rank: int, feature_parallel: int) -> torch.Tensor:
    """The part of a whole parameter (or its gradient) that one feature rank holds."""
    n_local = N_PER_LAYER // feature_parallel
    latents = slice(feature_rank * n_local, (feature_rank + 1) * n_local)
    if name == "W_enc":
        return full[:, :, latents]
    if name in ("b_enc", "log_threshold"):
        return full[:, latents]
    return full[latents] if name.startswith("W_dec") else full


def _fired(out: dict[str, torch.Tensor]) -> list[list[int]]:
    """Per token, the latents firing (global indices, ascending), dense or (acts, indices) alike."""
    acts, indices = out["latent_acts"], out["latent_indices"]
    if indices is None:
        return [row.nonzero().squeeze(1).tolist() for row in acts]
    return [sorted(indices[t][acts[t] > 0].tolist()) for t in range(len(acts))]


def _dense(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L * n) activations, from a dense code or (acts, indices) alike (zero padding adds nothing)."""
    acts, indices = out["latent_acts"], out["latent_indices"]
    if indices is None:
        return acts
    return acts.new_zeros(len(acts), N_LAYERS * N_PER_LAYER).scatter_add(1, indices, acts)


def _outputs(out) -> dict[str, torch.Tensor | None]:
    return {field: None if value is None else value.detach().clone() for field, value in out._asdict().items()}


# --------------------------------------------------------------------------- what each rank runs


def _one_step(name: str, group) -> dict[str, object]:
    clt = parallelize_features(_centred(_clt(name)), group=group)
    optimizer = torch.optim.Adam(clt.parameters(), lr=LR)
    x, y = _batches()[0]
    out = clt(x, target=y)
    out.loss.backward()
    grads = {param_name: param.grad.clone() for param_name, param in clt.named_parameters()}
    optimizer.step()
    return {
        "class": type(clt).__name__,
        "n_local": feature_shard(clt).n_local,
        "out": _outputs(out),
        "fire_counts": output_fire_counts(out.latent_acts, out.latent_indices, clt.n_latents),
        "grads": grads,
        "updated": {param_name: param.detach().clone() for param_name, param in clt.named_parameters()},
        "full_state_dict": clt.full_state_dict(),
    }


def _grid_steps(name: str, stage: int, grid) -> dict[str, object]:
    # Each data rank draws a different dictionary: DeepSpeed broadcasts the first data rank's.
    clt = parallelize_features(_centred(_clt(name, seed=CLT_SEED + grid.data_rank)), group=grid.feature_group)
    engine = wrap_in_deepspeed(
        clt, train_cfg=TrainConfig(batch_size=BATCH, max_grad_norm=MAX_GRAD_NORM),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=stage, feature_parallel=grid.feature_parallel,
                                      stage3_param_persistence_threshold=0),  # partition every ZeRO-3 parameter
        lr=LR, world_size=dist.get_world_size(), grid=grid,
    )
    rows = slice(grid.data_rank * BATCH // grid.data_parallel, (grid.data_rank + 1) * BATCH // grid.data_parallel)
    losses, norms = [], []
    for x, y in _batches(GRID_STEPS):
        out = engine(x[rows], target=y[rows])
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    full = engine.module.full_state_dict(master_weights(engine))
    shutdown_engine(engine)
    return {"losses": losses, "grad_norms": norms, "full_state_dict": full}


def _refusals(group) -> list[str]:
    """What ``parallelize_features`` will not split: an odd width per layer, AuxK, a split CLT."""
    errors = []
    candidates = [
        lambda: CrossLayerTranscoder(N_LAYERS, D_IN, 7, d_layer_out=D_OUT, seed=CLT_SEED),  # 7 per layer over 2
        lambda: CrossLayerTranscoder(N_LAYERS, D_IN, N_PER_LAYER, d_layer_out=D_OUT, activation="topk", k=K,
                                     seed=CLT_SEED),  # AuxK on
        lambda: parallelize_features(_clt("jumprelu_l0"), group=group),  # split already
    ]
    for make in candidates:
        try:
            parallelize_features(make(), group=group)
        except ValueError as error:
            errors.append(str(error))
        else:
            errors.append("no error")
    return errors


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))  # deepspeed.initialize wants LOCAL_RANK
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    grid = build_grid(data_parallel=2, feature_parallel=2)
    pair = dist.new_group([0, 1])  # one feature group of 2 (ranks 2 and 3 also make it, unused)
    results: dict[str, object] = {"position": (grid.data_rank, grid.feature_rank)}
    if rank < 2:
        results.update({name: _one_step(name, pair) for name in MODELS})
        results["refusals"] = _refusals(pair)
    dist.barrier()
    results["grid"] = {(name, stage): _grid_steps(name, stage, grid) for name in GRID_MODELS for stage in GRID_STAGES}
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, object]]:
    return run_ranks(_worker, 4, free_port(), nprocs=4, out_dir=tmp_path_factory.mktemp("clt_fp"),
                     preload=["torch", "torch._dynamo", "trainer.engine"])


# --------------------------------------------------------------------------- the references


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, object]]:
    """One process, the same batch: the plain CLT's step for each model."""
    results = {}
    for name in MODELS:
        clt = _centred(_clt(name))
        optimizer = torch.optim.Adam(clt.parameters(), lr=LR)
        x, y = _batches()[0]
        out = clt(x, target=y)
        out.loss.backward()
        grads = {param_name: param.grad.clone() for param_name, param in clt.named_parameters()}
        optimizer.step()
        results[name] = {"out": _outputs(out), "grads": grads, "state": {k: v.clone() for k, v in clt.state_dict().items()},
                         "fire_counts": output_fire_counts(out.latent_acts, out.latent_indices, clt.n_latents)}
    return results


@pytest.fixture(scope="module")
def grid_reference() -> dict[str, dict[str, object]]:
    """One process, the whole batches: torch Adam with ``clip_grad_norm_``."""
    results = {}
    for name in GRID_MODELS:
        clt = _centred(_clt(name))
        optimizer = torch.optim.Adam(clt.parameters(), lr=LR)
        losses, norms = [], []
        for x, y in _batches(GRID_STEPS):
            optimizer.zero_grad()
            out = clt(x, target=y)
            out.loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(clt.parameters(), MAX_GRAD_NORM).item())
            optimizer.step()
            losses.append(out.loss.item())
        results[name] = {"losses": losses, "grad_norms": norms, "state": clt.state_dict()}
    return results


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Equal up to sums of the same terms in another order (partials, all-reduces, ZeRO partitions)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=msg)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(MODELS))
def test_split_step_gives_the_single_process_loss_code_and_prediction(ranks, reference, name: str) -> None:
    expected = reference[name]["out"]
    for rank in (0, 1):
        step = ranks[rank][name]
        assert step["class"] == "FeatureParallelCrossLayerTranscoder" and step["n_local"] == N_PER_LAYER // 2
        out = step["out"]
        for field in ("loss", "mse", "fvu", "sparsity_loss", "l0"):
            close(out[field], expected[field], field)
        close(out["reconstruction"], expected["reconstruction"], "prediction")
        assert _fired(out) == _fired(expected)
        assert all(len(token) > 0 for token in _fired(out))
        assert torch.equal(step["fire_counts"], reference[name]["fire_counts"])
        close(_dense(out), _dense(expected), "latent_acts")
    if name.startswith("jumprelu"):
        assert expected["sparsity_loss"] > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_slice_gets_the_single_process_gradient_and_update(ranks, reference, name: str) -> None:
    expected = reference[name]
    for rank in (0, 1):
        step = ranks[rank][name]
        assert sorted(step["grads"]) == sorted(expected["grads"])
        for param_name, grad in step["grads"].items():
            assert grad.abs().sum() > 0 or expected["grads"][param_name].abs().sum() == 0
            close(grad, _slice(param_name, expected["grads"][param_name], rank, 2), f"grad {param_name}")
            close(step["updated"][param_name], _slice(param_name, expected["state"][param_name], rank, 2), param_name)
    if name.startswith("jumprelu"):  # the straight-through estimator reached the thresholds
        assert expected["grads"]["log_threshold"].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gathered_state_is_the_single_process_state_after_the_step(ranks, reference, name: str) -> None:
    assert ranks[1][name]["full_state_dict"] is None
    full, expected = ranks[0][name]["full_state_dict"], reference[name]["state"]
    assert sorted(full) == sorted(expected)  # the scale buffers too: it loads into an unsplit CLT
    for key, value in expected.items():
        close(full[key], value, key)
    _clt(name).load_state_dict(full)


@pytest.mark.parametrize("stage", GRID_STAGES)
@pytest.mark.parametrize("name", GRID_MODELS)
def test_grid_under_zero_gives_the_single_process_losses_norms_and_weights(
    ranks, grid_reference, name: str, stage: int
) -> None:
    expected = grid_reference[name]
    assert min(expected["grad_norms"]) > 2 * MAX_GRAD_NORM  # the clipping bites at every step
    by_replica = {results["position"][0]: results["grid"][name, stage]["losses"] for results in ranks}
    close(torch.tensor([by_replica[0], by_replica[1]]).mean(dim=0), torch.tensor(expected["losses"]), "losses")
    for results in ranks:
        close(torch.tensor(results["grid"][name, stage]["grad_norms"]), torch.tensor(expected["grad_norms"]), "grad norms")
        full = results["grid"][name, stage]["full_state_dict"]
        if results["position"][1] != 0:
            assert full is None
            continue
        assert sorted(full) == sorted(expected["state"])
        for key, value in expected["state"].items():
            close(full[key], value, key)


def test_what_cannot_be_split_is_refused_in_one_line(ranks) -> None:
    indivisible, auxk, twice = ranks[0]["refusals"]
    assert indivisible == (
        "n_per_layer=7 must be divisible by feature_parallel=2: each layer's latents are split over the feature group"
    )
    assert "kernel='sparse' and auxk_coefficient=0" in auxk and "'auxk_coefficient': 0.03125" in auxk
    assert twice == "FeatureParallelCrossLayerTranscoder is already split over features"
