"""Steering: edit a dictionary's features at its hookpoint while the model runs, and generate.

The edit keeps the error term by default. With ``f`` the dictionary's activations of the edited
features on the activation ``x`` and ``f'`` the edited ones, ``x`` becomes

    x + (f' - f) @ W_dec[features]

so everything the dictionary does not explain, and every other feature, flows on unchanged; an
edit that changes nothing (scale by 1, add 0) leaves ``x`` bit-identical. ``error_term="drop"``
substitutes the edited reconstruction ``x_hat + (f' - f) @ W_dec[features]`` for ``x`` instead,
as a naive splice does. The edit applies at every position the dictionary encodes (tokens the
training left out, BOS and the other special tokens, keep their activations, as in the spliced
evaluation), the prompt's and each generated token's; with the KV cache each step edits the new
position only, which is what recomputing the whole sequence would do, since the edit is per token.

A transcoder reads ``x`` at its input hookpoint and predicts ``y`` at its target hookpoint; its
features are encoded from ``x`` and an edit changes ``y``, in the same forward pass:

    y + (f' - f) @ W_dec[features]

so the transcoder's error (``y`` minus its prediction) flows on unchanged; ``error_term="drop"``
substitutes the edited prediction (sparse path, skip term, ``b_dec``) for ``y``. The input runs
before the target in the forward pass (an MLP's input before its output), so the pass captures
``x`` and edits ``y`` once it is computed; generation does the same at each step.

A cross-layer transcoder (``interp.cross_layer``) writes to every covered MLP output at once: an
edit of layer ``l``'s feature moves each output ``y_j``, ``j >= l``, by

    y_j + (f' - f) @ W_dec[l][features, j - l]

with ``f`` encoded from ``x_l``, layer ``l``'s MLP input in the same pass (which edits of earlier
outputs have already moved), so the CLT's error flows on at every layer; ``error_term="drop"``
substitutes for every covered output ``y_j`` the CLT's edited prediction
``b_dec[j] + sum_{l <= j} f_l W_dec[l][:, j - l]`` plus the edit's change. One forward pass
rewrites the covered layers in order (``activation_cache.hooking.spliced_pairs``).

    from interp import open_observer
    from interp.steering import FeatureEdit, Steerer

    steerer = Steerer(open_observer("store/runs/<run>/dictionary/model.layers.15"))
    edit = steerer.edit([1205], "10x")                      # clamp to 10 times its held-out maximum
    result = steerer.steer(["Shall I compare thee"], edit, max_new_tokens=30)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from activation_cache.hooking import spliced, spliced_pairs
from interp.cross_layer import (
    LayerRewrite,
    decoder_directions,
    is_cross_layer,
    layer_pass,
    layer_slices,
    selected_activations,
)
from interp.observe import Observer
from trainer.evaluation import spliced_positions
from trainer.sae import SparseCoder

__all__ = [
    "FeatureEdit", "GenerationSettings", "SteerResult", "Steerer", "edit_activations", "edit_rewrite", "parse_value",
    "rewritten",
]

Mode = Literal["clamp", "add", "scale"]
ErrorTerm = Literal["keep", "drop"]
MODES: tuple[Mode, ...] = ("clamp", "add", "scale")
ERROR_TERMS: tuple[ErrorTerm, ...] = ("keep", "drop")
_MULTIPLE = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*[xX]\s*$")


@dataclass(frozen=True)
class FeatureEdit:
    """What a steer does to the dictionary's features, in raw activation units."""

    features: tuple[int, ...]
    values: tuple[float, ...]
    """One per feature: the clamp target, the amount added, or the factor (``mode``)."""
    mode: Mode = "clamp"
    error_term: ErrorTerm = "keep"

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("features=(): name at least one feature to edit")
        if len(self.values) != len(self.features):
            raise ValueError(f"{len(self.values)} values for {len(self.features)} features {list(self.features)}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {list(MODES)}")
        if self.error_term not in ERROR_TERMS:
            raise ValueError(f"error_term={self.error_term!r}: expected one of {list(ERROR_TERMS)}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features {list(self.features)}: a feature is named twice")

    def edited(self, f: Tensor) -> Tensor:
        """``f'`` from ``f`` (rows, len(features))."""
        values = torch.tensor(self.values, dtype=f.dtype, device=f.device)
        if self.mode == "clamp":
            return values.expand_as(f)
        if self.mode == "add":
            return f + values
        return f * values


def parse_value(text: str) -> tuple[float, bool]:
    """``"3.5"`` -> (3.5, False): raw units; ``"10x"`` -> (10.0, True): a multiple of each
    feature's largest held-out activation. One line for anything else."""
    match = _MULTIPLE.match(text)
    if match:
        return float(match.group(1)), True
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--value {text!r}: expected a number (raw activation units) or a multiple "
                         "of the feature's largest held-out activation such as 10x") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"--value {text!r}: expected a finite number")
    return value, False


def feature_activations(sae: nn.Module, x: Tensor, features: Sequence[int]) -> tuple[Tensor, object]:
    """(rows, len(features)) activations of ``features`` on ``x`` (0 where one did not fire), and the code."""
    code = sae.encode(x)
    return selected_activations(code, features), code


def edit_activations(sae: nn.Module, x: Tensor, edit: FeatureEdit, target: Tensor | None = None) -> Tensor:
    """What the dictionary reconstructs, with ``edit`` applied (the module docstring's formulas):
    ``target`` (rows, d_out; a transcoder's target activations) or, for an SAE, ``x`` itself,
    edited through the features encoded from ``x`` (rows, d_in); in the dtype of what is edited."""
    rows = x.to(next(sae.parameters()).dtype)
    y = x if target is None else target
    if edit.error_term == "keep":
        f, _ = feature_activations(sae, rows, edit.features)
        base = y
    else:
        code, base = sae.reconstruct(rows)  # the full prediction: a skip transcoder's skip term too
        f = selected_activations(code, edit.features)
    delta = (edit.edited(f) - f) @ sae.W_dec[list(edit.features)]
    return (base + delta.to(base.dtype)).to(y.dtype)


def edit_rewrite(sae: nn.Module, edit: FeatureEdit) -> LayerRewrite:
    """``edit`` as a rewrite ``(j, x, y) -> y'`` of each output the dictionary writes, rows at the
    encoded positions (``interp.cross_layer.LayerRewrite``): ``edit_activations`` for a dictionary
    of one hookpoint; for a cross-layer transcoder, output ``j`` moved by the edited features of
    layers ``<= j``, encoded from the inputs of the same pass (the module docstring)."""
    if not is_cross_layer(sae):
        return lambda layer, x, y: edit_activations(sae, x, edit, target=y)
    passing, slices = layer_pass(sae), layer_slices(sae)
    directions = decoder_directions(sae, edit.features).detach()

    def rewrite(layer: int, x: Tensor, y: Tensor) -> Tensor:
        passing.read(layer, x)
        f = passing.features(edit.features)  # features of later layers read as 0: they write nothing here
        delta = (edit.edited(f) - f) @ directions[:, slices[layer]]
        base = y if edit.error_term == "keep" else passing.prediction(layer)
        return (base + delta.to(base.dtype)).to(y.dtype)

    return rewrite


@contextmanager
def rewritten(observer: Observer, replace: LayerRewrite) -> Iterator[None]:
    """While active, every forward pass of the observer's model runs with the activations ``y`` at
    each place the dictionary writes replaced by ``replace(j, x, y)``, both (batch, seq, d): ``j``
    0 and ``x`` the activations at the input hookpoint in the same pass for a transcoder (``y``
    itself for an SAE, at its hookpoint); for a cross-layer transcoder, covered layer ``j``'s MLP
    input and output, ``j = 0, 1, ...`` in the order the pass runs them. A target that runs before
    its input is refused when it runs (``activation_cache.hooking.spliced_pairs``)."""
    model = observer.harvester().model
    if not observer.pairs:
        with spliced(model, observer.hookpoint, lambda acts: replace(0, acts, acts)):
            yield
        return
    with spliced_pairs(model, observer.pairs, replace):
        yield


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 40
    seed: int | None = None
    """None: greedy; a seed: sampling (temperature 1, full distribution) from that seed."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: expected at least 1")


@dataclass(frozen=True)
class Continuation:
    prompt: str
    prompt_ids: list[int]
    unedited: str
    steered: str
    unedited_ids: list[int] = field(repr=False)
    steered_ids: list[int] = field(repr=False)


@dataclass(frozen=True)
class SteerResult:
    dictionary: str
    hookpoint: str
    features: list[int]
    values: list[float]
    mode: str
    error_term: str
    max_new_tokens: int
    seed: int | None
    continuations: list[Continuation]
    hookpoint_out: str | None = None
    """Where a transcoder writes, and so where the edit applies; None for an SAE (at ``hookpoint``)."""
    layer_hookpoints: list[tuple[str, str]] | None = None
    """A cross-layer transcoder's (input, output) hookpoints per covered layer; None otherwise."""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)


class Steerer:
    """A dictionary with its model (an ``Observer``), steering generation where it writes: its
    hookpoint, or a transcoder's target hookpoint (the module docstring)."""

    def __init__(self, observer: Observer) -> None:
        if not isinstance(observer.sae, SparseCoder) and not is_cross_layer(observer.sae):
            raise ValueError(f"{observer.folder.uri}: normalize_activations="
                             f"{observer.folder.cfg.get('normalize_activations')!r}: steering edits raw-unit decoder "
                             "directions, so only dictionaries without run-time normalisation can steer")
        if is_cross_layer(observer.sae):
            layer_pass(observer.sae)  # refuses a CLT whose forward cannot encode a layer before writing its output
        self.observer = observer

    @property
    def model(self) -> nn.Module:
        return self.observer.harvester().model

    def edit(self, features: Sequence[int], value: str | float, *, mode: Mode = "clamp",
             error_term: ErrorTerm = "keep") -> FeatureEdit:
        """A checked edit: every feature exists; ``value`` a number or ``"<N>x"`` (times each
        feature's largest held-out activation, which the dictionary must record)."""
        for feature in features:
            self.observer.folder.check_feature(feature)
        number, multiple = parse_value(value) if isinstance(value, str) else (float(value), False)
        if not multiple:
            return FeatureEdit(tuple(features), (number,) * len(features), mode, error_term)
        maxima = self.observer.folder.feature_max
        if maxima is None:
            raise ValueError(f"--value {value}: {self.observer.folder.uri} records no held-out feature maxima "
                             "(feature_stats.safetensors); give the value in raw activation units")
        return FeatureEdit(tuple(features), tuple(number * float(maxima[f]) for f in features), mode, error_term)

    @contextmanager
    def applied(self, edit: FeatureEdit | None) -> Iterator[None]:
        """While active, every forward pass of the model runs with ``edit`` where the dictionary
        writes (nothing when ``edit`` is None), at the positions the dictionary encodes."""
        if edit is None:
            yield
            return
        model, rows_rewrite = self.model, edit_rewrite(self.observer.sae, edit)
        excluded = self.observer.excluded
        current: dict[str, Tensor] = {}

        def remember_ids(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = args[0] if args else kwargs.get("input")
            current["encoded"] = spliced_positions(ids.cpu(), excluded)

        def replace(layer: int, x: Tensor, y: Tensor) -> Tensor:
            encoded = current["encoded"].to(y.device)
            out = y.clone()
            out[encoded] = rows_rewrite(layer, x[encoded.to(x.device)], y[encoded])
            return out

        handle = model.get_input_embeddings().register_forward_pre_hook(remember_ids, with_kwargs=True)
        try:
            with rewritten(self.observer, replace):
                yield
        finally:
            handle.remove()

    @torch.inference_mode()
    def generate(self, ids: list[int], edit: FeatureEdit | None, settings: GenerationSettings, *,
                 use_cache: bool = True) -> tuple[list[int], Tensor]:
        """The new token ids and their (new tokens, vocab) logits, with ``edit`` applied."""
        model = self.model
        device = model.get_input_embeddings().weight.device
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0} if settings.seed is not None \
            else {"do_sample": False}
        with self.applied(edit):
            out = model.generate(
                torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=settings.max_new_tokens, use_cache=use_cache, output_logits=True,
                return_dict_in_generate=True, pad_token_id=self.observer.tokenizer.eos_token_id, **sampling,
            )
        new = out.sequences[0, len(ids):].tolist()
        return new, torch.stack(out.logits, dim=1)[0].float().cpu()

    def steer(self, prompts: str | list[str], edit: FeatureEdit, settings: GenerationSettings | None = None, *,
              chat: bool = False) -> SteerResult:
        """Each prompt continued without and with ``edit``."""
        settings = settings or GenerationSettings()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        token_ids = [self.observer.token_ids(p, chat=chat) for p in prompts]  # all checked before the model loads
        decode = self.observer.tokenizer.decode
        continuations = []
        for prompt, ids in zip(prompts, token_ids, strict=True):
            unedited, _ = self.generate(ids, None, settings)
            steered, _ = self.generate(ids, edit, settings)
            continuations.append(Continuation(prompt, ids, decode(unedited, skip_special_tokens=False),
                                              decode(steered, skip_special_tokens=False), unedited, steered))
        return SteerResult(self.observer.folder.uri, self.observer.hookpoint, list(edit.features), list(edit.values),
                           edit.mode, edit.error_term, settings.max_new_tokens, settings.seed, continuations,
                           self.observer.hookpoint_out, self.observer.layer_hookpoints)
