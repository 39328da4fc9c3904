"""The dictionary's report: one self-contained HTML page written next to the dictionary.

Sections (each an element with a fixed id): ``#summary``, ``#training-curves``,
``#firing-histogram``, ``#evaluation``, ``#unexplained`` (only when ``eval.json`` has it) and
``#features``: feature cards for a sample of live latents (frequent, median and rare) with their
top-activating held-out contexts and the tokens each promotes through the unembedding.

Plots are inline SVG drawn here: images that any browser shows offline, kept in one file (one
object in the store, one wandb artifact file), and no plotting dependency. Every text that comes
from the data (tokens, metadata, eval keys) is HTML-escaped, and the page's Content-Security-Policy
allows no script at all: a token is untrusted text.

``build_report`` takes everything as arguments (dictionary files, held-out shards, a token
decoder, an unembedding) and returns ``report.html`` with ``report_features.json``, the feature
cards as data; ``report_with_model`` finds the decoder and the unembedding from the job's model
config, so the trainer's rank 0 can call it. ``render_report`` redraws the page from the
dictionary's files alone, for when ``eval.json`` changes (the spliced evaluation runs later).
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from activation_cache.config import ModelConfig
from activation_cache.hooking import ModelSource, load_model, load_tokenizer, resolve_model_source
from activation_cache.schema import DecodedShard
from trainer.dictionary import CONFIG_FILE, EVAL_FILE, SPARSITY_FILE, load_dictionary

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FEATURES_FILE = "report_features.json"
"""The feature cards as data: ``render_report`` redraws the page from the dictionary's files alone
(after the spliced evaluation adds to ``eval.json``) without the model or the activations."""
TRAINING_CURVES_FILE = "training_curves.json"

Decode = Callable[[list[int]], list[str]]
"""Token ids -> one display string per id."""


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


@dataclass(frozen=True)
class Context:
    """One top-activating token and its neighbours in the same sequence."""

    tokens: list[str]
    """Decoded tokens in position order (tokens excluded from the cache, like BOS, are absent)."""
    hit: int
    """Index in ``tokens`` of the activating token."""
    activation: float
    sequence_id: int
    position: int
    more_before: bool
    """The sequence has cached tokens before the first one shown."""
    more_after: bool


@dataclass(frozen=True)
class FeatureCard:
    """What the report shows of one latent."""

    index: int
    band: str
    """Which part of the sample it came from: ``frequent``, ``median``, ``rare`` or ``random``."""
    frequency: float | None
    """Held-out firing frequency from ``sparsity.safetensors``; None without that file."""
    fired: int
    """Tokens it fired on among those scanned for contexts."""
    max_activation: float
    contexts: list[Context]
    promoted: list[tuple[str, float]] = field(default_factory=list)
    """(token, logit per unit activation), highest first; empty without an unembedding."""
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    """The most negative ones, lowest first."""


@dataclass(frozen=True)
class FeatureSample:
    """The feature cards and how they were made: ``report_features.json``."""

    cards: list[FeatureCard]
    rows_scanned: int
    """Held-out rows the contexts were searched in."""
    logits_note: str
    """How the promoted tokens were computed, or why they are unavailable."""
    has_logits: bool
    seed: int

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FeatureSample:
        raw = json.loads(data)
        cards = [
            FeatureCard(**{**card, "contexts": [Context(**c) for c in card["contexts"]],
                           "promoted": [tuple(t) for t in card["promoted"]],
                           "suppressed": [tuple(t) for t in card["suppressed"]]})
            for card in raw.pop("cards")
        ]
        return cls(cards=cards, **raw)


# --------------------------------------------------------------------------- entry points


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
    ``options.max_tokens`` rows are encoded); ``decode`` turns token ids into display strings
    (``token_decoder(tokenizer)``; None shows ids); ``unembedding`` is the model's W_U
    (vocab, d_model), None when it has none, with ``unembedding_note`` saying how it was obtained.
    The held-out rows are encoded on ``device``. The same inputs give the same bytes.
    """
    sae, _ = load_dictionary(dict(files))
    sae.to(device)
    frequencies = sparsity_frequencies(files[SPARSITY_FILE]) if SPARSITY_FILE in files else None
    features = sample_features(frequencies, sae.n_latents, options.n_features, seed=options.seed)
    scan = scan_top_activations(sae, holdout, [f for f, _ in features], n_examples=options.n_examples,
                                max_tokens=options.max_tokens)
    logits_reason = _unembedding_problem(unembedding, sae.d_in)
    logit_ids = None if logits_reason else logit_tokens(sae.W_dec, unembedding, scan.features, options.n_logit_tokens)
    cards = feature_cards(features, frequencies, scan, logit_ids, decode=decode or _show_ids,
                          before=options.context_before, after=options.context_after)
    sample = FeatureSample(cards, scan.rows, logits_reason or unembedding_note, logits_reason is None, options.seed)
    report = {FEATURES_FILE: sample.to_json()}
    return {**report, **render_report({**files, **report})}


def render_report(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """``{REPORT_FILE: html}`` drawn from a dictionary's files alone: ``cfg.json``, and what there
    is of ``eval.json``, ``training_curves.json`` and ``report_features.json``. Call it again after
    ``eval.json`` changes (the spliced evaluation adds ``lm`` and ``unexplained``)."""
    cfg = json.loads(files[CONFIG_FILE]) if CONFIG_FILE in files else {}
    evaluation = json.loads(files[EVAL_FILE]) if EVAL_FILE in files else {}
    curves = json.loads(files[TRAINING_CURVES_FILE]) if TRAINING_CURVES_FILE in files else None
    sample = FeatureSample.from_json(files[FEATURES_FILE]) if FEATURES_FILE in files else None
    page = render_html(cfg=cfg, evaluation=evaluation, curves=curves, sample=sample)
    return {REPORT_FILE: page.encode("utf-8")}


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


# --------------------------------------------------------------------------- inputs


def sparsity_frequencies(data: bytes) -> Tensor:
    """Firing frequencies from ``sparsity.safetensors`` (which holds log10(frequency + 1e-10))."""
    log10 = load_safetensors(data)["sparsity"].double()
    # A latent that never fired is stored as log10(1e-10) = -10; any real frequency over up to
    # 3e9 tokens is above 10**-9.5, so this threshold tells them apart despite float32 rounding.
    return torch.where(log10 > -9.5, 10.0**log10, torch.zeros_like(log10))


def token_decoder(tokenizer: Any) -> Decode:
    """A ``Decode`` for a Hugging Face tokenizer: each id decoded alone. SentencePiece drops a
    token's leading space when decoding it alone; it is put back from the ``▁`` of its piece."""

    def decode(ids: list[int]) -> list[str]:
        texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
        pieces = tokenizer.convert_ids_to_tokens(list(ids))
        return [" " + text if str(piece).startswith("▁") and not text.startswith(" ") else text
                for text, piece in zip(texts, pieces, strict=True)]

    return decode


_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                "model.final_layernorm")


def unembedding_of(model: nn.Module) -> tuple[Tensor | None, str]:
    """(W_U (vocab, d_model) on the CPU, a note for the report) of a loaded causal LM; W_U is None
    when the model has no output embedding. The final norm's gain is folded into W_U; its
    normalisation (a per-token rescaling) is left out."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return None, f"{type(model).__name__} has no output embedding (unembedding)"
    weight = head.weight.detach().float().cpu()
    norm = _final_norm(model)
    return _with_gain(weight, _norm_gain(norm[1], weight.shape[1]) if norm else None, type(norm[1]).__name__)


def load_unembedding(source: ModelSource) -> tuple[Tensor | None, str]:
    """W_U of the model at ``source`` and a note, reading only the unembedding and final-norm
    tensors from its GGUF or safetensors files where it can, else loading the whole model."""
    try:
        found = _unembedding_from_gguf(source) if source.gguf_file else _unembedding_from_safetensors(source)
        if found is not None:
            return found
        model = load_model(source)
        try:
            return unembedding_of(model)
        finally:
            del model
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        log.warning("report: unembedding of %s not read: %s", source.model_id, err)
        return None, f"the unembedding of {source.model_id} could not be read: {err}"


def _final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    modules = dict(model.named_modules())
    return next(((name, modules[name]) for name in _FINAL_NORMS if name in modules), None)


@torch.no_grad()
def _norm_gain(norm: nn.Module, d_model: int) -> Tensor | None:
    """The elementwise gain of a final norm, measured rather than read, as conventions differ
    (Gemma's RMSNorm scales by 1 + weight): for x of zero mean and unit RMS, RMSNorm and
    LayerNorm alike give (norm(x) - norm(-x)) / 2 = x * gain, the bias cancelling."""
    param = next(norm.parameters(), None)
    if param is None or d_model % 2:
        return None
    x = torch.ones(1, d_model, dtype=param.dtype, device=param.device)
    x[:, 1::2] = -1
    return ((norm(x) - norm(-x)) / (2 * x))[0].float().cpu()


def _with_gain(weight: Tensor, gain: Tensor | None, norm_name: str) -> tuple[Tensor, str]:
    lens = ("Promoted tokens are the top entries of W_U · W_dec[feature]: the decoder direction read "
            "directly by the unembedding, skipping every layer after the hookpoint (a logit lens); "
            "values are logits per unit of feature activation.")
    if gain is None or gain.shape != weight.shape[1:]:
        return weight, f"{lens} No final-norm gain was found; the final norm is ignored."
    return weight * gain, (f"{lens} The gain of the final norm ({norm_name}) is folded into W_U; its "
                           "normalisation (a per-token rescaling, and the centring and bias of a "
                           "LayerNorm) is ignored.")


def _unembedding_from_safetensors(source: ModelSource) -> tuple[Tensor, str] | None:
    """W_U without loading the model: the names come from an empty (meta-device) model, the
    tensors from the safetensors files. None when they are not stored under those names."""
    files = sorted(source.directory.glob("*.safetensors"))
    if not files:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source.directory))
    head = empty.get_output_embeddings()
    if head is None:
        return None
    # Every name of the head's weight: a tied one is stored once, often as the input embedding.
    wanted = [n for n, p in empty.named_parameters(remove_duplicate=False) if p is head.weight]
    found = _final_norm(empty)
    norm_keys = [f"{found[0]}.{k}" for k in found[1].state_dict()] if found else []
    tensors = _read_tensors(files, [*wanted, *norm_keys])
    weight = next((tensors[n] for n in wanted if n in tensors), None)
    if weight is None:
        return None
    gain, norm_name = None, "none"
    if found and all(k in tensors for k in norm_keys):
        name, norm = found
        norm.to_empty(device="cpu")
        norm.load_state_dict({k.removeprefix(f"{name}."): tensors[k] for k in norm_keys})
        gain, norm_name = _norm_gain(norm, weight.shape[1]), type(norm).__name__
    return _with_gain(weight.float(), gain, norm_name)


def _unembedding_from_gguf(source: ModelSource) -> tuple[Tensor, str] | None:
    """W_U from a GGUF file's tensors by llama.cpp's standard names (``output``, else the tied
    ``token_embd``; ``output_norm``, stored as the gain itself: llama.cpp's converter adds
    Gemma's 1): 9 s for SmolLM2 where loading the model takes 35 s."""
    import gguf

    reader = gguf.GGUFReader(source.directory / source.gguf_file)
    tensors = {t.name: t for t in reader.tensors}
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if head is None:
        return None

    def dequantized(tensor: Any) -> Tensor:
        # A copy: an unquantised tensor comes back as a read-only view of the memory-mapped file.
        return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))

    norm = tensors.get("output_norm.weight")
    return _with_gain(dequantized(head), None if norm is None else dequantized(norm), "output_norm")


def _read_tensors(files: list[Path], names: list[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    found: dict[str, Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in set(names) & set(f.keys()) - found.keys():
                found[name] = f.get_tensor(name)
    return found


def _unembedding_problem(unembedding: Tensor | None, d_in: int) -> str | None:
    if unembedding is None:
        return "no unembedding was given"
    if unembedding.ndim != 2 or unembedding.shape[1] != d_in:
        return (f"the unembedding has shape {tuple(unembedding.shape)}, not (vocab, d_in={d_in}): "
                "the dictionary does not write into the model's residual width")
    return None


def _show_ids(ids: list[int]) -> list[str]:
    return [f"⟨{i}⟩" for i in ids]


# --------------------------------------------------------------------------- feature statistics


def sample_features(
    frequencies: Tensor | None, n_latents: int, n: int, *, seed: int
) -> list[tuple[int, str]]:
    """(latent, band) for up to ``n`` live latents: a third drawn from each of the most frequent,
    the middle and the rarest third of the live latents by firing frequency, most frequent first.
    Without frequencies, ``n`` latents drawn uniformly (band ``random``)."""
    generator = torch.Generator().manual_seed(seed)
    if frequencies is None:
        drawn = torch.randperm(n_latents, generator=generator)[:n].sort().values
        return [(int(i), "random") for i in drawn]
    live = (frequencies > 0).nonzero().flatten()
    order = live[frequencies[live].argsort(descending=True, stable=True)]
    chosen: list[tuple[int, str]] = []
    offset = 0
    for b, (band, members) in enumerate(zip(("frequent", "median", "rare"), order.tensor_split(3), strict=True)):
        quota = n // 3 + (1 if b < n % 3 else 0)
        # Positions in ``order`` sort the picks by frequency, highest first.
        positions = (torch.randperm(len(members), generator=generator)[:quota] + offset).sort().values
        chosen += [(int(order[i]), band) for i in positions]
        offset += len(members)
    return chosen


@dataclass
class Scan:
    """What ``scan_top_activations`` found for each sampled feature."""

    features: list[int]
    values: Tensor
    """(n_examples, n_features) largest activations, descending; -inf where fewer rows were seen."""
    rows: int
    """Rows scanned."""
    row_ids: Tensor
    """(n_examples, n_features) the scanned-row index of each value."""
    fired: Tensor
    """(n_features,) rows each fired on (> 0)."""
    token_ids: np.ndarray
    sequence_ids: np.ndarray
    positions: np.ndarray
    """Provenance of every scanned row, by scanned-row index."""


@torch.no_grad()
def scan_top_activations(
    sae: nn.Module, shards: Iterable[DecodedShard], features: Sequence[int], *, n_examples: int, max_tokens: int
) -> Scan:
    """Encode up to ``max_tokens`` rows of ``shards`` (raw activations; ``sae`` acts on raw
    activations, as ``load_dictionary`` gives it) and keep each feature's ``n_examples`` largest
    activations with their rows' provenance."""
    index = torch.tensor(list(features), dtype=torch.int64)
    param = next(sae.parameters())
    values = torch.full((n_examples, len(index)), -math.inf)
    row_ids = torch.full((n_examples, len(index)), -1, dtype=torch.int64)
    fired = torch.zeros(len(index), dtype=torch.int64)
    provenance: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    # The encoder's (rows, n_latents) pre-activations take about 256 MB per chunk in float32.
    chunk_rows = max(64, min(4096, 2**26 // sae.n_latents))
    was_training, rows = sae.training, 0
    sae.eval()
    try:
        for shard in shards:
            take = min(len(shard.activations), max_tokens - rows)
            provenance.append((shard.token_ids[:take], shard.sequence_ids[:take], shard.positions[:take]))
            for start in range(0, take, chunk_rows):
                x = shard.activations[start : min(take, start + chunk_rows)]
                acts = _feature_activations(sae(x.to(device=param.device, dtype=param.dtype)), index.to(param.device))
                # A row with NaN or Inf (a cache keeps them, counted) must not rank first: topk puts NaN on top.
                finite = torch.isfinite(x).all(dim=-1).to(acts.device)[:, None] & ~acts.isnan()
                acts = acts.masked_fill(~finite, -math.inf)
                fired += (acts > 0).sum(dim=0)
                candidates = torch.cat([values, acts])
                ids = torch.arange(rows + start, rows + start + len(acts))[:, None].expand(-1, len(index))
                values, top = candidates.topk(n_examples, dim=0)
                row_ids = torch.cat([row_ids, ids]).gather(0, top)
            rows += take
            if rows >= max_tokens:
                break
    finally:
        sae.train(was_training)
    token_ids, sequence_ids, positions = (
        np.concatenate([p[i] for p in provenance]) if provenance else np.zeros(0, dtype=np.int64) for i in range(3)
    )
    return Scan(list(features), values, rows, row_ids, fired, token_ids, sequence_ids, positions)


def _feature_activations(out: Any, index: Tensor) -> Tensor:
    """(B, len(index)) float32 activations of the latents ``index`` from any architecture's output:
    TopK's (B, k) values with indices, or a dense architecture's (B, n_latents)."""
    if out.latent_indices is None:
        return out.latent_acts[:, index].float().cpu()
    hit = out.latent_indices.unsqueeze(-1) == index  # (B, k, n_features)
    return (out.latent_acts.float().unsqueeze(-1) * hit).sum(dim=1).cpu()


@torch.no_grad()
def logit_tokens(W_dec: Tensor, unembedding: Tensor, features: Sequence[int], n: int) -> list[tuple[list, list]]:
    """Per feature, ((promoted ids, logits), (suppressed ids, logits)): the top and bottom ``n``
    entries of ``unembedding @ W_dec[feature]``."""
    directions = W_dec.detach()[list(features)].float().cpu()
    # In vocabulary slices: a float32 copy of a large W_U (128k x 8192) would be 4 GB.
    logits = torch.cat([directions @ part.float().T for part in unembedding.split(16384)], dim=1)
    k = min(n, logits.shape[1])
    top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    return [((top.indices[i].tolist(), top.values[i].tolist()), (bottom.indices[i].tolist(), bottom.values[i].tolist()))
            for i in range(len(features))]


def feature_cards(
    features: list[tuple[int, str]],
    frequencies: Tensor | None,
    scan: Scan,
    logit_ids: list[tuple[list, list]] | None,
    *,
    decode: Decode,
    before: int,
    after: int,
) -> list[FeatureCard]:
    """The cards of the sampled features, with their contexts and logit tokens decoded."""
    windows = _SequenceIndex(scan)
    examples = []
    for j in range(len(features)):
        found = [(float(v), int(r)) for v, r in zip(scan.values[:, j], scan.row_ids[:, j], strict=True) if v > 0]
        examples.append([(v, r, *windows.window(r, before, after)) for v, r in found])
    needed = {t for found in examples for _, _, ids, *_ in found for t in ids}
    for promoted, suppressed in logit_ids or []:
        needed.update(promoted[0] + suppressed[0])
    ordered = sorted(needed)
    text = dict(zip(ordered, decode(ordered), strict=True)) if ordered else {}
    cards = []
    for j, (feature, band) in enumerate(features):
        contexts = [
            Context([text[t] for t in ids], hit, v, int(scan.sequence_ids[r]), int(scan.positions[r]), more_b, more_a)
            for v, r, ids, hit, more_b, more_a in examples[j]
        ]
        promoted, suppressed = logit_ids[j] if logit_ids else (([], []), ([], []))
        cards.append(FeatureCard(
            index=feature, band=band, frequency=None if frequencies is None else float(frequencies[feature]),
            fired=int(scan.fired[j]), max_activation=contexts[0].activation if contexts else 0.0, contexts=contexts,
            promoted=[(text[t], v) for t, v in zip(*promoted, strict=True)],
            suppressed=[(text[t], v) for t, v in zip(*suppressed, strict=True)],
        ))
    return cards


class _SequenceIndex:
    """The scanned rows sorted by (sequence, position), to cut a window around any row."""

    def __init__(self, scan: Scan) -> None:
        self._span = int(scan.positions.max()) + 1 if len(scan.positions) else 1
        keys = scan.sequence_ids.astype(np.int64) * self._span + scan.positions.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys, self._tokens = keys[order], scan.token_ids[order]
        self._scan = scan

    def window(self, row: int, before: int, after: int) -> tuple[list[int], int, bool, bool]:
        """(token ids from ``before`` to ``after`` positions around ``row``, index of ``row``'s
        token among them, whether the sequence goes on before / after the window)."""
        base = int(self._scan.sequence_ids[row]) * self._span
        position = int(self._scan.positions[row])
        def index(key: int, side: str) -> int:
            return int(np.searchsorted(self._keys, key, side=side))

        lo, hi = index(base + max(position - before, 0), "left"), index(base + min(position + after, self._span - 1), "right")
        first, last = index(base, "left"), index(base + self._span - 1, "right")
        return [int(t) for t in self._tokens[lo:hi]], index(base + position, "left") - lo, first < lo, last > hi


# --------------------------------------------------------------------------- SVG plots


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))


def _axis(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """A padded range and round tick values covering [lo, hi]."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target)
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [lo + i * step for i in range(int(round((hi - lo) / step)) + 1)]
    return lo, hi, ticks


def _compact(value: float) -> str:
    if value == 0:
        return "0"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


@dataclass(frozen=True)
class _Frame:
    """A plot area inside an SVG of ``width`` x ``height`` pixels, data ranges mapped onto it."""

    width: int = 440
    height: int = 250
    left: int = 64
    right: int = 14
    top: int = 28
    bottom: int = 42

    def x(self, value: float, lo: float, hi: float) -> float:
        return self.left + (value - lo) / (hi - lo) * (self.width - self.left - self.right)

    def y(self, value: float, lo: float, hi: float) -> float:
        return self.height - self.bottom - (value - lo) / (hi - lo) * (self.height - self.top - self.bottom)


def _axes_svg(frame: _Frame, x_axis, y_axis, *, title: str, x_label: str, y_label: str, y_tick_text=_compact) -> list[str]:
    (x_lo, x_hi, x_ticks), (y_lo, y_hi, y_ticks) = x_axis, y_axis
    e, f = html.escape, frame
    parts = [f'<text class="title" x="{f.left}" y="16">{e(title)}</text>']
    for t in y_ticks:
        y = f.y(t, y_lo, y_hi)
        parts.append(f'<line class="grid" x1="{f.left}" x2="{f.width - f.right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{f.left - 6}" y="{y + 4:.1f}" text-anchor="end">{e(y_tick_text(t))}</text>')
    for t in x_ticks:
        x = f.x(t, x_lo, x_hi)
        parts.append(f'<text class="tick" x="{x:.1f}" y="{f.height - f.bottom + 16}" text-anchor="middle">{e(_compact(t))}</text>')
    parts.append(f'<rect class="frame" x="{f.left}" y="{f.top}" width="{f.width - f.left - f.right}" '
                 f'height="{f.height - f.top - f.bottom}"/>')
    parts.append(f'<text class="label" x="{(f.left + f.width - f.right) / 2:.1f}" y="{f.height - 6}" '
                 f'text-anchor="middle">{e(x_label)}</text>')
    if y_label:
        middle = (f.top + f.height - f.bottom) / 2
        parts.append(f'<text class="label" transform="translate(12 {middle:.1f}) rotate(-90)" '
                     f'text-anchor="middle">{e(y_label)}</text>')
    return parts


def _svg(frame: _Frame, parts: list[str], label: str) -> str:
    return (f'<svg class="plot" role="img" aria-label="{html.escape(label)}" width="{frame.width}" '
            f'height="{frame.height}" viewBox="0 0 {frame.width} {frame.height}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


def svg_line_chart(points: list[tuple[float, float]], *, title: str, x_label: str, y_label: str, log_y: bool = False) -> str:
    """A line chart of (x, y) points as an inline SVG; ``log_y`` uses a log axis when every y is
    positive and they span at least a decade."""
    points = _thin([(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)], 2000)
    frame = _Frame()
    if not points:
        return _svg(frame, [f'<text class="title" x="{frame.left}" y="16">{html.escape(title)}: no finite values</text>'], title)
    ys = [y for _, y in points]
    log_y = log_y and min(ys) > 0 and max(ys) / min(ys) >= 10
    if log_y:
        ys = [math.log10(y) for y in ys]
        lo, hi = math.floor(min(ys)), math.ceil(max(ys))
        y_axis = (lo, hi, [float(t) for t in range(lo, hi + 1)])
        tick_text = lambda t: f"{10 ** t:g}"  # noqa: E731
    else:
        y_axis, tick_text = _axis(min(ys), max(ys)), _compact
    x_axis = _axis(min(x for x, _ in points), max(x for x, _ in points))
    parts = _axes_svg(frame, x_axis, y_axis, title=title, x_label=x_label, y_label=y_label, y_tick_text=tick_text)
    coords = [(frame.x(x, *x_axis[:2]), frame.y(y, *y_axis[:2])) for (x, _), y in zip(points, ys, strict=True)]
    parts.append(f'<polyline class="series" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in coords)}">'
                 f'<title>{html.escape(title)}</title></polyline>')
    if len(coords) <= 40:  # a few points (or one) stay visible as dots
        parts += [f'<circle class="dot" cx="{a:.1f}" cy="{b:.1f}" r="2.5"/>' for a, b in coords]
    return _svg(frame, parts, title)


def _thin(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def svg_histogram(edges: list[float], counts: list[float], *, title: str, x_label: str, y_label: str,
                  marker: tuple[float, str] | None = None) -> str:
    """Bars of ``counts`` between consecutive ``edges`` as an inline SVG, with an optional dashed
    vertical ``marker`` (x, label)."""
    frame = _Frame(width=640, height=260)
    x_axis = _axis(edges[0], edges[-1], target=10)
    y_axis = _axis(0.0, max(max(counts), 1.0))
    parts = _axes_svg(frame, x_axis, y_axis, title=title, x_label=x_label, y_label=y_label)
    base = frame.y(0.0, *y_axis[:2])
    for lo, hi, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if count <= 0:
            continue
        x0, x1 = frame.x(lo, *x_axis[:2]), frame.x(hi, *x_axis[:2])
        y = frame.y(count, *y_axis[:2])
        parts.append(f'<rect class="bar" x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                     f'height="{base - y:.1f}"><title>[{lo:g}, {hi:g}): {count:,.0f}</title></rect>')
    if marker is not None and x_axis[0] <= marker[0] <= x_axis[1]:
        x = frame.x(marker[0], *x_axis[:2])
        parts.append(f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{base:.1f}"/>')
        parts.append(f'<text class="tick" x="{x - 4:.1f}" y="{frame.top + 12}" text-anchor="end">'
                     f"{html.escape(marker[1])}</text>")
    return _svg(frame, parts, title)


# --------------------------------------------------------------------------- HTML

_CURVES = (  # (key, title, log axis)
    ("loss", "loss", True), ("fvu", "FVU (training batches)", True), ("l0", "L0: latents firing per token", False),
    ("dead_fraction", "dead fraction", False), ("mse", "MSE (normalised activations)", True),
    ("dense_fraction", "dense fraction (firing on > 10% of tokens)", False),
    ("aux_loss", "auxiliary loss", False), ("sparsity_loss", "sparsity loss", False),
    ("lr", "learning rate", False), ("tokens_per_second", "tokens / s", False),
)
_HEADLINE = ("fvu", "mse", "cosine", "l0", "dead_fraction", "dense_fraction", "train_tokens", "train_steps", "n_tokens")
_SECTIONED = {"firing_histogram", "unexplained"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:18px 28px}header h1{margin:0 0 6px;font-size:22px}
nav a{color:#cfe3ff;margin-right:16px;text-decoration:none}main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;margin:18px 0;padding:14px 20px}
h2{margin:4px 0 10px;font-size:18px}h3{margin:0 0 6px;font-size:15px}h4{margin:10px 0 4px;font-size:13px;color:#4a5563}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid #e6e9ed;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:10px}svg.plot{background:#fff;border:1px solid #eef0f3}
svg text{font-size:11px;fill:#333}svg .title{font-size:12px;font-weight:600}svg .label{fill:#555}
svg .grid{stroke:#eceff3}svg .frame{fill:none;stroke:#9aa3ad}svg .series{fill:none;stroke:#2a6fdb;stroke-width:1.6}
svg .dot{fill:#2a6fdb}svg .bar{fill:#e07a2f}svg .marker{stroke:#8a1c1c;stroke-dasharray:4 3}
.note{color:#5b6470;font-size:13px}.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
article.feature{border:1px solid #dde1e6;border-radius:8px;padding:10px 14px;background:#fcfcfd}
.band{font-size:11px;padding:1px 7px;border-radius:9px;background:#e8eef8;color:#1d3557;margin-left:6px}
ol.contexts{margin:0;padding-left:22px}ol.contexts li{margin:2px 0}
.act{display:inline-block;min-width:52px;color:#5b6470;font-variant-numeric:tabular-nums}
.ctx{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px}
.tok{white-space:pre;border-radius:3px}mark.hit{background:#ffd166;outline:1px solid #e0a100;font-weight:700;color:#111}
.chip{display:inline-block;font-family:"DejaVu Sans Mono",Menlo,monospace;font-size:12px;white-space:pre;
background:#eef6ee;border:1px solid #cfe6cf;border-radius:4px;padding:0 5px;margin:2px 3px 2px 0}
.chip.neg{background:#fbeeee;border-color:#efcfcf}.chip small{color:#5b6470;margin-left:4px}
"""


def render_html(
    *,
    cfg: dict[str, Any],
    evaluation: dict[str, Any],
    curves: list[dict[str, Any]] | None,
    sample: FeatureSample | None,
) -> str:
    """The report page: a pure function of its arguments."""
    metadata = cfg.get("metadata", {})
    title = f"SAE report: {metadata.get('hook_name', '?')} of {metadata.get('model_name', '?')}"
    sections = [
        ("summary", "Summary", _summary_html(cfg, evaluation)),
        ("training-curves", "Training curves", _curves_html(curves)),
        ("firing-histogram", "Firing frequencies", _histogram_html(evaluation.get("firing_histogram"))),
        ("evaluation", "Held-out evaluation", _evaluation_html(evaluation)),
    ]
    if "unexplained" in evaluation:
        sections.append(("unexplained", "What the dictionary leaves unexplained",
                         _unexplained_html(evaluation["unexplained"])))
    sections.append(("features", "Features", _features_html(sample)))
    nav = "".join(f'<a href="#{sid}">{html.escape(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(name)}</h2>{content}</section>' for sid, name, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        # No script may run: everything shown is static, and tokens are untrusted text.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><nav>{nav}</nav></header><main>{body}</main></body></html>\n"
    )


def _summary_html(cfg: dict[str, Any], evaluation: dict[str, Any]) -> str:
    metadata = cfg.get("metadata", {})
    rows: list[tuple[str, Any]] = [
        ("model", metadata.get("model_name")), ("hookpoint", metadata.get("hook_name")),
        *([("output hookpoint", metadata["hook_name_out"])] if "hook_name_out" in metadata else []),
        ("architecture", f"{cfg.get('architecture')} (trained as {metadata.get('training_architecture', '?')})"),
        ("d_in", cfg.get("d_in")), ("latents (d_sae)", cfg.get("d_sae")),
        *([("k", cfg["k"])] if "k" in cfg else []),
        *[(key, metadata[key]) for key in ("run_name", "cache_key") if key in metadata],
        *[(f"held-out {key}" if key not in ("train_tokens", "train_steps") else key, evaluation[key])
          for key in _HEADLINE if key in evaluation],
    ]
    lm = evaluation.get("lm")
    if isinstance(lm, dict):
        rows += [(f"spliced LM: {key}", lm[key]) for key in ("ce_recovered", "delta_lm_loss", "kl_divergence") if key in lm]
    return _table(rows)


def _curves_html(curves: list[dict[str, Any]] | None) -> str:
    if not curves:
        return '<p class="note">No training curves were recorded with this dictionary.</p>'
    plots = []
    for key, title, log_y in _CURVES:
        points = [(float(e["step"]), float(e[key])) for e in curves
                  if isinstance(e.get(key), int | float) and isinstance(e.get("step"), int | float)]
        if points:
            plots.append(svg_line_chart(points, title=title, x_label="step", y_label="", log_y=log_y))
    note = (f'<p class="note">{len(curves)} logging steps; each point averages the steps since the previous one. '
            "Loss and MSE are in the training's normalised units.</p>")
    return note + f'<div class="plots">{"".join(plots)}</div>'


def _histogram_html(histogram: Any) -> str:
    if not (isinstance(histogram, dict) and histogram.get("latents") and histogram.get("log10_frequency_edges")):
        return '<p class="note">eval.json has no firing histogram.</p>'
    edges, counts = histogram["log10_frequency_edges"], histogram["latents"]
    if len(edges) != len(counts) + 1:
        return f'<p class="note">eval.json firing histogram: {len(edges)} edges for {len(counts)} bins; not drawn.</p>'
    svg = svg_histogram(edges, counts, title="latents by held-out firing frequency", x_label="log10 firing frequency",
                        y_label="latents", marker=(-1.0, "dense: > 10%"))
    return (f'<div class="plots">{svg}</div><p class="note">Frequency: the fraction of held-out tokens a latent '
            "fires on. Latents that never fired count at -10, the leftmost bar.</p>")


def _evaluation_html(evaluation: dict[str, Any]) -> str:
    if not evaluation:
        return '<p class="note">No eval.json.</p>'
    scalars = [(k, v) for k, v in sorted(evaluation.items()) if k not in _SECTIONED and not isinstance(v, dict | list)]
    parts = [_table(scalars)]
    for key, value in sorted(evaluation.items()):
        if key in _SECTIONED or not isinstance(value, dict | list):
            continue
        heading = "Language-model loss with the dictionary spliced in" if key == "lm" else key
        parts.append(f"<h4>{html.escape(heading)}</h4>{_value_html(value)}")
    return "".join(parts)


def _features_html(sample: FeatureSample | None) -> str:
    if sample is None:
        return f'<p class="note">No feature sample was computed for this dictionary ({FEATURES_FILE} is missing).</p>'
    if not sample.cards:
        return '<p class="note">No live latents to show.</p>'
    intro = (f'<p class="note">{len(sample.cards)} latents, drawn (seed {sample.seed}) from the most frequent, middle '
             "and rarest thirds of the live latents; contexts are the top activations among the first "
             f"{sample.rows_scanned:,} held-out tokens, with the activating token highlighted.</p>")
    if sample.has_logits:
        intro += f'<p class="note">{html.escape(sample.logits_note)}</p>'
    else:
        intro += f'<p class="note">Promoted tokens are unavailable: {html.escape(sample.logits_note)}.</p>'
    index = _table_rows(
        ["latent", "band", "frequency", "fired (scanned)", "max activation"],
        [[f'<a href="#feature-{c.index}">{c.index}</a>', html.escape(c.band), _number(c.frequency),
          _number(c.fired), _number(c.max_activation)] for c in sample.cards],
    )
    cards = "".join(_card_html(c, sample.has_logits) for c in sample.cards)
    return f'{intro}{index}<div class="cards">{cards}</div>'


def _card_html(card: FeatureCard, has_logits: bool) -> str:
    frequency = "unknown" if card.frequency is None else f"{card.frequency:.3g}" + (
        f" (1 in {1 / card.frequency:,.0f} tokens)" if card.frequency > 0 else "")
    parts = [
        f'<article class="feature" id="feature-{card.index}"><h3>Latent {card.index}'
        f'<span class="band">{html.escape(card.band)}</span></h3>',
        f'<p class="note">held-out firing frequency {frequency} · fired on {card.fired:,} scanned tokens · '
        f"max activation {card.max_activation:.4g}</p><h4>Top-activating contexts</h4>",
    ]
    if card.contexts:
        parts.append('<ol class="contexts">' + "".join(_context_html(c) for c in card.contexts) + "</ol>")
    else:
        parts.append('<p class="note">It did not fire on the scanned tokens.</p>')
    if has_logits:
        parts.append("<h4>Promoted tokens</h4>" + _chips(card.promoted, ""))
        parts.append("<h4>Suppressed tokens</h4>" + _chips(card.suppressed, " neg"))
    return "".join(parts) + "</article>"


def _context_html(context: Context) -> str:
    spans = []
    for i, token in enumerate(context.tokens):
        text = html.escape(_visible(token))
        if i == context.hit:
            spans.append(f'<mark class="tok hit" title="activation {context.activation:.4g}">{text}</mark>')
        else:
            spans.append(f'<span class="tok">{text}</span>')
    where = f"sequence {context.sequence_id}, position {context.position}"
    return (f'<li title="{html.escape(where)}"><span class="act">{context.activation:.3g}</span>'
            f'<span class="ctx">{"…" if context.more_before else ""}{"".join(spans)}'
            f'{"…" if context.more_after else ""}</span></li>')


def _chips(tokens: list[tuple[str, float]], kind: str) -> str:
    return "<div>" + "".join(
        f'<span class="chip{kind}">{html.escape(_visible(t))}<small>{v:+.3g}</small></span>' for t, v in tokens
    ) + "</div>"


_SHOWN_CONTROLS = {"\n": "⏎", "\t": "⇥", "\r": "␍"}


def _visible(token: str) -> str:
    """``token`` with control characters shown as symbols or escapes (HTML cannot carry most)."""
    return "".join(
        _SHOWN_CONTROLS.get(ch, f"\\x{ord(ch):02x}") if unicodedata.category(ch) == "Cc" else ch for ch in token
    )


def _number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return html.escape(str(value))


def _table(rows: list[tuple[str, Any]]) -> str:
    return _table_rows(None, [[html.escape(str(k)), _value_html(v)] for k, v in rows])


def _table_rows(header: list[str] | None, rows: list[list[str]]) -> str:
    """A table of already-escaped cells."""
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _value_html(value: Any) -> str:
    """Any JSON value as escaped HTML: dicts as key/value tables, lists of dicts as tables."""
    if isinstance(value, dict):
        return _table_rows(None, [[html.escape(str(k)), _value_html(v)] for k, v in value.items()])
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            return _table_rows(columns, [[_value_html(v.get(c)) for c in columns] for v in value])
        shown = ", ".join(_value_html(v) for v in value[:32])
        return shown + (f" … ({len(value) - 32} more)" if len(value) > 32 else "")
    return _number(value)


def _unexplained_html(unexplained: Any) -> str:
    """``eval.json``'s ``unexplained`` (``cluster.evaluation``): the error summaries as one table,
    the error-norm histogram as a plot, the worst tokens in their contexts; any other key as is."""
    if not isinstance(unexplained, dict):
        return _value_html(unexplained)
    rest = dict(unexplained)
    parts = []
    summaries = {k: rest.pop(k) for k in ("error_norm", "token_fvu") if isinstance(rest.get(k), dict)}
    if summaries:
        found = list(dict.fromkeys(c for summary in summaries.values() for c in summary))
        # eval.json is written with sorted keys: put the quantiles back in order.
        columns = [c for c in ("mean", "p50", "p90", "p99", "max") if c in found] + [
            c for c in found if c not in ("mean", "p50", "p90", "p99", "max")]
        parts.append(_table_rows(["per token", *columns], [[html.escape(name), *(_number(s.get(c)) for c in columns)]
                                                           for name, s in summaries.items()]))
    histogram = rest.get("error_norm_histogram")
    if isinstance(histogram, dict) and len(histogram.get("edges", [])) == len(histogram.get("tokens", [])) + 1 > 1:
        rest.pop("error_norm_histogram")
        parts.append('<div class="plots">' + svg_histogram(
            histogram["edges"], histogram["tokens"], title="tokens by reconstruction-error norm",
            x_label="‖x − x̂‖ (raw activation units)", y_label="tokens") + "</div>")
    worst = rest.get("worst_contexts")
    if isinstance(worst, list) and worst and all(isinstance(w, dict) for w in worst):
        rest.pop("worst_contexts")
        parts.append("<h4>Tokens with the largest reconstruction error</h4>" + _worst_html(worst))
    if rest:
        parts.insert(0, _value_html(rest))
    return "".join(parts)


def _worst_html(worst: list[dict[str, Any]]) -> str:
    columns = [c for c in dict.fromkeys(k for w in worst for k in w) if c not in ("context", "token")]
    rows = [[*(_value_html(w.get(c)) for c in columns), _marked_context(w.get("context"), w.get("token"))]
            for w in worst]
    return _table_rows([*columns, "context"], rows)


def _marked_context(context: Any, token: Any) -> str:
    """``cluster.evaluation``'s ``prefix[[token]]suffix`` with the token highlighted."""
    if not isinstance(context, str):
        return _value_html(context)
    marker = f"[[{token}]]" if isinstance(token, str) else "[["
    at = context.find(marker)
    if at < 0 or not isinstance(token, str):
        return f'<span class="ctx tok">{html.escape(_visible(context))}</span>'
    before, after = context[:at], context[at + len(marker):]
    return (f'<span class="ctx"><span class="tok">{html.escape(_visible(before))}</span>'
            f'<mark class="tok hit">{html.escape(_visible(token))}</mark>'
            f'<span class="tok">{html.escape(_visible(after))}</span></span>')
