"""The sparse TopK kernels against their plain-PyTorch twins: values and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from trainer import kernels
from trainer.kernels import (
    dense_decode,
    dense_topk_encode,
    encoder_gemm_dtype,
    relu_topk_rows,
    sparse_decode,
    sparse_topk_encode,
    topk_rows,
    unit_norm_rows,
)
from trainer.sae import TopKSAE

# (parameter dtype, GEMM dtype): fp32 throughout, bf16 GEMM over fp32 parameters (the fast
# training setting), bf16 parameters (DeepSpeed's bf16 mode).
DTYPE_SETUPS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
]


def _assert_agree(fast: Tensor, slow: Tensor, dtype: torch.dtype, msg: str | None = None) -> None:
    """The two paths sum the same terms in different orders (a sparse scatter against a dense
    GEMM), so they differ by rounding: a few fp32 ulps of sums over ~1000 terms; in bf16 about
    0.5% of the tensor's largest entry (both paths are that far from a float64 reference)."""
    if dtype == torch.bfloat16:
        scale = slow.detach().abs().max().float().item()
        torch.testing.assert_close(fast, slow, rtol=2e-2, atol=1e-2 * scale, msg=msg)
    else:
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5, msg=msg)


def _params(d: int, n: int, *, seed: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """W_enc (d, n), b_enc (n,), W_dec (n, d) with rows off unit norm, b_dec (d,): leaf tensors."""
    generator = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, n, generator=generator) / d**0.5
    b_enc = 0.1 * torch.randn(n, generator=generator)
    W_dec = torch.randn(n, d, generator=generator) * (torch.rand(n, 1, generator=generator) + 0.5)
    b_dec = 0.1 * torch.randn(d, generator=generator)
    return [p.to(dtype).requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]


def _clone(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _without_boundary_ties(
    x: Tensor, params: list[Tensor], k: int, compute_dtype: torch.dtype
) -> Tensor:
    """The rows of ``x`` whose k-th and (k+1)-th pre-activations differ (or are both <= 0).

    In bf16 exact ties are common, and which of two tied latents is selected is arbitrary: the
    paths may legitimately differ there. Elsewhere the selection is unique and must agree.
    """
    W_enc, b_enc, _, b_dec = (p.detach() for p in params)
    centred = (x.to(W_enc.dtype) - b_dec).to(compute_dtype)
    pre = torch.addmm(b_enc.to(compute_dtype), centred, W_enc.to(compute_dtype))
    top = pre.topk(k + 1, dim=-1).values
    unique = (top[:, k - 1] > top[:, k]) | (top[:, k - 1] <= 0)
    assert unique.float().mean() > 0.5, "test data should be mostly tie-free"
    return x[unique]


def _densify(acts: Tensor, indices: Tensor, n: int) -> Tensor:
    """(B, n) with the selected values in place: equal for any order or choice among zeros."""
    return torch.zeros(acts.shape[0], n, dtype=acts.dtype).scatter(1, indices, acts)


def _autoencoder_loss(encode, decode, x: Tensor, params: list[Tensor], k: int, **kwargs) -> tuple:
    W_enc, b_enc, W_dec, b_dec = params
    acts, indices = encode(x, W_enc, b_enc, b_dec, k, **kwargs)
    reconstruction = decode(acts, indices, W_dec, b_dec)
    loss = (reconstruction.float() - x.float()).pow(2).mean()
    loss.backward()
    return acts, indices, reconstruction, loss


# --------------------------------------------------------------------------- topk_rows


@pytest.mark.parametrize("shape, k", [((7, 4096), 32), ((5, 1000), 8), ((3, 256), 8), ((4, 64), 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_returns_the_values_of_torch_topk(shape: tuple[int, int], k: int, dtype) -> None:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    top_vals, top_indices = topk_rows(values, k)
    expected = values.topk(k, dim=-1).values
    torch.testing.assert_close(top_vals.sort(dim=1, descending=True).values, expected, rtol=0, atol=0)
    torch.testing.assert_close(values.gather(1, top_indices), top_vals, rtol=0, atol=0)
    assert top_indices.sort(dim=1).values.diff(dim=1).gt(0).all()  # k distinct columns per row


def test_topk_rows_with_ties_and_constant_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    values = torch.randint(0, 4, (6, 2048), generator=generator).float()  # massive ties
    values[0] = 0.0
    values[1] = -1.0
    values[2, 100] = 7.0  # a single large entry among ties
    top_vals, top_indices = topk_rows(values, 32)
    torch.testing.assert_close(
        top_vals.sort(dim=1, descending=True).values, values.topk(32, dim=-1).values
    )
    torch.testing.assert_close(values.gather(1, top_indices), top_vals)
    assert top_indices.sort(dim=1).values.diff(dim=1).gt(0).all()
    assert 100 in top_indices[2].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_relu_topk_rows_selects_the_largest_relu_values(dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(9, 4096, generator=generator).to(dtype)
    values[0] = -values[0].abs()  # nothing positive: every selected value is 0
    values[1, :10] = values[1, :10].abs() + 5  # fewer than k positive entries: the rest are 0
    values[1, 10:] = -values[1, 10:].abs()
    values[2, 5] = -0.0  # -0.0 reads as the smallest integer key, and counts as 0
    values[3, 1000] = float("inf")
    top_vals, top_indices = relu_topk_rows(values, 32)
    expected = values.relu().topk(32, dim=-1).values
    torch.testing.assert_close(top_vals.sort(dim=1, descending=True).values, expected, rtol=0, atol=0)
    torch.testing.assert_close(values.gather(1, top_indices).relu(), top_vals, rtol=0, atol=0)
    assert top_indices.sort(dim=1).values.diff(dim=1).gt(0).all()  # k distinct columns per row
    assert set(range(10)) <= set(top_indices[1].tolist()) and 1000 in top_indices[3].tolist()


def test_encoder_gemm_setting_resolves_to_a_dtype() -> None:
    assert encoder_gemm_dtype("param") is None and encoder_gemm_dtype("bf16") == torch.bfloat16
    assert encoder_gemm_dtype("auto") == (torch.bfloat16 if kernels.native_bf16_matmul() else None)
    with pytest.raises(ValueError, match="encoder_gemm='fp16': expected 'param', 'bf16' or 'auto'"):
        encoder_gemm_dtype("fp16")


def test_native_bf16_matmul_follows_the_cpu_flags() -> None:
    if torch.cuda.is_available():
        pytest.skip("the CUDA answer is torch.cuda.is_bf16_supported()")
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert kernels.native_bf16_matmul() == bool({"amx_bf16", "avx512_bf16"} & set(flags))


# --------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("param_dtype, compute_dtype", DTYPE_SETUPS)
def test_sparse_encode_matches_dense_values_and_gradients(param_dtype, compute_dtype) -> None:
    d, n, k = 24, 512, 16
    x = torch.randn(96, d, generator=torch.Generator().manual_seed(10)).to(param_dtype)
    x = _without_boundary_ties(x, _params(d, n, seed=3, dtype=param_dtype), k, compute_dtype)
    weights = torch.randn(n, generator=torch.Generator().manual_seed(11)).to(param_dtype)
    results = []
    for encode in (sparse_topk_encode, dense_topk_encode):
        W_enc, b_enc, _, b_dec = _params(d, n, seed=3, dtype=param_dtype)
        acts, indices = encode(x, W_enc, b_enc, b_dec, k, compute_dtype=compute_dtype)
        # Depends on which latents fired and how strongly, not on their order within a row.
        (acts.float() * weights[indices].float()).pow(2).sum().backward()
        results.append((_densify(acts, indices, n), W_enc.grad, b_enc.grad, b_dec.grad))
    assert results[0][0].dtype == param_dtype
    for fast, slow in zip(results[0], results[1], strict=True):
        _assert_agree(fast, slow, param_dtype)


def test_sparse_encode_gradient_reaches_x_when_it_requires_grad() -> None:
    d, n, k = 16, 256, 8
    weights = torch.randn(n, generator=torch.Generator().manual_seed(3))
    grads = []
    for encode in (sparse_topk_encode, dense_topk_encode):
        x = torch.randn(3, 10, d, generator=torch.Generator().manual_seed(2)).requires_grad_()
        W_enc, b_enc, _, b_dec = _params(d, n, seed=4)
        acts, indices = encode(x, W_enc, b_enc, b_dec, k)
        assert acts.shape == indices.shape == (3, 10, k)
        (acts * weights[indices]).sum().backward()
        grads.append((x.grad, b_dec.grad, W_enc.grad))
    for fast, slow in zip(*grads, strict=True):
        torch.testing.assert_close(fast, slow)


def test_sparse_encode_gradients_touch_only_selected_latents() -> None:
    d, n, k = 16, 512, 4
    W_enc, b_enc, _, b_dec = _params(d, n, seed=5)
    acts, indices = sparse_topk_encode(torch.randn(6, d), W_enc, b_enc, b_dec, k)
    acts.sum().backward()
    fired = torch.zeros(n, dtype=torch.bool)
    fired[indices[acts > 0]] = True
    assert (W_enc.grad[:, ~fired] == 0).all() and (b_enc.grad[~fired] == 0).all()
    assert (W_enc.grad[:, fired] != 0).any(dim=0).all()


def test_chunked_encode_equals_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    d, n, k = 16, 256, 8
    x = torch.randn(50, d, generator=torch.Generator().manual_seed(6))
    params = _params(d, n, seed=6)
    whole = sparse_topk_encode(x, params[0], params[1], params[3], k)
    monkeypatch.setattr(kernels, "ENCODER_CHUNK_ROWS", 7)  # 7-row chunks, ragged tail
    chunked = sparse_topk_encode(x, params[0], params[1], params[3], k)
    torch.testing.assert_close(_densify(*chunked, n), _densify(*whole, n))


def test_autocast_sets_the_gemm_dtype() -> None:
    d, n, k = 16, 256, 8
    x = torch.randn(20, d)
    W_enc, b_enc, _, b_dec = _params(d, n, seed=7)
    explicit = sparse_topk_encode(x, W_enc, b_enc, b_dec, k, compute_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sparse_topk_encode(x, W_enc, b_enc, b_dec, k)
    assert autocast[0].dtype == torch.float32  # parameters' dtype, bf16-exact values
    torch.testing.assert_close(autocast[0], autocast[0].bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(_densify(*autocast, n), _densify(*explicit, n), rtol=0, atol=0)


# --------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("unit_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_matches_dense_values_and_gradients(unit_norm: bool, dtype) -> None:
    n, d, k = 300, 24, 12
    generator = torch.Generator().manual_seed(20)
    indices = torch.rand(40, n, generator=generator).argsort(dim=1)[:, :k]
    acts_init = torch.rand(40, k, generator=generator).to(dtype)
    acts_init[:5, -3:] = 0.0  # zero activations carry gradient to acts, none to their rows
    grad_out = torch.randn(40, d, generator=generator).to(dtype)
    results = []
    for decode in (sparse_decode, dense_decode):
        acts = acts_init.clone().requires_grad_()
        _, _, W_dec, b_dec = _params(d, n, seed=21, dtype=dtype)
        out = decode(acts, indices, W_dec, b_dec, unit_norm=unit_norm)
        out.backward(grad_out)
        results.append((out, acts.grad, W_dec.grad, b_dec.grad))
    assert results[0][0].dtype == dtype
    for fast, slow in zip(results[0], results[1], strict=True):
        _assert_agree(fast, slow, dtype)


def test_sparse_decode_gradient_is_zero_off_the_gathered_rows_and_orthogonal_on_them() -> None:
    n, d, k = 200, 16, 4
    _, _, W_dec, b_dec = _params(d, n, seed=22)
    indices = torch.randint(0, n, (10, k))
    sparse_decode(torch.rand(10, k), indices, W_dec, b_dec).pow(2).sum().backward()
    gathered = torch.zeros(n, dtype=torch.bool)
    gathered[indices] = True
    assert (W_dec.grad[~gathered] == 0).all()
    radial = (W_dec.grad * W_dec.detach()).sum(dim=1)
    scale = W_dec.grad.norm(dim=1) * W_dec.detach().norm(dim=1)
    assert (radial.abs() <= 1e-6 * scale).all()


def _scatter_add_rows(rows: Tensor, indices: Tensor, weights: Tensor, n_out: int) -> Tensor:
    """(n_out, d) ``out[indices[b, j]] += weights[b, j] * rows[b]`` from the backward passes' block
    scatter (``kernels._scatter_blocks``), the blocks laid side by side."""
    pairs = kernels._sort_pairs(indices)
    blocks = kernels._scatter_blocks(rows, pairs, weights.reshape(-1)[pairs.order], n_out)
    return torch.cat([sums for _, _, sums in blocks])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_scatter_of_the_backward_matches_index_add(dtype) -> None:
    generator = torch.Generator().manual_seed(23)
    rows = torch.randn(50, 12, generator=generator).to(dtype)
    indices = torch.randint(0, 1100, (50, 6), generator=generator)  # several scatter blocks
    indices[:, 0] = 7  # one latent collects a term from every row
    weights = torch.randn(50, 6, generator=generator).to(dtype)
    expected = torch.zeros(1100, 12, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), (weights.double()[..., None] * rows.double()[:, None]).reshape(-1, 12)
    )
    out = _scatter_add_rows(rows, indices, weights, 1100)
    assert out.dtype == torch.float32  # accumulated in fp32 even from bf16
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_unit_norm_rows_matches_the_sae_decoder_weight() -> None:
    sae = TopKSAE(8, 32, 4, seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) + 0.5)
    torch.testing.assert_close(unit_norm_rows(sae.W_dec), sae.decoder_weight())


# --------------------------------------------------------------------------- together


@pytest.mark.parametrize("param_dtype, compute_dtype", DTYPE_SETUPS)
def test_topk_sae_kernels_agree_on_outputs_and_every_gradient(param_dtype, compute_dtype) -> None:
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(30)) * 2 + 0.5
    sample = torch.randn(64, 32, generator=torch.Generator().manual_seed(31)) + 0.5
    outputs, grads = [], []
    for kernel in ("sparse", "dense"):
        sae = TopKSAE(32, 384, 16, seed=1, kernel=kernel, compute_dtype=compute_dtype)
        sae.init_b_dec(sample)
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(384, 1, generator=torch.Generator().manual_seed(2)) + 0.5)
        sae.to(param_dtype)
        if kernel == "sparse":
            params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
            x = _without_boundary_ties(x.to(param_dtype), params, 16, compute_dtype)
        out = sae(x.to(param_dtype))
        out.loss.backward()
        outputs.append(out)
        grads.append({name: p.grad for name, p in sae.named_parameters()})
    fast, slow = outputs
    _assert_agree(
        _densify(fast.latent_acts, fast.latent_indices, 384),
        _densify(slow.latent_acts, slow.latent_indices, 384),
        param_dtype,
    )
    for field in ("reconstruction", "mse", "fvu", "loss"):
        _assert_agree(getattr(fast, field), getattr(slow, field), param_dtype, msg=field)
    for name in grads[1]:
        _assert_agree(grads[0][name], grads[1][name], param_dtype, msg=name)


def _duplicated_latents_sae(kernel: str) -> TopKSAE:
    """32 distinct latents, each twice (latent j and j + 32 identical): exact ties in every row."""
    sae = TopKSAE(16, 64, 8, seed=2, kernel=kernel)
    with torch.no_grad():
        sae.W_enc[:, 32:] = sae.W_enc[:, :32]
        sae.b_enc.copy_(0.05 * torch.arange(64) % 32)
        sae.b_enc[32:] = sae.b_enc[:32]
        sae.W_dec[32:] = sae.W_dec[:32]
    return sae


def test_kernels_agree_under_exact_ties() -> None:
    """Which copy of a tied latent is chosen is arbitrary; the output and the gradient summed over
    the two copies are not."""
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(31))
    results = []
    for kernel in ("sparse", "dense"):
        sae = _duplicated_latents_sae(kernel)
        out = sae(x)
        out.loss.backward()
        dense = _densify(out.latent_acts, out.latent_indices, 64)
        results.append(
            (
                dense[:, :32] + dense[:, 32:],
                out.reconstruction,
                out.loss,
                sae.W_enc.grad[:, :32] + sae.W_enc.grad[:, 32:],
                sae.b_enc.grad[:32] + sae.b_enc.grad[32:],
                sae.W_dec.grad[:32] + sae.W_dec.grad[32:],
                sae.b_dec.grad,
            )
        )
    for fast, slow in zip(*results, strict=True):
        torch.testing.assert_close(fast, slow)


def test_kernels_agree_when_fewer_than_k_latents_fire() -> None:
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(32))
    x[0] = 0.0  # a token with no input at all
    results = []
    for kernel in ("sparse", "dense"):
        sae = TopKSAE(16, 128, 12, seed=3, kernel=kernel)
        with torch.no_grad():
            sae.b_enc.fill_(-3.0)  # most pre-activations negative: ReLU leaves < k positive
        out = sae(x)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in sae.named_parameters()}))
    (fast, fast_grads), (slow, slow_grads) = results
    assert ((fast.latent_acts > 0).sum(dim=1) < 12).all()
    assert (fast.latent_acts[0] == 0).all()
    torch.testing.assert_close(
        _densify(fast.latent_acts, fast.latent_indices, 128),
        _densify(slow.latent_acts, slow.latent_indices, 128),
    )
    torch.testing.assert_close(fast.reconstruction, slow.reconstruction)
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], msg=name)


def test_topk_sae_rejects_an_unknown_kernel() -> None:
    with pytest.raises(ValueError, match=r"kernel='fused': expected one of \['dense', 'sparse'\]"):
        TopKSAE(8, 32, 4, kernel="fused")
