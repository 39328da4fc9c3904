"""The trainer launch: Ray Train workers, each one DeepSpeed data-parallel rank.

Workers read the cache themselves (shard-partitioned by rank), so no activation passes through
the driver. Rank 0 evaluates on the held-out shards and writes the dictionary to the run's
object-store folder; the driver reads the evaluation back from there.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray.train
import torch
from omegaconf import OmegaConf
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from activation_cache.manifest import Manifest, ShardEntry, load_manifest
from activation_cache.reader import ActivationReader, read_shard
from activation_cache.store import open_store
from cluster.config import JobConfig, to_dict
from trainer.architectures import build_sae
from trainer.dictionary import dictionary_files
from trainer.engine import master_weights, shutdown_engine, wrap_in_deepspeed
from trainer.loggers import make_logger
from trainer.loop import StepSchedule, evaluate, train
from trainer.metrics import DeadLatentTracker, dense_fraction, firing_histogram
from trainer.schedules import k_at, lr_at, sparsity_coefficient_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPlan:
    """Where a training run reads from and writes to."""

    cache_uri: str
    run_uri: str
    run_name: str
    hookpoint: str
    wandb_dir: str


def split_holdout(shards: list[ShardEntry], fraction: float) -> tuple[list[ShardEntry], list[ShardEntry]]:
    """(training shards, held-out shards): the last ``ceil(fraction * n)`` shards by name
    (at least one) are held out, the same split on every rank and every run of this cache."""
    ordered = sorted(shards, key=lambda s: s.name)
    n_holdout = max(1, math.ceil(fraction * len(ordered)))
    return ordered[:-n_holdout], ordered[-n_holdout:]


def input_scale(manifest: Manifest, normalize: bool) -> float:
    """Factor that brings the cache's mean activation norm to sqrt(d_model)."""
    return math.sqrt(manifest.d_model) / manifest.stats.mean_norm if normalize else 1.0


def _steps(reader: ActivationReader, epochs: int, max_tokens: int | None, global_batch: int) -> int:
    steps = sum(reader.batches_per_epoch(epoch) for epoch in range(epochs))
    return steps if max_tokens is None else min(steps, max_tokens // global_batch)


def _build_sae(job: JobConfig, d_model: int) -> torch.nn.Module:
    return build_sae(
        job.sae.architecture, d_in=d_model, n_latents=job.sae.n_latents, k=job.sae.k,
        seed=job.train.seed, **job.sae.build_options(),
    )


def _lr_schedule(train_cfg, total_steps: int) -> dict:
    warmup = min(train_cfg.lr_warmup_steps, total_steps)
    decay_steps = min(int(train_cfg.lr_decay_fraction * total_steps), total_steps - warmup)
    return {
        "warmup_steps": warmup, "total_steps": total_steps, "decay": train_cfg.lr_decay,
        "min_lr_fraction": train_cfg.min_lr_fraction, "decay_steps": decay_steps,
    }


def _step_schedule(job: JobConfig, sae: torch.nn.Module) -> StepSchedule:
    sparsity = k = None
    if hasattr(sae, "sparsity_coefficient") and job.train.sparsity_warmup_steps:
        final, warmup = sae.sparsity_coefficient, job.train.sparsity_warmup_steps
        sparsity = partial(sparsity_coefficient_at, final=final, warmup_steps=warmup)
    if job.sae.k_start is not None and job.train.k_anneal_steps:
        k = partial(k_at, k_start=job.sae.k_start, k_final=job.sae.k, anneal_steps=job.train.k_anneal_steps)
    return StepSchedule(sparsity_coefficient=sparsity, k=k)


def _job_from_dict(raw: dict) -> JobConfig:
    job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), raw))
    assert isinstance(job, JobConfig)
    return job


def _worker_loop(config: dict) -> None:
    job, plan = _job_from_dict(config["job"]), TrainPlan(**config["plan"])
    logging.basicConfig(level=job.logging.level)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(job.cluster.train_worker_num_cpus)))
    torch.manual_seed(job.train.seed)

    cache = open_store(plan.cache_uri, s3_options=job.cache.s3_options())
    manifest = load_manifest(cache)
    assert manifest is not None and manifest.complete, f"cache {plan.cache_uri} is not complete"
    train_shards, holdout_shards = split_holdout(manifest.shards, job.train.holdout_fraction)
    reader = ActivationReader(
        cache, train_shards, rank=rank, world_size=world_size,
        batch_size=job.train.batch_size // world_size, seed=job.train.seed,
        shuffle_buffer_rows=job.train.shuffle_buffer_rows, read_threads=job.train.read_threads,
        prefetch_bytes=job.train.prefetch_mb << 20,
    )
    scale = input_scale(manifest, job.sae.normalize_activations)
    sae = _build_sae(job, manifest.d_model)
    sae.init_b_dec(torch.tensor(manifest.stats.mean(), dtype=torch.float32)[None] * scale, method="mean")
    steps = _steps(reader, job.train.epochs, job.train.max_tokens, job.train.batch_size)
    lr = job.train.learning_rate(job.sae.n_latents)
    engine = wrap_in_deepspeed(
        sae, train_cfg=job.train, lr=lr, world_size=world_size,
        lr_multiplier=lambda step: lr_at(step, base_lr=1.0, **_lr_schedule(job.train, steps)),
    )
    logger = make_logger(
        rank=rank, wandb_mode=job.logging.wandb_mode, project=job.logging.project,
        run_name=plan.run_name, config=to_dict(job), dir=plan.wandb_dir,
    )
    tracker = DeadLatentTracker(job.sae.n_latents)
    summary = train(
        engine, iter(reader), scale=scale, max_steps=steps, logger=logger,
        log_every=job.train.log_every_steps, dead_tracker=tracker,
        dead_after_tokens=job.train.dead_after_tokens, world_size=world_size,
        schedule=_step_schedule(job, sae),
    )
    # master_weights is a collective under ZeRO: every rank takes part. Buffers (BatchTopK's
    # threshold) are kept equal across ranks by the loop and come from the module.
    state = {**engine.module.state_dict(), **master_weights(engine)}
    if rank == 0:
        final = _build_sae(job, manifest.d_model)
        final.load_state_dict(state)
        _finish(job, plan, final, manifest, holdout_shards, scale, summary, logger)
    logger.finish()
    shutdown_engine(engine)


def _finish(job, plan, sae, manifest, holdout_shards, scale, summary, logger) -> None:
    """Rank 0: evaluate on every held-out row and write the dictionary."""
    cache = open_store(plan.cache_uri, s3_options=job.cache.s3_options())
    holdout = (read_shard(cache, entry).activations for entry in holdout_shards)
    firing = DeadLatentTracker(sae.n_latents)  # held-out firing frequencies, for sparsity.safetensors
    metrics = evaluate(sae, holdout, scale=scale, dead_tracker=firing)
    metrics.update(train_tokens=summary.tokens, train_steps=summary.steps)
    frequencies = firing.frequencies()
    metrics["dense_fraction"] = dense_fraction(frequencies)
    logger.log({f"eval/{k}": v for k, v in metrics.items()}, step=summary.steps)
    counts, edges = firing_histogram(frequencies, bins=torch.linspace(-10, 0, 41))
    metrics["firing_histogram"] = {"log10_frequency_edges": edges.tolist(), "latents": counts.long().tolist()}
    files = dictionary_files(
        sae, hookpoint=plan.hookpoint, model_name=manifest.model, scale=scale,
        extra_metadata={"cache_key": manifest.cache_key, "run_name": plan.run_name},
        sparsity=frequencies, eval_metrics=metrics,
    )
    run = open_store(plan.run_uri, s3_options=job.cache.s3_options())
    for name, data in files.items():
        run.put_bytes(f"dictionary/{plan.hookpoint}/{name}", data)


def train_dictionary(job: JobConfig, plan: TrainPlan) -> dict:
    """Run the Ray Train job; return the held-out evaluation of the written dictionary."""
    storage = Path(job.logging.dir).resolve() / "ray_train"
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": to_dict(job), "plan": plan.__dict__},
        scaling_config=ScalingConfig(
            num_workers=job.cluster.num_train_workers, use_gpu=False,
            resources_per_worker={"CPU": job.cluster.train_worker_num_cpus},
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=plan.run_name, storage_path=str(storage)),
    )
    trainer.fit()
    run = open_store(plan.run_uri, s3_options=job.cache.s3_options())
    return json.loads(run.get_bytes(f"dictionary/{plan.hookpoint}/eval.json"))
