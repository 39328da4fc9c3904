"""The spliced evaluation of a trained dictionary: the SAE's reconstruction substituted into the
real model on held-out text (``eval.json``'s ``lm`` and ``unexplained`` sections).

Three forward passes per batch: clean, with the hookpoint's activations replaced by the SAE's
reconstruction, and with them zero-ablated. Only the positions the cache keeps are replaced (BOS
and the other excluded tokens keep their activations: the SAE never saw them) and only those
are scored. A transcoder (cfg.json's ``metadata.hook_name_out``) reads its input hookpoint and
replaces its target hookpoint's activations with its prediction in the same pass
(``activation_cache.hooking.spliced_pair``); the zero-ablation and the per-token error are the
target's. A cross-layer transcoder (cfg.json's architecture ``*_clt``, ``metadata.hook_names`` /
``hook_names_out``) replaces every covered MLP output in one pass, each layer's features encoded
from its input as the spliced forward reaches it (``activation_cache.hooking.spliced_pairs``);
the zero-ablation covers every one of them and the error is reported over all and per layer.
The layers before the first one a splice touches compute the same in all three passes: the
replaced and ablated passes start there from the clean pass's hidden states (``_Resume``). The
math is ``trainer.evaluation``'s; here are the model, the text, the object store and Ray.
``evaluate_in_ray`` runs it as a Ray task after training and returns, beside the evaluations,
where the task's time went (``Evaluations.timings``); ``evaluate_stored`` runs it without Ray
for ``saeforge eval``.

With the model still loaded, a few of the report's feature cards are then audited
(``interp.audit``, ``eval.audit_*``): each clamped to a multiple of its largest held-out
activation and zeroed, on the first ``eval.audit_tokens`` of the same held-out text
(``eval.json``'s ``audit`` section; the report draws its headline figures on those cards).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.eval_text import EvalText, held_out_text, text_source
from activation_cache.hooking import (
    INPUT_SUFFIX,
    layer_container,
    load_model,
    load_tokenizer,
    resolve_hookpoint,
    resolve_model_source,
    spliced,
    spliced_pair,
    spliced_pairs,
)
from activation_cache.store import ObjectNotFound, ObjectStore, open_store
from activation_cache.text import excluded_token_ids, pack_sequences
from activation_cache.unembedding import unembedding_of
from cluster.config import EvalConfig, JobConfig, job_from_dict
from cluster.errors import EvaluationFailed, no_room, one_line_cause, resources_text
from cluster.report_cards import FeatureCard, FeatureSample
from cluster.timing import Fault
from interp.audit import audit, firing_counts, logit_lens_refusal, target_standout
from interp.observe import Observer, open_observer
from interp.steering import FeatureEdit, Steerer
from trainer.dictionary import load_dictionary
from trainer.evaluation import (
    ReconstructionErrorStats,
    SplicedLossStats,
    scored_positions,
    spliced_positions,
)
from trainer.layout import (
    CONFIG_FILE,
    EVAL_FILE,
    FEATURES_FILE,
    REPORT_FILE,
    RUN_CONFIG_FILE,
    TRAINING_CURVES_FILE,
    WEIGHTS_FILE,
    dictionary_folder_name,
    merged_eval,
    read_run_config,
    rewrite_files,
    split_dictionary_uri,
)
from trainer.loggers import MetricLogger, NullLogger, make_logger

log = logging.getLogger(__name__)


class SplicedEval(NamedTuple):
    """One dictionary's spliced evaluation."""

    lm: dict[str, Any]
    """Cross-entropies, loss recovered, KL, delta LM loss (``SplicedLossStats.result``)."""
    unexplained: dict[str, Any]
    """Error-norm and per-token FVU summaries, histogram, worst contexts."""
    error_norms: Tensor
    """(n_tokens,) every evaluated token's reconstruction-error norm (for a histogram)."""


def load_sae(files: dict[str, bytes]) -> tuple[nn.Module, dict]:
    """The dictionary (acting on raw activations) in eval mode, and its cfg.json."""
    sae, cfg = load_dictionary(files)
    return sae.eval(), cfg


def target_hookpoint(cfg: dict) -> str | None:
    """A transcoder's target hookpoint (cfg.json's ``metadata.hook_name_out``); None for an SAE."""
    return cfg.get("metadata", {}).get("hook_name_out")


def clt_pairs(cfg: dict) -> list[tuple[str, str]] | None:
    """A cross-layer transcoder's (MLP input, MLP output) hookpoints, layer by layer (cfg.json's
    ``metadata.hook_names`` and ``hook_names_out``; architecture ``*_clt``); None for any other
    dictionary."""
    if not str(cfg.get("architecture", "")).endswith("_clt"):
        return None
    metadata = cfg.get("metadata", {})
    inputs, targets = list(metadata.get("hook_names") or []), list(metadata.get("hook_names_out") or [])
    if not inputs or len(inputs) != len(targets):
        raise ValueError(f"cfg.json architecture {cfg.get('architecture')!r}: metadata.hook_names={inputs} and "
                         f"hook_names_out={targets} must name the same number (>= 1) of layers")
    return list(zip(inputs, targets, strict=True))


def folder_name(cfg: dict) -> str:
    """The dictionary's folder name under ``dictionary/`` from its cfg.json (a CLT's
    ``clt-<first input>-to-<last target>``)."""
    pairs = clt_pairs(cfg)
    if pairs is not None:
        return dictionary_folder_name(pairs[0][0], pairs[-1][1], clt=True)
    return dictionary_folder_name(cfg["metadata"]["hook_name"], target_hookpoint(cfg))


class _Splice:
    """The replacement at the (target) hookpoint: the dictionary's prediction at the spliced
    positions (their errors recorded), or zeros there."""

    def __init__(self, sae: nn.Module, errors: ReconstructionErrorStats) -> None:
        self.sae, self.errors = sae, errors
        self.param = next(sae.parameters())
        self.mask = self.sequences = self.positions = None

    def batch(self, mask: Tensor, sequence_ids: Tensor) -> None:
        self.mask = mask
        self.sequences = sequence_ids[:, None].expand_as(mask)[mask]
        self.positions = torch.arange(mask.shape[1]).expand_as(mask)[mask]

    def _rows(self, acts: Tensor, width: int, what: str) -> tuple[Tensor, Tensor]:
        """(the activations as rows (B*S, d), which rows are spliced), checking their width."""
        if acts.shape[-1] != width:
            raise ValueError(f"dictionary {what}={width} but the "
                             f"{'input ' if what.startswith('d_in') else ''}hookpoint's activations have d={acts.shape[-1]}")
        flat = acts.reshape(-1, acts.shape[-1])
        return flat, self.mask.reshape(-1).to(flat.device)

    def _x(self, rows: Tensor) -> Tensor:
        return rows.to(device=self.param.device, dtype=self.param.dtype)

    def predict(self, inputs: Tensor, target: Tensor) -> Tensor:
        """``target`` with the dictionary's prediction from ``inputs`` (its reconstruction, with
        the skip term of a skip transcoder) at the spliced positions."""
        flat_in, keep = self._rows(inputs, self.sae.d_in, "d_in")
        flat_out, keep_out = self._rows(target, self.sae.d_out, "d_out")
        x = self._x(flat_in[keep])
        if x.shape[0] == 0:
            return target
        _, prediction = self.sae.reconstruct(x)
        y = flat_out[keep_out].to(device=prediction.device)
        self.errors.update(y.float(), prediction.float(), sequences=self.sequences, positions=self.positions)
        return self._written(flat_out, keep_out, prediction).view_as(target)

    @staticmethod
    def _written(flat: Tensor, keep: Tensor, rows: Tensor | float) -> Tensor:
        out = flat.clone()
        out[keep] = rows.to(device=out.device, dtype=out.dtype) if isinstance(rows, Tensor) else rows
        return out

    def reconstruct(self, acts: Tensor) -> Tensor:
        return self.predict(acts, acts)

    def ablate(self, acts: Tensor) -> Tensor:
        flat, keep = self._rows(acts, self.sae.d_out, "d_out")
        return self._written(flat, keep, 0.0).view_as(acts)


class _CrossLayerSplice(_Splice):
    """Every covered MLP output replaced in one forward by a cross-layer transcoder's prediction
    (``trainer.clt.CrossLayerTranscoder``, on flat concatenations of its layers).

    Layer ``l``'s prediction is the CLT's on the inputs the spliced forward computed for layers
    ``0..l`` beside the clean forward's inputs of the later layers (``capture_clean`` keeps those):
    a layer's features read only its own input and a prediction only earlier layers' features,
    so those later inputs change nothing, except where a TopK selection across layers
    (``clt_topk=all``) needs every layer's pre-activations before the later ones exist. The
    error is recorded per layer and, once the last layer is replaced, over all targets at once."""

    def __init__(self, clt: nn.Module, errors: ReconstructionErrorStats,
                 layer_errors: list[ReconstructionErrorStats]) -> None:
        super().__init__(clt, errors)
        self.layer_errors = layer_errors
        self.n_layers, self.d_in, self.d_out = clt.n_layers, clt.d_layer_in, clt.d_layer_out
        self.clean_inputs: list[Tensor | None] = [None] * self.n_layers
        self.inputs: list[Tensor | None] = [None] * self.n_layers
        self.sides: list[tuple[Tensor, Tensor]] = []  # (target, prediction) rows of each layer replaced so far

    def batch(self, mask: Tensor, sequence_ids: Tensor) -> None:
        super().batch(mask, sequence_ids)
        self.clean_inputs = [None] * self.n_layers  # a previous batch's inputs must never be used

    def capture_clean(self, layer: int, inputs: Tensor, target: Tensor) -> Tensor:
        """Keep the clean forward's input rows of ``layer``; the target stays."""
        flat_in, keep = self._rows(inputs, self.d_in, "d_in (per layer)")
        self.clean_inputs[layer] = self._x(flat_in[keep])
        return target

    def predict_layer(self, layer: int, inputs: Tensor, target: Tensor) -> Tensor:
        """``target`` (layer ``layer``'s MLP output) with the CLT's prediction at the spliced
        positions."""
        if any(x is None for x in self.clean_inputs):
            raise RuntimeError("the CLT splice ran before the clean forward captured every covered layer's input")
        flat_in, keep = self._rows(inputs, self.d_in, "d_in (per layer)")
        flat_out, keep_out = self._rows(target, self.d_out, "d_out (per layer)")
        if layer == 0:
            self.sides = []
        self.inputs[layer] = self._x(flat_in[keep])
        if self.inputs[layer].shape[0] == 0:
            return target
        x = torch.cat([*self.inputs[: layer + 1], *self.clean_inputs[layer + 1:]], dim=-1)
        _, prediction = self.sae.reconstruct(x)
        prediction = prediction[:, layer * self.d_out: (layer + 1) * self.d_out]
        y = flat_out[keep_out].to(device=prediction.device).float()
        self.layer_errors[layer].update(y, prediction.float(), sequences=self.sequences, positions=self.positions)
        self.sides.append((y, prediction.float()))
        if layer == self.n_layers - 1:
            ys, predictions = zip(*self.sides, strict=True)
            self.errors.update(torch.cat(ys, dim=-1), torch.cat(predictions, dim=-1), sequences=self.sequences,
                               positions=self.positions)
        return self._written(flat_out, keep_out, prediction).view_as(target)

    def ablate_layer(self, layer: int, inputs: Tensor, target: Tensor) -> Tensor:
        flat, keep = self._rows(target, self.d_out, "d_out (per layer)")
        return self._written(flat, keep, 0.0).view_as(target)


Splices = Callable[[], AbstractContextManager]
"""A context manager factory: the forward passes run inside it are spliced."""


class _Resume:
    """The replaced and zero-ablated forwards started at the first decoder layer a splice touches.

    Every layer before it computes the same in all three passes, so the clean pass keeps the
    hidden states entering it and the other two start there (``inputs_embeds``, the model's layer
    list cut to that layer onwards): for a mid-depth hookpoint about a third of the evaluation's
    layer computations. ``check`` compares, on the first batch, a clean forward started there with
    the whole clean forward; a model whose forward does more between its embeddings and its first
    layer than passing them on (scaling them, adding position embeddings) fails it, and then every
    forward runs whole."""

    def __init__(self, model: nn.Module, parent: nn.Module, attr: str, layer: int) -> None:
        self.model, self.parent, self.attr, self.layer = model, parent, attr, layer
        self.hidden: Tensor | None = None
        self.checked = False

    @classmethod
    def of(cls, model: nn.Module, hookpoints: list[str]) -> _Resume | None:
        """Where ``hookpoints`` (canonical) let the forwards start: the first decoder layer holding
        one of them; None if one is outside the decoder layers or the first layer holds one."""
        try:
            container, _ = layer_container(model)
        except ValueError:
            return None
        layers = []
        for hookpoint in hookpoints:
            index = hookpoint.removesuffix(INPUT_SUFFIX).removeprefix(f"{container}.").split(".")[0]
            if not hookpoint.startswith(f"{container}.") or not index.isdigit():
                return None
            layers.append(int(index))
        layer = min(layers)
        if layer == 0:
            return None
        parent, _, attr = container.rpartition(".")
        modules = dict(model.named_modules())
        return cls(model, modules[parent], attr, layer)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """While active, a forward keeps the hidden states entering the resume layer."""
        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.hidden = (args[0] if args else next(iter(kwargs.values()))).clone()

        # prepend: kept before any splice hook on that layer (a ``:input`` hookpoint) changes them
        handle = getattr(self.parent, self.attr)[self.layer].register_forward_pre_hook(keep, with_kwargs=True,
                                                                                       prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def forward(self) -> Tensor:
        """The logits of a forward from the kept hidden states through the layers from the resume one."""
        layers = getattr(self.parent, self.attr)
        setattr(self.parent, self.attr, nn.ModuleList(list(layers)[self.layer:]))
        try:
            return self.model(inputs_embeds=self.hidden, use_cache=False).logits
        finally:
            setattr(self.parent, self.attr, layers)

    def check(self, clean_logits: Tensor) -> bool:
        """Whether a clean forward from the kept states gives ``clean_logits`` (checked once)."""
        if not self.checked:
            self.checked = True
            if not torch.equal(self.forward(), clean_logits):
                log.info("the spliced forwards run whole: a clean forward started at layer %d of %s differs "
                         "from the whole one", self.layer, type(self.model).__name__)
                return False
        return True


def _losses(model: nn.Module, text: EvalText, cfg: EvalConfig, name: str, splice: _Splice, *,
            clean: Splices, replaced: Splices, ablated: Splices, hookpoints: list[str]) -> SplicedLossStats:
    """The three forward passes over every batch of ``text`` (clean, replaced, zero-ablated),
    each inside its context, ``splice`` told each batch's spliced positions first; the replaced
    and ablated ones start at the first layer holding one of ``hookpoints`` (``_Resume``)."""
    device = model.get_input_embeddings().weight.device
    losses = SplicedLossStats()
    resume = _Resume.of(model, hookpoints)
    starts = range(0, len(text.tokens), cfg.batch_size)
    for lo in tqdm(starts, desc=f"eval {name}", unit="batch", disable=None, file=sys.stderr):
        # Copies: the token and sequence-id arrays arrive read-only from Ray's object store.
        ids = torch.tensor(text.tokens[lo : lo + cfg.batch_size])
        splice.batch(spliced_positions(ids, text.excluded_token_ids), torch.tensor(text.sequence_ids[lo: lo + cfg.batch_size]))
        ids = ids.to(device)
        with clean(), resume.capturing() if resume is not None else nullcontext():
            logits = [model(input_ids=ids, use_cache=False).logits]
        if resume is not None and not resume.check(logits[0]):
            resume = None
        for context in (replaced, ablated):
            with context():
                logits.append(model(input_ids=ids, use_cache=False).logits if resume is None else resume.forward())
        losses.update(clean_logits=logits[0], spliced_logits=logits[1], ablated_logits=logits[2], token_ids=ids,
                      mask=scored_positions(ids, text.excluded_token_ids))
    return losses


def _unexplained(errors: ReconstructionErrorStats, text: EvalText, tokenizer: Any, cfg: EvalConfig) -> dict:
    unexplained = errors.result(histogram_bins=cfg.histogram_bins, n_worst=cfg.worst_contexts)
    worst = unexplained.pop("worst_tokens")
    unexplained["worst_contexts"] = [_with_context(entry, text, tokenizer, cfg.context_tokens) for entry in worst]
    return unexplained


@torch.inference_mode()
def evaluate_spliced(
    sae: nn.Module, model: nn.Module, hookpoint: str, text: EvalText, tokenizer: Any, *, cfg: EvalConfig,
    target: str | None = None,
) -> SplicedEval:
    """Splice ``sae`` (acting on raw activations) into ``model`` at ``hookpoint`` and evaluate it
    on ``text``: clean / spliced / zero-ablated next-token losses and the per-token error.

    A transcoder names its ``target`` hookpoint: it reads ``hookpoint`` and its prediction
    replaces ``target``'s activations in the same pass; ``target`` is what is zero-ablated and
    what the per-token error (target - prediction) measures. ``lm`` names the hookpoint(s)."""
    hookpoint = resolve_hookpoint(model, hookpoint)
    target = None if target is None else resolve_hookpoint(model, target)
    sae = sae.to(model.get_input_embeddings().weight.device)
    errors = ReconstructionErrorStats()
    splice = _Splice(sae, errors)
    if target is None:
        def replaced() -> AbstractContextManager:
            return spliced(model, hookpoint, splice.reconstruct)
    else:
        def replaced() -> AbstractContextManager:
            return spliced_pair(model, hookpoint, target, splice.predict)
    losses = _losses(model, text, cfg, hookpoint if target is None else dictionary_folder_name(hookpoint, target),
                     splice, clean=_unspliced, replaced=replaced,
                     ablated=lambda: spliced(model, target or hookpoint, splice.ablate),
                     hookpoints=[hookpoint] if target is None else [hookpoint, target])
    lm = {**losses.result(), "text": text.source, "hookpoint": hookpoint,
          **({} if target is None else {"target_hookpoint": target})}
    return SplicedEval(lm, _unexplained(errors, text, tokenizer, cfg), errors.error_norms())


@contextmanager
def _unspliced() -> Iterator[None]:
    yield


@torch.inference_mode()
def evaluate_spliced_clt(
    clt: nn.Module, model: nn.Module, pairs: list[tuple[str, str]], text: EvalText, tokenizer: Any, *,
    cfg: EvalConfig,
) -> SplicedEval:
    """Splice the cross-layer transcoder ``clt`` into ``model``: every covered MLP output (the
    targets of ``pairs``, (MLP input, MLP output) layer by layer) replaced in one forward by its
    prediction, each layer's features encoded from that layer's input as the spliced forward
    computes it (``_CrossLayerSplice``), so later layers run on the replacement model; the
    baseline zero-ablates every covered MLP output at once. ``unexplained`` is the error over all
    targets together (a token's error norm over the L*d_out concatenation) with ``layers``: each
    layer's ``error_norm`` and ``token_fvu`` summaries; ``lm`` adds ``layers``, each layer's
    ``hookpoint``, ``hookpoint_out`` and ``fvu`` (its pooled FVU in the spliced forward)."""
    if len(pairs) != clt.n_layers:
        raise ValueError(f"the CLT covers n_layers={clt.n_layers} but {len(pairs)} (input, target) pairs were given")
    pairs = [(resolve_hookpoint(model, i), resolve_hookpoint(model, t)) for i, t in pairs]
    clt = clt.to(model.get_input_embeddings().weight.device)
    errors, layer_errors = ReconstructionErrorStats(), [ReconstructionErrorStats() for _ in pairs]
    splice = _CrossLayerSplice(clt, errors, layer_errors)
    name = dictionary_folder_name(pairs[0][0], pairs[-1][1], clt=True)
    losses = _losses(model, text, cfg, name, splice, clean=lambda: spliced_pairs(model, pairs, splice.capture_clean),
                     replaced=lambda: spliced_pairs(model, pairs, splice.predict_layer),
                     ablated=lambda: spliced_pairs(model, pairs, splice.ablate_layer),
                     hookpoints=[h for pair in pairs for h in pair])
    unexplained = _unexplained(errors, text, tokenizer, cfg)
    per_layer = [e.result(histogram_bins=cfg.histogram_bins, n_worst=0) for e in layer_errors]
    unexplained["layers"] = [{"hookpoint_out": out, "error_norm": r["error_norm"], "token_fvu": r["token_fvu"]}
                             for (_, out), r in zip(pairs, per_layer, strict=True)]
    lm = {**losses.result(), "text": text.source, "hookpoint": pairs[0][0], "target_hookpoint": pairs[-1][1],
          "layers": [{"hookpoint": i, "hookpoint_out": out, "fvu": r["token_fvu"]["mean"]}
                     for (i, out), r in zip(pairs, per_layer, strict=True)]}
    return SplicedEval(lm, unexplained, errors.error_norms())


def _with_context(entry: dict, text: EvalText, tokenizer: Any, before: int) -> dict:
    """``entry`` with the decoded token and a window of text around it, the token in [[ ]]."""
    row = int(np.flatnonzero(text.sequence_ids == entry["sequence"])[0])
    ids, position = text.tokens[row].tolist(), entry["position"]
    prefix = tokenizer.decode(ids[max(0, position - before): position])
    token = tokenizer.decode(ids[position: position + 1])
    suffix = tokenizer.decode(ids[position + 1: position + 1 + max(1, before // 4)])
    return {**entry, "token": token, "context": f"{prefix}[[{token}]]{suffix}"}


# --------------------------------------------------------------------------- the steer audit

_MAX_FREQUENCY = 0.3
"""The firing frequency above which ``interp.audit.choose_features`` calls a feature dense."""
_MIN_FIRINGS = 3
"""Firings a feature needs in the audit's tokens: its suppression is measured where it fires."""


def _card_choice(observer: Observer, tokens: np.ndarray, cards: list[FeatureCard], n: int,
                 n_targets: int = 5) -> list[int]:
    """Up to ``n`` of the cards' latents, best first, by ``interp.audit.choose_features``'s
    criterion restricted to them (scoring every latent would cost an (n_latents, vocab) product):
    among those firing at least ``_MIN_FIRINGS`` times on the encoded positions of ``tokens`` and
    on at most ``_MAX_FREQUENCY`` of them, the ones whose promoted tokens stand out furthest
    (``interp.audit.target_standout``)."""
    indices = list(dict.fromkeys(c.index for c in cards))
    if not indices or unembedding_of(observer.harvester().model)[0] is None:
        return []
    counts, n_rows = firing_counts(observer, tokens)
    live = [i for i in indices if _MIN_FIRINGS <= counts[i] <= _MAX_FREQUENCY * n_rows]
    if not live:
        return []
    order = target_standout(observer, live, n_targets=n_targets).argsort(descending=True)
    return [live[i] for i in order[:n].tolist()]


def _units(observer: Observer, features: list[int], cards: dict[int, FeatureCard], notes: list[str]) -> list[dict]:
    """What the amplification multiplies per feature: its largest held-out activation as the
    training recorded it, else the card's largest among the scanned tokens; a feature with
    neither is only zeroed."""
    maxima, units = observer.folder.feature_max, []
    for feature in features:
        if maxima is not None and float(maxima[feature]) > 0:
            units.append({"feature": feature, "unit": "held-out maximum", "unit_value": float(maxima[feature])})
        elif feature in cards and cards[feature].max_activation > 0:
            units.append({"feature": feature, "unit": "scanned maximum", "unit_value": cards[feature].max_activation})
        else:
            notes.append(f"feature {feature}: no recorded maximum activation, so it is only zeroed")
    return units


def audit_observer(uri: str, model: nn.Module, tokenizer: Any, model_cfg: ModelConfig, *,
                   s3_options: dict | None = None) -> Observer:
    """The dictionary at ``uri`` observed through the evaluation's ``model`` and ``tokenizer``,
    already loaded: no file of the model is read again."""
    return open_observer(uri, model=model_cfg, s3_options=s3_options, loaded_model=model, tokenizer=tokenizer)


def audit_cards(observer: Observer, text: EvalText, cfg: EvalConfig, cards: list[FeatureCard]) -> dict:
    """``eval.json``'s ``audit``: up to ``cfg.audit_features`` of the report's ``cards`` (the
    clearest of those that fire often enough in the audit's tokens, ``_card_choice``)
    each clamped to ``cfg.audit_multiple`` times its maximum activation and zeroed, with the error
    term kept, on the first ``cfg.audit_tokens`` of ``text``. ``amplify`` and ``suppress`` are
    ``interp.audit.AuditResult.to_dict()``; ``{"skipped": reason}`` when the dictionary cannot be
    audited. A transcoder's features are edited where it writes (its target hookpoint), with its
    error kept; one whose target is not the model's hidden width (no logit lens, so no promoted
    tokens to target) is skipped, saying so."""
    start = time.perf_counter()
    try:
        steerer = Steerer(observer)
    except ValueError as err:  # run-time normalisation, a CLT's TopK across layers: it cannot steer
        log.info("steer audit skipped: %s", err)
        return {"skipped": str(err)}
    refusal = logit_lens_refusal(observer)
    if refusal is not None:
        log.info("steer audit skipped: %s", refusal)
        return {"skipped": refusal}
    tokens = np.array(text.tokens[: max(1, cfg.audit_tokens // text.tokens.shape[1])])  # writable copy
    features = _card_choice(observer, tokens, cards, cfg.audit_features)
    if not features:
        return {"skipped": f"no feature card fires {_MIN_FIRINGS} times or more, on at most {_MAX_FREQUENCY:.0%}, "
                           f"of the audit's {tokens.size:,} held-out tokens"}
    notes: list[str] = []
    units = _units(observer, features, {c.index: c for c in cards}, notes)
    settings = {"seeds": cfg.audit_seeds, "doses": (), "text_source": text.source}
    amplify = None
    if units:
        edit = FeatureEdit(tuple(u["feature"] for u in units), tuple(cfg.audit_multiple * u["unit_value"] for u in units))
        amplify = audit(steerer, edit, tokens, **settings).to_dict()
    suppress = audit(steerer, FeatureEdit(tuple(features), (0.0,) * len(features)), tokens, **settings).to_dict()
    seconds = time.perf_counter() - start
    log.info("%s: audited features %s on %d tokens in %.1f s", observer.folder.uri, features, tokens.size, seconds)
    return {"features": features, "multiple": cfg.audit_multiple, "units": units,
            "amplify": amplify, "suppress": suppress, "seconds": round(seconds, 2), "notes": notes}


# --------------------------------------------------------------------------- stored dictionaries


def store_evaluation(folder: ObjectStore, result: SplicedEval, audit_section: dict | None = None) -> dict:
    """Merge ``lm`` and ``unexplained`` (and ``audit``, when given) into the folder's
    ``eval.json`` (the reconstruction figures stay), written atomically; ``checksums.json``, if
    the folder has one, is rewritten after it with the new file's checksum. Returns the merged
    evaluation."""
    from cluster.report_html import render_report

    sections = {"lm": result.lm, "unexplained": result.unexplained}
    data = merged_eval(folder, sections if audit_section is None else {**sections, "audit": audit_section})
    written = {EVAL_FILE: data}
    if folder.exists(FEATURES_FILE):  # the report, drawn again with the new sections
        have = {n: folder.get_bytes(n) for n in (CONFIG_FILE, TRAINING_CURVES_FILE, FEATURES_FILE) if folder.exists(n)}
        written[REPORT_FILE] = render_report({**have, EVAL_FILE: data})[REPORT_FILE]
    rewrite_files(folder, written)
    return json.loads(data)


def _read_dictionary(folder: ObjectStore) -> dict[str, bytes]:
    try:
        return {name: folder.get_bytes(name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    except ObjectNotFound:
        raise FileNotFoundError(f"{folder.uri}: not a dictionary (needs {CONFIG_FILE} and {WEIGHTS_FILE})") from None


def _log_evaluation(logger: MetricLogger, result: SplicedEval) -> None:
    figures = {f"eval/lm/{k}": v for k, v in result.lm.items() if isinstance(v, int | float)}
    figures.update({f"eval/lm/fvu/{layer['hookpoint_out']}": layer["fvu"] for layer in result.lm.get("layers", [])})
    for section in ("error_norm", "token_fvu"):
        figures.update({f"eval/unexplained/{section}_{k}": v for k, v in result.unexplained[section].items()})
    logger.log(figures, step=0)
    logger.log_histogram("eval/error_norm", result.error_norms, step=0)


@dataclass
class EvaluationTimes:
    """Where an evaluation task's wall time went, in seconds, measured in the task: returned beside
    the evaluations (``Evaluations.timings``), never written to ``eval.json``. The parts add up to
    ``total``."""

    model_load: float = 0.0
    """The model and its tokenizer."""
    spliced: float = 0.0
    """The clean, replaced and zero-ablated forwards, their losses and the per-token error statistics."""
    logging: float = 0.0
    """wandb: what the eval run's start (begun in a thread before the forwards) still took once they
    were done, then logging and finishing the run."""
    audit: float = 0.0
    """The steer audit: its observer (the folder read and checked again) and its forwards."""
    other: float = 0.0
    """The rest of the task: reading each dictionary, storing ``eval.json`` and the report."""
    task_start: float = 0.0
    """Outside the task's function: a Ray worker process starting, its imports, the text's
    transfer, the result's return (0 without Ray)."""

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    def as_dict(self) -> dict[str, float]:
        """Every part and ``total``, in seconds."""
        return {k: round(v, 3) for k, v in {**dataclasses.asdict(self), "total": self.total}.items()}


class Evaluations(list):
    """The merged evaluations (``eval.json``'s contents), in the order of the dictionaries, and
    where the task's time went (``timings``)."""

    def __init__(self, evaluations: list[dict], timings: EvaluationTimes) -> None:
        super().__init__(evaluations)
        self.timings = timings
        self.faults: list[Fault] = []
        """The evaluation tasks lost and started again (filled in by ``evaluate_in_ray``)."""


class _Clock:
    """Adds the seconds spent inside ``part(name)`` to that field of ``times``."""

    def __init__(self, times: EvaluationTimes) -> None:
        self.times = times

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.times, name, getattr(self.times, name) + time.perf_counter() - start)


def _spliced_result(sae: nn.Module, sae_cfg: dict, model: nn.Module, text: EvalText, tokenizer: Any,
                    cfg: EvalConfig) -> SplicedEval:
    pairs = clt_pairs(sae_cfg)
    if pairs is not None:
        return evaluate_spliced_clt(sae, model, pairs, text, tokenizer, cfg=cfg)
    return evaluate_spliced(sae, model, sae_cfg["metadata"]["hook_name"], text, tokenizer, cfg=cfg,
                            target=target_hookpoint(sae_cfg))


def _finish_unused(started: Future | None) -> None:
    """Close a run whose start was begun for an evaluation that failed (its error propagates)."""
    if started is not None:
        with suppress(Exception):
            started.result().finish()


def _audit_section(uri: str, folder: ObjectStore, model: nn.Module, tokenizer: Any, model_cfg: ModelConfig,
                   text: EvalText, cfg: EvalConfig, s3_options: dict | None) -> dict | None:
    # The model is loaded already: the audit costs its forward passes only. Its features are
    # among the report's cards (choosing among every latent costs an (n_latents, vocab) product).
    if cfg.audit_features == 0 or not folder.exists(FEATURES_FILE):
        return None
    cards = FeatureSample.from_json(folder.get_bytes(FEATURES_FILE)).cards
    try:
        observer = audit_observer(uri, model, tokenizer, model_cfg, s3_options=s3_options)
    except ValueError as err:  # it reads the whole folder: a file that differs from checksums.json
        return {"skipped": str(err)}
    return audit_cards(observer, text, cfg, cards)


def evaluate_uris(
    uris: list[str], *, model_cfg: ModelConfig, text: EvalText, cfg: EvalConfig, s3_options: dict | None = None,
    make_run_logger: Callable[[str, dict], MetricLogger] | None = None,
) -> Evaluations:
    """Load the model once and evaluate each dictionary at ``uris`` on ``text``; store each
    result in its ``eval.json`` and return the merged evaluations, in order, with the time each
    part took. ``make_run_logger(uri, cfg_json)`` gives each dictionary's metric logger (default:
    none); it is called in a thread while the dictionary's forwards run (a wandb run takes
    seconds to start, mostly waiting on its service process)."""
    start, times = time.perf_counter(), EvaluationTimes()
    clock = _Clock(times)
    with clock.part("model_load"):
        source = resolve_model_source(model_cfg)
        model = load_model(source, dtype=model_cfg.dtype, device_map=model_cfg.device_map)
        tokenizer = load_tokenizer(source)
    merged = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-logger") as starter:
        for uri in uris:
            folder = open_store(uri, s3_options=s3_options)
            sae, sae_cfg = load_sae(_read_dictionary(folder))
            started = starter.submit(make_run_logger, uri, sae_cfg) if make_run_logger else None
            try:
                with clock.part("spliced"):
                    result = _spliced_result(sae, sae_cfg, model, text, tokenizer, cfg)
            except BaseException:
                _finish_unused(started)
                raise
            with clock.part("logging"):
                logger = started.result() if started is not None else NullLogger()
                try:
                    _log_evaluation(logger, result)
                finally:
                    logger.finish()
            log.info("%s: CE clean %.4f spliced %.4f ablated %.4f, recovered %.4f", uri, result.lm["clean_ce"],
                     result.lm["spliced_ce"], result.lm["ablated_ce"], result.lm["ce_recovered"])
            with clock.part("audit"):
                audit_section = _audit_section(uri, folder, model, tokenizer, model_cfg, text, cfg, s3_options)
            merged.append(store_evaluation(folder, result, audit_section))
    times.other = time.perf_counter() - start - times.total
    return Evaluations(merged, times)


# --------------------------------------------------------------------------- after training, in Ray


def _wandb_name(uri: str, sae_cfg: dict) -> str:
    _, variant = split_dictionary_uri(uri)
    return "-".join(filter(None, (sae_cfg["metadata"].get("run_name"), variant, folder_name(sae_cfg), "eval")))


_STARTED = "started"
"""What the evaluation task yields first, the moment it runs: the driver then knows it found room."""


def _evaluate_task(
    uris: list[str], model_cfg: ModelConfig, text: EvalText, cfg: EvalConfig, s3_options: dict,
    wandb: dict,
) -> Iterator[str | Evaluations]:
    yield _STARTED
    torch.set_num_threads(max(1, int(cfg.num_cpus)))

    def run_logger(uri: str, sae_cfg: dict) -> MetricLogger:
        run_name = sae_cfg["metadata"].get("run_name", "")
        return make_logger(rank=0, wandb_mode=wandb["mode"], project=wandb["project"],
                           run_name=_wandb_name(uri, sae_cfg), config={"dictionary": uri, "eval": dataclasses.asdict(cfg)},
                           dir=str(Path(wandb["dir"]) / run_name / "eval"), group=run_name or None)

    yield evaluate_uris(uris, model_cfg=model_cfg, text=text, cfg=cfg, s3_options=s3_options,
                        make_run_logger=run_logger)


EVAL_ATTEMPTS = 3
"""Tries of the evaluation task when its process or node dies under it."""


def evaluate_in_ray(
    job: JobConfig, dictionary_uris: list[str], *, tokens: np.ndarray, excluded_token_ids: frozenset[int],
    eval_cfg: EvalConfig,
) -> Evaluations:
    """The spliced evaluation of the job's trained dictionaries, as one Ray task (one model
    load) with ``eval_cfg.num_cpus`` / ``num_gpus``, on the held-out units of ``tokens`` (the
    job's packed text); each result is merged into the dictionary's ``eval.json`` and logged to
    a wandb run ``<run>-<hookpoint>-eval`` in the run's group. Returns the merged evaluations,
    in the order of ``dictionary_uris`` (a list), with ``timings``: where the task's time went,
    the Ray worker's start included (``EvaluationTimes``)."""
    text = held_out_text(
        tokens, sequences_per_shard=job.cache.sequences_per_shard, holdout_fraction=job.train.holdout_fraction,
        max_tokens=eval_cfg.max_tokens, excluded=frozenset(excluded_token_ids), source=job.data.source,
    )
    wandb = {"mode": job.logging.wandb_mode, "project": job.logging.project, "dir": str(Path(job.logging.dir).resolve())}
    # no more CPUs than the largest node has: a task asking for more would wait for ever
    largest = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=1.0)
    if eval_cfg.num_cpus > largest:
        eval_cfg = dataclasses.replace(eval_cfg, num_cpus=largest)
    task = ray.remote(num_cpus=eval_cfg.num_cpus, num_gpus=eval_cfg.num_gpus, max_retries=0,
                      num_returns="streaming")(_evaluate_task)
    need = {"CPU": eval_cfg.num_cpus, **({"GPU": eval_cfg.num_gpus} if eval_cfg.num_gpus else {})}
    timeout_s = job.cluster.placement_timeout_s
    faults = []
    for attempt in range(1, EVAL_ATTEMPTS + 1):
        start = time.perf_counter()
        running = task.remote(list(dictionary_uris), job.model, text, eval_cfg, job.cache.s3_options(), wandb)
        try:
            # Pending with no room (a node lost, another job's actors), it would wait for ever.
            if not ray.wait([running], timeout=timeout_s)[0]:
                ray.cancel(running, force=True)
                raise EvaluationFailed(no_room(f"the evaluation task ({resources_text(need)})", timeout_s, need))
            ray.get(next(running))  # _STARTED, or what stopped the task before it could say so
            merged = ray.get(next(running))
            break
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as err:
            # its process or node died: a fresh task on a live node does it again (it writes
            # each eval.json whole, so nothing is half written)
            lost = time.perf_counter() - start
            cause = one_line_cause(err)
            if attempt == EVAL_ATTEMPTS:
                raise EvaluationFailed(f"the evaluation task was lost {attempt} times; last cause {cause}") from None
            log.warning("evaluation task lost after %.1f s (%s): started again (attempt %d of %d)",
                        lost, cause, attempt + 1, EVAL_ATTEMPTS)
            faults.append(Fault("evaluation", f"evaluation task lost ({cause}): started again", lost))
    merged.faults = faults
    timings = merged.timings
    timings.task_start = max(0.0, time.perf_counter() - start - timings.total)
    # Logged here: the task's own log lines stay in its worker.
    log.info("evaluation task: %d dictionaries in %.1f s: model load %.1f, spliced forwards %.1f, steer audit "
             "%.1f, wandb %.1f, task start %.1f, other %.1f s", len(merged), timings.total, timings.model_load,
             timings.spliced, timings.audit, timings.logging, timings.task_start, timings.other)
    return merged


# --------------------------------------------------------------------------- saeforge eval


def _run_config(run_uri: str | None, s3_options: dict | None) -> tuple[JobConfig, dict] | None:
    """The job config and the raw ``eval`` section of ``<run>/config.json``; None if absent."""
    if run_uri is None:
        return None
    raw = read_run_config(open_store(run_uri, s3_options=s3_options))
    if raw is None:
        return None
    eval_raw = raw.pop("eval", None) or {}
    return job_from_dict(raw, where=f"{run_uri}/{RUN_CONFIG_FILE}"), eval_raw


def _eval_config(raw: dict, max_tokens: int | None) -> EvalConfig:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), raw))
    assert isinstance(cfg, EvalConfig)
    return cfg if max_tokens is None else dataclasses.replace(cfg, max_tokens=max_tokens)


def evaluate_stored(
    uri: str, *, s3_options: dict | None = None, text: str | None = None, model: str | None = None,
    max_tokens: int | None = None,
) -> dict:
    """``saeforge eval``: evaluate the dictionary at ``uri`` spliced into its model, without Ray,
    and merge the result into its ``eval.json``; return the merged evaluation.

    The model, the text and the exclusions come from the run's ``config.json`` (two folders up,
    or four for a sweep variant): the job's held-out units. ``text`` evaluates on that source
    instead (all of it, up to ``max_tokens``), ``model`` overrides the model (a directory or
    ``packaged:...``); without a run config, ``text`` is needed and the model is ``model`` or
    cfg.json's ``model_name``.
    """
    # Loading checks the weights against cfg.json: a mismatch fails here, before the model loads.
    _, sae_cfg = load_sae(_read_dictionary(open_store(uri, s3_options=s3_options)))
    run_uri, _ = split_dictionary_uri(uri)
    found = _run_config(run_uri, s3_options)
    if found is None and text is None:
        raise FileNotFoundError(f"{uri}: no run config ({run_uri or 'not under <run>/dictionary/'}"
                                f"{'/' + RUN_CONFIG_FILE if run_uri else ''}): give the text with --text")
    job, eval_raw = found if found is not None else (None, {})
    cfg = _eval_config(eval_raw, max_tokens)
    # A run's config holds the dtype its job resolved; without one, float32 as observe and steer do.
    model_cfg = job.model if job is not None else ModelConfig(name_or_path=sae_cfg["metadata"]["model_name"],
                                                              dtype="float32")
    if model is not None:
        model_cfg = dataclasses.replace(model_cfg, name_or_path=model, gguf_file=None)
    tokenizer = load_tokenizer(resolve_model_source(model_cfg))
    data = job.data if job is not None else DataConfig()
    if text is not None:
        eval_text = text_source(data, text, cfg.max_tokens, tokenizer)
    else:
        assert job is not None
        eval_text = held_out_text(
            pack_sequences(job.data, tokenizer), sequences_per_shard=job.cache.sequences_per_shard,
            holdout_fraction=job.train.holdout_fraction, max_tokens=cfg.max_tokens,
            excluded=excluded_token_ids(job.data, tokenizer), source=job.data.source,
        )
    [merged] = evaluate_uris([uri], model_cfg=model_cfg, text=eval_text, cfg=cfg, s3_options=s3_options)
    return merged


def format_table(evaluation: dict) -> str:
    """A few lines for the terminal: the spliced losses and the worst contexts."""
    lm, unexplained = evaluation["lm"], evaluation["unexplained"]

    def figure(value: float | None, spec: str = ".4f") -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"text             {lm['text']} ({lm['n_tokens']:,} tokens scored)",
        *([f"spliced          reads {lm['hookpoint']} -> writes {lm['target_hookpoint']}"]
          if "target_hookpoint" in lm and "layers" not in lm else []),
        *([f"spliced          {len(lm['layers'])} layers at once: reads {lm['hookpoint']} .. writes "
           f"{lm['target_hookpoint']}"] if "layers" in lm else []),
        f"CE clean         {figure(lm['clean_ce'])}",
        f"CE spliced       {figure(lm['spliced_ce'])}   (delta {figure(lm['delta_lm_loss'], '+.4f')})",
        f"CE zero-ablated  {figure(lm['ablated_ce'])}",
        f"CE recovered     {figure(lm['ce_recovered'])}",
        f"KL to clean      {figure(lm['kl_divergence'])}",
        "error norm       " + "  ".join(f"{k} {figure(unexplained['error_norm'].get(k), '.4g')}"
                                        for k in ("mean", "p50", "p90", "p99", "max")),
    ]
    if "fvu" in evaluation:
        lines.insert(1, f"held-out FVU     {figure(evaluation['fvu'])}")
    lines += [f"FVU spliced      {figure(layer['fvu'])}  at {layer['hookpoint_out']}" for layer in lm.get("layers", [])]
    for entry in unexplained["worst_contexts"][:5]:
        lines.append(f"worst  {entry['error_norm']:9.4g}  {entry['context']!r}")
    return "\n".join(lines)
