"""The dictionary's report: one self-contained HTML page written next to the dictionary.

The report's parts, one module each:

- ``cluster.report`` (here): the entry points. ``build_report`` takes everything as arguments
  (dictionary files, held-out shards, a token decoder, an unembedding) and returns
  ``report.html`` with ``report_features.json``, the feature cards as data; ``report_with_model``
  finds the decoder and the unembedding from the job's model config, so the trainer's rank 0 can
  call it.
- ``cluster.report_scan``: which latents to show and their top-activating held-out contexts (torch).
- ``activation_cache.unembedding``: the model's unembedding, read from its GGUF or safetensors files.
- ``cluster.report_cards``: the feature cards as data (``report_features.json``).
- ``cluster.report_html``: the page, and ``render_report``, which redraws it from the dictionary's
  files alone, for when ``eval.json`` changes (the spliced evaluation runs later); no torch.
- ``interp.svg`` and ``interp.markup``: the inline SVG charts and the stylesheet it shares with the interp pages (no torch).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from activation_cache.config import ModelConfig
from activation_cache.hooking import load_tokenizer, resolve_model_source
from activation_cache.schema import DecodedShard
from activation_cache.text import token_decoder
from activation_cache.unembedding import load_unembedding, logit_tokens
from cluster.report_cards import FeatureSample
from cluster.report_html import render_report
from cluster.report_scan import (
    Decode,
    feature_cards,
    sample_features,
    scan_top_activations,
    sparsity_frequencies,
)
from trainer.dictionary import load_dictionary
from trainer.layout import FEATURES_FILE, SPARSITY_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportOptions:
    """What the report shows and how much held-out data it reads."""

    n_features: int = 24
    """Feature cards: a third each from the frequent, median and rare live latents."""
    n_examples: int = 8
    """Top-activating contexts per feature."""
    context_before: int = 12
    """Tokens shown before the activating token (fewer at the start of a sequence)."""
    context_after: int = 4
    """Tokens shown after it."""
    n_logit_tokens: int = 10
    """Promoted (and suppressed) tokens per feature."""
    max_tokens: int = 100_000
    """Held-out rows encoded for the contexts (the first shards' rows): the report's cost is
    ``max_tokens * d_in * n_latents`` multiply-adds, whatever the size of the held-out set."""
    seed: int = 0
    """Seed of the feature sample."""

    def __post_init__(self) -> None:
        for name in ("n_features", "n_examples", "n_logit_tokens", "max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("context_before", "context_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


def build_report(
    files: Mapping[str, bytes],
    *,
    holdout: Iterable[DecodedShard],
    decode: Decode | None = None,
    unembedding: Tensor | None = None,
    unembedding_note: str = "",
    options: ReportOptions = ReportOptions(),
    device: str | torch.device = "cpu",
) -> dict[str, bytes]:
    """The report's files, ``REPORT_FILE`` (the page) and ``FEATURES_FILE`` (its feature cards
    as data), for the dictionary ``files`` (as ``dictionary_files`` writes them, plus
    ``training_curves.json`` when there is one).

    ``holdout`` yields held-out shards with provenance (read lazily: only the first
    ``options.max_tokens`` rows are encoded; a transcoder's are its input hookpoint's, what its
    features read; a cross-layer transcoder's hold every covered layer's input side by side,
    (rows, L*d_in) in layer order, with the provenance their tokens share); ``decode`` turns token ids into display strings (``token_decoder(tokenizer)``;
    None shows ids); ``unembedding`` is the model's W_U (vocab, d_model), None when it has none,
    with ``unembedding_note`` saying how it was obtained. The promoted tokens are the decoder rows
    (what a transcoder's features write; a cross-layer transcoder's summed over the layers each
    writes to, ``written_directions``) through it, where its width is the decoder's ``d_out``.
    The held-out rows are encoded on ``device``. The same inputs give the same bytes.
    """
    sae, cfg = load_dictionary(dict(files))
    sae.to(device)
    frequencies = sparsity_frequencies(files[SPARSITY_FILE]) if SPARSITY_FILE in files else None
    features = sample_features(frequencies, sae.n_latents, options.n_features, seed=options.seed)
    scan = scan_top_activations(sae, holdout, [f for f, _ in features], n_examples=options.n_examples,
                                max_tokens=options.max_tokens)
    directions = written_directions(sae)
    logits_reason = _unembedding_problem(unembedding, directions.shape[1],
                                         transcoder="hook_name_out" in cfg.get("metadata", {}))
    logit_ids = None if logits_reason else logit_tokens(directions, unembedding, scan.features, options.n_logit_tokens)
    cards = feature_cards(features, frequencies, scan, logit_ids, decode=decode or _show_ids,
                          before=options.context_before, after=options.context_after)
    sample = FeatureSample(cards, scan.rows, logits_reason or unembedding_note, logits_reason is None, options.seed)
    report = {FEATURES_FILE: sample.to_json()}
    return {**report, **render_report({**files, **report})}


def written_directions(sae: torch.nn.Module) -> Tensor:
    """(n_latents, d) what each latent writes per unit activation: its decoder row; for a
    cross-layer transcoder (``W_dec`` a list of (n, L - l, d_out) per layer) the sum of its
    decoder rows over the MLP outputs it writes to, its total write into the residual stream
    (every covered MLP output is added to it) and what the logit lens reads."""
    if isinstance(sae.W_dec, torch.nn.ParameterList):
        return torch.cat([sae.decoder_weight(layer).detach().sum(dim=1) for layer in range(sae.n_layers)])
    return sae.W_dec


def report_with_model(
    files: Mapping[str, bytes],
    *,
    holdout: Iterable[DecodedShard],
    model: ModelConfig,
    options: ReportOptions = ReportOptions(),
) -> dict[str, bytes]:
    """``build_report`` with the tokenizer and unembedding of ``model`` (the job's model config),
    encoding on the first GPU when there is one.

    A model that cannot be read costs only its part of the report (ids instead of tokens, no
    promoted tokens, each with the reason on the page); everything else raises."""
    decode, unembedding, note = None, None, "the model could not be read"
    try:
        source = resolve_model_source(model)
    except (OSError, ValueError) as err:
        log.warning("report: model %s not found, tokens shown as ids: %s", model.name_or_path, err)
        note = f"the model {model.name_or_path!r} could not be found: {err}"
    else:
        try:
            decode = token_decoder(load_tokenizer(source))
        except (OSError, ValueError, ImportError) as err:
            log.warning("report: tokenizer of %s did not load, tokens shown as ids: %s", model.name_or_path, err)
        unembedding, note = load_unembedding(source)
    return build_report(files, holdout=holdout, decode=decode, unembedding=unembedding, unembedding_note=note,
                        options=options, device="cuda" if torch.cuda.is_available() else "cpu")


def report_artifact_name(*parts: str) -> str:
    """A wandb artifact name for a dictionary's report, e.g. ``report_artifact_name(run_name,
    variant, hookpoint)``: the non-empty parts joined by ``-``, characters wandb refuses as ``_``.
    The same name on every upload makes each a new version of one artifact."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(["report", *filter(None, parts)]))


def _unembedding_problem(unembedding: Tensor | None, d_out: int, *, transcoder: bool) -> str | None:
    if unembedding is None:
        return "no unembedding was given"
    if unembedding.ndim == 2 and unembedding.shape[1] == d_out:
        return None
    if transcoder:
        return (f"the logit lens does not apply: the transcoder writes d_out={d_out} but the unembedding "
                f"has shape {tuple(unembedding.shape)}, not the model's residual width")
    return (f"the unembedding has shape {tuple(unembedding.shape)}, not (vocab, d_in={d_out}): "
            "the dictionary does not write into the model's residual width")


def _show_ids(ids: list[int]) -> list[str]:
    return [f"⟨{i}⟩" for i in ids]
