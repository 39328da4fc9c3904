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
    """Where a transcoder writes (what its errors are errors of); None for an SAE."""

    @property
    def where(self) -> str:
        """``model.layers.3`` for an SAE, ``reads <in> -> writes <out>`` for a transcoder."""
        return describe_hookpoints(self.hookpoint, self.hookpoint_out)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: features as ``{"id", "activation"}`` objects."""
        data = asdict(self)
        for text in data["texts"]:
            for token in text["tokens"]:
                token["features"] = [{"id": i, "activation": a} for i, a in token["features"]]
                if self.feature is None:
                    del token["activation"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)


class _Encoded:
    """One text's encoded rows, before the baseline divides their squared errors; ``rows`` are
    what the dictionary reconstructs (a transcoder's target)."""

    def __init__(self, ids: list[int], encoded: Tensor, rows: Tensor, top: tuple[Tensor, Tensor], l0: Tensor,
                 squared_error: Tensor, activation: Tensor | None) -> None:
        self.ids, self.encoded, self.rows, self.top, self.l0 = ids, encoded, rows, top, l0
        self.squared_error, self.activation = squared_error, activation


class Observer:
    """A dictionary with its model and tokenizer, ready to observe texts. Build it with
    ``open_observer``; the model's weights load at the first ``observe``."""

    def __init__(self, folder: DictionaryFolder, *, model_name: str, source: Any, dtype: str, hookpoint: str,
                 tokenizer: Any, max_positions: int | None, hookpoint_out: str | None = None,
                 hidden_size: int | None = None) -> None:
        self.folder, self.model_name, self.hookpoint, self.tokenizer = folder, model_name, hookpoint, tokenizer
        self.hookpoint_out = hookpoint_out
        """Where a transcoder writes (canonical hookpoint); None for an SAE."""
        self.hidden_size = hidden_size
        """The model's hidden size (what its unembedding reads), where known before it loads."""
        self._source, self._dtype, self.max_positions = source, dtype, max_positions
        data = folder.data_config()
        self.excluded = excluded_token_ids(data, tokenizer)
        self.prepend_bos = data.prepend_bos and tokenizer.bos_token_id is not None
        self._harvester: ActivationHarvester | None = None
        self._pair: MultiHarvester | None = None
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
        return describe_hookpoints(self.hookpoint, self.hookpoint_out)

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
        if self.hookpoint_out is not None:
            self._pair = MultiHarvester(model, [self.hookpoint, self.hookpoint_out])
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
        reconstructs, from one forward pass (the same tensor twice for an SAE)."""
        harvester = self.harvester()
        if self._pair is None:
            acts = harvester(input_ids)
            return acts, acts
        pair = self._pair(input_ids)
        return pair[self.hookpoint], pair[self.output_hookpoint]

    @torch.inference_mode()
    def _encode(self, ids: list[int], *, top: int, feature: int | None) -> _Encoded:
        acts, targets = (t[0] for t in self.inputs_and_targets(torch.tensor([ids])))
        encoded = spliced_positions(torch.tensor(ids), self.excluded)
        param = next(self.sae.parameters())
        rows = acts[encoded.to(acts.device)].to(device=param.device, dtype=param.dtype)
        target_rows = targets[encoded.to(targets.device)].to(device=param.device).float()
        code, reconstruction = self.sae.reconstruct(rows)
        dense = _dense_top(code, top)
        l0 = (code.acts > 0).sum(dim=-1)
        activation = None if feature is None else _feature_activation(code, feature)
        squared_error = (target_rows - reconstruction.float()).pow(2).sum(dim=-1)
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
            texts=[TextObservation(text, self._tokens(e, stats)) for text, e in zip(texts, encoded, strict=True)],
            hookpoint_out=self.hookpoint_out,
        )

    def _baseline(self, encoded: list[_Encoded]) -> tuple[Baseline, ActivationStats]:
        stats = self.folder.stats
        if stats is not None:
            return Baseline("held-out", stats.n_tokens, float(stats.total_variance)), stats
        stats = ActivationStats.of(torch.cat([e.rows for e in encoded]))
        return Baseline("text", stats.n_tokens, float(stats.total_variance)), stats

    def _tokens(self, e: _Encoded, stats: ActivationStats) -> list[TokenObservation]:
        variance = float(stats.total_variance)
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
            tokens.append(TokenObservation(
                position, token_id, text, True, features, l0[row], squared[row] ** 0.5,
                squared[row] / variance if variance > 0 else None,
                None if activation is None else activation[row],
            ))
            row += 1
        return tokens


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
    canonical = hookpoint_for(folder.hook_name, skeleton, override=hookpoint)
    _check_width(folder, skeleton, source.model_id, canonical, "d_in", folder.sae.d_in)
    canonical_out = None
    if folder.hook_name_out is not None:
        canonical_out = hookpoint_for(folder.hook_name_out, skeleton, override=hookpoint_out,
                                      field="hook_name_out", give="hookpoint_out= (open_observer)")
        if canonical_out == canonical:
            raise ValueError(f"{folder.uri}: a transcoder reading and writing the same place {canonical}; "
                             "expected a target hookpoint other than its input")
        _check_width(folder, skeleton, source.model_id, canonical_out, "d_out", folder.sae.d_out)
    elif hookpoint_out is not None:
        raise ValueError(f"hookpoint_out={hookpoint_out!r}: {folder.uri} is an SAE (no metadata.hook_name_out); "
                         "only a transcoder writes to another hookpoint")
    observer = Observer(folder, model_name=source.model_id, source=source, dtype=model_cfg.dtype,
                        hookpoint=canonical, tokenizer=tokenizer if tokenizer is not None else load_tokenizer(source),
                        max_positions=getattr(skeleton.config, "max_position_embeddings", None),
                        hookpoint_out=canonical_out, hidden_size=int(skeleton.config.hidden_size))
    if loaded_model is not None:
        observer.use_model(loaded_model)
    return observer
