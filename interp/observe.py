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
    hookpoint_width,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_model_source,
)
from activation_cache.text import excluded_token_ids, token_decoder
from interp.hooknames import hookpoint_for
from interp.loading import DictionaryFolder, read_dictionary_folder
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
    model: str
    n_latents: int
    top: int
    feature: int | None
    baseline: Baseline
    texts: list[TextObservation]

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
    """One text's encoded rows, before the baseline divides their squared errors."""

    def __init__(self, ids: list[int], encoded: Tensor, rows: Tensor, top: tuple[Tensor, Tensor], l0: Tensor,
                 squared_error: Tensor, activation: Tensor | None) -> None:
        self.ids, self.encoded, self.rows, self.top, self.l0 = ids, encoded, rows, top, l0
        self.squared_error, self.activation = squared_error, activation


class Observer:
    """A dictionary with its model and tokenizer, ready to observe texts. Build it with
    ``open_observer``; the model's weights load at the first ``observe``."""

    def __init__(self, folder: DictionaryFolder, *, model_name: str, source: Any, dtype: str, hookpoint: str,
                 tokenizer: Any, max_positions: int | None) -> None:
        self.folder, self.model_name, self.hookpoint, self.tokenizer = folder, model_name, hookpoint, tokenizer
        self._source, self._dtype, self.max_positions = source, dtype, max_positions
        data = folder.data_config()
        self.excluded = excluded_token_ids(data, tokenizer)
        self.prepend_bos = data.prepend_bos and tokenizer.bos_token_id is not None
        self._harvester: ActivationHarvester | None = None
        self._decode = token_decoder(tokenizer)

    @property
    def sae(self) -> nn.Module:
        return self.folder.sae

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
        self.folder.sae.to(model.get_input_embeddings().weight.device)

    def harvester(self) -> ActivationHarvester:
        """The harvester on the model, which loads at the first call."""
        if self._harvester is None:
            log.info("loading %s", self.model_name)
            self.use_model(load_model(self._source, dtype=self._dtype))
        assert self._harvester is not None
        return self._harvester

    @torch.inference_mode()
    def _encode(self, ids: list[int], *, top: int, feature: int | None) -> _Encoded:
        acts = self.harvester()(torch.tensor([ids]))[0]
        encoded = spliced_positions(torch.tensor(ids), self.excluded)
        param = next(self.sae.parameters())
        rows = acts[encoded.to(acts.device)].to(device=param.device, dtype=param.dtype)
        code, reconstruction = self.sae.reconstruct(rows)
        dense = _dense_top(code, top)
        l0 = (code.acts > 0).sum(dim=-1)
        activation = None if feature is None else _feature_activation(code, feature)
        squared_error = (rows.float() - reconstruction.float()).pow(2).sum(dim=-1)
        return _Encoded(ids, encoded, rows.float(), dense, l0, squared_error, activation)

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


def open_observer(uri: str, *, model: str | ModelConfig | None = None, hookpoint: str | None = None,
                  s3_options: dict | None = None, loaded_model: nn.Module | None = None,
                  tokenizer: Any = None) -> Observer:
    """The dictionary at ``uri`` (ours or SAELens's; an object-store URI or a local folder) with
    its model's tokenizer: everything checked that can be before the model's weights load (the
    folder, the model files, the hookpoint, the widths). ``model`` (a directory or
    ``packaged:...``) overrides the dictionary's model; ``hookpoint`` overrides where it reads
    (needed for a SAELens hook name with no known hookpoint). ``loaded_model`` and ``tokenizer``:
    that model and its tokenizer, already loaded (in a notebook, or the job's evaluation), used
    instead of reading the model's files again (seconds for a GGUF file)."""
    folder = read_dictionary_folder(uri, s3_options=s3_options)
    if "hook_name_out" in folder.cfg.get("metadata", {}):
        raise ValueError(f"{folder.uri}: a transcoder (reads {folder.hook_name}, writes "
                         f"{folder.cfg['metadata']['hook_name_out']}); observe reads and reconstructs one hookpoint")
    model_cfg = folder.model_config(model)
    source = resolve_model_source(model_cfg)
    skeleton = loaded_model if loaded_model is not None else model_skeleton(source)
    canonical = hookpoint_for(folder.hook_name, skeleton, override=hookpoint)
    module = dict(skeleton.named_modules())[canonical.removesuffix(INPUT_SUFFIX)]
    width = hookpoint_width(module, canonical.endswith(INPUT_SUFFIX), int(skeleton.config.hidden_size))
    if width != folder.sae.d_in:
        raise ValueError(f"{folder.uri}: dictionary d_in={folder.sae.d_in} but {source.model_id} at {canonical} "
                         f"has width {width}")
    observer = Observer(folder, model_name=source.model_id, source=source, dtype=model_cfg.dtype,
                        hookpoint=canonical, tokenizer=tokenizer if tokenizer is not None else load_tokenizer(source),
                        max_positions=getattr(skeleton.config, "max_position_embeddings", None))
    if loaded_model is not None:
        observer.use_model(loaded_model)
    return observer
