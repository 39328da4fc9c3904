"""The cross-layer transcoder (CLT): layer l's features read layer l's MLP input ``x_l`` and write,
through their own decoders, to the MLP outputs ``y_l'`` of layer l and of every later covered layer
(Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer's ``CrossLayerTranscoder`` layout):

    f_l = sigma(x_l W_enc[l] + b_enc[l])                      (n features per layer)
    y_hat_l' = b_dec[l'] + sum_{l <= l'} f_l W_dec[l][:, l' - l]

``CrossLayerTranscoder`` speaks the ``trainer.sae.SparseCoder`` protocol on FLAT concatenations, so
the trainer, the evaluation and interp drive it as any dictionary: ``x`` (B, L * d_layer_in) is the
L inputs side by side in layer order, the target ``y`` (B, L * d_layer_out) the L MLP outputs;
``d_in``, ``d_out`` and ``n_latents`` are the flat widths, and latent ``l * n + i`` is layer l's
feature i. Parameters (circuit-tracer's layout, our encoder transposed as in every SAE here):
``W_enc`` (L, d_layer_in, n), ``b_enc`` (L, n), ``W_dec`` an ``nn.ParameterList`` of L tensors
``W_dec[l]`` (n, L - l, d_layer_out), ``b_dec`` (L, d_layer_out), and for JumpReLU
``log_threshold`` (L, n).

Activations:

* ``jumprelu`` (the published CLTs'): per-latent thresholds trained with the straight-through
  estimators and the L0 (or tanh) penalty of ``trainer.architectures.JumpReLUSAE``; dense (B, L * n)
  activations.
* ``topk`` with ``clt_topk="layer"``: the k largest ReLU pre-activations of each layer, per token
  (L * k latents a token); with ``clt_topk="all"``: the ``k * L`` largest over all the token's
  L * n latents, so a token may spend its budget where it needs it. Per layer is the default
  (``SAEConfig.clt_topk``); see "TopK: per layer or across layers" below for the measurement.

TopK: per layer or across layers. Measured at equal L0 on synthetic CLT problems with a known
answer (L = 4 layers, d = 32, 64 true features per layer firing 3 per layer per token on average,
each with a random unit encoder direction and random decoders to its layer and the later ones;
n = 128 latents per layer, 1,500 Adam steps of 256 tokens, FVU on 8,192 fresh tokens):

    true features per layer per token    k    FVU layer    FVU all
    independent (3 on average)           2    0.324        0.216
    independent (3 on average)           3    0.194        0.131
    one busy layer per token (3 on avg)  2    0.516        0.310
    one busy layer per token (3 on avg)  3    0.435        0.229

``all`` reconstructs better at every setting, most where a token's activity moves between layers.
The default is nevertheless ``layer``: with ``all``, whether a layer-l feature fires depends on the
later layers' inputs, which in the model depend on layer l's output. A CLT is a replacement for the
MLPs, run layer by layer in a spliced forward pass (the spliced evaluation, observe, steer, circuit
tracing); only ``layer`` (and JumpReLU) can encode layer l when the forward pass reaches it. ``all``
also costs 1.7 times the step (below). Use ``all`` for offline reconstruction only.

Normalisation lives inside: the CLT is built with ``input_scales`` (L,) and ``target_scales`` (L,)
(each layer's factor to mean norm sqrt(width), from its cache's manifest), kept as fp32 buffers.
Every method takes RAW ``x`` and gives RAW predictions; inside, layer l's input is multiplied by
``s_l`` before encoding and the decoders predict ``y_l' * t_l'``, divided by ``t_l'`` on the way out.
``folded_weights`` folds the buffers into the saved weights, so a loaded CLT has scales 1.

Loss (``forward``), all in the normalised space, so that every layer weighs alike whatever its norm:
the error of layer l' is ``(y_hat_l' - y_l') * t_l'``.

* TopK: the sum over layers of each layer's normalised MSE (mean over B * d_layer_out), plus AuxK;
* JumpReLU: the sum over layers of the per-token squared L2 error, averaged over tokens (the
  per-layer transcoders' ``mse * d_out``, summed over layers), plus ``sparsity_coefficient`` times
  the number of latents firing per token over all layers (its default 1.0, as JumpReLUSAE's).

``ForwardOutput.mse`` and ``fvu`` pool every layer in that same normalised space (``fvu``: the
squared error over the targets' total variance, both summed over layers); ``l0`` counts the latents
firing per token over all layers. ``layer_fvu`` gives each layer's FVU (scale-free).

Decoders have unit norm over a feature's whole output (its (L - l) * d_layer_out concatenated
row, normalised inside ``forward`` from the raw parameter, as the SAEs' rows are), so a TopK
selection compares features of every layer alike and the L0 penalty cannot be dodged by
scaling an encoder up and its decoder down.

Initialisation: decoder rows are random directions (their scale is irrelevant under the unit norm);
encoder columns random directions of norm ``ENCODER_INIT_NORM`` (TopK, as ``TopKSAE``) or 1
(JumpReLU, as ``JumpReLUSAE``), so that on inputs normalised to norm sqrt(d) the pre-activations
start at the scale our per-layer dictionaries start at. Input and output spaces differ, so there is
no tied start. ``init_b_dec`` then puts ``b_dec`` at each target layer's mean.

TopK is computed sparse: each layer's encoder is ``trainer.kernels.sparse_topk_encode`` (one
GEMM, backward over the selected latents only), each source layer's decoders one
``trainer.kernels.sparse_decode`` over its (n, (L - l) * d_layer_out) rows; ``kernel="dense"``
runs the plain-PyTorch twins (``tests/trainer/test_clt.py`` checks they agree). JumpReLU runs the
L encoders as one batched matmul and decodes densely: its thresholds' straight-through gradient
needs the loss's gradient at latents near their threshold that did not fire, which a sparse decode
would not give. One step (forward and backward) at L = 6, n = 4,608 per layer, d = 576, a batch of
1,024, one thread of the 2-core reference machine under load: TopK ``layer`` 0.96 s (0.45 forward),
``all`` 1.7 s, the dense TopK twin 5.9 s, JumpReLU 5.8 s (at initialisation, half its latents firing).

AuxK (TopK, with ``forward``'s ``dead_mask``): the top ``k_aux`` dead latents of all layers, by
pre-activation, reconstruct the whole scaled residual (B, L * d_layer_out), each through its own
decoders into its layer and the later ones; ``k_aux`` defaults to L * d_layer_out / 2 (the SAEs'
d_out / 2). JumpReLU has no auxiliary term.

Pure torch: nothing distributed (``trainer.feature_parallel`` splits it from outside).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from trainer.config import CLT_TOPK_MODES
from trainer.jumprelu import JumpReLUFunction, StepFunction
from trainer.kernels import (
    dense_decode,
    dense_topk_encode,
    sparse_decode,
    sparse_topk_encode,
    unit_norm_rows,
)
from trainer.losses import AUXK_COEFFICIENT, auxk_loss
from trainer.sae import ENCODER_INIT_NORM, Code, ForwardOutput, geometric_median

__all__ = ["CLT_ACTIVATIONS", "CLT_TOPK_MODES", "CrossLayerTranscoder", "clt_saved_architecture"]

CLT_ACTIVATIONS = ("jumprelu", "topk")
"""The ``sae.architecture`` values a CLT is built with."""
_SAVED_SUFFIX = "_clt"

_KERNELS = {
    "sparse": (sparse_topk_encode, sparse_decode),
    "dense": (dense_topk_encode, dense_decode),
}


def clt_saved_architecture(activation: str) -> str:
    """cfg.json ``architecture`` of a CLT folder: ``jumprelu_clt`` or ``topk_clt``."""
    return activation + _SAVED_SUFFIX


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder over ``n_layers`` consecutive layers (the module docstring).

    ``activation`` is ``"jumprelu"`` or ``"topk"`` (then ``k`` per layer and ``clt_topk``);
    ``unit_norm_decoder=False`` uses the decoders as they are (a loaded, folded dictionary).
    """

    transcoder_capable: ClassVar[bool] = True
    apply_b_dec_to_input = False
    W_skip = None
    """No skip connection: the CLT's affine part is ``b_dec``."""

    def __init__(
        self,
        n_layers: int,
        d_layer_in: int,
        n_per_layer: int,
        *,
        d_layer_out: int | None = None,
        activation: Literal["jumprelu", "topk"] = "jumprelu",
        k: int | None = None,
        clt_topk: Literal["layer", "all"] = "layer",
        auxk_coefficient: float = AUXK_COEFFICIENT,
        k_aux: int | None = None,
        sparsity_coefficient: float = 1.0,
        sparsity_loss: Literal["l0", "tanh"] = "l0",
        bandwidth: float = 0.05,
        init_threshold: float = 0.01,
        tanh_scale: float = 4.0,
        input_scales: Sequence[float] | Tensor | None = None,
        target_scales: Sequence[float] | Tensor | None = None,
        unit_norm_decoder: bool = True,
        encoder_init_norm: float | None = None,
        kernel: str = "sparse",
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        d_layer_out = d_layer_in if d_layer_out is None else d_layer_out
        for name, value in (("n_layers", n_layers), ("d_layer_in", d_layer_in), ("d_layer_out", d_layer_out),
                            ("n_per_layer", n_per_layer)):
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if activation not in CLT_ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: expected one of {list(CLT_ACTIVATIONS)}")
        if kernel not in _KERNELS:
            raise ValueError(f"kernel={kernel!r}: expected one of {sorted(_KERNELS)}")
        if activation == "topk":
            if k is None or not 0 < k <= n_per_layer:
                raise ValueError(f"k={k} must be in [1, n_per_layer={n_per_layer}]")
            if clt_topk not in CLT_TOPK_MODES:
                raise ValueError(f"clt_topk={clt_topk!r}: expected one of {list(CLT_TOPK_MODES)}")
            self.k = k
            """Active latents per layer per token (``all``: k * L per token over all layers)."""
            self.clt_topk = clt_topk
            self.auxk_coefficient = auxk_coefficient
            self.k_aux = k_aux
        else:
            for name, value in (("bandwidth", bandwidth), ("init_threshold", init_threshold),
                                ("tanh_scale", tanh_scale)):
                if not value > 0:
                    raise ValueError(f"{name}={value} must be positive")
            if sparsity_coefficient < 0:
                raise ValueError(f"sparsity_coefficient={sparsity_coefficient} must be >= 0")
            if sparsity_loss not in ("l0", "tanh"):
                raise ValueError(f"sparsity_loss={sparsity_loss!r}: expected 'l0' or 'tanh'")
            # Only JumpReLU has the attribute: the loop's schedule sets it where a module has it.
            self.sparsity_coefficient = sparsity_coefficient
            self.sparsity_loss_mode = sparsity_loss
            self.bandwidth = bandwidth
            self.tanh_scale = tanh_scale
        self.activation = activation
        self.architecture = activation
        """The ``sae.architecture`` it was trained as (recorded in the dictionary's metadata)."""
        self.n_layers, self.d_layer_in, self.d_layer_out, self.n_per_layer = n_layers, d_layer_in, d_layer_out, n_per_layer
        self.d_in, self.d_out, self.n_latents = n_layers * d_layer_in, n_layers * d_layer_out, n_layers * n_per_layer
        self.unit_norm_decoder = unit_norm_decoder
        self.kernel = kernel

        if encoder_init_norm is None:
            encoder_init_norm = ENCODER_INIT_NORM if activation == "topk" else 1.0
        w_enc, w_dec = _initial_weights(n_layers, d_layer_in, d_layer_out, n_per_layer, seed=seed,
                                        encoder_norm=encoder_init_norm)
        self.W_enc = nn.Parameter(w_enc.to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, n_per_layer, dtype=dtype))
        self.W_dec = nn.ParameterList([nn.Parameter(w.to(dtype)) for w in w_dec])
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_layer_out, dtype=dtype))
        if activation == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((n_layers, n_per_layer), math.log(init_threshold), dtype=dtype)
            )
        self.register_buffer("input_scales", torch.ones(n_layers, dtype=torch.float32))
        self.register_buffer("target_scales", torch.ones(n_layers, dtype=torch.float32))
        self.set_scales(input_scales, target_scales)

    # ----------------------------------------------------------------------- building

    @classmethod
    def from_config(
        cls,
        sae_cfg: Any,
        *,
        layers: int,
        d_in: int,
        d_out: int | None = None,
        seed: int | None,
        dtype: torch.dtype = torch.float32,
        input_scales: Sequence[float] | Tensor | None = None,
        target_scales: Sequence[float] | Tensor | None = None,
    ) -> CrossLayerTranscoder:
        """A freshly initialised CLT over ``layers`` layers of the ``SAEConfig`` ``sae_cfg``: ``d_in``,
        ``d_out`` and ``sae_cfg.n_latents`` / ``k`` are PER LAYER; ``sae_cfg.architecture`` is
        ``topk`` (with ``sae_cfg.clt_topk``) or ``jumprelu``."""
        if sae_cfg.architecture not in CLT_ACTIVATIONS:
            raise ValueError(
                f"sae.architecture={sae_cfg.architecture!r} cannot be a cross-layer transcoder: expected one of "
                f"{list(CLT_ACTIVATIONS)}"
            )
        options: dict[str, Any] = {}
        if sae_cfg.architecture == "topk":
            options.update(k=sae_cfg.k, clt_topk=getattr(sae_cfg, "clt_topk", "layer"),
                           auxk_coefficient=sae_cfg.auxk_coefficient, k_aux=sae_cfg.k_aux)
        else:
            options.update(sparsity_loss=sae_cfg.jumprelu_sparsity_loss, bandwidth=sae_cfg.jumprelu_bandwidth)
            if sae_cfg.sparsity_coefficient is not None:
                options["sparsity_coefficient"] = sae_cfg.sparsity_coefficient
        return cls(
            layers, d_in, sae_cfg.n_latents, d_layer_out=d_out, activation=sae_cfg.architecture, seed=seed,
            dtype=dtype, input_scales=input_scales, target_scales=target_scales, **options,
        )

    @classmethod
    def for_inference(cls, cfg: dict[str, Any], dtype: torch.dtype) -> CrossLayerTranscoder:
        """An empty CLT for the weights of a saved folder (``cfg.json``: ``architecture``
        ``jumprelu_clt`` or ``topk_clt``, ``n_layers``, per-layer ``d_in``, ``d_out``, ``d_sae``,
        and ``k`` / ``clt_topk`` for TopK): free decoders, scales 1."""
        activation = str(cfg["architecture"]).removesuffix(_SAVED_SUFFIX)
        options: dict[str, Any] = {}
        if activation == "topk":
            options.update(k=cfg["k"], clt_topk=cfg.get("clt_topk", "layer"))
        return cls(
            cfg["n_layers"], cfg["d_in"], cfg["d_sae"], d_layer_out=cfg.get("d_out"), activation=activation,
            unit_norm_decoder=False, seed=None, dtype=dtype, **options,
        )

    @torch.no_grad()
    def set_scales(
        self, input_scales: Sequence[float] | Tensor | None, target_scales: Sequence[float] | Tensor | None
    ) -> None:
        """Set the per-layer normalisation factors (``None``: 1 for every layer). Call before
        ``init_b_dec``, which centres ``b_dec`` in the scaled target space."""
        for name, values in (("input_scales", input_scales), ("target_scales", target_scales)):
            buffer = getattr(self, name)
            if values is None:
                buffer.fill_(1.0)
                continue
            values = torch.as_tensor(values, dtype=torch.float32)
            if values.shape != (self.n_layers,):
                raise ValueError(f"{name} shape {tuple(values.shape)} must be (n_layers={self.n_layers},)")
            if not bool(torch.isfinite(values).all() and (values > 0).all()):
                raise ValueError(f"{name}={values.tolist()} must be finite and positive")
            buffer.copy_(values)

    def _apply(self, fn: Any, recurse: bool = True) -> CrossLayerTranscoder:
        out = super()._apply(fn, recurse)
        # fp32 scales whatever the parameters' dtype: in bf16 a scale keeps 3 digits, and the fold
        # would save weights that differ from the model trained on them.
        for name in ("input_scales", "target_scales"):
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return out

    # ----------------------------------------------------------------------- forward

    def decoder_weight(self, layer: int) -> Tensor:
        """(n, L - layer, d_layer_out): layer ``layer``'s decoders as the forward pass uses them,
        each feature's concatenated row at unit norm (or as it is, ``unit_norm_decoder=False``);
        they write the scaled targets (``target_scales``)."""
        weight = self.W_dec[layer]
        if not self.unit_norm_decoder:
            return weight
        return unit_norm_rows(weight.reshape(self.n_per_layer, -1)).view_as(weight)

    def threshold(self) -> Tensor:
        """(L, n) JumpReLU thresholds, ``exp(log_threshold)``."""
        return self.log_threshold.exp()

    def inference_threshold(self) -> Tensor | None:
        """(L * n,) JumpReLU thresholds in latent order; ``None`` for TopK."""
        return self.threshold().reshape(-1) if self.activation == "jumprelu" else None

    def _scaled_inputs(self, x: Tensor) -> Tensor:
        """(B, L * d_layer_in) raw -> (L, B, d_layer_in) scaled, in the parameters' dtype."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x shape {tuple(x.shape)} must be (B, n_layers * d_layer_in = {self.d_in})")
        layers = x.reshape(x.shape[0], self.n_layers, self.d_layer_in).transpose(0, 1)
        return (layers * self.input_scales[:, None, None]).to(self.W_enc.dtype)

    def pre_activations(self, x: Tensor) -> Tensor:
        """(B, L * d_layer_in) raw -> (B, L * n) pre-activations: the L encoders as one batched matmul."""
        pre = torch.baddbmm(self.b_enc[:, None, :], self._scaled_inputs(x), self.W_enc)  # (L, B, n)
        return pre.transpose(0, 1).reshape(x.shape[0], self.n_latents)

    def encode(self, x: Tensor) -> Code:
        """(B, L * d_layer_in) raw -> the latents: JumpReLU dense (B, L * n) with the pre-activations;
        TopK (B, L * k) values and latent indices (``layer``: layer l's k at columns [l k, (l + 1) k))."""
        return self._encode(x)[0]

    def _encode(self, x: Tensor) -> tuple[Code, list[tuple[Tensor, Tensor]] | None]:
        """The code, and for TopK ``layer`` each layer's (acts, indices within the layer)."""
        if self.activation == "jumprelu":
            pre = self.pre_activations(x)
            acts = JumpReLUFunction.apply(pre, self.threshold().reshape(-1), self.bandwidth, False)
            return Code(acts, None, pre), None
        encode, _ = _KERNELS[self.kernel]
        inputs = self._scaled_inputs(x)
        zero = self.b_enc.new_zeros(self.d_layer_in)
        per_layer = self.k if self.clt_topk == "layer" else min(self.k * self.n_layers, self.n_per_layer)
        parts = [
            encode(x_l, w_l, b_l, zero, per_layer)
            for x_l, w_l, b_l in zip(inputs.unbind(0), self.W_enc.unbind(0), self.b_enc.unbind(0), strict=True)
        ]
        offsets = [layer * self.n_per_layer for layer in range(self.n_layers)]
        acts = torch.cat([a for a, _ in parts], dim=1)
        indices = torch.cat([i + offset for (_, i), offset in zip(parts, offsets, strict=True)], dim=1)
        if self.clt_topk == "layer":
            return Code(acts, indices, None), parts
        # Across layers: the token's top k * L is among the union of every layer's top k * L.
        top, where = acts.topk(self.k * self.n_layers, dim=1, sorted=False)
        return Code(top, indices.gather(1, where), None), None

    def decode(self, acts: Tensor, indices: Tensor | None = None) -> Tensor:
        """Latents -> (B, L * d_layer_out) RAW prediction: dense (B, L * n) ``acts``, or (B, K)
        ``acts`` at flat latent ``indices`` (any layers, any order)."""
        if indices is None:
            return self._decode_dense(acts)
        if self.kernel == "dense":  # the slow twin: scatter into (B, L * n) and multiply
            dense = acts.new_zeros(acts.shape[0], self.n_latents).scatter_add(1, indices, acts)
            return self._decode_dense(dense)
        parts = []
        for layer in range(self.n_layers):
            start = layer * self.n_per_layer
            mine = (indices >= start) & (indices < start + self.n_per_layer)
            parts.append((torch.where(mine, acts, 0), torch.where(mine, indices - start, 0)))
        return self._decode_sparse(parts)

    def _decode_dense(self, acts: Tensor) -> Tensor:
        batch = acts.shape[0]
        features = acts.to(self.W_enc.dtype).view(batch, self.n_layers, self.n_per_layer)
        scaled = self.b_dec.reshape(1, -1).expand(batch, -1).clone()
        for layer in range(self.n_layers):
            decoder = self.decoder_weight(layer).reshape(self.n_per_layer, -1)
            scaled[:, layer * self.d_layer_out:] += features[:, layer] @ decoder
        return self._unscale_targets(scaled)

    def _decode_sparse(self, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Each source layer's (acts, indices within the layer), decoded with its decoders."""
        _, decode = _KERNELS[self.kernel]
        batch = parts[0][0].shape[0]
        scaled = self.b_dec.reshape(1, -1).expand(batch, -1).clone()
        for layer, (acts, indices) in enumerate(parts):
            rows = self.W_dec[layer].reshape(self.n_per_layer, -1)
            zero = rows.new_zeros(rows.shape[1])
            scaled[:, layer * self.d_layer_out:] += decode(acts, indices, rows, zero, unit_norm=self.unit_norm_decoder)
        return self._unscale_targets(scaled)

    def _unscale_targets(self, scaled: Tensor) -> Tensor:
        """(B, L * d_layer_out) in the scaled target space -> raw units."""
        per_layer = scaled.view(scaled.shape[0], self.n_layers, self.d_layer_out) / self.target_scales[:, None]
        return per_layer.to(scaled.dtype).reshape(scaled.shape[0], self.d_out)

    def skip_output(self, x: Tensor) -> None:
        """No skip term (``W_skip`` is None)."""
        return None

    def reconstruct(self, x: Tensor) -> tuple[Code, Tensor]:
        """``encode`` then ``decode``: the code and the (B, L * d_layer_out) RAW prediction; the step
        a parallel wrapper replaces whole."""
        code, parts = self._encode(x)
        if parts is not None and self.kernel == "sparse":
            return code, self._decode_sparse(parts)
        return code, self.decode(code.acts, code.indices)

    def forward(self, x: Tensor, *, target: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Predict the RAW ``target`` (B, L * d_layer_out) from the RAW ``x``; the loss and its
        terms in the normalised space (the module docstring). ``dead_mask`` (L * n,) bool: the
        latents that count as dead, for TopK's AuxK."""
        if target.shape != (x.shape[0], self.d_out):
            raise ValueError(f"target shape {tuple(target.shape)} must be (B={x.shape[0]}, n_layers * d_layer_out = {self.d_out})")
        code, prediction = self.reconstruct(x)
        scales = self.target_scales[None, :, None]
        shape = (x.shape[0], self.n_layers, self.d_layer_out)
        scaled_target = target.float().view(shape) * scales
        error = (prediction.float().view(shape) * scales - scaled_target)
        squared = error.pow(2)
        mse = squared.mean()
        total_variance = (scaled_target - scaled_target.mean(dim=0)).pow(2).sum()
        fvu = squared.sum() / total_variance
        if self.activation == "topk":
            fit = squared.mean(dim=(0, 2)).sum()
            sparsity = torch.zeros((), device=x.device)
            aux = self._auxk(x, -error.reshape(x.shape[0], -1), dead_mask)
        else:
            fit = squared.sum(dim=(1, 2)).mean()
            sparsity = self._sparsity_loss(code)
            aux = torch.zeros((), device=x.device)
        l0 = (code.acts > 0).sum(dim=-1).float().mean().detach()
        return ForwardOutput(code.acts, code.indices, prediction, mse, fvu, sparsity, aux, fit + sparsity + aux, l0)

    def _sparsity_loss(self, code: Code) -> Tensor:
        if self.sparsity_loss_mode == "l0":
            step = StepFunction.apply(code.pre_acts, self.threshold().reshape(-1), self.bandwidth, False)
            per_token = step.float().sum(dim=-1)
        else:
            norms = torch.cat([self.decoder_weight(layer).reshape(self.n_per_layer, -1).float().norm(dim=1)
                               for layer in range(self.n_layers)])
            per_token = torch.tanh(self.tanh_scale * code.acts.float() * norms).sum(dim=-1)
        return self.sparsity_coefficient * per_token.mean()

    def _auxk(self, x: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK (Gao et al. 2024) over the dead latents of every layer: their top ``k_aux``
        (default L * d_layer_out / 2) reconstruct the scaled residual (B, L * d_layer_out), each
        through its decoders into its own and the later layers (zero into the earlier ones)."""
        zero = torch.zeros((), device=residual.device)
        if dead_mask is None or self.auxk_coefficient == 0:
            return zero
        dead = dead_mask.to(device=x.device, dtype=torch.bool).view(self.n_layers, self.n_per_layer)
        if not bool(dead.any()):
            return zero
        inputs = self._scaled_inputs(x)
        pre, rows = [], []
        for layer in range(self.n_layers):
            ids = dead[layer].nonzero().squeeze(1)
            if ids.numel() == 0:
                continue
            pre.append(inputs[layer] @ self.W_enc[layer][:, ids] + self.b_enc[layer, ids])
            own = self.decoder_weight(layer)[ids].reshape(ids.numel(), -1)
            rows.append(torch.nn.functional.pad(own, (layer * self.d_layer_out, 0)))
        pre_dead, decoder = torch.cat(pre, dim=1), torch.cat(rows, dim=0)
        all_dead = torch.ones(pre_dead.shape[1], dtype=torch.bool, device=x.device)
        return auxk_loss(residual, pre_dead, decoder, all_dead, k_aux=self.k_aux, coefficient=self.auxk_coefficient)

    def layer_fvu(self, prediction: Tensor, target: Tensor) -> Tensor:
        """(L,) each layer's FVU: its squared error over its target's variance about the batch mean
        (fp32; the same in raw and scaled units)."""
        shape = (target.shape[0], self.n_layers, self.d_layer_out)
        target = target.float().view(shape)
        squared = (prediction.float().view(shape) - target).pow(2).sum(dim=(0, 2))
        return squared / (target - target.mean(dim=0)).pow(2).sum(dim=(0, 2))

    # ----------------------------------------------------------------------- state

    @torch.no_grad()
    def init_b_dec(
        self, sample: Tensor, *, method: Literal["mean", "geometric_median"] = "geometric_median"
    ) -> None:
        """Set ``b_dec`` to each layer's centre of the RAW target ``sample`` (N, L * d_layer_out),
        scaled by ``target_scales`` (so set the scales first). Call before wrapping in DeepSpeed."""
        if sample.ndim != 2 or sample.shape[1] != self.d_out:
            raise ValueError(f"sample shape {tuple(sample.shape)} must be (N, d_out={self.d_out})")
        layers = sample.float().view(sample.shape[0], self.n_layers, self.d_layer_out)
        if method == "mean":
            centre = layers.mean(dim=0)
        elif method == "geometric_median":
            centre = torch.stack([geometric_median(layers[:, layer]) for layer in range(self.n_layers)])
        else:
            raise ValueError(f"method={method!r}: expected 'mean' or 'geometric_median'")
        self.b_dec.copy_((centre * self.target_scales[:, None]).to(self.b_dec.dtype))

    @torch.no_grad()
    def folded_weights(self, scale: float = 1.0, *, target_scale: float | None = None) -> dict[str, Tensor]:
        """Weights that act on raw activations: the per-layer scales (and any extra uniform
        ``scale`` / ``target_scale``, 1 from the trainer) folded in: ``W_enc[l] * s_l``,
        ``W_dec[l][:, j] / t_{l + j}`` (the rows the forward uses), ``b_dec[l] / t_l``; ``b_enc``
        and the JumpReLU ``threshold`` (L, n) unchanged (the pre-activations are). Keys: ``W_enc``
        (L, d_layer_in, n), ``b_enc``, ``b_dec``, ``threshold`` and ``W_dec_{l}`` (n, L - l, d_layer_out)."""
        target_scale = scale if target_scale is None else target_scale
        for name, value in (("scale", scale), ("target_scale", target_scale)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be positive")
        dtype = self.W_enc.dtype
        inputs = self.input_scales * scale
        targets = self.target_scales * target_scale
        weights = {
            "W_enc": (self.W_enc.float() * inputs[:, None, None]).to(dtype).contiguous(),
            "b_enc": self.b_enc.detach().clone(),
            "b_dec": (self.b_dec.float() / targets[:, None]).to(dtype).contiguous(),
        }
        for layer in range(self.n_layers):
            decoder = self.decoder_weight(layer).float() / targets[layer:, None]
            weights[f"W_dec_{layer}"] = decoder.to(dtype).contiguous()
        if self.activation == "jumprelu":
            weights["threshold"] = self.threshold().detach().to(dtype).contiguous()
        return weights

    def full_state_dict(self, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor] | None:
        """The whole model's state (``state_dict``, the scale buffers included), with ``weights``
        (e.g. DeepSpeed's fp32 master copies) in place of its parameters."""
        return {**self.state_dict(), **(weights or {})}


def _initial_weights(
    n_layers: int, d_in: int, d_out: int, n: int, *, seed: int | None, encoder_norm: float
) -> tuple[Tensor, list[Tensor]]:
    """fp32 ``W_enc`` (L, d_in, n) with columns of norm ``encoder_norm`` and the decoders ``W_dec[l]``
    (n, L - l, d_out) with unit-norm concatenated rows, random directions drawn layer by layer
    (decoder, then encoder) from one generator of ``seed``, whatever the dtype."""
    if not encoder_norm > 0:
        raise ValueError(f"encoder_init_norm={encoder_norm} must be positive")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    encoders, decoders = [], []
    for layer in range(n_layers):
        decoder = torch.randn(n, (n_layers - layer) * d_out, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True)
        decoders.append(decoder.view(n, n_layers - layer, d_out))
        encoder = torch.randn(n, d_in, generator=generator)
        encoder *= encoder_norm / encoder.norm(dim=1, keepdim=True)
        encoders.append(encoder.T)
    return torch.stack(encoders), decoders
