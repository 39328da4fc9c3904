"""Which features of a dictionary fire on a text, token by token, and what the dictionary leaves
unexplained there.

    from interp import open_observer

    observer = open_observer("store/runs/<run>/dictionary/model.layers.15")
    result = observer.observe("The cat sat on the mat.", top=5)
    for token in result.texts[0].tokens:
        print(token.token, token.features, token.error_norm, token.relative_error)

The text is tokenized as the training tokenized its text (BOS first when it put BOS first) and
runs through the model up to the dictionary's hookpoint and no further. Tokens the training left
out of the cache (BOS and the other special tokens, ``data.exclude_token_ids``) are shown but not
encoded. Per encoded token: its ``top`` features by activation, how many fired (L0), the norm of
the reconstruction error ``x - x_hat`` and the relative error ``|x - x_hat|^2 / E|x' - mu|^2``:
the squared error over the mean squared deviation of held-out activations ``x'`` from their mean
``mu`` (the total variance). Its mean over the held-out tokens is the dictionary's FVU, so 0.1
means the token is reconstructed as well as a typical held-out token of a dictionary with FVU 0.1.
The mean and variance are those the training job recorded (``activation_stats.safetensors``);
a dictionary without them (older ones, SAELens's) gets them computed on the observed tokens, and
the result says so (``Baseline.source``).

A transcoder reads one hookpoint and predicts another (``metadata.hook_name_out``, e.g. an MLP's
input and output): its features are encoded from the input's activation ``x``, and the error is
that of its prediction of the target's activation ``y`` in the same forward pass,
``y - sae.reconstruct(x)`` (the sparse path, plus the skip term where it has one), against the
target's statistics (a transcoder folder records the target's).

A cross-layer transcoder (``interp.cross_layer``) covers L layers: one forward pass, to the last
covered MLP output, captures every covered layer's input and output; the features of every layer
are encoded from the L inputs, and per token the result gives the ``top`` features among all
layers' (flat ids ``l * n + i``, each with its layer), the L0 over all layers, the error and the
relative error over the L outputs side by side (against the concatenated targets' statistics),
and per covered layer its L0, the error of its output's prediction and that error against its
own output's variance (``TokenObservation.layers``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from activation_cache.config import ModelConfig
from activation_cache.hooking import (
    INPUT_SUFFIX,
    ActivationHarvester,
    MultiHarvester,
    hookpoint_width,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_model_source,
)
from activation_cache.text import excluded_token_ids, token_decoder
from interp.hooknames import hookpoint_for
from interp.loading import DictionaryFolder, read_dictionary_folder
from interp.markup import describe_hookpoints
from trainer.activation_stats import ActivationStats
from trainer.evaluation import spliced_positions

log = logging.getLogger(__name__)

__all__ = ["Baseline", "Observations", "Observer", "TextObservation", "TokenObservation", "open_observer"]


@dataclass(frozen=True)
class TokenObservation:
    """One token of an observed text."""

    position: int
    token_id: int
    token: str
    """The token alone, decoded."""
    encoded: bool
    """False for a token the training left out (BOS, special tokens): no figures then."""
    features: list[tuple[int, float]]
    """Its ``top`` active features as (feature id, activation), largest first."""
    l0: int | None
    """How many features fired."""
    error_norm: float | None
    """``|x - x_hat|``, in raw activation units."""
    relative_error: float | None
    """``|x - x_hat|^2`` over the total variance of the baseline (the module docstring)."""
    activation: float | None = None
    """The activation of the feature asked for (``feature=``), 0 where it did not fire."""
    layers: list[LayerObservation] | None = None
    """A cross-layer transcoder's figures per covered layer, in order; None for any other dictionary
    or a token left out."""


@dataclass(frozen=True)
class LayerObservation:
    """One covered layer of a cross-layer transcoder at one token."""

    l0: int
    """How many of the layer's features fired."""
    error_norm: float
    """``|y_l - y_hat_l|`` at the layer's output, raw units."""
    relative_error: float | None
    """``|y_l - y_hat_l|^2`` over the total variance of the baseline's slice for this output."""


@dataclass(frozen=True)
class TextObservation:
    """One observed text."""

    text: str
    tokens: list[TokenObservation]


@dataclass(frozen=True)
class Baseline:
    """The activation mean and variance relative errors are measured against."""

    source: Literal["held-out", "text"]
    """``held-out``: recorded by the training job; ``text``: computed on the observed tokens."""
    n_tokens: int
    total_variance: float
    """``E|x - mu|^2``: the sum of the per-dimension variances."""
    layer_total_variance: list[float] | None = None
    """A cross-layer transcoder's total variance of each covered layer's output (they sum to
    ``total_variance``); None for any other dictionary."""


@dataclass(frozen=True)
class Observations:
    """What ``Observer.observe`` returns: each text's tokens, with what they were measured by."""

    dictionary: str
    hookpoint: str
    """Where the dictionary reads."""
    model: str
    n_latents: int
    top: int
    feature: int | None
    baseline: Baseline
    texts: list[TextObservation]
    hookpoint_out: str | None = None
    """Where a transcoder writes (what its errors are errors of); None for an SAE. A cross-layer
    transcoder's first covered layer's input and output are ``hookpoint`` and ``hookpoint_out``."""
    layer_hookpoints: list[tuple[str, str]] | None = None
    """A cross-layer transcoder's (input, output) hookpoints of each covered layer, in order; None
    for any other dictionary."""
    n_per_layer: int | None = None
    """A cross-layer transcoder's features per layer: feature ``id`` is layer ``id // n_per_layer``'s."""

    @property
    def where(self) -> str:
        """``model.layers.3`` for an SAE, ``reads <in> -> writes <out>`` for a transcoder."""
        return describe_hookpoints(self.hookpoint, self.hookpoint_out, self.layer_hookpoints)

    def feature_layer(self, feature: int) -> int | None:
        """The covered layer of a cross-layer transcoder's feature; None for any other dictionary."""
        return None if self.n_per_layer is None else feature // self.n_per_layer

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: features as ``{"id", "activation"}`` objects (and ``"layer"`` for a
        cross-layer transcoder)."""
        data = asdict(self)
        for text in data["texts"]:
            for token in text["tokens"]:
                token["features"] = [{"id": i, "activation": a} | self._layer_key(i) for i, a in token["features"]]
                if self.feature is None:
                    del token["activation"]
                if self.n_per_layer is None:
                    del token["layers"]
        if self.n_per_layer is None:
            for key in ("layer_hookpoints", "n_per_layer"):
                del data[key]
            del data["baseline"]["layer_total_variance"]
        return data

    def _layer_key(self, feature: int) -> dict[str, int]:
        return {} if self.n_per_layer is None else {"layer": feature // self.n_per_layer}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)


class _Encoded:
    """One text's encoded rows, before the baseline divides their squared errors; ``rows`` are
    what the dictionary reconstructs (a transcoder's target)."""

    def __init__(self, ids: list[int], encoded: Tensor, rows: Tensor, top: tuple[Tensor, Tensor], l0: Tensor,
                 squared_error: Tensor, activation: Tensor | None) -> None:
        self.ids, self.encoded, self.rows, self.top, self.l0 = ids, encoded, rows, top, l0
        self.squared_error, self.activation = squared_error, activation
        """``l0`` and ``squared_error``: (rows, L) per covered layer, L = 1 but for a cross-layer transcoder."""


class Observer:
    """A dictionary with its model and tokenizer, ready to observe texts. Build it with
    ``open_observer``; the model's weights load at the first ``observe``."""

    def __init__(self, folder: DictionaryFolder, *, model_name: str, source: Any, dtype: str, hookpoint: str,
                 tokenizer: Any, max_positions: int | None, hookpoint_out: str | None = None,
                 hidden_size: int | None = None, layer_hookpoints: list[tuple[str, str]] | None = None) -> None:
        self.folder, self.model_name, self.hookpoint, self.tokenizer = folder, model_name, hookpoint, tokenizer
        self.hookpoint_out = hookpoint_out
        """Where a transcoder writes (canonical hookpoint); None for an SAE. A cross-layer
        transcoder's first covered output (its first input is ``hookpoint``)."""
        self.layer_hookpoints = layer_hookpoints
        """A cross-layer transcoder's canonical (input, output) hookpoints per covered layer; None otherwise."""
        self.hidden_size = hidden_size
        """The model's hidden size (what its unembedding reads), where known before it loads."""
        self._source, self._dtype, self.max_positions = source, dtype, max_positions
        data = folder.data_config()
        self.excluded = excluded_token_ids(data, tokenizer)
        self.prepend_bos = data.prepend_bos and tokenizer.bos_token_id is not None
        self._harvester: ActivationHarvester | None = None
        self._pair: MultiHarvester | None = None
        self._inputs: MultiHarvester | None = None
        self._decode = token_decoder(tokenizer)

    @property
    def sae(self) -> nn.Module:
        return self.folder.sae

    @property
    def output_hookpoint(self) -> str:
        """Where the dictionary's reconstruction lives, and so where a steer edits: the target
        hookpoint of a transcoder, the hookpoint itself for an SAE."""
        return self.hookpoint_out or self.hookpoint

    @property
    def where(self) -> str:
        """``model.layers.3``, or ``reads <in> -> writes <out>`` for a transcoder."""
        return describe_hookpoints(self.hookpoint, self.hookpoint_out, self.layer_hookpoints)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(input, output) hookpoints of each place the dictionary writes: a cross-layer
        transcoder's covered layers, a transcoder's one pair; ``[]`` for an SAE."""
        if self.layer_hookpoints is not None:
            return list(self.layer_hookpoints)
        return [] if self.hookpoint_out is None else [(self.hookpoint, self.hookpoint_out)]

    # ----------------------------------------------------------------------- tokens

    def token_ids(self, text: str, *, chat: bool = False) -> list[int]:
        """``text`` as the model reads it: wrapped in the chat template (``chat``), BOS first
        where the training put BOS first. Raises one line if no token of it would be encoded."""
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"--chat: the tokenizer of {self.model_name} has no chat template")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.prepend_bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id, *ids]
        if not any(i not in self.excluded for i in ids):
            raise ValueError(f"text {_preview(text)}: tokenizes to no token the dictionary encodes "
                             f"({len(ids)} tokens, all left out as in training: BOS and special tokens)")
        if self.max_positions is not None and len(ids) > self.max_positions:
            raise ValueError(f"text {_preview(text)}: {len(ids)} tokens, more than the model's "
                             f"{self.max_positions} positions")
        return ids

    # ----------------------------------------------------------------------- observing

    def use_model(self, model: nn.Module) -> None:
        """Run ``model`` (the dictionary's model, already loaded) instead of loading it."""
        self._harvester = ActivationHarvester(model, self.hookpoint)
        if self.pairs:
            self._pair = MultiHarvester(model, [h for pair in self.pairs for h in pair])
        if self.layer_hookpoints is not None:
            self._inputs = MultiHarvester(model, [h for h, _ in self.layer_hookpoints])
        self.folder.sae.to(model.get_input_embeddings().weight.device)

    def harvester(self) -> ActivationHarvester:
        """The harvester on the model up to where the dictionary reads (a transcoder's input),
        which loads at the first call."""
        if self._harvester is None:
            log.info("loading %s", self.model_name)
            self.use_model(load_model(self._source, dtype=self._dtype))
        assert self._harvester is not None
        return self._harvester

    def inputs_and_targets(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(batch, seq, d_in) activations the dictionary reads and (batch, seq, d_out) those it
        reconstructs, from one forward pass (the same tensor twice for an SAE); a cross-layer
        transcoder's L inputs side by side and its L outputs side by side."""
        harvester = self.harvester()
        if self._pair is None:
            acts = harvester(input_ids)
            return acts, acts
        captured = self._pair(input_ids)
        return (_side_by_side([captured[h] for h, _ in self.pairs]),
                _side_by_side([captured[h] for _, h in self.pairs]))

    def feature_inputs(self, input_ids: Tensor) -> Tensor:
        """(batch, seq, d_in) what the dictionary encodes, the forward stopping there: the
        hookpoint's activations, or a cross-layer transcoder's L inputs side by side."""
        harvester = self.harvester()
        if self._inputs is None:
            return harvester(input_ids)
        captured = self._inputs(input_ids)
        return _side_by_side([captured[h] for h, _ in self.pairs])

    @torch.inference_mode()
    def _encode(self, ids: list[int], *, top: int, feature: int | None) -> _Encoded:
        acts, targets = (t[0] for t in self.inputs_and_targets(torch.tensor([ids])))
        encoded = spliced_positions(torch.tensor(ids), self.excluded)
        param = next(self.sae.parameters())
        rows = acts[encoded.to(acts.device)].to(device=param.device, dtype=param.dtype)
        target_rows = targets[encoded.to(targets.device)].to(device=param.device).float()
        code, reconstruction = self.sae.reconstruct(rows)
        dense = _dense_top(code, top)
        n_layers = len(self.layer_hookpoints or [None])
        l0 = _layer_l0(code, n_layers, self.folder.n_latents // n_layers)
        activation = None if feature is None else _feature_activation(code, feature)
        squared_error = (target_rows - reconstruction.float()).pow(2).reshape(len(rows), n_layers, -1).sum(dim=-1)
        return _Encoded(ids, encoded, target_rows, dense, l0, squared_error, activation)

    def observe(self, texts: str | list[str], *, top: int = 5, feature: int | None = None,
                chat: bool = False) -> Observations:
        """Observe each text (one string, or several observed one by one); ``top`` features per
        token, and ``feature``'s activation at every token when given."""
        if top < 1:
            raise ValueError(f"top={top} must be at least 1")
        self.folder.check_feature(feature)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no text to observe")
        token_ids = [self.token_ids(text, chat=chat) for text in texts]  # every text checked before the model loads
        encoded = [self._encode(ids, top=top, feature=feature) for ids in token_ids]
        baseline, stats = self._baseline(encoded)
        return Observations(
            dictionary=self.folder.uri, hookpoint=self.hookpoint, model=self.model_name, n_latents=self.folder.n_latents,
            top=top, feature=feature, baseline=baseline,
            texts=[TextObservation(text, self._tokens(e, baseline)) for text, e in zip(texts, encoded, strict=True)],
            hookpoint_out=self.hookpoint_out, layer_hookpoints=self.layer_hookpoints, n_per_layer=self.folder.n_per_layer,
        )

    def _baseline(self, encoded: list[_Encoded]) -> tuple[Baseline, ActivationStats]:
        stats, source = self.folder.stats, "held-out"
        if stats is None:
            stats, source = ActivationStats.of(torch.cat([e.rows for e in encoded])), "text"
        layers = None
        if self.layer_hookpoints is not None:
            layers = stats.variance.double().reshape(len(self.layer_hookpoints), -1).sum(dim=-1).tolist()
        return Baseline(source, stats.n_tokens, float(stats.total_variance), layers), stats  # type: ignore[arg-type]

    def _tokens(self, e: _Encoded, baseline: Baseline) -> list[TokenObservation]:
        variance = baseline.total_variance
        values, indices = (t.tolist() for t in e.top)
        l0, squared = e.l0.tolist(), e.squared_error.tolist()
        activation = None if e.activation is None else e.activation.tolist()
        tokens, row = [], 0
        texts = self._decode(e.ids)
        for position, (token_id, is_encoded, text) in enumerate(zip(e.ids, e.encoded.tolist(), texts, strict=True)):
            if not is_encoded:
                tokens.append(TokenObservation(position, token_id, text, False, [], None, None, None, None))
                continue
            features = [(i, v) for i, v in zip(indices[row], values[row], strict=True) if v > 0]
            total = sum(squared[row])
            tokens.append(TokenObservation(
                position, token_id, text, True, features, sum(l0[row]), total ** 0.5,
                _ratio(total, variance), None if activation is None else activation[row],
                _layer_observations(l0[row], squared[row], baseline.layer_total_variance),
            ))
            row += 1
        return tokens


def _ratio(squared_error: float, variance: float) -> float | None:
    return squared_error / variance if variance > 0 else None


def _layer_observations(l0: list[int], squared: list[float], variances: list[float] | None) -> list[LayerObservation] | None:
    if variances is None:
        return None
    return [LayerObservation(n, s ** 0.5, _ratio(s, v)) for n, s, v in zip(l0, squared, variances, strict=True)]


def _side_by_side(parts: list[Tensor]) -> Tensor:
    """The activations of several hookpoints (each (batch, seq, d), perhaps on different devices)
    concatenated along the last dimension on the first one's device."""
    return parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].device) for p in parts], dim=-1)


def _layer_l0(code: Any, n_layers: int, n_per_layer: int) -> Tensor:
    """(rows, n_layers) how many features of each covered layer fired (one column but for a CLT)."""
    fired = code.acts > 0
    if code.indices is None:
        return fired.reshape(len(fired), n_layers, n_per_layer).sum(dim=-1)
    counts = torch.zeros(len(fired), n_layers, dtype=torch.long, device=fired.device)
    return counts.scatter_add_(1, code.indices // n_per_layer, fired.long())


def _dense_top(code: Any, top: int) -> tuple[Tensor, Tensor]:
    """(values, feature ids) of each row's ``top`` largest activations, largest first."""
    if code.indices is None:
        values, indices = torch.topk(code.acts, min(top, code.acts.shape[-1]), dim=-1)
        return values.float(), indices
    values, order = torch.sort(code.acts, dim=-1, descending=True)
    return values[:, :top].float(), code.indices.gather(-1, order)[:, :top]


def _feature_activation(code: Any, feature: int) -> Tensor:
    if code.indices is None:
        return code.acts[:, feature].float()
    return (code.acts * (code.indices == feature)).sum(dim=-1).float()


def _preview(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def _check_width(folder: DictionaryFolder, skeleton: nn.Module, model_id: str, hookpoint: str, name: str,
                 expected: int) -> None:
    module = dict(skeleton.named_modules())[hookpoint.removesuffix(INPUT_SUFFIX)]
    width = hookpoint_width(module, hookpoint.endswith(INPUT_SUFFIX), int(skeleton.config.hidden_size))
    if width != expected:
        raise ValueError(f"{folder.uri}: dictionary {name}={expected} but {model_id} at {hookpoint} has width {width}")


def _hookpoints(folder: DictionaryFolder, skeleton: nn.Module, model_id: str, hookpoint: str | None,
                hookpoint_out: str | None) -> tuple[str, str | None]:
    """The canonical hookpoint a dictionary of one hookpoint reads and, for a transcoder, the one
    it writes, each of the dictionary's width; ``hookpoint`` and ``hookpoint_out`` override cfg.json's."""
    canonical = hookpoint_for(folder.hook_name, skeleton, override=hookpoint)
    _check_width(folder, skeleton, model_id, canonical, "d_in", folder.sae.d_in)
    if folder.hook_name_out is None:
        if hookpoint_out is not None:
            raise ValueError(f"hookpoint_out={hookpoint_out!r}: {folder.uri} is an SAE (no metadata.hook_name_out); "
                             "only a transcoder writes to another hookpoint")
        return canonical, None
    canonical_out = hookpoint_for(folder.hook_name_out, skeleton, override=hookpoint_out,
                                  field="hook_name_out", give="hookpoint_out= (open_observer)")
    if canonical_out == canonical:
        raise ValueError(f"{folder.uri}: a transcoder reading and writing the same place {canonical}; "
                         "expected a target hookpoint other than its input")
    _check_width(folder, skeleton, model_id, canonical_out, "d_out", folder.sae.d_out)
    return canonical, canonical_out


def _layer_hookpoints(folder: DictionaryFolder, skeleton: nn.Module, model_id: str) -> list[tuple[str, str]]:
    """A cross-layer transcoder's canonical (input, output) hookpoints per covered layer, each of
    the layer's width (the order they run in is checked when a splice runs:
    ``activation_cache.hooking.spliced_pairs``)."""
    sae, pairs = folder.sae, []
    for name_in, name_out in folder.layer_hook_names():
        pair = (hookpoint_for(name_in, skeleton), hookpoint_for(name_out, skeleton, field="hook_names_out"))
        _check_width(folder, skeleton, model_id, pair[0], "d_in", int(sae.d_layer_in))
        _check_width(folder, skeleton, model_id, pair[1], "d_out", int(sae.d_layer_out))
        pairs.append(pair)
    flat = [h for pair in pairs for h in pair]
    if len(set(flat)) != len(flat):
        raise ValueError(f"{folder.uri}: covered layers' hookpoints {pairs} name a place twice; expected each "
                         "covered layer's own MLP input and output")
    return pairs


def open_observer(uri: str, *, model: str | ModelConfig | None = None, hookpoint: str | None = None,
                  s3_options: dict | None = None, loaded_model: nn.Module | None = None,
                  tokenizer: Any = None, hookpoint_out: str | None = None) -> Observer:
    """The dictionary at ``uri`` (ours or SAELens's; an object-store URI or a local folder) with
    its model's tokenizer: everything checked that can be before the model's weights load (the
    folder, the model files, the hookpoint, the widths). ``model`` (a directory or
    ``packaged:...``) overrides the dictionary's model; ``hookpoint`` overrides where it reads
    (needed for a SAELens hook name with no known hookpoint) and ``hookpoint_out`` where a
    transcoder writes (its ``metadata.hook_name_out`` otherwise). ``loaded_model`` and ``tokenizer``:
    that model and its tokenizer, already loaded (in a notebook, or the job's evaluation), used
    instead of reading the model's files again (seconds for a GGUF file)."""
    folder = read_dictionary_folder(uri, s3_options=s3_options)
    model_cfg = folder.model_config(model)
    source = resolve_model_source(model_cfg)
    skeleton = loaded_model if loaded_model is not None else model_skeleton(source)
    layer_hookpoints = None
    if folder.is_cross_layer:
        if hookpoint is not None or hookpoint_out is not None:
            raise ValueError(f"{folder.uri}: a cross-layer transcoder names each covered layer's hookpoints "
                             "(metadata.hook_names / hook_names_out); --hookpoint / hookpoint_out do not apply")
        layer_hookpoints = _layer_hookpoints(folder, skeleton, source.model_id)
        canonical, canonical_out = layer_hookpoints[0]
    else:
        canonical, canonical_out = _hookpoints(folder, skeleton, source.model_id, hookpoint, hookpoint_out)
    observer = Observer(folder, model_name=source.model_id, source=source, dtype=model_cfg.dtype,
                        hookpoint=canonical, tokenizer=tokenizer if tokenizer is not None else load_tokenizer(source),
                        max_positions=getattr(skeleton.config, "max_position_embeddings", None),
                        hookpoint_out=canonical_out, hidden_size=int(skeleton.config.hidden_size),
                        layer_hookpoints=layer_hookpoints)
    if loaded_model is not None:
        observer.use_model(loaded_model)
    return observer
