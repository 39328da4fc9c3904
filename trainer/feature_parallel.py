"""Feature parallelism: a TopK SAE's (or a cross-layer transcoder's) latent dimension split across a
group of ranks, applied to a model (``parallelize_features``) rather than written into it.

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

A cross-layer transcoder (``trainer.clt.CrossLayerTranscoder``) is split layer by layer: each rank
holds the same slice ``[start, end)`` of EVERY layer's n latents (its columns of ``W_enc[l]``,
entries of ``b_enc[l]`` and ``log_threshold[l]``, rows of each ``W_dec[l]``), so the ranks carry
equal shares whatever the number of layers; ``b_dec`` and the per-layer scale buffers are
replicated. JumpReLU: each rank encodes its slice and decodes its partial prediction, the partials
are summed, and the L0 (or tanh) penalty is each rank's share summed over the group. TopK per
layer: steps 1-4 above with each layer's candidates apart (k per layer chosen from every rank's
top k of that layer); across layers (``clt_topk="all"``): the same over every layer's candidates
at once (k * L chosen from every rank's top k * L). The gathered state is the single-process one.
Composes with the grid and ZeRO as the SAE split does (``tests/trainer/test_clt_feature_parallel.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.distributed import ProcessGroup

from trainer.clt import CrossLayerTranscoder
from trainer.jumprelu import JumpReLUFunction, StepFunction
from trainer.kernels import sparse_decode, sparse_topk_encode, unit_norm_rows
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


def parallelize_features(
    model: SparseCoder | CrossLayerTranscoder, *, group: ProcessGroup | None
) -> SparseCoder | CrossLayerTranscoder:
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

    A ``CrossLayerTranscoder`` (JumpReLU, or TopK with the sparse kernel and no AuxK) is split
    layer by layer: rank i keeps latents ``[i * n_local, (i + 1) * n_local)`` of EVERY layer,
    ``n_local = n_per_layer / group size``, so each rank holds the same share of every layer's
    encoder and decoders whatever the number of layers (``_FeatureParallelCLT``).
    """
    if isinstance(model, CrossLayerTranscoder):
        return _parallelize_clt(model, group=group)
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
    _keep_slices(model, _SLICED, shard)
    model.feature_shard = shard
    model.__class__ = _feature_parallel_class(type(model))
    return model


def _parallelize_clt(model: CrossLayerTranscoder, *, group: ProcessGroup | None) -> CrossLayerTranscoder:
    feature_parallel = dist.get_world_size(group)
    if model.n_per_layer % feature_parallel:
        raise ValueError(
            f"n_per_layer={model.n_per_layer} must be divisible by feature_parallel={feature_parallel}: "
            "each layer's latents are split over the feature group"
        )
    if model.activation == "topk":
        found = {"kernel": model.kernel, "auxk_coefficient": model.auxk_coefficient}
        if found != {"kernel": "sparse", "auxk_coefficient": 0}:
            raise ValueError(
                f"a TopK CrossLayerTranscoder splits over features with kernel='sparse' and auxk_coefficient=0, got {found}"
            )
    if feature_shard(model) is not None:
        raise ValueError(f"{type(model).__name__} is already split over features")
    shard = FeatureShard(group, feature_parallel, dist.get_rank(group), model.n_per_layer // feature_parallel)
    _keep_slices(model, _clt_sliced(model), shard)
    model.feature_shard = shard
    model.__class__ = _feature_parallel_class(type(model))
    return model


def _clt_sliced(model: CrossLayerTranscoder) -> dict[str, int]:
    """A CLT's parameters split along the latents (``named_parameters`` names), and the dimension."""
    sliced = {"W_enc": 2, "b_enc": 1, **{f"W_dec.{layer}": 0 for layer in range(model.n_layers)}}
    if model.activation == "jumprelu":
        sliced["log_threshold"] = 1
    return sliced


@torch.no_grad()
def _keep_slices(model: nn.Module, sliced: dict[str, int], shard: FeatureShard) -> None:
    """Replace each parameter of ``sliced`` by this rank's ``[latent_start, + n_local)`` along its dimension."""
    for name, dim in sliced.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        local = getattr(owner, attribute).narrow(dim, shard.latent_start, shard.n_local)
        setattr(owner, attribute, nn.Parameter(local.detach().clone().contiguous()))


def feature_shard(model: nn.Module) -> FeatureShard | None:
    """The slice ``model`` holds if ``parallelize_features`` split it, else ``None``."""
    return getattr(model, "feature_shard", None)


@functools.cache
def _feature_parallel_class(cls: type) -> type:
    split = _FeatureParallelCLT if issubclass(cls, CrossLayerTranscoder) else _FeatureParallel
    return type(f"FeatureParallel{cls.__name__}", (split, cls), {})


class _Split:
    """What every split model shares: its sliced parameters and the gathered state."""

    feature_shard: FeatureShard

    def sliced_dims(self) -> dict[str, int]:
        """The parameters split across the feature group (``named_parameters`` names) and the
        dimension each is split along; the others, and the buffers, are replicated."""
        raise NotImplementedError

    def sliced_parameters(self) -> list[nn.Parameter]:
        """The parameters split across the feature group: all but the replicated ones (``b_dec``).
        A norm over the whole dictionary sums these over the group and counts the rest once."""
        return [self.get_parameter(name) for name in self.sliced_dims()]  # type: ignore[attr-defined]

    @torch.no_grad()
    def full_state_dict(self, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor] | None:
        """The whole dictionary's state (the unsplit model's ``state_dict``: its raw parameters,
        and its buffers) on the group's first rank, ``None`` on the others. A collective over the
        feature group.

        ``weights``: this rank's slice by parameter name, in place of the parameters themselves;
        ``trainer.engine.master_weights(engine)`` gives the fp32 master slice of a DeepSpeed engine.
        """
        shard = self.feature_shard
        dst = dist.get_global_rank(shard.group or dist.group.WORLD, 0)
        is_dst = shard.feature_rank == 0
        local_state = self.state_dict()  # type: ignore[attr-defined]
        weights = weights if weights is not None else dict(self.named_parameters())  # type: ignore[attr-defined]
        full: dict[str, Tensor] = {}
        for name, dim in self.sliced_dims().items():
            local = weights[name].detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(shard.feature_parallel)] if is_dst else None
            dist.gather(local, parts, dst=dst, group=shard.group)
            if is_dst:
                full[name] = torch.cat(parts, dim=dim)
        if not is_dst:
            return None
        for name, value in local_state.items():
            if name not in full:
                full[name] = (weights[name] if name in weights else value).detach().clone()
        return full


class _FeatureParallel(_Split):
    """What ``parallelize_features`` puts in front of a ``TopKSAE``'s class."""

    k: int
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def sliced_dims(self) -> dict[str, int]:
        return _SLICED

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
            x, self.W_enc, self.b_enc, b_dec_for_encoder, min(self.k, shard.n_local),
            compute_dtype=self.compute_dtype,
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


def _gather_candidates(local_acts: Tensor, global_indices: Tensor, shard: FeatureShard) -> tuple[Tensor, Tensor]:
    """Every rank's (..., local_k) candidates side by side, rank-major: two (..., world * local_k)."""
    gathered = []
    for tensor in (local_acts.contiguous(), global_indices.contiguous()):
        parts = [torch.empty_like(tensor) for _ in range(shard.feature_parallel)]
        dist.all_gather(parts, tensor, group=shard.group)
        gathered.append(torch.cat(parts, dim=-1))
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


class _FeatureParallelCLT(_Split):
    """What ``parallelize_features`` puts in front of a ``CrossLayerTranscoder``'s class.

    Each rank holds latents ``[latent_start, latent_start + n_local)`` of every layer: those
    columns of ``W_enc[l]``, entries of ``b_enc[l]`` and ``log_threshold[l]``, rows of every
    ``W_dec[l]``; ``b_dec`` and the scale buffers are replicated. ``n_layers``, ``n_per_layer``
    and ``n_latents`` keep the whole dictionary's values; latent ``l * n_per_layer + i`` is still
    layer l's feature i. The loss terms are the model's own ``forward``: only ``reconstruct``, the
    sparsity penalty and the decoder norm rule (over the local rows) are replaced.
    """

    n_layers: int
    n_per_layer: int
    d_layer_out: int
    activation: str
    unit_norm_decoder: bool
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.ParameterList
    b_dec: nn.Parameter

    def sliced_dims(self) -> dict[str, int]:
        return _clt_sliced(self)  # type: ignore[arg-type]

    def decoder_weight(self, layer: int) -> Tensor:
        """(n_local, L - layer, d_layer_out): this rank's rows of layer ``layer``'s decoders, each
        at unit norm (a feature's norm is over its own row: no collective)."""
        weight = self.W_dec[layer]
        if not self.unit_norm_decoder:
            return weight
        return unit_norm_rows(weight.reshape(weight.shape[0], -1)).view_as(weight)

    def reconstruct(self, x: Tensor) -> tuple[Code, Tensor]:
        """The whole CLT's code and RAW prediction; a collective over the feature group.

        Each rank encodes its latents of every layer and decodes the ones that are active into a
        partial prediction (in the scaled target space); the partials are summed over the group
        and ``b_dec`` added once. The code's ``acts`` and global ``indices`` are the same on every
        rank and carry no gradient. TopK: (B, L * k) (``layer``: layer l's k at columns
        [l k, (l + 1) k), by value) or (B, k * L) (``all``), chosen from every rank's candidates
        with ties to the lower global index, as the SAE split. JumpReLU: the firing latents of
        every rank, (B, f * m) values at global indices, zero-padded (m: the most any rank's
        slice fires on one token), in place of the single process's dense (B, L * n) code; its
        ``pre_acts`` are this rank's (B, L * n_local), for the sparsity penalty.
        """
        if self.activation == "jumprelu":
            code, partial = self._jumprelu_partial(x)
        else:
            code, partial = self._topk_partial(x)
        total = _SumPartials.apply(partial, self.feature_shard.group) + self.b_dec.reshape(1, -1)
        return code, self._unscale_targets(total)  # type: ignore[attr-defined]

    def _local_pre_activations(self, x: Tensor) -> Tensor:
        """(B, L * n_local): this rank's pre-activations, layer-major."""
        pre = torch.baddbmm(self.b_enc[:, None, :], self._scaled_inputs(x), self.W_enc)  # type: ignore[attr-defined]
        return pre.transpose(0, 1).reshape(x.shape[0], -1)

    def _jumprelu_partial(self, x: Tensor) -> tuple[Code, Tensor]:
        shard = self.feature_shard
        pre = self._local_pre_activations(x)
        acts = JumpReLUFunction.apply(pre, self.threshold().reshape(-1), self.bandwidth, False)  # type: ignore[attr-defined]
        features = acts.view(x.shape[0], self.n_layers, shard.n_local)
        partial = acts.new_zeros(x.shape[0], self.n_layers * self.d_layer_out)
        for layer in range(self.n_layers):
            decoder = self.decoder_weight(layer).reshape(shard.n_local, -1)
            partial[:, layer * self.d_layer_out :] += features[:, layer] @ decoder
        values, indices = _gather_firing(acts.detach(), self._global_indices, shard)
        return Code(values, indices, pre), partial

    def _global_indices(self, layer: Tensor | int, within: Tensor) -> Tensor:
        """Global latent indices of this rank's latents ``within`` its slice of ``layer``."""
        return layer * self.n_per_layer + self.feature_shard.latent_start + within

    def _topk_partial(self, x: Tensor) -> tuple[Code, Tensor]:
        shard, n_layers, batch = self.feature_shard, self.n_layers, x.shape[0]
        per_layer_k = self.k if self.clt_topk == "layer" else self.k * n_layers  # type: ignore[attr-defined]
        zero = self.b_enc.new_zeros(self.W_enc.shape[1])
        layers = [
            sparse_topk_encode(x_l, w_l, b_l, zero, min(per_layer_k, shard.n_local))
            for x_l, w_l, b_l in zip(self._scaled_inputs(x).unbind(0), self.W_enc.unbind(0),  # type: ignore[attr-defined]
                                     self.b_enc.unbind(0), strict=True)
        ]
        acts = torch.stack([a for a, _ in layers], dim=1)  # (B, L, c), within-slice indices beside
        within = torch.stack([i for _, i in layers], dim=1).long()
        layer_of = torch.arange(n_layers, device=x.device)[None, :, None].expand_as(within)
        if self.clt_topk == "all":  # this rank's top k * L over its layers: one group of candidates
            acts, where = acts.reshape(batch, 1, -1).topk(min(per_layer_k, acts[0].numel()), dim=2)
            within, layer_of = within.reshape(batch, 1, -1).gather(2, where), layer_of.reshape(batch, 1, -1).gather(2, where)
        values, indices = _gather_candidates(acts.detach(), self._global_indices(layer_of, within), shard)
        groups, local_k = values.shape[1], acts.shape[2]
        chosen = _select_topk(values.flatten(0, 1), indices.flatten(0, 1), self.k * n_layers // groups)
        own = torch.zeros_like(values, dtype=torch.bool).flatten(0, 1).scatter_(1, chosen, True).view_as(values)
        own = own[..., shard.feature_rank * local_k : (shard.feature_rank + 1) * local_k]
        code = Code(values.flatten(0, 1).gather(1, chosen).view(batch, -1),
                    indices.flatten(0, 1).gather(1, chosen).view(batch, -1), None)
        return code, self._decode_partial(torch.where(own, acts, 0), within, layer_of)

    def _decode_partial(self, acts: Tensor, within: Tensor, layer_of: Tensor) -> Tensor:
        """(B, G, c) this rank's chosen values (zero elsewhere) at latents ``within`` its slice of
        layer ``layer_of`` -> (B, L * d_layer_out) partial prediction in the scaled target space.
        G = L: group l is layer l; G = 1: any layers, each layer's masked out in turn."""
        batch = acts.shape[0]
        partial = acts.new_zeros(batch, self.n_layers * self.d_layer_out)
        for layer in range(self.n_layers):
            if acts.shape[1] == self.n_layers:
                layer_acts, layer_within = acts[:, layer], within[:, layer]
            else:
                mine = layer_of[:, 0] == layer
                layer_acts, layer_within = torch.where(mine, acts[:, 0], 0), torch.where(mine, within[:, 0], 0)
            rows = self.W_dec[layer].reshape(self.feature_shard.n_local, -1)
            partial[:, layer * self.d_layer_out :] += sparse_decode(
                layer_acts, layer_within, rows, rows.new_zeros(rows.shape[1]), unit_norm=self.unit_norm_decoder
            )
        return partial

    def _sparsity_loss(self, code: Code) -> Tensor:
        """JumpReLU's penalty over the whole dictionary: this rank's latents' share (from its
        ``pre_acts``), summed over the feature group (every rank then holds the same loss, and
        each share's gradient is its own)."""
        threshold = self.threshold().reshape(-1)  # type: ignore[attr-defined]
        if self.sparsity_loss_mode == "l0":  # type: ignore[attr-defined]
            per_token = StepFunction.apply(code.pre_acts, threshold, self.bandwidth, False).float().sum(dim=-1)  # type: ignore[attr-defined]
        else:
            # The activations again from the pre-activations: the same values, and JumpReLU's
            # backward is linear in its incoming gradient, so two uses add up as one would.
            acts = JumpReLUFunction.apply(code.pre_acts, threshold, self.bandwidth, False)  # type: ignore[attr-defined]
            norms = torch.cat([self.decoder_weight(layer).flatten(1).float().norm(dim=1) for layer in range(self.n_layers)])
            per_token = torch.tanh(self.tanh_scale * acts.float() * norms).sum(dim=-1)  # type: ignore[attr-defined]
        share = self.sparsity_coefficient * per_token.mean()  # type: ignore[attr-defined]
        return _SumPartials.apply(share, self.feature_shard.group)


def _gather_firing(
    acts: Tensor, global_indices: Callable[[Tensor, Tensor], Tensor], shard: FeatureShard
) -> tuple[Tensor, Tensor]:
    """(B, L * n_local) this rank's JumpReLU activations -> every rank's firing latents side by
    side: (B, f * m) values and global indices, zero-padded to the most latents one rank's slice
    fires on one token (one small all-reduce, then an all-gather of B * m per rank)."""
    widest = (acts > 0).sum(dim=1).max().reshape(1) if acts.shape[0] else acts.new_zeros(1, dtype=torch.int64)
    dist.all_reduce(widest, op=dist.ReduceOp.MAX, group=shard.group)
    values, flat = acts.topk(max(int(widest.item()), 1), dim=1)
    return _gather_candidates(values, global_indices(flat // shard.n_local, flat % shard.n_local), shard)



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
