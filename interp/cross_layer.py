"""A cross-layer transcoder (``trainer.clt.CrossLayerTranscoder``) as observe, steer and the audit
use it, beside the dictionaries of one hookpoint (SAEs, per-layer transcoders).

A CLT covers L layers. Layer ``l``'s ``n`` features read layer ``l``'s MLP input ``x_l`` and write
to the MLP outputs ``y_j`` of the layers ``j >= l`` through ``W_dec[l][:, j - l]``. Features have
flat ids: layer ``l``'s feature ``i`` is ``l * n + i`` (the CLT's latent order, the order of its
``feature_stats.safetensors``); ``feature_layer`` gives a flat id's layer.

Written out flat, a feature's decoder is one vector over the L outputs side by side
(``decoder_directions``), zero in the outputs of the layers before its own; an edit of the
features moves the flat outputs by ``(f' - f) @ directions``, so layer ``j``'s output moves by
the ``j``-th slice. A dictionary of one hookpoint is the case L = 1 (its ``W_dec`` rows).

In a forward pass the covered layers run in order, so a rewrite of the MLP outputs is a sequence
of calls ``(j, x_j, y_j) -> y_j'``, one per covered layer (``LayerRewrite``): layer ``j``'s
features are encoded from the ``x_j`` of that same pass (which rewrites of earlier outputs have
already changed) and kept for the later outputs they write to (``LayerPass``). That needs each
layer's features from its own input alone: JumpReLU and TopK per layer (``clt_topk='layer'``);
a TopK over all layers (``clt_topk='all'``) picks layer ``l``'s features with the later layers'
inputs, which the forward has not computed when ``y_l`` is written, so it cannot be rewritten.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trainer.clt import CrossLayerTranscoder
from trainer.kernels import dense_topk_encode, sparse_topk_encode

__all__ = [
    "LayerPass",
    "LayerRewrite",
    "decoder_directions",
    "feature_layer",
    "is_cross_layer",
    "layer_slices",
    "layer_pass",
    "layer_acts",
    "layer_width_out",
    "raw_decoder",
    "selected_activations",
    "summed_decoder_rows",
]

LayerRewrite = Callable[[int, Tensor, Tensor], Tensor]
"""``(j, x, y) -> y'``: covered layer ``j`` (0 for a dictionary of one hookpoint), its input rows
``x`` (rows, d_in of the layer) and its output rows ``y`` (rows, d_out of the layer) at the
encoded positions -> the output's new rows; called for ``j = 0, 1, ...`` in each forward pass."""


def is_cross_layer(sae: nn.Module) -> bool:
    return isinstance(sae, CrossLayerTranscoder)


def feature_layer(sae: nn.Module, feature: int) -> int:
    """The covered layer a flat feature id belongs to (0 for a dictionary of one hookpoint)."""
    return feature // sae.n_per_layer if is_cross_layer(sae) else 0


def layer_width_out(sae: nn.Module) -> int:
    """The width of one output the dictionary writes: a CLT's ``d_layer_out``, else ``d_out``."""
    return int(sae.d_layer_out if is_cross_layer(sae) else sae.d_out)


def layer_slices(sae: nn.Module) -> list[slice]:
    """Each covered layer's columns of the flat outputs (L slices of ``d_layer_out``; one slice
    of all columns for a dictionary of one hookpoint)."""
    width, n_layers = layer_width_out(sae), int(sae.n_layers) if is_cross_layer(sae) else 1
    return [slice(j * width, (j + 1) * width) for j in range(n_layers)]


def decoder_directions(sae: nn.Module, features: Sequence[int]) -> Tensor:
    """(len(features), d_out) the features' decoders as flat vectors over every output the
    dictionary writes: a CLT's layer-``l`` feature ``i`` holds ``W_dec[l][i, j - l]`` in output
    ``j >= l``'s slice and zeros before; an SAE's or transcoder's ``W_dec`` rows."""
    if not is_cross_layer(sae):
        return sae.W_dec[list(features)]
    n, width = sae.n_per_layer, sae.d_layer_out
    rows = []
    for feature in features:
        layer, index = divmod(int(feature), n)
        written = raw_decoder(sae, layer)[index].reshape(-1)  # (L - layer) * d_layer_out
        rows.append(torch.cat([written.new_zeros(layer * width), written]))
    return torch.stack(rows)


def summed_decoder_rows(sae: nn.Module, features: Sequence[int]) -> Tensor:
    """(len(features), d_layer_out) each feature's decoder rows summed over the outputs it writes
    to: what it adds to the residual stream in all, each MLP output being added to it (the logit
    lens then skips the layers in between); an SAE's or transcoder's ``W_dec`` rows."""
    if not is_cross_layer(sae):
        return sae.W_dec[list(features)]
    index = torch.as_tensor(list(features), dtype=torch.long, device=sae.b_dec.device)
    layers = index // sae.n_per_layer
    out = sae.b_dec.new_zeros(len(index), sae.d_layer_out)
    for layer in layers.unique().tolist():
        chosen = layers == layer
        out[chosen] = raw_decoder(sae, layer)[index[chosen] % sae.n_per_layer].sum(dim=1).to(out.dtype)
    return out


def raw_decoder(sae: CrossLayerTranscoder, layer: int) -> Tensor:
    """(n, L - layer, d_layer_out) layer ``layer``'s decoders in raw output units: as the CLT's
    forward uses them (``decoder_weight``), over each output's target scale (1 once loaded)."""
    if not sae.unit_norm_decoder and bool((sae.target_scales == 1).all()):  # a loaded CLT: the weights as saved
        return sae.W_dec[layer]
    return sae.decoder_weight(layer) / sae.target_scales[layer:, None].to(sae.b_dec.dtype)


def layer_acts(sae: CrossLayerTranscoder, layer: int, x: Tensor) -> Tensor:
    """(rows, n) dense activations of layer ``layer``'s features on its raw input rows ``x``,
    computed as ``CrossLayerTranscoder.encode`` computes that layer's part (JumpReLU, or TopK of
    the layer's own k): each layer's features depend on its input alone."""
    scaled = (x * sae.input_scales[layer]).to(sae.W_enc.dtype)
    if sae.activation == "jumprelu":
        pre = torch.addmm(sae.b_enc[layer], scaled, sae.W_enc[layer])
        return pre * (pre > sae.threshold()[layer]).to(pre.dtype)
    encode = sparse_topk_encode if sae.kernel == "sparse" else dense_topk_encode
    acts, indices = encode(scaled, sae.W_enc[layer], sae.b_enc[layer], sae.b_enc.new_zeros(sae.d_layer_in), sae.k)
    return acts.new_zeros(len(x), sae.n_per_layer).scatter(1, indices, acts)


def selected_activations(code: Any, features: Sequence[int]) -> Tensor:
    """(rows, len(features)) the activations of ``features`` in ``code`` (dense or sparse), 0 where
    one did not fire."""
    index = torch.tensor(list(features), device=code.acts.device)
    if code.indices is None:
        return code.acts[:, index]
    hits = code.indices.unsqueeze(-1) == index  # (rows, k, m)
    return (code.acts.unsqueeze(-1) * hits).sum(dim=1)


class OneLayerPass:
    """``LayerPass`` for a dictionary of one hookpoint (an SAE, a transcoder): layer 0 only."""

    def __init__(self, sae: nn.Module) -> None:
        self.sae = sae
        self.x: Tensor | None = None
        self.code: Any = None

    def read(self, layer: int, x: Tensor) -> None:
        self.x, self.code = x, None

    def features(self, features: Sequence[int]) -> Tensor:
        if self.code is None:
            self.code = self.sae.encode(self.x)
        return selected_activations(self.code, features)

    def prediction(self, layer: int) -> Tensor:
        """The dictionary's reconstruction (a transcoder's prediction, its skip term included)."""
        self.code, prediction = self.sae.reconstruct(self.x)
        return prediction


def layer_pass(sae: nn.Module) -> LayerPass | OneLayerPass:
    """What a rewrite keeps of one forward pass's features: ``read(j, x)`` each covered layer's
    input rows in order, then ``features(ids)`` (rows, m) and ``prediction(j)`` (rows, d_layer_out)."""
    return LayerPass(sae) if is_cross_layer(sae) else OneLayerPass(sae)


class LayerPass:
    """One forward pass's features of a CLT, layer by layer as the pass reaches them: ``read`` is
    called with each covered layer's input in order (layer 0 starts a new pass)."""

    def __init__(self, sae: CrossLayerTranscoder) -> None:
        if sae.activation == "topk" and sae.clt_topk == "all":
            raise ValueError("a cross-layer transcoder with clt_topk='all' picks layer l's features among every layer's, so a forward "
                             "pass cannot encode them before writing layer l's output: rewriting the model's outputs "
                             "(steer, the audit) needs clt_topk='layer' or jumprelu")
        self.sae = sae
        self.acts: list[Tensor] = []
        """Per layer read so far in this pass: (rows, n) its features' activations."""

    def read(self, layer: int, x: Tensor) -> None:
        """Encodes layer ``layer``'s features on its input rows ``x``, kept for the later layers."""
        if layer == 0:
            self.acts = []
        if layer != len(self.acts):
            raise ValueError(f"covered layer {layer} read after layers 0..{len(self.acts) - 1}: "
                             "expected the layers in order, one forward pass at a time")
        self.acts.append(layer_acts(self.sae, layer, x))

    def prediction(self, layer: int) -> Tensor:
        """(rows, d_layer_out) the CLT's prediction of layer ``layer``'s output from the features of
        the layers read so far: ``b_dec[j] + sum_{l <= j} f_l W_dec[l][:, j - l]``."""
        sae = self.sae
        out = (sae.b_dec[layer] / sae.target_scales[layer].to(sae.b_dec.dtype)).expand(len(self.acts[0]), -1)
        for source in range(layer + 1):
            out = out + self.acts[source] @ raw_decoder(sae, source)[:, layer - source]
        return out

    def features(self, features: Sequence[int]) -> Tensor:
        """(rows, len(features)) the activations of flat ``features``, 0 for those of layers not read yet."""
        n = self.sae.n_per_layer
        rows = len(self.acts[0])
        columns = [self.acts[f // n][:, f % n] if f // n < len(self.acts) else self.acts[0].new_zeros(rows)
                   for f in (int(f) for f in features)]
        return torch.stack(columns, dim=1)
