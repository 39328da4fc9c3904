"""The SAE architectures beside TopK (``trainer.sae.TopKSAE``), each a ``trainer.sae.SparseCoder``
in SAELens's parameter layout, with plain PyTorch math; and ``build_sae``, which builds any
architecture (``trainer.registry``) from its ``SAEConfig`` in one call.

* ``ReLUSAE``: ReLU and an L1 penalty; the Anthropic April-2024 recipe (penalty weighted by decoder
  row norms, free decoder norms) or the classic one (``UnitNormReLUSAE``: unit-norm decoder rows,
  Bricken et al. 2023).
* ``JumpReLUSAE``: JumpReLU with per-latent thresholds trained by straight-through estimators
  (Rajamanoharan et al. 2024, "Jumping Ahead"), with the L0 penalty or the tanh penalty.
* ``BatchTopKSAE``: the top ``k * batch`` activations over the whole batch (Bussmann et al. 2024),
  with a learned threshold so the saved dictionary runs as a JumpReLU; AuxK as TopK.
* ``MatryoshkaBatchTopKSAE``: BatchTopK whose nested prefixes each reconstruct (Bussmann et al. 2025).

Transcoders are any of these but Matryoshka (``trainer.registry.TRANSCODER_ARCHITECTURES``) with
``target`` set (the output hookpoint's activations) and built with ``transcoder=True``
(``apply_b_dec_to_input=False``), optionally with ``skip_connection=True`` (``W_skip``, the base
class's): the reconstruction, MSE, FVU and AuxK residual are measured against ``target``, the
reconstruction including the skip term.

The decoder-norm constraint is the base class's: unit-norm architectures normalise the decoder
rows inside ``forward`` from the raw parameter (``SparseCoder.decoder_weight``), so that it holds
under DeepSpeed ZeRO, which owns the fp32 master weights. For a raw row ``w`` of norm 1 the
gradient through ``w / |w|`` is ``(I - w w^T) g``, the projected gradient of the classic explicit
recipe (OpenAI ``train.py``: ``unit_norm_decoder_grad_adjustment_``); without renormalising the raw
parameter ``|w|`` only grows slowly (each orthogonal step adds ``|step|^2``), which scales that
row's effective learning rate by ``1 / |w|``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Literal

import torch
from torch import Tensor, nn

from trainer.clt import CrossLayerTranscoder
from trainer.jumprelu import JumpReLUFunction, StepFunction, rectangle  # noqa: F401 (re-exported)
from trainer.losses import AUXK_COEFFICIENT, ReconstructionError
from trainer.registry import architecture_class
from trainer.sae import Code, SparseCoder

__all__ = [
    "BatchTopKSAE",
    "JumpReLUFunction",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "StepFunction",
    "UnitNormReLUSAE",
    "build_sae",
]


def build_sae(
    sae_cfg: Any,
    *,
    d_in: int,
    d_out: int | None = None,
    transcoder: bool = False,
    seed: int | None,
    dtype: torch.dtype = torch.float32,
    layers: int | None = None,
    input_scales: Sequence[float] | None = None,
    target_scales: Sequence[float] | None = None,
) -> SparseCoder | CrossLayerTranscoder:
    """A freshly initialised model of ``sae_cfg`` (an ``SAEConfig``): the class its
    ``architecture`` names (``trainer.registry``), built by that class's ``from_config``.

    ``d_out`` (default ``d_in``) is the width of the reconstruction; ``transcoder=True`` builds an
    encoder that does not subtract ``b_dec`` from its input (train it with ``target=``), which a
    ``d_out`` other than ``d_in`` needs.

    ``layers`` set builds a ``trainer.clt.CrossLayerTranscoder`` over that many layers instead
    (``sae.architecture`` ``topk`` or ``jumprelu``): ``d_in``, ``d_out``, ``sae.n_latents`` and
    ``sae.k`` are then PER LAYER, and ``input_scales`` / ``target_scales`` (L,) its per-layer
    normalisation factors (default 1).
    """
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"layers={layers} must be positive")
        return CrossLayerTranscoder.from_config(
            sae_cfg, layers=layers, d_in=d_in, d_out=d_out, seed=seed, dtype=dtype,
            input_scales=input_scales, target_scales=target_scales,
        )
    if input_scales is not None or target_scales is not None:
        raise ValueError("input_scales and target_scales are a cross-layer transcoder's: build with layers=")
    cls = architecture_class(sae_cfg.architecture)
    return cls.from_config(sae_cfg, d_in=d_in, d_out=d_out, seed=seed, dtype=dtype, transcoder=transcoder)


# --------------------------------------------------------------------------- ReLU + L1


class ReLUSAE(SparseCoder):
    """``f = relu(W_enc^T x' + b_enc)``, ``x̂ = f W_dec + b_dec``, loss ``|x - x̂|^2 + lambda * L1``.

    Two recipes (``relu_l1`` and ``relu_l1_unitnorm``):

    * Anthropic, "Circuits Updates, April 2024" (SAELens ``StandardTrainingSAE``): L1 weighted by
      decoder row norms, ``sum_i f_i |W_dec_i|``; decoder free (no norm constraint); no ``b_dec``
      subtracted before the encoder; decoder rows initialised to norm 0.1 (SAELens
      ``decoder_init_norm``), ``W_enc = W_dec^T``; inputs scaled to mean norm sqrt(d_in); lambda
      warmed up linearly from 0 (``schedules.sparsity_coefficient_at``).
    * Classic (Bricken et al. 2023, "Towards Monosemanticity"): unit-norm decoder rows, plain
      ``sum_i f_i``, ``b_dec`` subtracted from the input (``UnitNormReLUSAE``).

    ``sparsity_coefficient`` is a plain attribute: the training loop's schedule sets it each step.
    At inference both are plain ReLU SAEs (SAELens ``standard``).
    """

    architecture = "relu_l1"
    saelens_architecture = "standard"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *,
        d_out: int | None = None,
        sparsity_coefficient: float = 5.0,
        weight_by_decoder_norm: bool = True,
        unit_norm_decoder: bool = False,
        apply_b_dec_to_input: bool = False,
        decoder_init_norm: float = 0.1,
        skip_connection: bool = False,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            d_in, n_latents, d_out=d_out, seed=seed, dtype=dtype, apply_b_dec_to_input=apply_b_dec_to_input,
            unit_norm_decoder=unit_norm_decoder, decoder_init_norm=decoder_init_norm, skip_connection=skip_connection,
        )
        if sparsity_coefficient < 0:
            raise ValueError(f"sparsity_coefficient={sparsity_coefficient} must be >= 0")
        self.sparsity_coefficient = sparsity_coefficient
        self.weight_by_decoder_norm = weight_by_decoder_norm

    @classmethod
    def config_options(cls, sae_cfg: Any) -> dict[str, Any]:
        if sae_cfg.sparsity_coefficient is None:
            return {}
        return {"sparsity_coefficient": sae_cfg.sparsity_coefficient}

    def encode(self, x: Tensor) -> Code:
        """(B, d_in) -> (B, n) latent activations."""
        return Code(torch.relu(self.pre_activations(x)), None, None)

    def fit_loss(self, code: Code, reconstruction: Tensor, target: Tensor, error: ReconstructionError) -> Tensor:
        return error.squared_l2

    def sparsity_loss(self, code: Code) -> Tensor:
        penalty = code.acts.float()
        if self.weight_by_decoder_norm:
            penalty = penalty * self.decoder_weight().float().norm(dim=1)
        return self.sparsity_coefficient * penalty.sum(dim=-1).mean()


class UnitNormReLUSAE(ReLUSAE):
    """``ReLUSAE`` with the classic recipe's defaults: unit-norm decoder rows (normalised in
    ``forward``), plain L1 ``sum_i f_i``, ``b_dec`` subtracted from the input, unit-norm init."""

    architecture = "relu_l1_unitnorm"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *,
        weight_by_decoder_norm: bool = False,
        unit_norm_decoder: bool = True,
        apply_b_dec_to_input: bool = True,
        decoder_init_norm: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            d_in, n_latents, weight_by_decoder_norm=weight_by_decoder_norm, unit_norm_decoder=unit_norm_decoder,
            apply_b_dec_to_input=apply_b_dec_to_input, decoder_init_norm=decoder_init_norm, **kwargs,
        )


# --------------------------------------------------------------------------- JumpReLU


class JumpReLUSAE(SparseCoder):
    """JumpReLU SAE (Rajamanoharan et al. 2024): ``f = JumpReLU_theta(W_enc^T x + b_enc)``.

    The threshold is stored as ``log_threshold`` (the paper's pseudo-code; positive by
    construction) and saved as ``threshold = exp(log_threshold)``. Sparsity penalty:

    * ``"l0"`` (the paper): ``lambda * sum_i H(z_i - theta_i)``, averaged over tokens, with the
      rectangle-kernel straight-through estimator of ``bandwidth`` for theta (section 4);
    * ``"tanh"`` (Anthropic, "Circuits Updates, January 2025"; SAELens
      ``jumprelu_sparsity_loss_mode="tanh"``): ``lambda * sum_i tanh(c * f_i * |W_dec_i|)``.

    ``ste_to_input`` also passes the kernel term to the pre-activations (Anthropic); the paper
    passes it to theta only. ``pre_act_loss_coefficient`` adds Anthropic's pre-activation loss
    ``sum_i relu(theta_i - z_i) |W_dec_i|`` over dead latents (needs ``dead_mask``; SAELens form).

    Units: ``bandwidth`` and ``init_threshold`` are in pre-activation units, so they scale with
    the inputs. The defaults are SAELens 6's (0.05 and 0.01); the paper used 0.001 for both under
    its own input normalisation. As in the paper's pseudo-code, no ``b_dec`` is subtracted from
    the input; the decoder rows are unit norm (normalised in ``forward``).
    """

    architecture = "jumprelu"
    saelens_architecture = "jumprelu"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *,
        d_out: int | None = None,
        sparsity_coefficient: float = 1.0,
        sparsity_loss: Literal["l0", "tanh"] = "l0",
        bandwidth: float = 0.05,
        init_threshold: float = 0.01,
        tanh_scale: float = 4.0,
        ste_to_input: bool = False,
        pre_act_loss_coefficient: float | None = None,
        unit_norm_decoder: bool = True,
        apply_b_dec_to_input: bool = False,
        decoder_init_norm: float = 1.0,
        skip_connection: bool = False,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            d_in, n_latents, d_out=d_out, seed=seed, dtype=dtype, apply_b_dec_to_input=apply_b_dec_to_input,
            unit_norm_decoder=unit_norm_decoder, decoder_init_norm=decoder_init_norm, skip_connection=skip_connection,
        )
        if sparsity_loss not in ("l0", "tanh"):
            raise ValueError(f"sparsity_loss={sparsity_loss!r}: expected 'l0' or 'tanh'")
        for name, value in (("bandwidth", bandwidth), ("init_threshold", init_threshold), ("tanh_scale", tanh_scale)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be positive")
        if sparsity_coefficient < 0:
            raise ValueError(f"sparsity_coefficient={sparsity_coefficient} must be >= 0")
        self.sparsity_coefficient = sparsity_coefficient
        # Named sparsity_loss_mode: sparsity_loss is the base class's loss term.
        self.sparsity_loss_mode = sparsity_loss
        self.bandwidth = bandwidth
        self.tanh_scale = tanh_scale
        self.ste_to_input = ste_to_input
        self.pre_act_loss_coefficient = pre_act_loss_coefficient
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(init_threshold), dtype=dtype))

    @classmethod
    def config_options(cls, sae_cfg: Any) -> dict[str, Any]:
        options: dict[str, Any] = {"sparsity_loss": sae_cfg.jumprelu_sparsity_loss, "bandwidth": sae_cfg.jumprelu_bandwidth}
        if sae_cfg.sparsity_coefficient is not None:
            options["sparsity_coefficient"] = sae_cfg.sparsity_coefficient
        return options

    def threshold(self) -> Tensor:
        """(n,) the per-latent thresholds, ``exp(log_threshold)``."""
        return self.log_threshold.exp()

    def inference_threshold(self) -> Tensor:
        return self.threshold()

    def encode(self, x: Tensor) -> Code:
        """(B, d_in) -> (B, n) latent activations, with the pre-activations."""
        pre = self.pre_activations(x)
        acts = JumpReLUFunction.apply(pre, self.threshold(), self.bandwidth, self.ste_to_input)
        return Code(acts, None, pre)

    def fit_loss(self, code: Code, reconstruction: Tensor, target: Tensor, error: ReconstructionError) -> Tensor:
        return error.squared_l2

    def sparsity_loss(self, code: Code) -> Tensor:
        if self.sparsity_loss_mode == "l0":
            step = StepFunction.apply(code.pre_acts, self.threshold(), self.bandwidth, self.ste_to_input)
            per_token = step.float().sum(dim=-1)
        else:
            decoder_norms = self.decoder_weight().float().norm(dim=1)
            per_token = torch.tanh(self.tanh_scale * code.acts.float() * decoder_norms).sum(dim=-1)
        return self.sparsity_coefficient * per_token.mean()

    def aux_loss(self, x: Tensor, residual: Tensor, code: Code, dead_mask: Tensor | None) -> Tensor:
        """Anthropic's pre-activation loss over the dead latents (0 without a coefficient or a mask)."""
        if self.pre_act_loss_coefficient is None or dead_mask is None:
            return torch.zeros((), device=residual.device)
        assert code.pre_acts is not None
        dead = dead_mask.to(device=code.pre_acts.device, dtype=torch.float32)
        decoder_norms = self.decoder_weight().float().norm(dim=1)
        per_token = (torch.relu(self.threshold() - code.pre_acts).float() * dead * decoder_norms).sum(dim=-1)
        return self.pre_act_loss_coefficient * per_token.mean()


# --------------------------------------------------------------------------- BatchTopK


def batch_topk(acts: Tensor, k: float) -> Tensor:
    """Keep the ``round(k * B)`` largest entries of the whole (B, n) ``acts``, zero the rest."""
    flat = acts.flatten()
    n_keep = min(max(round(k * acts.shape[:-1].numel()), 1), flat.numel())
    values, indices = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts)


class BatchTopKSAE(SparseCoder):
    """BatchTopK SAE (Bussmann et al. 2024): ``f = batchtopk_k(relu((x - b_dec) W_enc + b_enc))``.

    In training mode the ``k * B`` largest activations of the batch are kept, and a running
    estimate of the smallest kept positive activation is updated: an exponential moving average
    with rate ``threshold_ema`` (SAELens ``topk_threshold_lr``, 0.01), bias-corrected as Adam's
    moments are so early estimates are not pulled towards 0. In eval mode (``.eval()``) the model
    runs as the JumpReLU it is saved as: ``relu(z) * (z > threshold)`` with that estimate for every
    latent. AuxK applies as for TopK. Unit-norm decoder rows, normalised in ``forward``.

    Data parallel: each rank estimates from its own batches; the loop averages ``running_threshold``
    over ranks after each step (with equal update counts the bias corrections agree).
    """

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    transcoder_free_decoder = True
    _FP64_BUFFERS = ("running_threshold",)

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: float,
        *,
        d_out: int | None = None,
        auxk_coefficient: float = AUXK_COEFFICIENT,
        k_aux: int | None = None,
        threshold_ema: float = 0.01,
        apply_b_dec_to_input: bool = True,
        unit_norm_decoder: bool = True,
        decoder_init_norm: float = 1.0,
        skip_connection: bool = False,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            d_in, n_latents, d_out=d_out, seed=seed, dtype=dtype, apply_b_dec_to_input=apply_b_dec_to_input,
            unit_norm_decoder=unit_norm_decoder, decoder_init_norm=decoder_init_norm, skip_connection=skip_connection,
        )
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be in (0, n_latents={n_latents}]")
        if not 0 < threshold_ema <= 1:
            raise ValueError(f"threshold_ema={threshold_ema} must be in (0, 1]")
        self.k = k
        self.auxk_coefficient = auxk_coefficient
        self.k_aux = k_aux
        self.threshold_ema = threshold_ema
        # fp64, and kept so by _apply: in bf16 a 1% EMA step would round away.
        self.register_buffer("running_threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    @classmethod
    def config_options(cls, sae_cfg: Any) -> dict[str, Any]:
        return {"k": sae_cfg.k, "auxk_coefficient": sae_cfg.auxk_coefficient, "k_aux": sae_cfg.k_aux}

    def _apply(self, fn: Any, recurse: bool = True) -> BatchTopKSAE:
        out = super()._apply(fn, recurse)
        for name in self._FP64_BUFFERS:
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != torch.float64:
                self._buffers[name] = buffer.double()
        return out

    def threshold(self) -> Tensor:
        """Scalar fp64: the bias-corrected running estimate (0 before any training batch)."""
        n = self.threshold_updates.double()
        correction = 1 - (1 - self.threshold_ema) ** n
        return torch.where(n > 0, self.running_threshold / correction.clamp_min(1e-300), 0.0)

    def inference_threshold(self) -> Tensor:
        return self.threshold().to(torch.float32).expand(self.n_latents).clone()

    @torch.no_grad()
    def _update_threshold(self, acts: Tensor) -> None:
        # Without a host sync: a batch with no positive activation leaves the estimate alone.
        smallest = torch.where(acts > 0, acts, float("inf")).min().double()
        seen = torch.isfinite(smallest)
        rate = self.threshold_ema
        updated = (1 - rate) * self.running_threshold + rate * torch.where(seen, smallest, 0.0)
        self.running_threshold.copy_(torch.where(seen, updated, self.running_threshold))
        self.threshold_updates += seen.long()

    def encode(self, x: Tensor) -> Code:
        """(B, d_in) -> (B, n) activations, with the pre-activations (AuxK reads them)."""
        pre = self.pre_activations(x)
        if self.training:
            acts = batch_topk(torch.relu(pre), self.k)
            self._update_threshold(acts)
        else:
            threshold = self.threshold().to(pre.dtype)
            acts = torch.relu(pre) * (pre > threshold).to(pre.dtype)
        return Code(acts, None, pre)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
    Matryoshka SAEs"; Nabeshima 2024): the latents ``[0, m)`` for each m in ``prefix_sizes``
    reconstruct on their own, ``x̂_m = f[:m] W_dec[:m] + b_dec``, and the loss is the sum of the
    prefixes' MSEs (the paper's sum, as SAELens ``MatryoshkaBatchTopKTrainingSAE``) plus AuxK on
    the full model. ``mse`` and ``fvu`` report the full-width reconstruction. Saved as JumpReLU.

    Not a transcoder (``transcoder_capable``): its prefix losses decode from ``b_dec`` alone, so
    they would leave out a skip term, and nested prefixes are a recipe for reconstructing the
    input, not tested as predictions of another hookpoint.
    """

    architecture = "matryoshka_batchtopk"
    transcoder_capable = False

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: float,
        *,
        prefix_sizes: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(d_in, n_latents, k, **kwargs)
        sizes = list(prefix_sizes) if prefix_sizes is not None else default_prefix_sizes(n_latents)
        if not sizes or sizes[-1] != n_latents:
            raise ValueError(f"prefix_sizes={sizes} must end at n_latents={n_latents}")
        if sizes[0] <= 0 or any(a >= b for a, b in pairwise(sizes)):
            raise ValueError(f"prefix_sizes={sizes} must be positive and strictly increasing")
        self.prefix_sizes = sizes

    @classmethod
    def config_options(cls, sae_cfg: Any) -> dict[str, Any]:
        options = super().config_options(sae_cfg)
        if sae_cfg.matryoshka_prefixes:
            options["prefix_sizes"] = list(sae_cfg.matryoshka_prefixes)
        return options

    def fit_loss(self, code: Code, reconstruction: Tensor, target: Tensor, error: ReconstructionError) -> Tensor:
        """The MSEs of every prefix's reconstruction, summed (the last prefix is the full model)."""
        decoder = self.decoder_weight()
        partial = self.b_dec.expand(code.acts.shape[0], -1)
        prefix_mses = []
        start = 0
        for end in self.prefix_sizes[:-1]:
            partial = partial + code.acts[:, start:end] @ decoder[start:end]
            prefix_mses.append((partial.float() - target.float()).pow(2).mean())
            start = end
        return torch.stack([*prefix_mses, error.mse]).sum()


def default_prefix_sizes(n_latents: int, *, n_levels: int = 4) -> list[int]:
    """Halving prefixes ending at ``n_latents``: ``[n/8, n/4, n/2, n]`` for 4 levels (no repeats)."""
    sizes = {max(n_latents >> level, 1) for level in range(n_levels)}
    return sorted(sizes)
