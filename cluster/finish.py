"""The end of one dictionary's training, on rank 0: its evaluation on every held-out row, then its
folder written (weights, cfg.json, sparsity, eval.json, the held-out activation stats and feature
maxima, training curves, the feature report), ``checksums.json`` last. The file names and the write order are ``trainer.layout``'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.manifest import Manifest
from activation_cache.plan import wait_for_manifest
from activation_cache.reader import read_shard, read_shard_group, read_shard_pair, read_shards
from activation_cache.schema import DecodedShard
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
    target_cache: ObjectStore | None = None
    """A transcoder's target cache: the same held-out shards at its target hookpoint."""
    layer_caches: list[tuple[ObjectStore, ObjectStore]] | None = None
    """A cross-layer transcoder's (input cache, target cache) per covered layer, in order."""

    def manifest(self) -> Manifest:
        """The committed manifest, once it lists every held-out shard."""
        return self._manifest(self.cache)

    def target_manifest(self) -> Manifest | None:
        """The target cache's manifest, once it lists every held-out shard (None for an SAE)."""
        return None if self.target_cache is None else self._manifest(self.target_cache)

    def _manifest(self, cache: ObjectStore) -> Manifest:
        return wait_for_manifest(cache, lambda m: set(self.shard_names) <= {s.name for s in m.shards},
                                 "held-out shards", self.timeout_s, self.abort)

    def input_shards(self, manifest: Manifest) -> Iterator[DecodedShard]:
        """The held-out shards of what the dictionary reads (the report's contexts): its input
        cache's, or for a cross-layer transcoder one shard with every covered layer's input rows
        side by side (its tokens are the first input cache's, checked against the others')."""
        inputs = [self.cache] if self.layer_caches is None else [store for store, _ in self.layer_caches]
        manifests = [manifest, *(self._manifest(store) for store in inputs[1:])]
        for name in self.shard_names:
            shards = read_shards(inputs, [next(s for s in m.shards if s.name == name) for m in manifests])
            if len(shards) == 1:
                yield shards[0]
            else:
                yield dataclasses.replace(shards[0], activations=torch.cat([s.activations for s in shards], dim=1))

    def rows(self, manifest: Manifest) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Every held-out row, shard by shard: the input rows, or a transcoder's aligned
        ``(input, target)`` pairs (each pair of shards checked to hold the same tokens)."""
        entries = {s.name: s for s in manifest.shards}
        if self.layer_caches is not None:
            inputs, targets = zip(*self.layer_caches, strict=True)
            input_manifests = [manifest, *(self._manifest(store) for store in inputs[1:])]
            target_manifests = [self._manifest(store) for store in targets]
            for name in self.shard_names:
                yield read_shard_group(inputs, targets, name, input_manifests, target_manifests)
            return
        target_manifest = self.target_manifest()
        if self.target_cache is None or target_manifest is None:
            for name in self.shard_names:
                yield read_shard(self.cache, entries[name]).activations
            return
        targets = {s.name: s for s in target_manifest.shards}
        for name in self.shard_names:
            x, y = read_shard_pair(self.cache, self.target_cache, entries[name], targets[name])
            yield x.activations, y.activations


def _held_out_metrics(
    sae: nn.Module, held_out: HeldOut, manifest: Manifest, scale: float, target_scale: float | None,
) -> tuple[dict, torch.Tensor, ActivationStats, FeatureStats]:
    """The reconstruction figures on every held-out row, each latent's firing frequency there, the
    raw held-out targets' mean and variance, and each latent's largest activation there."""
    firing = DeadLatentTracker(sae.n_latents)  # held-out firing frequencies, for the sparsity file
    # The stats describe the reconstruction target's rows (an SAE's input, a transcoder's target):
    # what observe measures a token's relative error against. Each row is read once for both.
    moments = RunningMoments()
    maxima = FeatureMaxima(sae.n_latents)  # the saved dictionary's units on raw rows (evaluate's docstring)
    metrics = evaluate(sae, _counting_targets(held_out.rows(manifest), moments), scale=scale,
                       target_scale=target_scale, dead_tracker=firing, feature_max=maxima)
    frequencies = firing.frequencies()
    metrics["dense_fraction"] = dense_fraction(frequencies)
    return metrics, frequencies, moments.result(), maxima.result()


def _counting_targets(batches: Iterator, moments: RunningMoments) -> Iterator:
    """``batches`` (rows, or ``(input, target)`` pairs) unchanged, each target block added to ``moments``."""
    for batch in batches:
        moments.update(batch[1] if isinstance(batch, tuple) else batch)
        yield batch


def write_trained_dictionary(
    sae: nn.Module, *, folder: ObjectStore, held_out: HeldOut, scale: float, hookpoint: str, run_name: str,
    summary: dict[str, Any], curves: list[dict], model: ModelConfig, data: DataConfig, logger: MetricLogger,
    artifact: str, target_scale: float | None = None, target_hookpoint: str | None = None,
    layer_hookpoints: list[tuple[str, str]] | None = None,
) -> None:
    """Evaluate ``sae`` (trained on activations times ``scale``) on the held-out rows, log the
    figures, and write its dictionary folder; the report (drawn with ``model``'s unembedding) is
    logged as the wandb artifact ``artifact``. ``summary`` (the training's counts) joins eval.json.
    cfg.json records ``model`` and the token exclusions of ``data``, so a copy of the folder away
    from its run (pulled) still finds its model for ``saeforge observe``. A transcoder (its target
    rows in ``held_out.target_cache``, trained on targets times ``target_scale``) names its target
    in ``target_hookpoint``; its stats are the target's. A cross-layer transcoder (its caches in
    ``held_out.layer_caches``) names each covered layer's (input, target) in ``layer_hookpoints``;
    eval.json adds each layer's FVU (``layers``)."""
    manifest = held_out.manifest()
    metrics, frequencies, activation_stats, feature_stats = _held_out_metrics(
        sae, held_out, manifest, scale, target_scale)
    if layer_hookpoints is not None:
        metrics["layers"] = [{"hookpoint_out": target, "fvu": fvu}
                             for (_, target), fvu in zip(layer_hookpoints, metrics.pop("layer_fvu"), strict=True)]
    metrics.update(summary)
    logger.log({f"eval/{k}": v for k, v in metrics.items() if k != "layers"}, step=summary["train_steps"])
    for layer in metrics.get("layers", []):
        logger.log({f"eval/fvu/{layer['hookpoint_out']}": layer["fvu"]}, step=summary["train_steps"])
    counts, edges = firing_histogram(frequencies, bins=torch.linspace(-10, 0, 41))
    metrics["firing_histogram"] = {"log10_frequency_edges": edges.tolist(), "latents": counts.long().tolist()}
    files = dictionary_files(
        sae, hookpoint=hookpoint, model_name=manifest.model, scale=scale,
        extra_metadata={"cache_key": manifest.cache_key, "run_name": run_name, **model_metadata(model, data)},
        sparsity=frequencies, eval_metrics=metrics, target_scale=target_scale,
        **({"hookpoint_out": target_hookpoint} if layer_hookpoints is None else
           {"hookpoint_out": layer_hookpoints[0][1], "hookpoints": [i for i, _ in layer_hookpoints],
            "hookpoints_out": [o for _, o in layer_hookpoints]}),
    )
    files[ACTIVATION_STATS_FILE] = activation_stats_file(activation_stats)
    files[FEATURE_STATS_FILE] = feature_stats_file(feature_stats)
    files[TRAINING_CURVES_FILE] = json.dumps(curves).encode()
    try:  # the report never costs the trained dictionary
        files.update(report_with_model(files, holdout=held_out.input_shards(manifest), model=model))
    except Exception:
        log.exception("dictionary %s: the report failed; written without it", folder.uri)
    write_dictionary(folder, files)
    if REPORT_FILE in files:
        logger.log_artifact(artifact, {n: files[n] for n in (REPORT_FILE, FEATURES_FILE)})
