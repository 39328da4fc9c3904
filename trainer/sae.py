"""The SAE family: one base class (``SparseCoder``), one forward result (``ForwardOutput``), and
``TopKSAE``, the workhorse. The other architectures live in ``trainer.architectures``; every one is
a ``SparseCoder`` subclass named in ``trainer.registry``.

What the base owns, once for every architecture:

* the parameters, in SAELens's layout: ``W_enc`` (d_in, n), ``b_enc`` (n,), ``W_dec`` (n, d_out),
  ``b_dec`` (d_out,), initialised tied (``tied_init``). ``d_out`` differs from ``d_in`` for a
  transcoder, which must not subtract ``b_dec`` from its input (``apply_b_dec_to_input=False``).
  A skip transcoder (``skip_connection=True``) also has ``W_skip`` (d_in, d_out), zero at
  initialisation: an affine path ``x W_skip`` beside the sparse one (``skip_output``);
* the decoder-norm rule (``decoder_weight``): rows normalised inside ``forward`` from the raw
  parameter, or used as they are (``unit_norm_decoder=False``);
* the forward pass: ``reconstruct`` (``encode``, then ``decode``, plus ``skip_output``; ``decode``
  alone is the sparse path), the reconstruction error
  (``trainer.losses.reconstruction_error``, the one MSE / FVU) against the target (``x``, or
  ``target=`` for a transcoder), and the loss ``fit_loss + sparsity_loss + aux_loss``. A subclass
  overrides the pieces that differ: ``encode`` always, the loss terms where it has them;
* the fold (``folded_weights``): the input and target scales folded into the saved weights;
* ``init_b_dec``, ``full_state_dict`` and building from an ``SAEConfig`` (``from_config``) or a
  saved ``cfg.json`` (``for_inference``).

The next architectures fit the same shapes: a cross-layer transcoder is one encoder and the
decoders of several layers side by side in ``W_dec``'s columns (``d_out`` their summed widths, the
targets concatenated the same way).

Pure torch: nothing distributed (``trainer.feature_parallel`` wraps a model from outside).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from trainer.kernels import (
    dense_decode,
    dense_topk_encode,
    encoder_gemm_dtype,
    sparse_decode,
    sparse_topk_encode,
    unit_norm_rows,
)
from trainer.losses import AUXK_COEFFICIENT, ReconstructionError, auxk_loss, reconstruction_error

# Norm of TopKSAE's initial encoder columns (its decoder rows start at unit norm): 1/sqrt(3), the
# row norm of a kaiming-uniform ``nn.Linear`` whatever its width, which is where sparsify starts.
# A smaller start than 1.0 overshoots less and Adam's steps move the encoder further: lower
# held-out FVU after the same steps (benchmarks/RESULTS.md).
ENCODER_INIT_NORM = 3**-0.5


def tied_init(
    n_latents: int,
    d_in: int,
    *,
    seed: int | None,
    d_out: int | None = None,
    decoder_norm: float = 1.0,
    encoder_norm: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Initial weights ``(W_enc (d_in, n), W_dec (n, d_out))``: Gaussian decoder directions of norm
    ``decoder_norm`` and ``W_enc = W_dec^T`` rescaled to columns of norm ``encoder_norm``
    (``None``: the same as the decoder's). With ``d_out != d_in`` (a transcoder) the encoder
    directions are drawn after the decoder's, from the same generator. Drawn in fp32 from
    ``seed`` whatever ``dtype`` is, so the same seed gives the same directions in every precision."""
    for name, value in (("decoder_norm", decoder_norm), ("encoder_norm", encoder_norm)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value} must be positive")
    d_out = d_in if d_out is None else d_out
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    directions = _unit_directions(n_latents, d_out, generator)
    encoder = directions if d_out == d_in else _unit_directions(n_latents, d_in, generator)
    encoder_norm = decoder_norm if encoder_norm is None else encoder_norm
    w_enc = (encoder.T * encoder_norm).contiguous().to(dtype)
    return w_enc, (directions * decoder_norm).to(dtype)


def _unit_directions(n: int, d: int, generator: torch.Generator | None) -> Tensor:
    directions = torch.randn(n, d, generator=generator, dtype=torch.float32)
    directions /= directions.norm(dim=1, keepdim=True)  # in place: no second (n, d) copy at 1M latents
    return directions


class ForwardOutput(NamedTuple):
    """What one forward pass of any architecture produces."""

    latent_acts: Tensor
    """TopK: (B, k) values of the selected latents (>= 0; zero where fewer than k fire). Dense
    architectures: (B, n_latents), zero where a latent did not fire."""
    latent_indices: Tensor | None
    """TopK: (B, k) indices of the selected latents, in [0, n_latents). ``None`` for dense ones."""
    reconstruction: Tensor
    """(B, d_out) the prediction, in the space of the target (``x`` for an SAE): the decoder's
    output plus, for a skip transcoder, ``skip_output(x)``."""
    mse: Tensor
    """Scalar: mean squared error against the target over all B * d_out elements (fp32)."""
    fvu: Tensor
    """Scalar: fraction of variance unexplained, the squared error summed over the batch over the
    target's total squared deviation from its batch mean (1.0: no better than the mean; fp32)."""
    sparsity_loss: Tensor
    """Scalar: the weighted sparsity penalty (L1, L0 or tanh) already in ``loss``; 0 for TopK-style
    architectures, whose sparsity is structural."""
    aux_loss: Tensor
    """Scalar: the weighted auxiliary term already in ``loss`` (AuxK; JumpReLU's optional pre-act
    loss); 0 when no ``dead_mask`` is given or nothing is dead."""
    loss: Tensor
    """Scalar the optimizer minimises: ``fit_loss`` + ``sparsity_loss`` + ``aux_loss``. TopK-style
    architectures fit ``mse`` (Matryoshka: the sum of every prefix's), penalised ones (ReLU,
    JumpReLU) the papers' per-token squared L2 error (``mse * d_out``), so published sparsity
    coefficients carry over. All are means over tokens, so averaging gradients across
    data-parallel ranks equals the full-batch gradient. The scale follows the activations', which
    the trainer normalises to mean norm sqrt(d_in) (``sae.normalize_activations``)."""
    l0: Tensor
    """Scalar, no gradient: mean number of latents firing (> 0) per token."""


class Code(NamedTuple):
    """What ``encode`` gives ``decode`` and the loss terms."""

    acts: Tensor
    """(B, k) selected values with ``indices``, or (B, n_latents) dense activations."""
    indices: Tensor | None
    """(B, k) latent indices of ``acts``; ``None`` for dense activations."""
    pre_acts: Tensor | None
    """(B, n_latents) pre-activations where the encoder computed them all (dense architectures),
    for the loss terms that need them (AuxK, JumpReLU's L0); ``None`` otherwise."""


class SparseCoder(nn.Module):
    """The base of every architecture: parameters, decoder-norm rule, forward pass and fold (see
    the module docstring). A subclass sets ``architecture`` (its ``trainer.registry`` name, or its
    ``"module:Class"`` path) and ``saelens_architecture`` (the SAELens 6 inference architecture its
    dictionary is saved as: ``topk``, ``standard`` or ``jumprelu``), and implements ``encode``.
    """

    architecture: ClassVar[str]
    """The name ``sae.architecture`` gives it (recorded in the dictionary's metadata)."""
    saelens_architecture: ClassVar[str]
    """The SAELens 6 inference architecture the saved dictionary uses."""
    transcoder_capable: ClassVar[bool] = True
    """Whether it can be trained as a transcoder (``from_config(..., transcoder=True)``): False
    where the loss reconstructs the model's own input in a way a target cannot replace."""
    auxk_coefficient: float = 0.0
    """Weight of the AuxK loss over dead latents (``aux_loss``); 0 for architectures without it."""
    k_aux: int | None = None
    """AuxK: dead latents used to model the residual (``None``: d_out // 2)."""

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *,
        d_out: int | None,
        seed: int | None,
        dtype: torch.dtype,
        apply_b_dec_to_input: bool,
        unit_norm_decoder: bool,
        decoder_init_norm: float = 1.0,
        encoder_init_norm: float | None = None,
        skip_connection: bool = False,
    ) -> None:
        super().__init__()
        d_out = d_in if d_out is None else d_out
        for name, value in (("d_in", d_in), ("d_out", d_out), ("n_latents", n_latents)):
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if apply_b_dec_to_input and d_out != d_in:
            raise ValueError(
                f"d_out={d_out} differs from d_in={d_in}: a transcoder cannot subtract b_dec from its "
                "input (apply_b_dec_to_input=False)"
            )
        if skip_connection and apply_b_dec_to_input:
            raise ValueError(
                "skip_connection=True needs a transcoder (apply_b_dec_to_input=False): a skip from the "
                "input to its own reconstruction would learn the identity"
            )
        w_enc, w_dec = tied_init(
            n_latents, d_in, d_out=d_out, seed=seed, decoder_norm=decoder_init_norm,
            encoder_norm=encoder_init_norm, dtype=dtype,
        )
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(n_latents, dtype=dtype))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        # Zero at the start: the skip transcoder begins as the plain one (SAELens and sparsify do too).
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out, dtype=dtype)) if skip_connection else None
        self.d_in, self.d_out, self.n_latents = d_in, d_out, n_latents
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.unit_norm_decoder = unit_norm_decoder

    # ----------------------------------------------------------------------- building

    @classmethod
    def from_config(
        cls,
        sae_cfg: Any,
        *,
        d_in: int,
        d_out: int | None = None,
        seed: int | None,
        dtype: torch.dtype = torch.float32,
        transcoder: bool = False,
    ) -> SparseCoder:
        """A freshly initialised model of the ``SAEConfig`` ``sae_cfg``. The base passes the width
        and the common arguments; a subclass adds the settings it reads (``config_options``).
        ``transcoder=True`` builds a transcoder (``apply_b_dec_to_input=False``), with ``W_skip``
        where ``sae_cfg.skip_connection`` is set; an architecture that is not ``transcoder_capable``
        is refused."""
        options = dict(d_out=d_out, seed=seed, dtype=dtype, **cls.config_options(sae_cfg))
        skip_connection = bool(getattr(sae_cfg, "skip_connection", False))
        if transcoder:
            if not cls.transcoder_capable:
                raise ValueError(
                    f"sae.architecture={sae_cfg.architecture!r} cannot be a transcoder ({cls.__name__}."
                    "transcoder_capable is False): expected one of trainer.registry.TRANSCODER_ARCHITECTURES"
                )
            options["apply_b_dec_to_input"] = False
            if skip_connection:
                options["skip_connection"] = True
        elif skip_connection:
            raise ValueError("sae.skip_connection=true needs a transcoder (a target hookpoint): build with transcoder=True")
        model = cls(d_in, sae_cfg.n_latents, **options)
        if transcoder and cls.transcoder_free_decoder:
            model.start_free_decoder()
        return model

    transcoder_free_decoder: ClassVar[bool] = False
    """A transcoder of this architecture starts with a free decoder at zero (``start_free_decoder``):
    the TopK family's, as sparsify starts its transcoders. Their input and output spaces differ,
    so the SAE's tied start (decoder rows the encoder's columns) has nothing to tie; from unit-norm
    random rows a TopK transcoder on SmolLM2's MLP reached a held-out FVU 0.08 worse than sparsify's
    after the same steps, from this start the same (benchmarks/RESULTS.md, ``bench_transcoder``)."""

    @torch.no_grad()
    def start_free_decoder(self) -> None:
        """Decoder rows at zero and free of the unit-norm rule (each row's norm is learned); the
        encoder keeps its random start and learns once the decoder has moved."""
        self.unit_norm_decoder = False
        self.W_dec.zero_()

    @torch.no_grad()
    def init_b_enc(self, sample: Tensor) -> None:
        """Set ``b_enc`` so that the mean of ``sample`` (N, d_in), in the space the model trains on,
        has zero pre-activations: a transcoder's encoder, which does not subtract ``b_dec``, then
        starts centred on its inputs as an SAE's does. Call before wrapping in DeepSpeed."""
        if sample.ndim != 2 or sample.shape[1] != self.d_in:
            raise ValueError(f"sample shape {tuple(sample.shape)} must be (N, d_in={self.d_in})")
        self.b_enc.copy_((-sample.float().mean(dim=0) @ self.W_enc.float()).to(self.b_enc.dtype))

    @classmethod
    def config_options(cls, sae_cfg: Any) -> dict[str, Any]:
        """The constructor arguments this architecture takes from an ``SAEConfig``, beyond the width."""
        return {}

    @classmethod
    def for_inference(cls, cfg: dict[str, Any], dtype: torch.dtype) -> SparseCoder:
        """An empty model for the weights of a saved dictionary (``cfg.json``, SAELens's fields):
        free decoder rows, so the folded ones are used as saved; ``W_skip`` where the saved
        architecture is a skip transcoder (``saved_with_skip``)."""
        return cls(
            cfg["d_in"], cfg["d_sae"], d_out=cfg.get("d_out"), seed=None, dtype=dtype,
            unit_norm_decoder=False, apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
            skip_connection=saved_with_skip(cfg),
        )

    # ----------------------------------------------------------------------- forward

    def decoder_weight(self) -> Tensor:
        """The decoder the forward pass uses: ``W_dec`` with each row scaled to unit norm, or
        ``W_dec`` itself (``unit_norm_decoder=False``).

        DeepSpeed ZeRO keeps its own fp32 master copy of every parameter and copies it back into
        the module after each step, so an in-place renormalisation of ``W_dec`` after the step
        would be overwritten (or, in fp32 stage 0, would desynchronise the optimizer state).
        Normalising here, from the raw parameter, needs no access to the optimizer, holds under
        every ZeRO stage and precision, and makes the gradient orthogonal to each row (the radial
        component has no effect on the output), as sparsify's gradient projection does by hand.
        """
        return unit_norm_rows(self.W_dec) if self.unit_norm_decoder else self.W_dec

    def encoder_input(self, x: Tensor) -> Tensor:
        """What the encoder multiplies: ``x - b_dec``, or ``x`` where b_dec is not applied."""
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_activations(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, n): ``encoder_input(x) W_enc + b_enc``."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Code:
        """(B, d_in) -> the latents (see ``Code``)."""
        raise NotImplementedError

    def decode(self, acts: Tensor, indices: Tensor | None = None) -> Tensor:
        """Latents -> (B, d_out) reconstruction with the ``decoder_weight`` rows and ``b_dec``:
        dense (B, n) ``acts``, or (B, k) ``acts`` at ``indices`` (``trainer.kernels.sparse_decode``)."""
        if indices is None:
            return acts @ self.decoder_weight() + self.b_dec
        return sparse_decode(acts, indices, self.W_dec, self.b_dec, unit_norm=self.unit_norm_decoder)

    def skip_output(self, x: Tensor) -> Tensor | None:
        """(B, d_in) -> (B, d_out) affine skip term ``x W_skip``; ``None`` without a skip connection."""
        return None if self.W_skip is None else x @ self.W_skip

    def reconstruct(self, x: Tensor) -> tuple[Code, Tensor]:
        """``encode`` then ``decode``, plus ``skip_output`` where there is one: the whole
        prediction, and the step a parallel wrapper replaces whole."""
        code = self.encode(x)
        reconstruction = self.decode(code.acts, code.indices)
        skip = self.skip_output(x)
        return code, reconstruction if skip is None else reconstruction + skip

    def forward(self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Reconstruct ``target`` (default ``x``) from ``x``. ``dead_mask`` (n_latents,) bool marks
        the latents that count as dead (the loop's ``DeadLatentTracker.dead_mask``), for AuxK."""
        target = x if target is None else target
        code, reconstruction = self.reconstruct(x)
        error = reconstruction_error(reconstruction, target)
        fit = self.fit_loss(code, reconstruction, target, error)
        sparsity = self.sparsity_loss(code)
        aux = self.aux_loss(x, target - reconstruction, code, dead_mask)
        l0 = (code.acts > 0).sum(dim=-1).float().mean().detach()
        return ForwardOutput(
            code.acts, code.indices, reconstruction, error.mse, error.fvu, sparsity, aux, fit + sparsity + aux, l0
        )

    def fit_loss(self, code: Code, reconstruction: Tensor, target: Tensor, error: ReconstructionError) -> Tensor:
        """The reconstruction term of the loss: ``mse`` here."""
        return error.mse

    def sparsity_loss(self, code: Code) -> Tensor:
        """The weighted sparsity penalty: none here (TopK-style sparsity is structural)."""
        return torch.zeros((), device=code.acts.device)

    def aux_loss(self, x: Tensor, residual: Tensor, code: Code, dead_mask: Tensor | None) -> Tensor:
        """AuxK (Gao et al. 2024): ``auxk_coefficient * auxk_loss(...)``, the top ``k_aux`` dead
        latents reconstructing ``residual`` (target - reconstruction); 0 without a ``dead_mask``,
        with a zero coefficient or with nothing dead. Without dense pre-activations in ``code``
        the dead latents' columns alone are computed (a host sync to list them, as sparsify and
        SAELens do)."""
        zero = torch.zeros((), device=residual.device)
        if dead_mask is None or self.auxk_coefficient == 0:
            return zero
        options = dict(k_aux=self.k_aux, coefficient=self.auxk_coefficient)
        if code.pre_acts is not None:
            return auxk_loss(residual, code.pre_acts, self.decoder_weight(), dead_mask, **options)
        dead = dead_mask.to(device=x.device, dtype=torch.bool).nonzero().squeeze(1)
        if dead.numel() == 0:
            return zero
        pre_dead = self.encoder_input(x) @ self.W_enc[:, dead] + self.b_enc[dead]
        all_dead = torch.ones(dead.numel(), dtype=torch.bool, device=x.device)
        return auxk_loss(residual, pre_dead, self.decoder_weight()[dead], all_dead, **options)

    # ----------------------------------------------------------------------- state

    @torch.no_grad()
    def init_b_dec(
        self, sample: Tensor, *, method: Literal["mean", "geometric_median"] = "geometric_median"
    ) -> None:
        """Set ``b_dec`` to the centre of ``sample`` (N, d_out), given in the space the model
        trains on (for a transcoder, a sample of the target).

        Call before wrapping in DeepSpeed: the engine copies the parameters into its master
        weights when it is built.
        """
        if sample.ndim != 2 or sample.shape[1] != self.d_out:
            raise ValueError(f"sample shape {tuple(sample.shape)} must be (N, d_out={self.d_out})")
        if method == "mean":
            centre = sample.float().mean(dim=0)
        elif method == "geometric_median":
            centre = geometric_median(sample.float())
        else:
            raise ValueError(f"method={method!r}: expected 'mean' or 'geometric_median'")
        self.b_dec.copy_(centre.to(self.b_dec.dtype))

    def inference_threshold(self) -> Tensor | None:
        """(n,) JumpReLU threshold of the saved dictionary; ``None`` for a plain ReLU or TopK."""
        return None

    @torch.no_grad()
    def folded_weights(self, scale: float, *, target_scale: float | None = None) -> dict[str, Tensor]:
        """SAELens-layout weights that act on raw activations, for a model trained on ``x * scale``
        with targets ``target * target_scale`` (default ``scale``).

        ``(x s - b_dec) W_enc + b_enc == (x - b_dec / s)(s W_enc) + b_enc``: the pre-activations
        are unchanged, so a JumpReLU ``threshold`` is saved as is; the decoder's output is divided
        by the target's scale: ``W_dec / t`` (the ``decoder_weight`` rows), ``b_dec / t``. The same
        fold as SAELens's ``fold_activation_norm_scaling_factor``. A skip connection maps ``x s`` to
        ``y t``, so ``W_skip * s / t`` (in our (d_in, d_out) layout; SAELens saves its transpose).
        A model that subtracts ``b_dec`` from its input needs ``t == s``.
        """
        target_scale = scale if target_scale is None else target_scale
        for name, value in (("scale", scale), ("target_scale", target_scale)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be positive")
        if self.apply_b_dec_to_input and target_scale != scale:
            raise ValueError(
                f"target_scale={target_scale} differs from scale={scale}, but b_dec is subtracted from "
                "the input (apply_b_dec_to_input=True): a transcoder must not apply b_dec to its input"
            )
        weights = {
            "W_enc": (self.W_enc * scale).contiguous(),
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": (self.decoder_weight() / target_scale).contiguous(),
            "b_dec": self.b_dec / target_scale,
        }
        if self.W_skip is not None:
            weights["W_skip"] = (self.W_skip * (scale / target_scale)).contiguous()
        threshold = self.inference_threshold()
        if threshold is not None:
            weights["threshold"] = threshold.detach().to(self.W_enc.dtype).contiguous()
        return weights

    def full_state_dict(self, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor] | None:
        """The whole model's state (``state_dict``), with ``weights`` (e.g. a DeepSpeed engine's
        fp32 master copies, ``trainer.engine.master_weights``) in place of its parameters.

        A feature-parallel model (``trainer.feature_parallel.parallelize_features``) gathers its
        slices to its group's first rank, a collective, and returns ``None`` on the others."""
        return {**self.state_dict(), **(weights or {})}


def saved_with_skip(cfg: dict[str, Any]) -> bool:
    """Whether a saved dictionary's ``cfg.json`` names a skip transcoder: SAELens's
    ``skip_transcoder`` and ``jumprelu_skip_transcoder``, saeforge's ``topk_skip_transcoder``."""
    return str(cfg.get("architecture", "")).endswith("skip_transcoder")


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


# --------------------------------------------------------------------------- TopK

# encode and decode functions of each ``TopKSAE(kernel=...)``.
_KERNELS = {
    "sparse": (sparse_topk_encode, sparse_decode),
    "dense": (dense_topk_encode, dense_decode),
}


class TopKSAE(SparseCoder):
    """TopK SAE (Gao et al. 2024): ``z = topk(relu((x - b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec``,
    with the AuxK loss over dead latents (``auxk_coefficient``, when ``forward`` gets a ``dead_mask``).

    ``unit_norm_decoder=False`` stops the decoder-row normalisation, which is what an exported
    dictionary needs: its rows carry the folded input scale (``folded_weights``).
    ``apply_b_dec_to_input=False`` makes it a transcoder-style encoder ``topk(relu(x W_enc + b_enc))``.

    ``kernel="sparse"`` (default) runs the encoder GEMM, a cheap top-k and backward passes that
    touch only the k selected latents per token (``trainer.kernels``); ``"dense"`` is the plain
    PyTorch reference. ``compute_dtype`` (e.g. ``torch.bfloat16`` over fp32 parameters) is the
    dtype of the encoder GEMM; ``None`` uses the CPU autocast dtype when autocast is on, else the
    parameters' dtype. Everything else, including the gradients, stays in the parameters' dtype.

    Initialisation (``tied_init``): Gaussian unit-norm decoder rows, ``W_enc`` their transpose
    scaled to columns of norm ``encoder_init_norm`` (default ``ENCODER_INIT_NORM``), zero biases;
    ``init_b_dec`` then centres ``b_dec`` on a sample.
    """

    architecture = "topk"
    saelens_architecture = "topk"
    transcoder_free_decoder = True

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        d_out: int | None = None,
        auxk_coefficient: float = AUXK_COEFFICIENT,
        k_aux: int | None = None,
        apply_b_dec_to_input: bool = True,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        unit_norm_decoder: bool = True,
        kernel: str = "sparse",
        compute_dtype: torch.dtype | None = None,
        encoder_init_norm: float = ENCODER_INIT_NORM,
        skip_connection: bool = False,
    ) -> None:
        if kernel not in _KERNELS:
            raise ValueError(f"kernel={kernel!r}: expected one of {sorted(_KERNELS)}")
        if n_latents > 0 and not 0 < k <= n_latents:  # before allocating (the base checks n)
            raise ValueError(f"k={k} must be in [1, n_latents={n_latents}]")
        super().__init__(
            d_in, n_latents, d_out=d_out, seed=seed, dtype=dtype, apply_b_dec_to_input=apply_b_dec_to_input,
            unit_norm_decoder=unit_norm_decoder, encoder_init_norm=encoder_init_norm,
            skip_connection=skip_connection,
        )
        self.k = k
        self.auxk_coefficient = auxk_coefficient
        self.k_aux = k_aux
        self.kernel = kernel
        self.compute_dtype = compute_dtype

    @classmethod
    def config_options(cls, sae_cfg: Any) -> dict[str, Any]:
        return {"k": sae_cfg.k, "auxk_coefficient": sae_cfg.auxk_coefficient, "k_aux": sae_cfg.k_aux,
                "compute_dtype": encoder_gemm_dtype(getattr(sae_cfg, "encoder_gemm", "param"))}

    @classmethod
    def for_inference(cls, cfg: dict[str, Any], dtype: torch.dtype) -> TopKSAE:
        return cls(
            cfg["d_in"], cfg["d_sae"], cfg["k"], d_out=cfg.get("d_out"), dtype=dtype, unit_norm_decoder=False,
            apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True), skip_connection=saved_with_skip(cfg),
        )

    def encode(self, x: Tensor) -> Code:
        """(B, d_in) -> (B, k) acts and indices: the k largest ReLU pre-activations."""
        encode, _ = _KERNELS[self.kernel]
        offset = self.b_dec if self.apply_b_dec_to_input else self.b_enc.new_zeros(self.d_in)
        acts, indices = encode(x, self.W_enc, self.b_enc, offset, self.k, compute_dtype=self.compute_dtype)
        return Code(acts, indices, None)

    def decode(self, acts: Tensor, indices: Tensor | None = None) -> Tensor:
        """(B, k) acts and indices -> (B, d_out) reconstruction with the ``decoder_weight`` rows.

        ``kernel="sparse"`` gathers the k decoder rows of each token, scaled by their inverse norms;
        ``"dense"`` scatters into a (B, n_latents) matrix and multiplies. Both give the same values
        and gradients (``tests/trainer/test_kernels.py``).
        """
        if indices is None:
            return super().decode(acts)
        _, decode = _KERNELS[self.kernel]
        return decode(acts, indices, self.W_dec, self.b_dec, unit_norm=self.unit_norm_decoder)
