"""Sparse fast paths for TopK-family SAEs, each beside the plain-PyTorch twin it replaces.

The one dense GEMM a TopK SAE step needs is the encoder's ``(B, d) @ (d, n)``. The dense
reference path adds four more of that size (the decoder's ``(B, n) @ (n, d)`` and three in
backward) plus several passes over (B, n) pre-activations. Here:

* ``sparse_topk_encode``: the GEMM (optionally in bf16, 8x fp32 on an AMX CPU: benchmarks/RESULTS.md;
  a 16-bit GEMM gets the bias folded into its operands, ``_bias_folded``) in chunks of rows, each
  reduced at once to its top k by ``relu_topk_rows`` (integer keys, one read of the chunk plus small
  top-ks); backward touches only the k selected latents per token.
* ``sparse_decode``: ``sum_j acts_j * W_dec[indices_j] + b_dec`` as a weighted ``embedding_bag``,
  with the unit-norm constraint applied to the k gathered rows only; backward touches those rows.

Both backward passes scatter B * k weighted rows per block of latents (``_scatter_blocks``, on
aten's ``embedding_bag`` backward) and write each block, still in cache, into the gradient.

``dense_topk_encode`` and ``dense_decode`` are the plain-PyTorch twins (the original ``TopKSAE``
math); ``tests/trainer/test_kernels.py`` checks that values and every gradient agree.

Pure torch: no distributed imports, nothing compiled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.profiler import record_function

__all__ = [
    "NATIVE_BF16_CPU_FLAGS",
    "cpu_flags",
    "dense_decode",
    "dense_topk_encode",
    "encoder_gemm_dtype",
    "native_bf16_matmul",
    "relu_topk_rows",
    "sparse_decode",
    "sparse_topk_encode",
    "topk_rows",
    "unit_norm_rows",
]

# Tokens per encoder chunk: the (B, n) pre-activations are computed and reduced to their top k
# this many rows at a time, so they never exist in full (1 GiB at B = 4096, n = 65536 in fp32).
# The GEMM loses rate below about 256 rows on the reference CPU (benchmarks/RESULTS.md).
ENCODER_CHUNK_ROWS = 512

# Columns per group in ``topk_rows``, at every level of its recursion. torch's CPU top-k costs
# a time per element plus a per-row overhead; eight-wide groups, recursively, cut the elements it
# sorts per row from n to about n / 8 + 2 * 8 * k (fastest of 4, 8, 16, 32 and 64:
# benchmarks/RESULTS.md).
TOPK_GROUP_SIZE = 8

# The inner dimension of the bias-folded encoder GEMM is padded to a multiple of this
# (``_bias_folded``): a whole bf16 AMX tile row (32 values).
BIAS_FOLD_ALIGN = 32

# Signed integer dtypes whose order on a 16-bit float's bits is the float order on non-negative
# values (``relu_topk_rows``). Wider floats select on their own values: their max vectorises already,
# and an fp32 step keeps the exact selection order (and so the bits) of earlier versions.
_ORDER_KEYS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}

# Latents per block of the backward's scatter-adds: a (512, d) fp32 block is about 1.5 MB, so it
# is still in cache when it is copied (transposed, for W_enc) into the gradient.
SCATTER_BLOCK_LATENTS = 512

# The floor of ``unit_norm_rows`` (``SparseCoder.decoder_weight``): keeps an all-zero row from
# dividing by zero.
NORM_EPS = 1e-12


# --------------------------------------------------------------------------- GEMM dtype


NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""The /proc/cpuinfo flags of a CPU that multiplies bf16 natively."""


def native_bf16_matmul(device: str | None = None) -> bool:
    """Whether ``device`` (``"cuda"`` or ``"cpu"``; ``None``: a CUDA GPU if there is one, else the
    CPU) multiplies bf16 matrices natively: a CUDA GPU that supports bf16, or a CPU with AMX
    (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``) in /proc/cpuinfo. Elsewhere a bf16 GEMM is
    emulated and no faster than fp32."""
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def encoder_gemm_dtype(setting: str) -> torch.dtype | None:
    """The ``compute_dtype`` of ``sae.encoder_gemm`` (``param``, ``bf16`` or ``auto``): ``None``
    for the parameters' own dtype."""
    if setting == "bf16" or (setting == "auto" and native_bf16_matmul()):
        return torch.bfloat16
    if setting in ("param", "auto"):
        return None
    raise ValueError(f"encoder_gemm={setting!r}: expected 'param', 'bf16' or 'auto'")


# --------------------------------------------------------------------------- top-k selection


def topk_rows(values: Tensor, k: int, *, group_size: int = TOPK_GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of the 2-D ``values``, unsorted: ``(vals, indices)``.

    Same result as ``values.topk(k, dim=-1, sorted=False)`` up to the order within a row and the
    choice among exactly tied values (the multiset of values is identical). Columns are split into
    groups of ``group_size`` (column c is in group ``c % (n / group_size)``); the k groups with
    the largest maxima hold at least k entries >= every entry outside them, so the top k of those
    ``k * group_size`` candidates is a top k of the row. The k largest group maxima are found the
    same way, recursively, until a level is too small to split.
    """
    n_rows, n = values.shape
    n_groups, remainder = divmod(n, group_size)
    if remainder or k * group_size >= n or k > n_groups:
        return values.topk(k, dim=-1, sorted=False)
    # Group g holds columns g, g + n_groups, ...: the max runs over the outer axis, so it is an
    # elementwise max of group_size contiguous rows (fully vectorised), not a short inner reduction.
    group_max = values.view(n_rows, group_size, n_groups).amax(dim=1)
    _, top_groups = topk_rows(group_max, k, group_size=group_size)
    members = torch.arange(group_size, device=values.device) * n_groups
    candidate_columns = (members[:, None] + top_groups[:, None, :]).view(n_rows, group_size * k)
    top_vals, positions = values.gather(1, candidate_columns).topk(k, dim=-1, sorted=False)
    return top_vals, candidate_columns.gather(1, positions)


def relu_topk_rows(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of ``relu(values)`` per row of the 2-D ``values``: ``(relu'd values,
    indices)``, unsorted. Entries <= 0 all count as 0, so which of them fill a row with fewer than
    k positive entries is arbitrary (their values are 0 either way).

    A 16-bit float's bit pattern read as an int16 orders the non-negative floats as the floats (and
    puts every negative one below them), so bf16 and fp16 values are selected on those integer keys:
    integer max and top-k vectorise where bf16 ones do not (2x faster ``amax`` on the AMX machine:
    benchmarks/RESULTS.md). A NaN then ranks first if its sign bit is clear (as in ``torch.topk``),
    with the negatives if it is set. Wider floats are selected on their values (``topk_rows``).
    """
    key_dtype = _ORDER_KEYS.get(values.dtype)
    if key_dtype is None:
        top_vals, indices = topk_rows(values, k)
        return top_vals.relu(), indices
    _, indices = topk_rows(values.view(key_dtype), k)
    return values.gather(1, indices).relu(), indices


# --------------------------------------------------------------------------- row scatter-add


class _Pairs(NamedTuple):
    """The (token, latent) pairs of a (B, k) index tensor, sorted by latent."""

    latents: Tensor
    """(B * k,) latent of each pair, ascending."""
    tokens: Tensor
    """(B * k,) token (row of the index tensor) of each pair."""
    order: Tensor
    """(B * k,) position of each pair in ``indices.reshape(-1)``."""


def _sort_pairs(indices: Tensor) -> _Pairs:
    # Stable: each latent's terms are summed in token order, so results repeat bit for bit.
    latents, order = indices.reshape(-1).sort(stable=True)
    return _Pairs(latents, torch.div(order, indices.shape[-1], rounding_mode="floor"), order)


def _scatter_blocks(
    rows: Tensor, pairs: _Pairs, weights: Tensor, n_out: int
) -> Iterator[tuple[int, int, Tensor]]:
    """For each block of ``SCATTER_BLOCK_LATENTS`` consecutive latents, ``(start, stop, sums)``
    with ``sums[r - start] = sum of weights[p] * rows[tokens[p]]`` over the pairs p of latent r.

    ``weights`` is in the pairs' (sorted) order. Sums are fp32 or wider: the kernel adds in its
    input dtype, and a frequent latent collects thousands of terms, too many to round to bf16
    one by one. A block (about 1.5 MB) stays in cache while the caller writes it out, in
    whatever layout it needs; no (n_out, d) temporary is ever made.
    """
    accumulate = torch.promote_types(rows.dtype, torch.float32)
    rows, weights = rows.to(accumulate), weights.to(accumulate)
    starts = list(range(0, n_out, SCATTER_BLOCK_LATENTS)) + [n_out]
    bounds = torch.searchsorted(pairs.latents, torch.tensor(starts, device=rows.device)).tolist()
    bag_size = torch.empty(0, dtype=torch.int64, device=rows.device)  # read only in "mean" mode
    for block, (start, stop) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        first, last = bounds[block], bounds[block + 1]
        if first == last:
            yield start, stop, rows.new_zeros(stop - start, rows.shape[1])
            continue
        # aten's own backward of F.embedding_bag (mode 0 = "sum", no padding index), which the
        # public API only reaches through autograd: each pair adds weight * rows[its token].
        yield start, stop, torch.ops.aten._embedding_bag_dense_backward(
            rows, pairs.latents[first:last] - start, pairs.tokens[first:last], bag_size,
            bag_size, stop - start, False, 0, weights[first:last], -1,
        )


def _gather_dot(rows: Tensor, table: Tensor, pairs: _Pairs) -> Tensor:
    """(B * k,) ``table[latents[p]] . rows[tokens[p]]`` for each pair p, in the pairs' order.

    Visiting the pairs in latent order streams the table (larger than the cache) once and reads
    ``rows`` (smaller) at random: faster than token order (benchmarks/RESULTS.md).
    """
    offsets = torch.empty(0, dtype=torch.int64, device=rows.device)  # offset2bag is given
    # aten's backward of embedding_bag with respect to per_sample_weights: exactly these dots.
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows, table, pairs.latents, offsets, pairs.tokens, 0, -1
    )


def _unsort(values: Tensor, pairs: _Pairs, shape: torch.Size) -> Tensor:
    """Values in the pairs' order back in the (B, k) layout of the index tensor."""
    return torch.empty_like(values).index_copy_(0, pairs.order, values).view(shape)


def _weighted_row_sum(indices: Tensor, table: Tensor, weights: Tensor) -> Tensor:
    """(B, d) ``sum_j weights[b, j] * table[indices[b, j]]``."""
    return torch.nn.functional.embedding_bag(
        indices, table, per_sample_weights=weights.to(table.dtype), mode="sum"
    )


# --------------------------------------------------------------------------- encoder


def _resolve_compute_dtype(compute_dtype: torch.dtype | None, param_dtype: torch.dtype) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return param_dtype


class _SparseTopKEncode(torch.autograd.Function):
    """``topk(relu((x - b_dec) W_enc + b_enc))`` with a backward over the selected latents only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        k: int,
        compute_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        centred = x.to(W_enc.dtype) - b_dec
        acts, indices = _chunked_topk_preacts(centred, W_enc, b_enc, k, compute_dtype)
        ctx.save_for_backward(centred, W_enc, acts, indices)
        ctx.mark_non_differentiable(indices)
        ctx.x_dtype = x.dtype
        return acts, indices

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_acts: Tensor, _grad_indices: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        centred, W_enc, acts, indices = ctx.saved_tensors
        n_latents = W_enc.shape[1]
        # ReLU: no gradient where the selected value is 0 (fewer than k positive pre-activations).
        grad_pre = torch.where(acts > 0, grad_acts.to(acts.dtype), 0)
        pairs = _sort_pairs(indices)
        accumulate = torch.promote_types(W_enc.dtype, torch.float32)
        grad_pre_sorted = grad_pre.reshape(-1)[pairs.order].to(accumulate)
        grad_b_enc = torch.zeros(n_latents, dtype=accumulate, device=W_enc.device)
        grad_b_enc.index_add_(0, pairs.latents, grad_pre_sorted)
        grad_W_enc = None
        if ctx.needs_input_grad[1]:
            # Row sums per block of latents, each written transposed into W_enc's (d, n) layout.
            grad_W_enc = torch.empty_like(W_enc)
            for start, stop, sums in _scatter_blocks(centred, pairs, grad_pre_sorted, n_latents):
                grad_W_enc[:, start:stop] = sums.T
        grad_x = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_centred = _weighted_row_sum(indices, W_enc.T.contiguous(), grad_pre)
            grad_x = grad_centred.to(ctx.x_dtype)
            grad_b_dec = -grad_centred.sum(dim=0)
        elif ctx.needs_input_grad[3]:
            # sum_b sum_j grad_pre[b, j] W_enc[:, i_bj] == W_enc @ grad_b_enc: one (d, n) matvec.
            grad_b_dec = -(W_enc @ grad_b_enc.to(W_enc.dtype))
        return grad_x, grad_W_enc, grad_b_enc.to(W_enc.dtype), grad_b_dec, None, None


def _chunked_topk_preacts(
    centred: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Row chunks of ``centred @ W_enc + b_enc`` in ``compute_dtype``, each reduced to its top k
    at once, so the (B, n) pre-activations never exist in full."""
    n_tokens = centred.shape[0]
    n_latents = W_enc.shape[1]
    # The record_function labels name the parts of the step in a torch.profiler trace
    # (benchmarks/bench_step.py); they cost nothing measurable when no profiler runs.
    with torch.autocast("cpu", enabled=False):
        # A 16-bit GEMM folds the bias into a copy of W_enc (over fp32 parameters it copies
        # W_enc anyway, to cast it). An fp32 GEMM makes no copy (it would add its size to the
        # peak: 1.6 GB a rank at 1M latents, bench_scale): addmm adds the bias.
        bias = None
        with record_function("saeforge.encoder.operands"):
            if torch.finfo(compute_dtype).bits < 32:
                inputs, weight = _bias_folded(centred.detach(), W_enc.detach(), b_enc.detach(), compute_dtype)
            else:
                inputs, weight, bias = centred.detach(), W_enc.detach(), b_enc.detach()
        chunk_rows = max(1, min(n_tokens, ENCODER_CHUNK_ROWS))
        buffer = inputs.new_empty((chunk_rows, n_latents))
        acts = torch.empty((n_tokens, k), dtype=W_enc.dtype, device=W_enc.device)
        indices = torch.empty((n_tokens, k), dtype=torch.int64, device=W_enc.device)
        for start in range(0, n_tokens, chunk_rows):
            stop = min(start + chunk_rows, n_tokens)
            with record_function("saeforge.encoder.gemm"):
                if bias is None:
                    pre = torch.mm(inputs[start:stop], weight, out=buffer[: stop - start])
                else:
                    pre = torch.addmm(bias, inputs[start:stop], weight, out=buffer[: stop - start])
            with record_function("saeforge.encoder.topk"):
                top_vals, top_indices = relu_topk_rows(pre, k)
                acts[start:stop] = top_vals
                indices[start:stop] = top_indices
    return acts, indices


def _bias_folded(
    centred: Tensor, W_enc: Tensor, b_enc: Tensor, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(inputs, weight)`` in ``compute_dtype`` with ``inputs @ weight == centred @ W_enc + b_enc``:
    ``inputs`` is ``centred`` with a column of ones, ``weight`` is ``W_enc`` with ``b_enc`` as a row
    beneath it, both padded with zeros to a multiple of ``BIAS_FOLD_ALIGN`` rows of the inner
    dimension.

    The GEMM then adds the bias as it accumulates, instead of ``addmm`` first broadcasting the bias
    into its whole (rows, n) output and adding the product to it, a pass as large as the output
    (a third of the encoder's time with a bf16 GEMM on the AMX machine: benchmarks/RESULTS.md).
    Over fp32 parameters the copy of ``W_enc`` into ``weight`` is the cast a bf16 GEMM makes
    anyway; over bf16 ones it is a copy of n x d 16-bit values, smaller than the (B, n) pass it saves.
    """
    d, n = W_enc.shape
    width = -(-(d + 1) // BIAS_FOLD_ALIGN) * BIAS_FOLD_ALIGN
    weight = W_enc.new_empty((width, n), dtype=compute_dtype)
    weight[:d] = W_enc
    weight[d] = b_enc
    weight[d + 1:] = 0
    inputs = centred.new_zeros((centred.shape[0], width), dtype=compute_dtype)
    inputs[:, :d] = centred
    inputs[:, d] = 1
    return inputs, weight


def sparse_topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(acts, indices)``, each (..., k): the k largest of ``relu((x - b_dec) @ W_enc + b_enc)``.

    ``W_enc`` (d, n), ``b_enc`` (n,), ``b_dec`` (d,), ``x`` (..., d). The GEMM runs in
    ``compute_dtype`` (default: the CPU autocast dtype when autocast is on, else ``W_enc.dtype``);
    ``acts`` come back in ``W_enc.dtype`` (bf16-exact values when computed in bf16). Backward
    gives every input its gradient, touching only the k selected latents per token; ``x`` gets
    one only if it requires grad.
    """
    if W_enc.ndim != 2 or x.shape[-1] != W_enc.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and W_enc {tuple(W_enc.shape)}: expected (..., d) and (d, n)")
    dtype = _resolve_compute_dtype(compute_dtype, W_enc.dtype)
    flat = x.reshape(-1, x.shape[-1])
    acts, indices = _SparseTopKEncode.apply(flat, W_enc, b_enc, b_dec, k, dtype)
    return acts.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)


def dense_topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin of ``sparse_topk_encode``: the full (..., n) pre-activations, ReLU,
    ``torch.topk``, and autograd for the backward.

    With a ``compute_dtype`` narrower than the parameters, the pre-activations take the values
    of the low-precision GEMM and the gradient of the parameter-dtype one (what the fast path's
    backward computes); this twin pays for both GEMMs.
    """
    dtype = _resolve_compute_dtype(compute_dtype, W_enc.dtype)
    with torch.autocast("cpu", enabled=False):
        centred = x.to(W_enc.dtype) - b_dec
        flat = centred.reshape(-1, centred.shape[-1])
        pre = torch.addmm(b_enc, flat, W_enc)
        if dtype != W_enc.dtype:
            low = torch.addmm(b_enc.detach().to(dtype), flat.detach().to(dtype), W_enc.detach().to(dtype))
            pre = pre + (low.to(pre.dtype) - pre).detach()
        acts, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return acts.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)


# --------------------------------------------------------------------------- decoder


def unit_norm_rows(W_dec: Tensor) -> Tensor:
    """``W_dec`` with each row scaled to unit norm (rows of norm below 1e-12 divided by 1e-12)."""
    return W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


class _SparseDecode(torch.autograd.Function):
    """``sum_j acts_j * row(indices_j) + b_dec`` where row(i) is ``W_dec[i]``, or ``W_dec[i] /
    |W_dec[i]|`` with ``unit_norm``; backward touches only the gathered rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        acts: Tensor,
        indices: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        unit_norm: bool,
    ) -> Tensor:
        acts = acts.to(W_dec.dtype)
        inv_norm = None
        weights = acts
        if unit_norm:
            # All n row norms cost one read of W_dec (n * d); gathering k norms per token instead
            # would read B * k rows, more than n whenever B * k > n.
            inv_norm = W_dec.detach().norm(dim=1).clamp_min(NORM_EPS).reciprocal()
            weights = acts * inv_norm[indices]
        with torch.autocast("cpu", enabled=False):
            reconstruction = _weighted_row_sum(indices, W_dec, weights) + b_dec
        ctx.save_for_backward(indices, W_dec, weights, inv_norm)
        return reconstruction

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        indices, W_dec, weights, inv_norm = ctx.saved_tensors
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        pairs = _sort_pairs(indices)
        # dots[p] = W_dec[latent p] . grad_out[token p]: the gradient of each raw row weight.
        dots = _gather_dot(grad_out, W_dec, pairs)
        grad_acts = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_acts = _unsort(dots, pairs, indices.shape)
            if inv_norm is not None:
                grad_acts = grad_acts * inv_norm[indices]
        if ctx.needs_input_grad[2]:
            weights_sorted = weights.reshape(-1)[pairs.order]
            radial = None
            if inv_norm is not None:
                # d(w / |w|) / dw = (I - u u^T) / |w| with u = w / |w|; the 1 / |w| is already
                # in ``weights``, so subtract each row's component along u. That component,
                # u . grad[r] = sum over the pairs of r of weights * dots / |w|, is a scatter of
                # B * k scalars. A row whose norm hit the floor is divided by a constant: no
                # projection.
                accumulate = torch.promote_types(W_dec.dtype, torch.float32)
                radial = torch.zeros(W_dec.shape[0], dtype=accumulate, device=W_dec.device)
                radial.index_add_(0, pairs.latents, (weights_sorted * dots).to(accumulate))
                radial *= inv_norm.to(accumulate).square()
                radial = torch.where(inv_norm < 1 / NORM_EPS, radial, 0).unsqueeze(1)
            grad_W_dec = torch.empty_like(W_dec)
            for start, stop, sums in _scatter_blocks(grad_out, pairs, weights_sorted, W_dec.shape[0]):
                if radial is not None:
                    sums.addcmul_(W_dec[start:stop], radial[start:stop], value=-1)
                grad_W_dec[start:stop] = sums
        grad_b_dec = grad_out.sum(dim=0) if ctx.needs_input_grad[3] else None
        return grad_acts, None, grad_W_dec, grad_b_dec, None


def sparse_decode(
    acts: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *, unit_norm: bool = True
) -> Tensor:
    """(..., d) reconstruction ``sum_j acts[..., j] * row(indices[..., j]) + b_dec``.

    ``acts`` and ``indices`` (..., k), ``W_dec`` (n, d), ``b_dec`` (d,); row(i) is ``W_dec[i]``
    normalised to unit norm when ``unit_norm`` (as ``unit_norm_rows``), else ``W_dec[i]``.
    Gradients reach ``acts``, ``W_dec`` and ``b_dec``; ``W_dec``'s is zero outside the gathered
    rows and, with ``unit_norm``, orthogonal to each row.
    """
    if W_dec.ndim != 2 or acts.shape != indices.shape:
        raise ValueError(
            f"acts {tuple(acts.shape)}, indices {tuple(indices.shape)}, W_dec {tuple(W_dec.shape)}: "
            "expected acts and indices of one shape (..., k) and W_dec (n, d)"
        )
    k = acts.shape[-1]
    flat_acts = acts.reshape(-1, k)
    flat_indices = indices.reshape(-1, k).long()
    out = _SparseDecode.apply(flat_acts, flat_indices, W_dec, b_dec, unit_norm)
    return out.view(*acts.shape[:-1], W_dec.shape[1])


def dense_decode(
    acts: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *, unit_norm: bool = True
) -> Tensor:
    """Plain-PyTorch twin of ``sparse_decode``: scatter into (..., n) and multiply by the
    (normalised) decoder."""
    decoder = unit_norm_rows(W_dec) if unit_norm else W_dec
    dense = acts.new_zeros(acts.shape[:-1] + (W_dec.shape[0],)).to(decoder.dtype)
    dense = dense.scatter(-1, indices, acts.to(decoder.dtype))
    return dense @ decoder + b_dec
