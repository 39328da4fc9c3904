"""Feature parallelism: a TopK SAE's latent dimension split across a group of ranks, applied to a
model (``parallelize_features``) rather than written into it.

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
the same slice and average their gradients.

The SAE math stays in ``trainer.sae`` and ``trainer.kernels``, which know nothing distributed: as
torch's ``fully_shard`` does, ``parallelize_features`` slices the model's parameters in place and
swaps its class for a subclass whose ``reconstruct`` and ``full_state_dict`` are the collective
versions; the loss terms, the fold and ``init_b_dec`` are the model's own.
``trainer.engine.wrap_in_deepspeed(..., grid=...)`` runs it under DeepSpeed, with data
parallelism and ZeRO over the data groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.distributed import ProcessGroup

from trainer.kernels import sparse_decode, sparse_topk_encode
from trainer.sae import Code, SparseCoder

__all__ = [
    "FeatureShard",
    "ParallelGrid",
    "build_grid",
    "feature_shard",
    "parallelize_features",
]

# The parameters split along the latents, and the dimension each is split on.
_SLICED = {"W_enc": 1, "b_enc": 0, "W_dec": 0}


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


# --------------------------------------------------------------------------- applying it


@dataclass(frozen=True)
class FeatureShard:
    """Which slice of the latents a feature-parallel model holds."""

    group: ProcessGroup | None
    """The feature group (``None``: the default group)."""
    feature_parallel: int
    """Ranks the latents are split over."""
    feature_rank: int
    """This rank's place in ``group``: it holds latents ``[latent_start, latent_start + n_local)``."""
    n_local: int
    """Latents per rank."""

    @property
    def latent_start(self) -> int:
        return self.feature_rank * self.n_local


def parallelize_features(model: SparseCoder, *, group: ProcessGroup | None) -> SparseCoder:
    """Split ``model``'s latents evenly over ``group`` (``None``: the default group), in place:
    rank i of the group keeps latents ``[i * n_local, (i + 1) * n_local)`` and drops the rest.
    Returns ``model``, whose ``forward`` is now a collective over the group, ``feature_shard``
    says which slice it holds and ``full_state_dict`` gathers the whole dictionary.

    Preconditions: ``torch.distributed`` is initialised; every rank of ``group`` passes the same
    model (same seed or state), built for this: a ``TopKSAE`` with the sparse kernel, ``b_dec``
    subtracted from the input, unit-norm decoder rows and no AuxK (its dead-latent columns would
    need another collective), which rules out transcoders (they keep ``b_dec`` off the input, and
    this split has no ``W_skip``); its ``n_latents`` divisible by the group's size; in ``forward``
    every rank of the group passes the same batch. The divisibility is checked before anything
    is copied, so a model built on the meta device fails without allocating.
    """
    feature_parallel = dist.get_world_size(group)
    if model.n_latents % feature_parallel:
        raise ValueError(f"n_latents={model.n_latents} must be divisible by feature_parallel={feature_parallel}")
    wanted = {"kernel": "sparse", "apply_b_dec_to_input": True, "unit_norm_decoder": True, "auxk_coefficient": 0}
    found = {name: getattr(model, name, None) for name in wanted}
    if found != wanted or not hasattr(model, "k"):
        raise ValueError(f"{type(model).__name__} cannot be split over features: needs a TopKSAE with {wanted}, got {found}")
    if feature_shard(model) is not None:
        raise ValueError(f"{type(model).__name__} is already split over features")
    shard = FeatureShard(group, feature_parallel, dist.get_rank(group), model.n_latents // feature_parallel)
    with torch.no_grad():
        for name, dim in _SLICED.items():
            local = getattr(model, name).narrow(dim, shard.latent_start, shard.n_local)
            setattr(model, name, nn.Parameter(local.detach().clone().contiguous()))
    model.feature_shard = shard
    model.__class__ = _feature_parallel_class(type(model))
    return model


def feature_shard(model: nn.Module) -> FeatureShard | None:
    """The slice ``model`` holds if ``parallelize_features`` split it, else ``None``."""
    return getattr(model, "feature_shard", None)


@functools.cache
def _feature_parallel_class(cls: type) -> type:
    return type(f"FeatureParallel{cls.__name__}", (_FeatureParallel, cls), {})


class _FeatureParallel:
    """What ``parallelize_features`` puts in front of the model's class."""

    feature_shard: FeatureShard
    k: int
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def reconstruct(self, x: Tensor) -> tuple[Code, Tensor]:
        """The whole dictionary's top-k code and reconstruction; a collective over the feature group.

        The code's ``acts`` and ``indices`` (global indices) are the same on every rank, sorted
        by value, largest first; ``acts`` carries no gradient (its values come from every rank),
        the reconstruction does. Exactly tied values are broken toward the lower global index
        across slices; within a slice the local top k picks among ties as the single-process
        kernel does (unspecified), so the selected *values* always equal the single-process SAE's,
        and the latents too unless two of them tie exactly.
        """
        shard = self.feature_shard
        b_dec_for_encoder = _SumGradients.apply(self.b_dec, shard.group)
        local_acts, local_indices = sparse_topk_encode(
            x, self.W_enc, self.b_enc, b_dec_for_encoder, min(self.k, shard.n_local)
        )
        values, indices = _gather_candidates(local_acts.detach(), local_indices + shard.latent_start, shard)
        chosen = _select_topk(values, indices, self.k)
        latent_acts, latent_indices = values.gather(1, chosen), indices.gather(1, chosen)
        # Decode this rank's chosen candidates; the others get weight zero (and so no gradient).
        local_k = local_acts.shape[1]
        own = torch.zeros_like(values, dtype=torch.bool).scatter_(1, chosen, True)
        own = own[:, shard.feature_rank * local_k : (shard.feature_rank + 1) * local_k]
        partial = sparse_decode(
            torch.where(own, local_acts, 0), local_indices, self.W_dec, torch.zeros_like(self.b_dec)
        )
        reconstruction = _SumPartials.apply(partial, shard.group) + self.b_dec
        return Code(latent_acts, latent_indices, None), reconstruction

    def sliced_parameters(self) -> list[nn.Parameter]:
        """The parameters split across the feature group: all but the replicated ``b_dec``. A norm
        over the whole dictionary sums these over the group and counts ``b_dec`` once."""
        return [getattr(self, name) for name in _SLICED]

    @torch.no_grad()
    def full_state_dict(self, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor] | None:
        """The whole dictionary in SAELens's layout (raw ``W_dec``, as ``TopKSAE.state_dict()``)
        on the group's first rank, ``None`` on the others. A collective over the feature group.

        ``weights``: this rank's slice by parameter name, in place of the parameters themselves;
        ``trainer.engine.master_weights(engine)`` gives the fp32 master slice of a DeepSpeed engine.
        """
        shard = self.feature_shard
        dst = dist.get_global_rank(shard.group or dist.group.WORLD, 0)
        is_dst = shard.feature_rank == 0
        weights = weights if weights is not None else dict(self.named_parameters())  # type: ignore[attr-defined]
        full: dict[str, Tensor] = {}
        for name, dim in _SLICED.items():
            local = weights[name].detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(shard.feature_parallel)] if is_dst else None
            dist.gather(local, parts, dst=dst, group=shard.group)
            if is_dst:
                full[name] = torch.cat(parts, dim=dim)
        if not is_dst:
            return None
        full["b_dec"] = weights["b_dec"].detach().clone()
        return full


def _gather_candidates(local_acts: Tensor, global_indices: Tensor, shard: FeatureShard) -> tuple[Tensor, Tensor]:
    """Every rank's (B, local_k) candidates side by side, rank-major: two (B, world * local_k)."""
    gathered = []
    for tensor in (local_acts.contiguous(), global_indices.contiguous()):
        parts = [torch.empty_like(tensor) for _ in range(shard.feature_parallel)]
        dist.all_gather(parts, tensor, group=shard.group)
        gathered.append(torch.cat(parts, dim=1))
    return gathered[0], gathered[1]


def _select_topk(values: Tensor, indices: Tensor, k: int) -> Tensor:
    """(B, k) positions of the k largest ``values`` per row, exact ties to the lower ``indices``.

    Every rank runs this on the same gathered candidates, so all agree on the selection; the
    explicit tie rule keeps that true whatever order the candidates arrive in. ``torch.topk``
    alone promises no order among ties.
    """
    by_index = indices.argsort(dim=1)
    _, by_value = values.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    return by_index.gather(1, by_value[:, :k])



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
