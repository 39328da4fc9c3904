"""A dictionary folder with what it takes to run it: its SAE, its statistics, its model and the
tokens its training left out.

A folder is our dictionary (``<run>/dictionary/<hookpoint>``, in the object store or pulled to a
local directory) or one SAELens wrote. Everything here is read before the model's weights load,
so a bad folder, a bad feature id or a dictionary of the wrong width fails in seconds.

Where the model comes from, first found wins: the caller's ``model``; the run's ``config.json``
(two folders above the dictionary, four for a sweep variant); ``cfg.json``'s ``saeforge_model``
(written since observe exists, so a pulled copy finds its model); a packaged model whose
Hugging Face id is ``cfg.json``'s ``model_name``; ``model_name`` as a local model directory.

A cross-layer transcoder's folder (``architecture`` ``*_clt``, ``trainer.clt``) names every
covered layer's input and target (``metadata.hook_names`` / ``hook_names_out``, in layer order);
its features have flat ids, layer ``l``'s feature ``i`` being ``l * n + i`` (``n`` features per
layer, cfg.json's ``d_sae``), and its statistics are those of the L targets side by side.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.hooking import packaged_model_named
from activation_cache.store import ObjectNotFound, open_store
from trainer.activation_stats import ActivationStats, load_activation_stats, load_feature_stats
from trainer.dictionary import dictionary_hook_name, load_dictionary
from trainer.layout import (
    ACTIVATION_STATS_FILE,
    CHECKSUMS_FILE,
    CONFIG_FILE,
    FEATURE_STATS_FILE,
    RUN_CONFIG_FILE,
    WEIGHTS_FILE,
    read_run_config,
    split_dictionary_uri,
    verify_checksums,
)

__all__ = ["DictionaryFolder", "read_dictionary_folder"]

MODEL_METADATA = "saeforge_model"
"""cfg.json metadata key: the model config (name_or_path, gguf_file, dtype) the dictionary was trained on."""
DATA_METADATA = "saeforge_data"
"""cfg.json metadata key: the text settings that decide which tokens training left out."""
_DATA_FIELDS = ("prepend_bos", "exclude_special_tokens", "exclude_token_ids", "context_length")
_MODEL_FIELDS = ("name_or_path", "gguf_file", "dtype")


def model_metadata(model: ModelConfig, data: DataConfig) -> dict[str, Any]:
    """cfg.json metadata that lets a copy of the dictionary, away from its run, find its model and
    leave out the tokens its training left out."""
    return {
        MODEL_METADATA: {name: getattr(model, name) for name in _MODEL_FIELDS},
        DATA_METADATA: {name: getattr(data, name) for name in _DATA_FIELDS},
    }


@dataclass(frozen=True)
class DictionaryFolder:
    """A dictionary read from its folder, its model not yet loaded."""

    uri: str
    sae: nn.Module
    """The SAE acting on raw activations, in eval mode (``trainer.dictionary.load_dictionary``)."""
    cfg: dict[str, Any]
    """Its ``cfg.json``."""
    stats: ActivationStats | None
    """The held-out activation mean and variance the training job recorded, of what the dictionary
    reconstructs (a transcoder's target); None if absent."""
    run_config: dict[str, Any] | None
    """The run's resolved job config, when the folder sits in its run."""
    feature_max: Tensor | None = None
    """(n_latents,) float32: each feature's largest held-out activation the training job recorded,
    in the units of ``sae``'s activations (what ``--value 10x`` multiplies); None if absent."""

    @property
    def hook_name(self) -> str:
        """Where the dictionary reads: our hookpoint, or SAELens's (TransformerLens-style) hook name."""
        return dictionary_hook_name(self.cfg)

    @property
    def hook_name_out(self) -> str | None:
        """Where a transcoder writes (``metadata.hook_name_out``, ours or SAELens's name, mapped to a
        hookpoint as ``hook_name`` is); None for an SAE, which reconstructs where it reads."""
        name = (self.cfg.get("metadata") or {}).get("hook_name_out")
        return name if isinstance(name, str) and name else None

    @property
    def is_cross_layer(self) -> bool:
        """Whether the folder holds a cross-layer transcoder (``architecture`` ``*_clt``)."""
        return str(self.cfg.get("architecture", "")).endswith("_clt")

    def layer_hook_names(self) -> list[tuple[str, str]]:
        """(input, target) hook names of each covered layer of a cross-layer transcoder, in order
        (one line if cfg.json's lists are missing or not ``n_layers`` long); ``[]`` for any other
        dictionary."""
        if not self.is_cross_layer:
            return []
        return list(zip(self._names("hook_names"), self._names("hook_names_out"), strict=True))

    def _names(self, key: str) -> list[str]:
        names = (self.cfg.get("metadata") or {}).get(key)
        n_layers = int(self.cfg.get("n_layers", 0))
        if not isinstance(names, list) or len(names) != n_layers or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{self.uri}/{CONFIG_FILE}: metadata.{key}={names!r}; expected the {n_layers} covered "
                             f"layers' hook names (n_layers={n_layers}) of a cross-layer transcoder")
        return names

    @property
    def n_per_layer(self) -> int | None:
        """A cross-layer transcoder's features per layer (cfg.json's ``d_sae``); None otherwise."""
        return int(self.cfg["d_sae"]) if self.is_cross_layer else None

    @property
    def is_transcoder(self) -> bool:
        """Whether the dictionary reads one hookpoint and predicts another (its ``stats`` are then
        the target's: what its prediction's error is measured against)."""
        return self.hook_name_out is not None

    @property
    def n_latents(self) -> int:
        """All its features: ``d_sae``, times the layers of a cross-layer transcoder."""
        return int(self.cfg["d_sae"]) * (int(self.cfg["n_layers"]) if self.is_cross_layer else 1)

    def check_feature(self, feature: int | None) -> None:
        """One line if ``feature`` is not a latent of this dictionary."""
        if feature is not None and not 0 <= feature < self.n_latents:
            flat = "" if self.n_per_layer is None else f" (layer l's feature i is l*{self.n_per_layer} + i)"
            raise ValueError(f"feature {feature}: the dictionary at {self.uri} has features 0..{self.n_latents - 1}{flat}")

    def model_config(self, model: str | ModelConfig | None = None) -> ModelConfig:
        """The model to run the dictionary with (the module docstring's order); ``model`` (a
        directory or ``packaged:...``, or a whole model config) overrides it."""
        if isinstance(model, ModelConfig):
            return model
        found = self._recorded_model()
        if model is not None:
            return ModelConfig(name_or_path=model, dtype=found.dtype if found else "float32")
        if found is not None:
            return found
        model_name = self.cfg.get("metadata", {}).get("model_name") or self.cfg.get("model_name") or ""
        packaged = packaged_model_named(model_name)
        if packaged is not None:
            return ModelConfig(name_or_path=packaged, dtype="float32")
        if model_name and Path(model_name).expanduser().is_dir():
            return ModelConfig(name_or_path=model_name, dtype="float32")
        raise ValueError(
            f"{self.uri}: its model {model_name!r} (cfg.json model_name) is neither a packaged model nor a local "
            "directory, and no run config is beside it: give the model with --model"
        )

    def _recorded_model(self) -> ModelConfig | None:
        if self.run_config is not None and "model" in self.run_config:
            raw = self.run_config["model"]
        else:
            raw = self.cfg.get("metadata", {}).get(MODEL_METADATA)
        if raw is None:
            return None
        recorded = ModelConfig(**{name: raw[name] for name in _MODEL_FIELDS if name in raw})
        # A job records the dtype it decided; a folder written with model.dtype=auto undecided
        # (by hand, from a ModelConfig()) runs the model as it is, in float32
        return dataclasses.replace(recorded, dtype="float32") if recorded.dtype == "auto" else recorded

    def data_config(self) -> DataConfig:
        """The text settings of the training: which tokens it left out and whether it put BOS first.
        A dictionary that records none (SAELens's) gets the defaults: BOS first, special tokens out."""
        if self.run_config is not None and "data" in self.run_config:
            raw = self.run_config["data"]
        else:
            raw = self.cfg.get("metadata", {}).get(DATA_METADATA) or {}
        return dataclasses.replace(DataConfig(), **{name: raw[name] for name in _DATA_FIELDS if name in raw})


def _read_files(uri: str, s3_options: dict | None) -> dict[str, bytes]:
    folder = open_store(uri, s3_options=s3_options)
    if folder.exists(CHECKSUMS_FILE):  # our folders: every file checked against its checksum
        return verify_checksums(folder.get_bytes(CHECKSUMS_FILE), folder.get_bytes, where=uri)
    files = {}
    for name in (CONFIG_FILE, WEIGHTS_FILE, ACTIVATION_STATS_FILE, FEATURE_STATS_FILE):
        try:
            files[name] = folder.get_bytes(name)
        except ObjectNotFound:
            continue
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in files]
        raise FileNotFoundError(f"{uri}: not a dictionary folder (no {' and no '.join(missing)})")
    return files


def _run_config(uri: str, s3_options: dict | None) -> dict[str, Any] | None:
    run_uri, _ = split_dictionary_uri(uri)
    if run_uri is None:
        return None
    try:
        return read_run_config(open_store(run_uri, s3_options=s3_options))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{run_uri}/{RUN_CONFIG_FILE}: not JSON") from None


def read_dictionary_folder(uri: str, *, s3_options: dict | None = None) -> DictionaryFolder:
    """Read and check the dictionary at ``uri`` (``s3://...``, ``file://...`` or a local path):
    checksums where the folder has them, the weights against cfg.json, the statistics file."""
    files = _read_files(uri, s3_options)
    try:
        sae, cfg = load_dictionary(files)
    except json.JSONDecodeError:
        raise ValueError(f"{uri}/{CONFIG_FILE}: not JSON") from None
    stats = None
    if ACTIVATION_STATS_FILE in files:
        stats = load_activation_stats(files[ACTIVATION_STATS_FILE])
        if stats.mean.shape[0] != sae.d_out:
            raise ValueError(
                f"{uri}/{ACTIVATION_STATS_FILE}: statistics of width {stats.mean.shape[0]} but the dictionary "
                f"reconstructs d_out={sae.d_out}"
            )
    feature_max = None
    if FEATURE_STATS_FILE in files:
        feature_max = load_feature_stats(files[FEATURE_STATS_FILE]).max_activation
    folder = DictionaryFolder(uri.rstrip("/"), sae.eval(), cfg, stats, _run_config(uri, s3_options), feature_max)
    if feature_max is not None and feature_max.shape[0] != folder.n_latents:
        raise ValueError(f"{uri}/{FEATURE_STATS_FILE}: maxima of {feature_max.shape[0]} features but the "
                         f"dictionary has {folder.n_latents} (d_sae={cfg['d_sae']}"
                         + (f" x {cfg['n_layers']} layers)" if folder.is_cross_layer else ")"))
    if folder.is_cross_layer:
        folder.layer_hook_names()  # both lists checked now, before any model loads
    return folder
