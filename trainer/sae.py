"""The TopK sparse autoencoder: SAELens's parameter layout, kernels from ``trainer.kernels``."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from trainer.kernels import (
    dense_decode,
    dense_topk_encode,
    sparse_decode,
    sparse_topk_encode,
    unit_norm_rows,
)

# encode and decode functions of each ``TopKSAE(kernel=...)``.
_KERNELS = {
    "sparse": (sparse_topk_encode, sparse_decode),
    "dense": (dense_topk_encode, dense_decode),
}


# Norm of TopKSAE's initial encoder columns (its decoder rows start at unit norm): 1/sqrt(3), the
# row norm of a kaiming-uniform ``nn.Linear`` whatever its width, which is where sparsify starts.
# Measured against 1.0 (benchmarks/RESULTS.md): held-out FVU 0.6705 against 0.6919 after 100 steps
# at 16,384 latents; a smaller start overshoots less and Adam's steps move the encoder further.
ENCODER_INIT_NORM = 3**-0.5


def tied_init(
    n_latents: int,
    d_in: int,
    *,
    seed: int | None,
    decoder_norm: float = 1.0,
    encoder_norm: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Tied initial weights ``(W_enc (d_in, n), W_dec (n, d_in))``: Gaussian decoder directions of
    norm ``decoder_norm`` and ``W_enc = W_dec^T`` rescaled to columns of norm ``encoder_norm``
    (``None``: the same as the decoder's). Drawn in fp32 from ``seed`` whatever ``dtype`` is, so the
    same seed gives the same directions in every precision."""
    for name, value in (("decoder_norm", decoder_norm), ("encoder_norm", encoder_norm)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value} must be positive")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    directions = torch.randn(n_latents, d_in, generator=generator, dtype=torch.float32)
    directions /= directions.norm(dim=1, keepdim=True)
    encoder_norm = decoder_norm if encoder_norm is None else encoder_norm
    w_enc = (directions.T * encoder_norm).contiguous().to(dtype)
    return w_enc, (directions * decoder_norm).to(dtype)


def add_tied_parameters(
    module: nn.Module,
    d_in: int,
    n_latents: int,
    *,
    seed: int | None,
    dtype: torch.dtype,
    decoder_norm: float = 1.0,
    encoder_norm: float | None = None,
) -> None:
    """Give ``module`` SAELens's parameters, ``W_enc`` (d_in, n), ``b_enc`` (n,), ``W_dec``
    (n, d_in), ``b_dec`` (d_in,): tied weights from ``tied_init``, zero biases."""
    if d_in <= 0:
        raise ValueError(f"d_in={d_in} must be positive")
    if n_latents <= 0:
        raise ValueError(f"n_latents={n_latents} must be positive")
    w_enc, w_dec = tied_init(
        n_latents, d_in, seed=seed, decoder_norm=decoder_norm, encoder_norm=encoder_norm, dtype=dtype
    )
    module.W_enc = nn.Parameter(w_enc)
    module.b_enc = nn.Parameter(torch.zeros(n_latents, dtype=dtype))
    module.W_dec = nn.Parameter(w_dec)
    module.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))


class ForwardOutput(NamedTuple):
    """What one forward pass of a TopK SAE produces."""

    latent_acts: Tensor
    """(B, k) values of the k selected latents per token (>= 0; zero where fewer than k fire)."""
    latent_indices: Tensor
    """(B, k) indices of the selected latents, in [0, n_latents)."""
    reconstruction: Tensor
    """(B, d_in) decoder output, in the same space as the input."""
    mse: Tensor
    """Scalar: mean squared error over all B * d_in elements."""
    fvu: Tensor
    """Scalar: fraction of variance unexplained, sum of squared errors over the batch's total
    squared deviation from its own mean (1.0 means no better than predicting the mean)."""
    loss: Tensor
    """Scalar the optimizer minimises: ``mse``, a mean over tokens, so averaging gradients across
    data-parallel ranks equals the gradient on the concatenated batch. Its scale follows the
    activations', which the trainer normalises to mean norm sqrt(d_in) (``sae.normalize``); on
    activations of norm about 1 its gradients shrink toward Adam's eps (see benchmarks/README.md)."""


class TopKSAE(nn.Module):
    """TopK SAE (Gao et al. 2024): ``z = topk(relu((x - b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec``.

    The decoder rows are kept at unit norm by normalising them inside ``forward`` from the raw
    parameter (see ``decoder_weight``). ``unit_norm_decoder=False`` turns that off, which is what
    an exported dictionary needs: its rows carry the folded input scale (``folded_weights``).

    ``kernel="sparse"`` (default) runs the encoder GEMM, a cheap top-k and backward passes that
    touch only the k selected latents per token (``trainer.kernels``); ``"dense"`` is the plain
    PyTorch reference. ``compute_dtype`` (e.g. ``torch.bfloat16`` over fp32 parameters) is the
    dtype of the encoder GEMM; ``None`` uses the CPU autocast dtype when autocast is on, else the
    parameters' dtype. Everything else, including the gradients, stays in the parameters' dtype.

    Initialisation (``tied_init``): Gaussian unit-norm decoder rows, ``W_enc`` their transpose
    scaled to columns of norm ``encoder_init_norm`` (default ``ENCODER_INIT_NORM``), zero biases;
    ``init_b_dec`` then centres ``b_dec`` on a sample.
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        unit_norm_decoder: bool = True,
        kernel: str = "sparse",
        compute_dtype: torch.dtype | None = None,
        encoder_init_norm: float = ENCODER_INIT_NORM,
    ) -> None:
        super().__init__()
        if kernel not in _KERNELS:
            raise ValueError(f"kernel={kernel!r}: expected one of {sorted(_KERNELS)}")
        if n_latents > 0 and not 0 < k <= n_latents:  # before allocating (add_tied_parameters checks n)
            raise ValueError(f"k={k} must be in [1, n_latents={n_latents}]")
        add_tied_parameters(self, d_in, n_latents, seed=seed, dtype=dtype, encoder_norm=encoder_init_norm)
        self.d_in = d_in
        self.n_latents = n_latents
        self.k = k
        self.unit_norm_decoder = unit_norm_decoder
        self.kernel = kernel
        self.compute_dtype = compute_dtype

    def decoder_weight(self) -> Tensor:
        """The decoder the forward pass uses: ``W_dec`` with each row scaled to unit norm.

        DeepSpeed ZeRO keeps its own fp32 master copy of every parameter and copies it back into
        the module after each step, so an in-place renormalisation of ``W_dec`` after the step
        would be overwritten (or, in fp32 stage 0, would desynchronise the optimizer state).
        Normalising here, from the raw parameter, needs no access to the optimizer, holds under
        every ZeRO stage and precision, and makes the gradient orthogonal to each row (the radial
        component has no effect on the output), as sparsify's gradient projection does by hand.
        """
        if not self.unit_norm_decoder:
            return self.W_dec
        # eps keeps an all-zero row (never produced by init or training) from dividing by zero.
        return unit_norm_rows(self.W_dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, d_in) -> (acts, indices), each (B, k): the k largest ReLU pre-activations."""
        encode, _ = _KERNELS[self.kernel]
        return encode(x, self.W_enc, self.b_enc, self.b_dec, self.k, compute_dtype=self.compute_dtype)

    def decode(self, acts: Tensor, indices: Tensor) -> Tensor:
        """(B, k) acts and indices -> (B, d_in) reconstruction with the ``decoder_weight`` rows.

        ``kernel="sparse"`` gathers the k decoder rows of each token, scaled by their inverse norms;
        ``"dense"`` scatters into a (B, n_latents) matrix and multiplies. Both give the same values
        and gradients (``tests/trainer/test_kernels.py``).
        """
        _, decode = _KERNELS[self.kernel]
        return decode(acts, indices, self.W_dec, self.b_dec, unit_norm=self.unit_norm_decoder)

    def forward(self, x: Tensor) -> ForwardOutput:
        acts, indices = self.encode(x)
        reconstruction = self.decode(acts, indices)
        # Loss terms in fp32 even when the parameters are bf16: sums over B * d_in elements.
        error = (reconstruction.float() - x.float()).pow(2)
        mse = error.mean()
        total_variance = (x.float() - x.float().mean(dim=0)).pow(2).sum()
        fvu = error.sum() / total_variance
        return ForwardOutput(acts, indices, reconstruction, mse, fvu, loss=mse)

    @torch.no_grad()
    def init_b_dec(
        self, sample: Tensor, *, method: Literal["mean", "geometric_median"] = "geometric_median"
    ) -> None:
        """Set ``b_dec`` to the centre of ``sample`` (N, d_in), given in the space the SAE trains on.

        Call before wrapping in DeepSpeed: the engine copies the parameters into its master
        weights when it is built.
        """
        if sample.ndim != 2 or sample.shape[1] != self.d_in:
            raise ValueError(f"sample shape {tuple(sample.shape)} must be (N, d_in={self.d_in})")
        if method == "mean":
            centre = sample.float().mean(dim=0)
        elif method == "geometric_median":
            centre = geometric_median(sample.float())
        else:
            raise ValueError(f"method={method!r}: expected 'mean' or 'geometric_median'")
        self.b_dec.copy_(centre.to(self.b_dec.dtype))

    @torch.no_grad()
    def folded_weights(self, scale: float) -> dict[str, Tensor]:
        """SAELens-layout weights that act on raw activations, for a model trained on ``x * scale``.

        ``(x s - b_dec) W_enc + b_enc == (x - b_dec / s)(s W_enc) + b_enc`` and the decoder's output
        is divided by s: ``W_dec / s``, ``b_dec / s``. The same fold as SAELens's
        ``fold_activation_norm_scaling_factor``. ``W_dec`` is the unit-norm ``decoder_weight``.
        """
        if not scale > 0:
            raise ValueError(f"scale={scale} must be positive")
        return {
            "W_enc": (self.W_enc * scale).contiguous(),
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": (self.decoder_weight() / scale).contiguous(),
            "b_dec": self.b_dec / scale,
        }


def geometric_median(points: Tensor, *, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to ``points`` (N, d)."""
    median = points.mean(dim=0)
    for _ in range(max_iter):
        # Clamping keeps a point that coincides with the estimate from getting infinite weight.
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        new_median = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = (new_median - median).norm()
        median = new_median
        if shift <= tol * median.norm().clamp_min(1.0):
            break
    return median
