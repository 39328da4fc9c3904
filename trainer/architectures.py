"""SAE architectures beside plain TopK, in SAELens's parameter layout, with plain PyTorch math.

Every module here takes ``forward(x, *, target=None, dead_mask=None)`` and returns ``SAEOutput``:

* ``ReLUSAE``: ReLU and an L1 penalty; the Anthropic April-2024 recipe (penalty weighted by decoder
  row norms, free decoder norms) or the classic one (unit-norm decoder rows, Bricken et al. 2023).
* ``JumpReLUSAE``: JumpReLU with per-latent thresholds trained by straight-through estimators
  (Rajamanoharan et al. 2024, "Jumping Ahead"), with the L0 penalty or the tanh penalty.
* ``TopKAuxSAE``: ``trainer.sae.TopKSAE`` plus the AuxK loss (Gao et al. 2024).
* ``BatchTopKSAE``: the top ``k * batch`` activations over the whole batch (Bussmann et al. 2024),
  with a learned threshold so the saved dictionary runs as a JumpReLU.
* ``MatryoshkaBatchTopKSAE``: BatchTopK whose nested prefixes each reconstruct (Bussmann et al. 2025).

Transcoders are any of these with ``target`` set (the output hookpoint's activations): the
reconstruction, MSE, FVU and AuxK residual are measured against ``target``, and the input should
not have ``b_dec`` subtracted (``apply_b_dec_to_input=False``; ``build_sae(..., transcoder=True)``).
Only ``d_out == d_in`` is supported (MLP in and out of one layer).

Decoder-norm constraint. Unit-norm architectures normalise the decoder rows inside ``forward``
from the raw parameter (``decoder_weight``), exactly as ``TopKSAE`` does, so that the constraint
holds under DeepSpeed ZeRO, which owns the fp32 master weights. For a plain-PyTorch loop over a
model with a free decoder, ``project_decoder_grad_`` and ``renormalize_decoder_`` are the classic
explicit recipe (OpenAI ``train.py``: ``unit_norm_decoder_`` and
``unit_norm_decoder_grad_adjustment_``). The two agree: for a raw row ``w`` of norm 1 the gradient
through ``w / |w|`` is ``(I - w w^T) g``, the projected gradient; forward normalisation without
renormalising the raw parameter only lets ``|w|`` grow slowly (each orthogonal step adds
``|step|^2``), which scales that row's effective learning rate by ``1 / |w|``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from trainer.kernels import unit_norm_rows
from trainer.losses import AUXK_COEFFICIENT, auxk_loss
from trainer.sae import TopKSAE, add_tied_parameters

ARCHITECTURES = (
    "topk",
    "batchtopk",
    "matryoshka_batchtopk",
    "jumprelu",
    "relu_l1",
    "relu_l1_unitnorm",
)
"""Names ``build_sae`` accepts."""


class SAEOutput(NamedTuple):
    """What one forward pass of any architecture here produces (a superset of ``ForwardOutput``)."""

    latent_acts: Tensor
    """TopK: (B, k) values of the selected latents (>= 0). Dense architectures: (B, n_latents),
    zero where a latent did not fire."""
    latent_indices: Tensor | None
    """TopK: (B, k) indices of the selected latents. ``None`` for dense architectures."""
    reconstruction: Tensor
    """(B, d_in) decoder output, in the space of the target (``x`` for an SAE)."""
    mse: Tensor
    """Scalar: mean squared error against the target over all B * d_in elements (fp32)."""
    fvu: Tensor
    """Scalar: squared error summed over the batch over the target's total squared deviation from
    its batch mean (fp32)."""
    sparsity_loss: Tensor
    """Scalar: the weighted sparsity penalty (L1, L0 or tanh) already in ``loss``; 0 for TopK-style
    architectures, whose sparsity is structural."""
    aux_loss: Tensor
    """Scalar: the weighted auxiliary term already in ``loss`` (AuxK; JumpReLU's optional pre-act
    loss); 0 when no ``dead_mask`` is given or nothing is dead."""
    loss: Tensor
    """Scalar the optimizer minimises: reconstruction term + ``sparsity_loss`` + ``aux_loss``.
    Penalised architectures (ReLU, JumpReLU) use the papers' per-token squared L2 error averaged
    over tokens (``mse * d_in``), so published sparsity coefficients carry over; TopK-style ones use
    ``mse`` as ``TopKSAE`` does (Matryoshka: the sum of every prefix's ``mse``). All are means over
    tokens, so averaging gradients across data-parallel ranks equals the full-batch gradient."""
    l0: Tensor
    """Scalar, no gradient: mean number of latents firing (> 0) per token."""


# --------------------------------------------------------------------------- decoder constraint


@torch.no_grad()
def project_decoder_grad_(W_dec: nn.Parameter) -> None:
    """Remove from ``W_dec.grad`` each row's component along that row, in place.

    For a plain-PyTorch loop over a free decoder (``unit_norm_decoder=False``): call after
    ``backward`` and before the optimizer step, then ``renormalize_decoder_`` after it. Not for
    DeepSpeed, whose optimizer holds its own master copy (use forward normalisation instead).
    """
    if W_dec.grad is None:
        raise ValueError("W_dec.grad is None: call after backward()")
    unit = unit_norm_rows(W_dec)
    W_dec.grad -= (W_dec.grad * unit).sum(dim=1, keepdim=True) * unit


@torch.no_grad()
def renormalize_decoder_(W_dec: nn.Parameter) -> None:
    """Scale each row of ``W_dec`` to unit norm, in place (after the optimizer step)."""
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- JumpReLU autograd


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u): 1 where -1/2 < u < 1/2, else 0 (Rajamanoharan et al. 2024, sec. 4)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``z * H(z - theta)`` with the paper's pseudo-derivative in theta (section 4):
    ``d/dtheta := -(theta / eps) K((z - theta) / eps)``. In z the gradient is the true one,
    ``H(z - theta)``, plus the same kernel term when ``ste_to_input`` (Anthropic, Jan 2025)."""

    @staticmethod
    def forward(
        ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool
    ) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre_acts * (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None]:
        pre_acts, threshold = ctx.saved_tensors
        kernel = rectangle((pre_acts - threshold) / ctx.bandwidth) / ctx.bandwidth
        ste = threshold * kernel * grad_out
        grad_threshold = -ste.reshape(-1, ste.shape[-1]).sum(dim=0).to(threshold.dtype)
        grad_pre = (pre_acts > threshold).to(grad_out.dtype) * grad_out
        if ctx.ste_to_input:
            grad_pre = grad_pre + ste
        return grad_pre, grad_threshold, None, None


class StepFunction(torch.autograd.Function):
    """``H(z - theta)`` with the pseudo-derivative ``d/dtheta := -(1 / eps) K((z - theta) / eps)``
    (section 4); in z zero, or ``+(1 / eps) K((z - theta) / eps)`` when ``ste_to_input``."""

    @staticmethod
    def forward(
        ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool
    ) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        pre_acts, threshold = ctx.saved_tensors
        ste = rectangle((pre_acts - threshold) / ctx.bandwidth) / ctx.bandwidth * grad_out
        grad_threshold = -ste.reshape(-1, ste.shape[-1]).sum(dim=0).to(threshold.dtype)
        return (ste if ctx.ste_to_input else None), grad_threshold, None, None


# --------------------------------------------------------------------------- shared base


def reconstruction_error(reconstruction: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mse, fvu, squared error summed over features and averaged over tokens), all fp32."""
    target = target.float()
    squared = (reconstruction.float() - target).pow(2)
    total_variance = (target - target.mean(dim=0)).pow(2).sum()
    return squared.mean(), squared.sum() / total_variance, squared.sum(dim=-1).mean()


def _firing_l0(latent_acts: Tensor) -> Tensor:
    return (latent_acts > 0).sum(dim=-1).float().mean().detach()


class SparseDictionary(nn.Module):
    """Parameters, initialisation, decoder constraint and scale fold shared by the dense architectures.

    ``W_enc`` (d_in, n), ``b_enc`` (n,), ``W_dec`` (n, d_in), ``b_dec`` (d_in,), as in SAELens.
    Initialised tied (``W_enc = W_dec^T``) with random decoder directions of norm
    ``decoder_init_norm`` and zero biases.
    """

    architecture: ClassVar[str]
    """The ``build_sae`` name."""
    saelens_architecture: ClassVar[str]
    """The SAELens 6 inference architecture the saved dictionary uses."""

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *,
        seed: int | None,
        dtype: torch.dtype,
        apply_b_dec_to_input: bool,
        unit_norm_decoder: bool,
        decoder_init_norm: float,
    ) -> None:
        super().__init__()
        add_tied_parameters(self, d_in, n_latents, seed=seed, dtype=dtype, decoder_norm=decoder_init_norm)
        self.d_in = d_in
        self.n_latents = n_latents
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.unit_norm_decoder = unit_norm_decoder

    def decoder_weight(self) -> Tensor:
        """The decoder the forward pass uses: unit-norm rows of ``W_dec``, or ``W_dec`` itself.

        Normalising from the raw parameter holds under every ZeRO stage; see ``TopKSAE.decoder_weight``.
        """
        if not self.unit_norm_decoder:
            return self.W_dec
        return unit_norm_rows(self.W_dec)

    def pre_activations(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, n): ``(x - b_dec) W_enc + b_enc``, without ``- b_dec`` where not applied."""
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        return sae_in @ self.W_enc + self.b_enc

    def inference_threshold(self) -> Tensor | None:
        """(n,) JumpReLU threshold of the saved dictionary; ``None`` for a plain ReLU."""
        return None

    # The same centring as TopKSAE's; for a transcoder, pass a sample of the target.
    init_b_dec = TopKSAE.init_b_dec

    @torch.no_grad()
    def folded_weights(
        self, scale: float, *, target_scale: float | None = None
    ) -> dict[str, Tensor]:
        """SAELens-layout weights on raw activations, for a model trained on ``x * scale`` (and
        ``target * target_scale``; default ``scale``).

        ``(x s - b_dec) W_enc + b_enc == (x - b_dec / s)(s W_enc) + b_enc``: the pre-activations
        are unchanged, so a JumpReLU ``threshold`` is saved as is. The decoder output is divided
        by the target's scale: ``W_dec / t``, ``b_dec / t``.
        """
        return _fold(self, scale, target_scale, threshold=self.inference_threshold())


def _fold(
    sae: nn.Module, scale: float, target_scale: float | None, *, threshold: Tensor | None
) -> dict[str, Tensor]:
    target_scale = scale if target_scale is None else target_scale
    for name, value in (("scale", scale), ("target_scale", target_scale)):
        if not value > 0:
            raise ValueError(f"{name}={value} must be positive")
    if sae.apply_b_dec_to_input and target_scale != scale:
        raise ValueError(
            f"target_scale={target_scale} differs from scale={scale}, but b_dec is subtracted from "
            "the input (apply_b_dec_to_input=True): a transcoder must not apply b_dec to its input"
        )
    weights = {
        "W_enc": (sae.W_enc * scale).contiguous(),
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": (sae.decoder_weight() / target_scale).contiguous(),
        "b_dec": sae.b_dec / target_scale,
    }
    if threshold is not None:
        weights["threshold"] = threshold.detach().to(sae.W_enc.dtype).contiguous()
    return weights


# --------------------------------------------------------------------------- ReLU + L1


class ReLUSAE(SparseDictionary):
    """``f = relu(W_enc^T x' + b_enc)``, ``x̂ = f W_dec + b_dec``, loss ``|x - x̂|^2 + lambda * L1``.

    Two recipes (``build_sae``'s ``relu_l1`` and ``relu_l1_unitnorm``):

    * Anthropic, "Circuits Updates, April 2024" (SAELens ``StandardTrainingSAE``): L1 weighted by
      decoder row norms, ``sum_i f_i |W_dec_i|``; decoder free (no norm constraint); no ``b_dec``
      subtracted before the encoder; decoder rows initialised to norm 0.1 (SAELens
      ``decoder_init_norm``), ``W_enc = W_dec^T``; inputs scaled to mean norm sqrt(d_in); lambda
      warmed up linearly from 0 (``schedules.sparsity_coefficient_at``).
    * Classic (Bricken et al. 2023, "Towards Monosemanticity"): unit-norm decoder rows, plain
      ``sum_i f_i``, ``b_dec`` subtracted from the input.

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
        sparsity_coefficient: float = 5.0,
        weight_by_decoder_norm: bool = True,
        unit_norm_decoder: bool = False,
        apply_b_dec_to_input: bool = False,
        decoder_init_norm: float = 0.1,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            d_in,
            n_latents,
            seed=seed,
            dtype=dtype,
            apply_b_dec_to_input=apply_b_dec_to_input,
            unit_norm_decoder=unit_norm_decoder,
            decoder_init_norm=decoder_init_norm,
        )
        if sparsity_coefficient < 0:
            raise ValueError(f"sparsity_coefficient={sparsity_coefficient} must be >= 0")
        self.sparsity_coefficient = sparsity_coefficient
        self.weight_by_decoder_norm = weight_by_decoder_norm

    def encode(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, n) latent activations."""
        return torch.relu(self.pre_activations(x))

    def forward(
        self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        target = x if target is None else target
        decoder = self.decoder_weight()
        acts = self.encode(x)
        reconstruction = acts @ decoder + self.b_dec
        mse, fvu, squared_l2 = reconstruction_error(reconstruction, target)
        penalty = acts.float()
        if self.weight_by_decoder_norm:
            penalty = penalty * decoder.float().norm(dim=1)
        sparsity = self.sparsity_coefficient * penalty.sum(dim=-1).mean()
        aux = mse.new_zeros(())
        return SAEOutput(
            acts,
            None,
            reconstruction,
            mse,
            fvu,
            sparsity,
            aux,
            squared_l2 + sparsity + aux,
            _firing_l0(acts),
        )


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
            d_in,
            n_latents,
            weight_by_decoder_norm=weight_by_decoder_norm,
            unit_norm_decoder=unit_norm_decoder,
            apply_b_dec_to_input=apply_b_dec_to_input,
            decoder_init_norm=decoder_init_norm,
            **kwargs,
        )


# --------------------------------------------------------------------------- JumpReLU


class JumpReLUSAE(SparseDictionary):
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
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            d_in,
            n_latents,
            seed=seed,
            dtype=dtype,
            apply_b_dec_to_input=apply_b_dec_to_input,
            unit_norm_decoder=unit_norm_decoder,
            decoder_init_norm=decoder_init_norm,
        )
        if sparsity_loss not in ("l0", "tanh"):
            raise ValueError(f"sparsity_loss={sparsity_loss!r}: expected 'l0' or 'tanh'")
        for name, value in (
            ("bandwidth", bandwidth),
            ("init_threshold", init_threshold),
            ("tanh_scale", tanh_scale),
        ):
            if not value > 0:
                raise ValueError(f"{name}={value} must be positive")
        if sparsity_coefficient < 0:
            raise ValueError(f"sparsity_coefficient={sparsity_coefficient} must be >= 0")
        self.sparsity_coefficient = sparsity_coefficient
        self.sparsity_loss = sparsity_loss
        self.bandwidth = bandwidth
        self.tanh_scale = tanh_scale
        self.ste_to_input = ste_to_input
        self.pre_act_loss_coefficient = pre_act_loss_coefficient
        self.log_threshold = nn.Parameter(
            torch.full((n_latents,), math.log(init_threshold), dtype=dtype)
        )

    def threshold(self) -> Tensor:
        """(n,) the per-latent thresholds, ``exp(log_threshold)``."""
        return self.log_threshold.exp()

    def inference_threshold(self) -> Tensor:
        return self.threshold()

    def encode(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, n) latent activations."""
        pre = self.pre_activations(x)
        return JumpReLUFunction.apply(pre, self.threshold(), self.bandwidth, self.ste_to_input)

    def forward(
        self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        target = x if target is None else target
        decoder = self.decoder_weight()
        threshold = self.threshold()
        pre = self.pre_activations(x)
        acts = JumpReLUFunction.apply(pre, threshold, self.bandwidth, self.ste_to_input)
        reconstruction = acts @ decoder + self.b_dec
        mse, fvu, squared_l2 = reconstruction_error(reconstruction, target)
        decoder_norms = decoder.float().norm(dim=1)
        if self.sparsity_loss == "l0":
            per_token = (
                StepFunction.apply(pre, threshold, self.bandwidth, self.ste_to_input)
                .float()
                .sum(dim=-1)
            )
        else:
            per_token = torch.tanh(self.tanh_scale * acts.float() * decoder_norms).sum(dim=-1)
        sparsity = self.sparsity_coefficient * per_token.mean()
        aux = self._pre_act_loss(pre, threshold, decoder_norms, dead_mask, like=mse)
        return SAEOutput(
            acts,
            None,
            reconstruction,
            mse,
            fvu,
            sparsity,
            aux,
            squared_l2 + sparsity + aux,
            _firing_l0(acts),
        )

    def _pre_act_loss(
        self,
        pre: Tensor,
        threshold: Tensor,
        decoder_norms: Tensor,
        dead_mask: Tensor | None,
        *,
        like: Tensor,
    ) -> Tensor:
        if self.pre_act_loss_coefficient is None or dead_mask is None:
            return like.new_zeros(())
        dead = dead_mask.to(device=pre.device, dtype=torch.float32)
        per_token = (torch.relu(threshold - pre).float() * dead * decoder_norms).sum(dim=-1)
        return self.pre_act_loss_coefficient * per_token.mean()


# --------------------------------------------------------------------------- TopK + AuxK


class TopKAuxSAE(TopKSAE):
    """``TopKSAE`` with the AuxK loss (Gao et al. 2024) and the ``SAEOutput`` interface.

    ``forward(x, *, target, dead_mask)``: with a ``dead_mask`` (n,) bool (the loop's
    ``DeadLatentTracker.dead_mask``), ``aux_loss = auxk_coefficient * auxk_loss(...)`` over the dead
    latents; their pre-activations are computed for those columns only (a host sync to list them,
    as sparsify and SAELens do). ``apply_b_dec_to_input=False`` makes it a transcoder-style encoder
    ``topk(relu(x W_enc + b_enc))`` (dense path, not the base class's kernel).
    """

    architecture = "topk"
    saelens_architecture = "topk"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        auxk_coefficient: float = AUXK_COEFFICIENT,
        k_aux: int | None = None,
        apply_b_dec_to_input: bool = True,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        unit_norm_decoder: bool = True,
    ) -> None:
        super().__init__(
            d_in, n_latents, k, seed=seed, dtype=dtype, unit_norm_decoder=unit_norm_decoder
        )
        self.auxk_coefficient = auxk_coefficient
        self.k_aux = k_aux
        self.apply_b_dec_to_input = apply_b_dec_to_input

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.apply_b_dec_to_input:
            return super().encode(x)
        acts, indices = torch.relu(x @ self.W_enc + self.b_enc).topk(self.k, dim=-1, sorted=False)
        return acts, indices

    def forward(  # type: ignore[override]
        self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        target = x if target is None else target
        acts, indices = self.encode(x)
        reconstruction = self.decode(acts, indices)
        mse, fvu, _ = reconstruction_error(reconstruction, target)
        aux = self._auxk(x, target - reconstruction, dead_mask, like=mse)
        zero = mse.new_zeros(())
        return SAEOutput(
            acts, indices, reconstruction, mse, fvu, zero, aux, mse + aux, _firing_l0(acts)
        )

    def _auxk(
        self, x: Tensor, residual: Tensor, dead_mask: Tensor | None, *, like: Tensor
    ) -> Tensor:
        if dead_mask is None or self.auxk_coefficient == 0:
            return like.new_zeros(())
        dead = dead_mask.to(device=x.device, dtype=torch.bool).nonzero().squeeze(1)
        if dead.numel() == 0:
            return like.new_zeros(())
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        pre_dead = sae_in @ self.W_enc[:, dead] + self.b_enc[dead]
        all_dead = torch.ones(dead.numel(), dtype=torch.bool, device=x.device)
        return auxk_loss(
            residual,
            pre_dead,
            self.decoder_weight()[dead],
            all_dead,
            k_aux=self.k_aux,
            coefficient=self.auxk_coefficient,
        )

    @torch.no_grad()
    def folded_weights(
        self, scale: float, *, target_scale: float | None = None
    ) -> dict[str, Tensor]:  # type: ignore[override]
        """As ``TopKSAE.folded_weights``, with a separate ``target_scale`` for transcoders."""
        return _fold(self, scale, target_scale, threshold=None)


# --------------------------------------------------------------------------- BatchTopK


def batch_topk(acts: Tensor, k: float) -> Tensor:
    """Keep the ``round(k * B)`` largest entries of the whole (B, n) ``acts``, zero the rest."""
    flat = acts.flatten()
    n_keep = min(max(round(k * acts.shape[:-1].numel()), 1), flat.numel())
    values, indices = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts)


class BatchTopKSAE(SparseDictionary):
    """BatchTopK SAE (Bussmann et al. 2024): ``f = batchtopk_k(relu((x - b_dec) W_enc + b_enc))``.

    In training mode the ``k * B`` largest activations of the batch are kept, and a running
    estimate of the smallest kept positive activation is updated: an exponential moving average
    with rate ``threshold_ema`` (SAELens ``topk_threshold_lr``, 0.01), bias-corrected as Adam's
    moments are so early estimates are not pulled towards 0. In eval mode (``.eval()``) the model
    runs as the JumpReLU it is saved as: ``relu(z) * (z > threshold)`` with that estimate for every
    latent. AuxK applies as for TopK. Unit-norm decoder rows, normalised in ``forward``.

    Data parallel: each rank estimates from its own batches; average ``running_threshold`` over
    ranks before saving (with equal update counts the bias corrections agree).
    """

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    _FP64_BUFFERS = ("running_threshold",)

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: float,
        *,
        auxk_coefficient: float = AUXK_COEFFICIENT,
        k_aux: int | None = None,
        threshold_ema: float = 0.01,
        apply_b_dec_to_input: bool = True,
        unit_norm_decoder: bool = True,
        decoder_init_norm: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            d_in,
            n_latents,
            seed=seed,
            dtype=dtype,
            apply_b_dec_to_input=apply_b_dec_to_input,
            unit_norm_decoder=unit_norm_decoder,
            decoder_init_norm=decoder_init_norm,
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

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, d_in) -> ((B, n) activations, (B, n) pre-activations)."""
        pre = self.pre_activations(x)
        if self.training:
            acts = batch_topk(torch.relu(pre), self.k)
            self._update_threshold(acts)
        else:
            threshold = self.threshold().to(pre.dtype)
            acts = torch.relu(pre) * (pre > threshold).to(pre.dtype)
        return acts, pre

    def forward(
        self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        target = x if target is None else target
        decoder = self.decoder_weight()
        acts, pre = self.encode(x)
        reconstruction = acts @ decoder + self.b_dec
        mse, fvu, _ = reconstruction_error(reconstruction, target)
        aux = self._auxk(target - reconstruction, pre, decoder, dead_mask, like=mse)
        zero = mse.new_zeros(())
        return SAEOutput(
            acts, None, reconstruction, mse, fvu, zero, aux, mse + aux, _firing_l0(acts)
        )

    def _auxk(
        self,
        residual: Tensor,
        pre: Tensor,
        decoder: Tensor,
        dead_mask: Tensor | None,
        *,
        like: Tensor,
    ) -> Tensor:
        if dead_mask is None or self.auxk_coefficient == 0:
            return like.new_zeros(())
        return auxk_loss(
            residual, pre, decoder, dead_mask, k_aux=self.k_aux, coefficient=self.auxk_coefficient
        )


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
    Matryoshka SAEs"; Nabeshima 2024): the latents ``[0, m)`` for each m in ``prefix_sizes``
    reconstruct on their own, ``x̂_m = f[:m] W_dec[:m] + b_dec``, and the loss is the sum of the
    prefixes' MSEs (the paper's sum, as SAELens ``MatryoshkaBatchTopKTrainingSAE``) plus AuxK on
    the full model. ``mse`` and ``fvu`` report the full-width reconstruction. Saved as JumpReLU.
    """

    architecture = "matryoshka_batchtopk"

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

    def forward(
        self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        target = x if target is None else target
        decoder = self.decoder_weight()
        acts, pre = self.encode(x)
        reconstruction = self.b_dec.expand(acts.shape[0], -1)
        prefix_mses = []
        start = 0
        for end in self.prefix_sizes:
            reconstruction = reconstruction + acts[:, start:end] @ decoder[start:end]
            prefix_mses.append((reconstruction.float() - target.float()).pow(2).mean())
            start = end
        mse, fvu, _ = reconstruction_error(reconstruction, target)
        aux = self._auxk(target - reconstruction, pre, decoder, dead_mask, like=mse)
        zero = mse.new_zeros(())
        loss = torch.stack(prefix_mses).sum() + aux
        return SAEOutput(acts, None, reconstruction, mse, fvu, zero, aux, loss, _firing_l0(acts))


def default_prefix_sizes(n_latents: int, *, n_levels: int = 4) -> list[int]:
    """Halving prefixes ending at ``n_latents``: ``[n/8, n/4, n/2, n]`` for 4 levels (no repeats)."""
    sizes = {max(n_latents >> level, 1) for level in range(n_levels)}
    return sorted(sizes)


# --------------------------------------------------------------------------- registry


def build_sae(
    architecture: str,
    *,
    d_in: int,
    n_latents: int,
    k: float | None = None,
    transcoder: bool = False,
    seed: int | None,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> nn.Module:
    """A freshly initialised SAE of ``architecture`` (one of ``ARCHITECTURES``).

    ``k`` is required by ``topk``, ``batchtopk`` and ``matryoshka_batchtopk`` and ignored by the
    others. ``transcoder=True`` sets ``apply_b_dec_to_input=False`` (train with ``target=``).
    ``options`` go to the constructor (``sparsity_coefficient``, ``bandwidth``, ``prefix_sizes``,
    ``auxk_coefficient``, ...). ``topk`` gives a ``TopKAuxSAE``, which is a ``trainer.sae.TopKSAE``.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}: expected one of {list(ARCHITECTURES)}")
    common: dict[str, Any] = {"seed": seed, "dtype": dtype, **options}
    if transcoder:
        common["apply_b_dec_to_input"] = False
    if architecture in ("topk", "batchtopk", "matryoshka_batchtopk"):
        if k is None:
            raise ValueError(f"architecture={architecture!r} needs k")
        cls = {
            "topk": TopKAuxSAE,
            "batchtopk": BatchTopKSAE,
            "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
        }
        return cls[architecture](d_in, n_latents, k, **common)
    if architecture == "jumprelu":
        return JumpReLUSAE(d_in, n_latents, **common)
    if architecture == "relu_l1_unitnorm":
        return UnitNormReLUSAE(d_in, n_latents, **common)
    return ReLUSAE(d_in, n_latents, **common)
