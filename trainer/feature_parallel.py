"""Feature parallelism for the TopK SAE: the latent dimension split across a group of ranks.

A dictionary of millions of latents does not fit one worker's memory, and its encoder GEMM is the
step's whole cost, so each rank of a *feature group* holds a contiguous slice ``[start, end)`` of
the latents: its columns of ``W_enc``, its entries of ``b_enc``, its rows of ``W_dec``. ``b_dec``
is replicated. One forward pass:

1. every rank computes its slice's ReLU pre-activations and their top k (``sparse_topk_encode``);
2. the ranks all-gather these candidates (values and global indices, k per token per rank): the
   global top k of a row is among the union of the slices' top k;
3. every rank takes the same global top k of the gathered candidates;
4. every rank decodes the selected latents that are its own, and the partial reconstructions are
   summed over the group; ``b_dec`` is added once.

Every rank of the group then holds the same reconstruction and the same loss, and its backward
gives each local parameter the gradient the single-process ``TopKSAE`` would (tested in
``tests/trainer/test_feature_parallel.py``). Feature groups compose with data parallelism as a
2-D grid (``build_grid``): ranks of one feature group share a batch, ranks of one data group hold
the same slice and average their gradients (``average_gradients``).

The SAE math stays in ``trainer.sae`` and ``trainer.kernels``, which know nothing distributed;
this module is the wrapping around them. ``trainer.engine.wrap_in_deepspeed(..., grid=...)`` runs
it under DeepSpeed, with data parallelism and ZeRO over the data groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.distributed import ProcessGroup

from trainer.kernels import sparse_decode, sparse_topk_encode
from trainer.sae import ENCODER_INIT_NORM, ForwardOutput, TopKSAE, tied_init

__all__ = [
    "FeatureParallelTopKSAE",
    "ParallelGrid",
    "average_gradients",
    "build_grid",
    "gather_slices",
    "normalization_scale",
]


# --------------------------------------------------------------------------- autograd collectives


class _SumPartials(torch.autograd.Function):
    """Forward: all-reduce (sum) of the ranks' partial reconstructions. Backward: identity.

    Every rank computes the same loss from the same sum, and the gradient it needs for its own
    partial is that loss's gradient with respect to the sum. ``torch.distributed.nn``'s
    ``all_reduce`` would all-reduce the gradient too, which is right for a sum of per-rank losses
    and here would multiply every gradient by the group size.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, partial: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class _SumGradients(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) of the gradient over the group.

    For the replicated ``b_dec`` on the encoder side: each rank's encoder sees ``x - b_dec`` for
    its own latents only, so the single-process gradient of that term is the sum of the ranks'
    shares. Reducing here, inside autograd, leaves the decoder-side term (identical on every rank,
    from adding ``b_dec`` once to the summed reconstruction) counted once.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


# --------------------------------------------------------------------------- the sharded SAE


class FeatureParallelTopKSAE(nn.Module):
    """This rank's slice of a ``TopKSAE(d_in, n_latents, k)`` whose latents are split evenly over
    ``group`` (``None``: the default group), rank i of the group holding latents
    ``[i * n_local, (i + 1) * n_local)``.

    Parameters in SAELens's layout, sliced: ``W_enc`` (d_in, n_local), ``b_enc`` (n_local,),
    ``W_dec`` (n_local, d_in), and the replicated ``b_dec`` (d_in,). Decoder rows are normalised
    inside ``forward``, as ``TopKSAE.decoder_weight`` does, so the slices need no coordination to
    stay at unit norm. The sparse kernels only, in the parameters' dtype.

    Initialisation is ``TopKSAE(d_in, n_latents, k, seed=seed)``'s, exactly: the concatenated
    slices equal its weights. Each rank draws the full tied matrices and keeps its slice (a CPU
    generator cannot skip ahead to a slice), so construction briefly holds two full (n_latents,
    d_in) matrices per rank: 4 GiB in fp32 at 1M latents and d_in 512. ``weights`` (a full
    ``TopKSAE.state_dict()``) replaces that draw; see ``from_full_state_dict``.

    Preconditions: ``torch.distributed`` is initialised, every rank of ``group`` constructs the
    module with the same arguments, and in ``forward`` every rank of the group passes the same batch.
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        group: ProcessGroup | None = None,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        encoder_init_norm: float = ENCODER_INIT_NORM,
        weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        feature_parallel = dist.get_world_size(group)
        # Before anything is allocated: a bad split must not first cost a full-size draw.
        if d_in <= 0:
            raise ValueError(f"d_in={d_in} must be positive")
        if n_latents <= 0:
            raise ValueError(f"n_latents={n_latents} must be positive")
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be in [1, n_latents={n_latents}]")
        if n_latents % feature_parallel:
            raise ValueError(f"n_latents={n_latents} must be divisible by feature_parallel={feature_parallel}")
        self.d_in = d_in
        self.n_latents = n_latents
        self.k = k
        self.group = group
        self.feature_parallel = feature_parallel
        self.feature_rank = dist.get_rank(group)
        self.n_local = n_latents // feature_parallel
        self.latent_start = self.feature_rank * self.n_local
        self.latent_end = self.latent_start + self.n_local
        if weights is None:
            w_enc, w_dec = tied_init(n_latents, d_in, seed=seed, encoder_norm=encoder_init_norm, dtype=dtype)
            weights = {
                "W_enc": w_enc, "b_enc": torch.zeros(n_latents, dtype=dtype),
                "W_dec": w_dec, "b_dec": torch.zeros(d_in, dtype=dtype),
            }
        self._take_slice(weights)

    @classmethod
    def from_full_state_dict(
        cls, state_dict: Mapping[str, Tensor], *, k: int, group: ProcessGroup | None = None
    ) -> FeatureParallelTopKSAE:
        """This rank's slice of a full SAELens-layout state dict (``TopKSAE.state_dict()``)."""
        d_in, n_latents = state_dict["W_enc"].shape
        return cls(d_in, n_latents, k, group=group, dtype=state_dict["W_enc"].dtype, weights=state_dict)

    def _take_slice(self, weights: Mapping[str, Tensor]) -> None:
        expected = {
            "W_enc": (self.d_in, self.n_latents), "b_enc": (self.n_latents,),
            "W_dec": (self.n_latents, self.d_in), "b_dec": (self.d_in,),
        }
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"{name} shape {tuple(weights[name].shape)} must be {shape}")
        start, end = self.latent_start, self.latent_end
        self.W_enc = nn.Parameter(weights["W_enc"][:, start:end].detach().clone().contiguous())
        self.b_enc = nn.Parameter(weights["b_enc"][start:end].detach().clone())
        self.W_dec = nn.Parameter(weights["W_dec"][start:end].detach().clone())
        self.b_dec = nn.Parameter(weights["b_dec"].detach().clone())

    def forward(self, x: Tensor) -> ForwardOutput:
        """``TopKSAE.forward`` on the whole dictionary; a collective over the feature group.

        ``latent_acts`` and ``latent_indices`` (global indices) are the same on every rank, sorted
        by value, largest first; ``latent_acts`` carries no gradient (its values come from every
        rank), the reconstruction and the loss do. Exactly tied values are broken toward the
        lower global index across slices; within a slice the local top k picks among ties as the
        single-process kernel does (unspecified), so the selected *values* always equal the
        single-process SAE's, and the latents too unless two of them tie exactly.
        """
        b_dec_for_encoder = _SumGradients.apply(self.b_dec, self.group)
        local_acts, local_indices = sparse_topk_encode(
            x, self.W_enc, self.b_enc, b_dec_for_encoder, min(self.k, self.n_local)
        )
        values, indices = self._gather_candidates(local_acts.detach(), local_indices)
        chosen = _select_topk(values, indices, self.k)
        latent_acts, latent_indices = values.gather(1, chosen), indices.gather(1, chosen)
        # Decode this rank's chosen candidates; the others get weight zero (and so no gradient).
        local_k = local_acts.shape[1]
        own = torch.zeros_like(values, dtype=torch.bool).scatter_(1, chosen, True)
        own = own[:, self.feature_rank * local_k : (self.feature_rank + 1) * local_k]
        partial = sparse_decode(
            torch.where(own, local_acts, 0), local_indices, self.W_dec, torch.zeros_like(self.b_dec)
        )
        reconstruction = _SumPartials.apply(partial, self.group) + self.b_dec
        return _forward_output(x, latent_acts, latent_indices, reconstruction)

    def _gather_candidates(self, local_acts: Tensor, local_indices: Tensor) -> tuple[Tensor, Tensor]:
        """Every rank's (B, local_k) candidates side by side, rank-major: two (B, world * local_k)."""
        global_indices = local_indices + self.latent_start
        gathered = []
        for tensor in (local_acts.contiguous(), global_indices.contiguous()):
            parts = [torch.empty_like(tensor) for _ in range(self.feature_parallel)]
            dist.all_gather(parts, tensor, group=self.group)
            gathered.append(torch.cat(parts, dim=1))
        return gathered[0], gathered[1]

    @torch.no_grad()
    def fire_counts(self, out: ForwardOutput) -> Tensor:
        """(n_local,) int64: how many tokens of ``out`` each latent of this slice fired on
        (selected with a positive value), what ``DeadLatentTracker(n_local)`` takes; no
        communication, since ``out``'s selection is the same on every rank."""
        fired = out.latent_indices[out.latent_acts > 0]
        fired = fired[(fired >= self.latent_start) & (fired < self.latent_end)] - self.latent_start
        return torch.bincount(fired, minlength=self.n_local)

    @torch.no_grad()
    def init_b_dec(
        self, sample: Tensor, *, method: Literal["mean", "geometric_median"] = "geometric_median"
    ) -> None:
        """``TopKSAE.init_b_dec`` for the replicated ``b_dec``: every rank of the group must pass
        the same ``sample``. Call before wrapping in DeepSpeed."""
        TopKSAE.init_b_dec(self, sample, method=method)  # it reads only d_in and b_dec

    def sliced_parameters(self) -> list[nn.Parameter]:
        """The parameters split across the feature group: all but the replicated ``b_dec``. A norm
        over the whole dictionary sums these over the group and counts ``b_dec`` once."""
        return [self.W_enc, self.b_enc, self.W_dec]

    @torch.no_grad()
    def full_state_dict(self, weights: Mapping[str, Tensor] | None = None) -> dict[str, Tensor] | None:
        """The whole dictionary in SAELens's layout (raw ``W_dec``, as ``TopKSAE.state_dict()``)
        on the group's first rank, ``None`` on the others. A collective over the feature group.

        ``weights``: this rank's slice by parameter name, in place of the parameters themselves;
        ``trainer.engine.master_weights(engine)`` gives the fp32 master slice of a DeepSpeed engine.
        """
        dst = dist.get_global_rank(self.group or dist.group.WORLD, 0)
        is_dst = self.feature_rank == 0
        weights = weights if weights is not None else dict(self.named_parameters())
        full: dict[str, Tensor] = {}
        for name, dim in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0)):
            local = weights[name].detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(self.feature_parallel)] if is_dst else None
            dist.gather(local, parts, dst=dst, group=self.group)
            if is_dst:
                full[name] = torch.cat(parts, dim=dim)
        if not is_dst:
            return None
        full["b_dec"] = weights["b_dec"].detach().clone()
        return full


def _select_topk(values: Tensor, indices: Tensor, k: int) -> Tensor:
    """(B, k) positions of the k largest ``values`` per row, exact ties to the lower ``indices``.

    Every rank runs this on the same gathered candidates, so all agree on the selection; the
    explicit tie rule keeps that true whatever order the candidates arrive in. ``torch.topk``
    alone promises no order among ties.
    """
    by_index = indices.argsort(dim=1)
    _, by_value = values.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    return by_index.gather(1, by_value[:, :k])


def _forward_output(x: Tensor, acts: Tensor, indices: Tensor, reconstruction: Tensor) -> ForwardOutput:
    """The loss terms exactly as ``TopKSAE.forward`` computes them (fp32, means over B * d_in)."""
    error = (reconstruction.float() - x.float()).pow(2)
    mse = error.mean()
    total_variance = (x.float() - x.float().mean(dim=0)).pow(2).sum()
    return ForwardOutput(acts, indices, reconstruction, mse, error.sum() / total_variance, loss=mse)


# --------------------------------------------------------------------------- the 2-D grid


class ParallelGrid(NamedTuple):
    """This rank's place in a (data x feature) grid of ``data_parallel * feature_parallel`` ranks."""

    data_parallel: int
    """Number of data-parallel replicas (distinct batches per step)."""
    feature_parallel: int
    """Number of ranks the latents are split over."""
    data_rank: int
    """Which replica this rank belongs to, in [0, data_parallel): its batch."""
    feature_rank: int
    """Which slice of the latents this rank holds, in [0, feature_parallel)."""
    feature_group: ProcessGroup
    """Ranks with this rank's ``data_rank``: one replica, one batch, all the slices."""
    data_group: ProcessGroup
    """Ranks with this rank's ``feature_rank``: one slice, every batch; gradients average here."""


def build_grid(*, data_parallel: int, feature_parallel: int) -> ParallelGrid:
    """Split the initialised default group into feature groups and data groups.

    Rank r sits at ``(data_rank, feature_rank) = divmod(r, feature_parallel)``: a feature group
    is ``feature_parallel`` consecutive ranks, which a launcher places on one node, where the
    per-step all-gather and all-reduce of the forward pass are cheapest. A collective: every rank
    calls it with the same arguments (each ``new_group`` is created by every rank, in one order).
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if data_parallel <= 0 or feature_parallel <= 0:
        raise ValueError(f"data_parallel={data_parallel} and feature_parallel={feature_parallel} must be positive")
    if data_parallel * feature_parallel != world_size:
        raise ValueError(
            f"data_parallel={data_parallel} x feature_parallel={feature_parallel} must equal world_size={world_size}"
        )
    data_rank, feature_rank = divmod(rank, feature_parallel)
    feature_groups = [
        dist.new_group(list(range(d * feature_parallel, (d + 1) * feature_parallel))) for d in range(data_parallel)
    ]
    data_groups = [dist.new_group(list(range(f, world_size, feature_parallel))) for f in range(feature_parallel)]
    return ParallelGrid(
        data_parallel, feature_parallel, data_rank, feature_rank,
        feature_groups[data_rank], data_groups[feature_rank],
    )


def average_gradients(module: nn.Module, *, group: ProcessGroup | None) -> None:
    """Average every parameter's gradient over ``group`` (the data group), in place.

    The loss is a mean over the rank's tokens, so with equal batches per rank the average is the
    gradient of the loss on the concatenated batch. A parameter without a gradient counts as
    zero, so every rank issues the same all-reduces. Call after ``backward`` on every rank.
    """
    size = dist.get_world_size(group)
    for param in module.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, group=group)
        param.grad /= size


def gather_slices(local: Tensor, *, group: ProcessGroup | None) -> Tensor:
    """Every rank's ``local`` concatenated along dim 0 in rank order: per-slice statistics
    (``fire_counts``) as one vector over all latents, on every rank. A collective."""
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts)


def normalization_scale(x: Tensor, *, group: ProcessGroup | None) -> float:
    """``sqrt(d) / mean token norm`` over the batches of every rank of ``group`` (the data group),
    the same float on every rank: the factor that scales inputs to mean norm sqrt(d).

    Summed in float64, so the value does not depend on how the tokens are split across ranks
    beyond rounding. A collective.
    """
    norms = x.detach().double().norm(dim=-1)
    totals = torch.stack([norms.sum(), torch.tensor(float(norms.numel()), dtype=torch.float64)])
    dist.all_reduce(totals, group=group)
    mean_norm = (totals[0] / totals[1]).item()
    if not mean_norm > 0:
        raise ValueError(f"mean token norm {mean_norm} over {int(totals[1])} tokens must be positive")
    return math.sqrt(x.shape[-1]) / mean_norm
