"""Small TopK dictionaries trained in a test and written as real dictionary folders: the ones the
interp tests observe and steer (``tiny_dictionaries``, ``tiny_transcoders``, ``tiny_clts``; a pytest
plugin of tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from activation_cache.config import PACKAGED_MODEL, PACKAGED_TEXT, DataConfig, ModelConfig
from activation_cache.hooking import (
    ActivationHarvester,
    MultiHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.store import open_store
from activation_cache.text import iter_documents, pack_sequences
from interp.loading import model_metadata
from trainer.activation_stats import (
    ActivationStats,
    FeatureMaxima,
    activation_stats_file,
    feature_stats_file,
)
from trainer.clt import CrossLayerTranscoder
from trainer.dictionary import dictionary_files
from trainer.layout import ACTIVATION_STATS_FILE, FEATURE_STATS_FILE, write_dictionary
from trainer.sae import SparseCoder, TopKSAE

LAYER = 1  # the tiny Llama's hookpoint resid_post.1: hidden_states[2] in transformers' numbering
MLP_IN, MLP_OUT = f"model.layers.{LAYER}.mlp:input", f"model.layers.{LAYER}.mlp"
"""The tiny transcoders' input and target: the layer-1 MLP's input and output."""
CLT_INPUTS = [f"model.layers.{layer}.mlp:input" for layer in range(4)]
CLT_TARGETS = [f"model.layers.{layer}.mlp" for layer in range(4)]
"""The tiny CLTs' inputs and targets: every MLP of the tiny Llama's 4 layers."""


def train_topk(rows: torch.Tensor, n_latents: int, k: int, steps: int) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(rows.shape[1], n_latents, k, seed=0)
    sae.init_b_dec(rows, method="mean")
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = sae(rows[torch.randint(0, len(rows), (256,))]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sae.eval()


def fit_transcoder(sae: SparseCoder, x: Tensor, y: Tensor, steps: int, *, seed: int = 0) -> SparseCoder:
    """``sae`` (built as a transcoder) trained to predict ``y`` from ``x`` (rows of each): ``b_dec``
    at ``y``'s mean, then ``steps`` Adam steps on 256 random rows; returned in eval mode."""
    torch.manual_seed(seed)
    sae.init_b_dec(y, method="mean")
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (256,))
        loss = sae(x[batch], target=y[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sae.eval()


def train_topk_transcoder(x: Tensor, y: Tensor, n_latents: int, k: int, steps: int, *,
                          skip_connection: bool = False) -> TopKSAE:
    """A TopK transcoder predicting ``y`` from ``x`` (rows of each), with ``W_skip`` if asked."""
    sae = TopKSAE(x.shape[1], n_latents, k, d_out=y.shape[1], apply_b_dec_to_input=False, seed=0,
                  skip_connection=skip_connection)
    return fit_transcoder(sae, x, y, steps)


def write_folder(folder: Path, sae: SparseCoder | CrossLayerTranscoder, hookpoint: str, model: ModelConfig,
                 held_out: Tensor | None = None, *, hookpoint_out: str | None = None,
                 held_out_target: Tensor | None = None, hookpoints: list[str] | None = None,
                 hookpoints_out: list[str] | None = None) -> Path:
    """``sae`` as a dictionary folder; with ``held_out`` rows, the statistics a training job
    records on them (activation mean and variance, each feature's largest activation). A
    transcoder names its target in ``hookpoint_out``; its mean and variance are the target's,
    ``held_out_target`` (the rows at the target of the same tokens). A cross-layer transcoder
    names every covered layer's input and target in ``hookpoints`` / ``hookpoints_out`` (its rows
    are the layers' side by side)."""
    files = dictionary_files(sae, hookpoint=hookpoint, model_name="test", scale=1.0,
                             extra_metadata=model_metadata(model, DataConfig()), sparsity=None, eval_metrics={},
                             hookpoint_out=hookpoint_out, hookpoints=hookpoints, hookpoints_out=hookpoints_out)
    if held_out is not None:
        reconstructed = held_out if held_out_target is None else held_out_target
        files[ACTIVATION_STATS_FILE] = activation_stats_file(ActivationStats.of(reconstructed))
        maxima = FeatureMaxima(sae.n_latents)
        with torch.no_grad():
            code = sae.encode(held_out)
        maxima.update(code.acts, code.indices)
        files[FEATURE_STATS_FILE] = feature_stats_file(maxima.result())
    write_dictionary(open_store(str(folder)), files)
    return folder


def _tiny_tokens(tiny_model_dir: Path, tiny_corpus_dir: Path) -> tuple[nn.Module, Tensor]:
    """The tiny Llama and 48 sequences of 32 tokens of the tiny corpus, BOS first."""
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokens = torch.from_numpy(pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 48),
                                             load_tokenizer(source)))
    return load_model(source), tokens


@pytest.fixture(scope="module")
def tiny_dictionaries(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A TopK dictionary trained on the tiny Llama's layer-1 activations (BOS left out), twice:
    with held-out statistics and feature maxima (from the last 8 sequences) and without."""
    model, tokens = _tiny_tokens(tiny_model_dir, tiny_corpus_dir)
    acts = ActivationHarvester(model, f"resid_post.{LAYER}")(tokens)[:, 1:].reshape(-1, 32)
    train, held_out = acts[: -8 * 31], acts[-8 * 31:]
    sae = train_topk(train, 64, 4, steps=60)
    model = ModelConfig(name_or_path=str(tiny_model_dir))
    root = tmp_path_factory.mktemp("observed")
    with_stats = write_folder(root / "with-stats", sae, f"model.layers.{LAYER}", model, held_out)
    return with_stats, write_folder(root / "without-stats", sae, f"model.layers.{LAYER}", model, None)


@dataclass(frozen=True)
class PackagedDictionary:
    model: nn.Module
    """The packaged SmolLM2-135M-Instruct, loaded once for the session."""
    folder: Path
    """A TopK dictionary (1,152 latents, k 16, 40 steps) on its layer-15 activations over Shakespeare,
    with the statistics a job records on its held-out rows."""
    text: Tensor
    """(4, 128) token ids, BOS first, the dictionary never trained on."""


@pytest.fixture(scope="session")
def packaged_dictionary(tmp_path_factory) -> PackagedDictionary:
    source = resolve_model_source(ModelConfig(name_or_path=PACKAGED_MODEL))
    model, tokenizer = load_model(source), load_tokenizer(source)
    stream = tokenizer(next(iter_documents(PACKAGED_TEXT))[1][:30000], add_special_tokens=False)["input_ids"]
    tokens = torch.tensor(stream[: 20 * 127]).reshape(20, 127)
    tokens = torch.cat([torch.full((20, 1), tokenizer.bos_token_id), tokens], dim=1)
    acts = ActivationHarvester(model, "resid_post.15")(tokens[:16])[:, 1:].reshape(-1, 576)
    sae = train_topk(acts[:-254], 1152, 16, steps=40)
    folder = write_folder(tmp_path_factory.mktemp("smollm") / "dictionary", sae, "model.layers.15", ModelConfig(),
                          acts[-254:])
    return PackagedDictionary(model, folder, tokens[16:])



@dataclass(frozen=True)
class TinyTranscoders:
    """TopK transcoders (64 latents, k 4, 80 steps) from the tiny Llama's layer-1 MLP input
    (``MLP_IN``) to its output (``MLP_OUT``), trained on the rows of 40 sequences (BOS left out)."""

    with_stats: Path
    """With the statistics a job records on the last 8 sequences' rows: the target's mean and
    variance, each feature's largest activation (encoded from the input)."""
    without_stats: Path


@dataclass(frozen=True)
class _MLPRows:
    model: ModelConfig
    x: Tensor
    """(rows, 32) the MLP's input at every token but BOS of 48 tiny-corpus sequences."""
    y: Tensor
    """(rows, 32) its output at the same tokens."""
    held_out: int = -8 * 31
    """The last 8 sequences' rows are held out."""


@pytest.fixture(scope="module")
def _tiny_mlp_rows(tiny_model_dir, tiny_corpus_dir) -> _MLPRows:
    model, tokens = _tiny_tokens(tiny_model_dir, tiny_corpus_dir)
    pair = MultiHarvester(model, [MLP_IN, MLP_OUT])(tokens)
    x, y = (pair[h][:, 1:].reshape(-1, 32) for h in (MLP_IN, MLP_OUT))
    return _MLPRows(ModelConfig(name_or_path=str(tiny_model_dir)), x, y)


def _train_transcoder(rows: _MLPRows, *, skip_connection: bool = False) -> TopKSAE:
    held = rows.held_out
    return train_topk_transcoder(rows.x[:held], rows.y[:held], 64, 4, steps=80, skip_connection=skip_connection)


def _transcoder_folder(rows: _MLPRows, folder: Path, sae: TopKSAE, *, stats: bool) -> Path:
    held = rows.held_out
    if not stats:
        return write_folder(folder, sae, MLP_IN, rows.model, hookpoint_out=MLP_OUT)
    return write_folder(folder, sae, MLP_IN, rows.model, rows.x[held:], hookpoint_out=MLP_OUT,
                        held_out_target=rows.y[held:])


@pytest.fixture(scope="module")
def tiny_transcoders(_tiny_mlp_rows, tmp_path_factory) -> TinyTranscoders:
    root, sae = tmp_path_factory.mktemp("transcoders"), _train_transcoder(_tiny_mlp_rows)
    return TinyTranscoders(_transcoder_folder(_tiny_mlp_rows, root / "with-stats", sae, stats=True),
                           _transcoder_folder(_tiny_mlp_rows, root / "without-stats", sae, stats=False))


@pytest.fixture(scope="module")
def tiny_skip_transcoder(_tiny_mlp_rows, tmp_path_factory) -> Path:
    """As ``tiny_transcoders.with_stats``, a skip transcoder (``W_skip``) trained the same way."""
    return _transcoder_folder(_tiny_mlp_rows, tmp_path_factory.mktemp("skip-transcoder") / "dictionary",
                              _train_transcoder(_tiny_mlp_rows, skip_connection=True), stats=True)


@dataclass(frozen=True)
class TinyCLTs:
    """Cross-layer transcoders over all 4 layers of the tiny Llama (each MLP's input -> the outputs
    of its own and every later MLP; 16 features per layer, 120 Adam steps) trained on the rows of 40
    sequences (BOS left out), with the statistics a job records on the last 8 sequences' rows (the 4
    targets' mean and variance side by side, each feature's largest activation). Built with each
    layer's own input and target scales, which the saved weights fold in."""

    jumprelu: Path
    topk: Path
    """TopK, 3 features per layer per token (``clt_topk='layer'``)."""


@dataclass(frozen=True)
class _CLTRows:
    model: ModelConfig
    x: Tensor
    """(rows, 4 * 32) the 4 MLPs' inputs side by side at every token but BOS of 48 tiny-corpus sequences."""
    y: Tensor
    """(rows, 4 * 32) their outputs at the same tokens."""
    held_out: int = -8 * 31


@pytest.fixture(scope="module")
def _tiny_clt_rows(tiny_model_dir, tiny_corpus_dir) -> _CLTRows:
    model, tokens = _tiny_tokens(tiny_model_dir, tiny_corpus_dir)
    captured = MultiHarvester(model, [h for pair in zip(CLT_INPUTS, CLT_TARGETS, strict=True) for h in pair])(tokens)
    x, y = (torch.cat([captured[h][:, 1:].reshape(-1, 32) for h in names], dim=1) for names in (CLT_INPUTS, CLT_TARGETS))
    return _CLTRows(ModelConfig(name_or_path=str(tiny_model_dir)), x, y)


def _layer_scales(rows: Tensor) -> Tensor:
    """Each layer's factor to mean norm sqrt(32), as a job's cache manifest gives it."""
    return 32 ** 0.5 / rows.reshape(len(rows), 4, 32).norm(dim=-1).mean(dim=0)


def fit_clt(clt: CrossLayerTranscoder, x: Tensor, y: Tensor, steps: int, *, seed: int = 0) -> CrossLayerTranscoder:
    """``clt`` trained to predict ``y`` from ``x`` (the layers side by side): ``b_dec`` at each
    target layer's mean, then ``steps`` Adam steps on 256 random rows; returned in eval mode."""
    torch.manual_seed(seed)
    clt.init_b_dec(y, method="mean")
    optimizer = torch.optim.Adam(clt.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (256,))
        loss = clt(x[batch], target=y[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return clt.eval()


@pytest.fixture(scope="module")
def tiny_clts(_tiny_clt_rows, tmp_path_factory) -> TinyCLTs:
    rows, root = _tiny_clt_rows, tmp_path_factory.mktemp("clts")
    held = rows.held_out
    scales = {"input_scales": _layer_scales(rows.x[:held]), "target_scales": _layer_scales(rows.y[:held])}
    folders = {}
    for name, options in (("jumprelu", {"activation": "jumprelu", "sparsity_coefficient": 0.05}),
                          ("topk", {"activation": "topk", "k": 3, "clt_topk": "layer"})):
        clt = fit_clt(CrossLayerTranscoder(4, 32, 16, seed=0, **scales, **options), rows.x[:held], rows.y[:held], 120)
        folders[name] = write_folder(root / name, clt, CLT_INPUTS[0], rows.model, rows.x[held:],
                                     hookpoint_out=CLT_TARGETS[0], held_out_target=rows.y[held:],
                                     hookpoints=CLT_INPUTS, hookpoints_out=CLT_TARGETS)
    return TinyCLTs(**folders)
