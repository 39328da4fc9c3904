"""The end of one dictionary's training, on rank 0: its evaluation on every held-out row, then its
folder written (weights, cfg.json, sparsity, eval.json, the held-out activation stats and feature
maxima, training curves, the feature report), ``checksums.json`` last. The file names and the write order are ``trainer.layout``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.manifest import Manifest
from activation_cache.plan import wait_for_manifest
from activation_cache.reader import read_shard
from activation_cache.store import ObjectStore
from cluster.report import report_with_model
from interp.loading import model_metadata
from trainer.activation_stats import (
    ActivationStats,
    FeatureMaxima,
    FeatureStats,
    RunningMoments,
    activation_stats_file,
    feature_stats_file,
)
from trainer.dictionary import dictionary_files
from trainer.layout import (
    ACTIVATION_STATS_FILE,
    FEATURE_STATS_FILE,
    FEATURES_FILE,
    REPORT_FILE,
    TRAINING_CURVES_FILE,
    write_dictionary,
)
from trainer.loggers import MetricLogger
from trainer.loop import evaluate
from trainer.metrics import DeadLatentTracker, dense_fraction, firing_histogram

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOut:
    """Where the held-out rows are and how long to wait for them."""

    cache: ObjectStore
    shard_names: list[str]
    timeout_s: float
    """A training on a cache still being written may end before the held-out shards (produced
    last) are committed: how long to wait for them."""
    abort: Callable[[], str | None]
    """Why the cache fill failed, once it has (the wait stops with it)."""

    def manifest(self) -> Manifest:
        """The committed manifest, once it lists every held-out shard."""
        return wait_for_manifest(self.cache, lambda m: set(self.shard_names) <= {s.name for s in m.shards},
                                 "held-out shards", self.timeout_s, self.abort)


def _held_out_metrics(
    sae: nn.Module, held_out: HeldOut, manifest: Manifest, scale: float,
) -> tuple[dict, torch.Tensor, ActivationStats, FeatureStats]:
    """The reconstruction figures on every held-out row, each latent's firing frequency there, the
    raw held-out rows' mean and variance, and each latent's largest activation there."""
    entries = {s.name: s for s in manifest.shards}
    rows = (read_shard(held_out.cache, entries[name]).activations for name in held_out.shard_names)
    firing = DeadLatentTracker(sae.n_latents)  # held-out firing frequencies, for the sparsity file
    # The stats describe the reconstruction target's rows, here the SAE's input rows, read once for
    # both (a transcoder's target would be its output hookpoint's rows).
    moments = RunningMoments()
    maxima = FeatureMaxima(sae.n_latents)  # the saved dictionary's units on raw rows (evaluate's docstring)
    metrics = evaluate(sae, moments.pass_through(rows), scale=scale, dead_tracker=firing, feature_max=maxima)
    frequencies = firing.frequencies()
    metrics["dense_fraction"] = dense_fraction(frequencies)
    return metrics, frequencies, moments.result(), maxima.result()


def write_trained_dictionary(
    sae: nn.Module, *, folder: ObjectStore, held_out: HeldOut, scale: float, hookpoint: str, run_name: str,
    summary: dict[str, Any], curves: list[dict], model: ModelConfig, data: DataConfig, logger: MetricLogger,
    artifact: str,
) -> None:
    """Evaluate ``sae`` (trained on activations times ``scale``) on the held-out rows, log the
    figures, and write its dictionary folder; the report (drawn with ``model``'s unembedding) is
    logged as the wandb artifact ``artifact``. ``summary`` (the training's counts) joins eval.json.
    cfg.json records ``model`` and the token exclusions of ``data``, so a copy of the folder away
    from its run (pulled) still finds its model for ``saeforge observe``."""
    manifest = held_out.manifest()
    metrics, frequencies, activation_stats, feature_stats = _held_out_metrics(sae, held_out, manifest, scale)
    metrics.update(summary)
    logger.log({f"eval/{k}": v for k, v in metrics.items()}, step=summary["train_steps"])
    counts, edges = firing_histogram(frequencies, bins=torch.linspace(-10, 0, 41))
    metrics["firing_histogram"] = {"log10_frequency_edges": edges.tolist(), "latents": counts.long().tolist()}
    files = dictionary_files(
        sae, hookpoint=hookpoint, model_name=manifest.model, scale=scale,
        extra_metadata={"cache_key": manifest.cache_key, "run_name": run_name, **model_metadata(model, data)},
        sparsity=frequencies, eval_metrics=metrics,
    )
    files[ACTIVATION_STATS_FILE] = activation_stats_file(activation_stats)
    files[FEATURE_STATS_FILE] = feature_stats_file(feature_stats)
    files[TRAINING_CURVES_FILE] = json.dumps(curves).encode()
    entries = {s.name: s for s in manifest.shards}
    try:  # the report never costs the trained dictionary
        files.update(report_with_model(
            files, holdout=(read_shard(held_out.cache, entries[name]) for name in held_out.shard_names), model=model))
    except Exception:
        log.exception("dictionary %s: the report failed; written without it", folder.uri)
    write_dictionary(folder, files)
    if REPORT_FILE in files:
        logger.log_artifact(artifact, {n: files[n] for n in (REPORT_FILE, FEATURES_FILE)})
