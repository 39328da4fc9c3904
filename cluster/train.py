"""The trainer launch: Ray Train workers, each one DeepSpeed data-parallel rank.

Workers read the cache themselves (shard-partitioned by rank, each with its data plan from
``activation_cache.plan``), so no activation passes through the driver. Rank 0 evaluates on the
held-out shards and writes the dictionary to the run's object-store folder (``cluster.finish``);
the driver reads the evaluation back from there. A failure a restart would meet again is left in
``training-failed.json``, where a restarted worker group finds it and stops at once.

A worker group that fails and is restarted says so in one console line from Ray Train's controller
(``GroupFailures``), and its successor's rank 0 in one more once it steps again; both times go into
``training-times.json``'s ``restarts`` (``training_record``). A worker group that finds no room on
the cluster (a node lost with no spare CPUs) says so once a minute (``GroupPlacement``) and stops
the job, naming what it needed, after ``cluster.placement_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray.exceptions
import ray.train
import torch
from ray.train import (
    ControllerError,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
    WorkerGroupError,
)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import ReschedulingState

from activation_cache.manifest import Manifest, load_manifest
from activation_cache.plan import DataPlan, PlanSettings, complete_plan, tailing_plan
from activation_cache.schema import CorruptShardError
from activation_cache.store import ObjectNotFound, ObjectStore, StoreError, open_store
from cluster.config import JobConfig, job_from_dict, to_dict
from cluster.errors import JobFailed, TrainingStopped, lost_actor_reason, no_room, resources_text
from cluster.finish import HeldOut, write_trained_dictionary
from cluster.logs import configure_logging
from cluster.report import report_artifact_name
from cluster.sweep import Variant, variants
from trainer.architectures import build_sae
from trainer.checkpoint import AttributeState, Checkpointer
from trainer.config import SAEConfig
from trainer.engine import (
    EngineRankState,
    distributed_backend,
    job_config,
    master_weights,
    shutdown_engine,
    wrap_in_deepspeed,
)
from trainer.feature_parallel import ParallelGrid, build_grid, parallelize_features
from trainer.layout import (
    CHECKPOINTS_DIR,
    PRODUCERS_FAILED_FILE,
    TRAINING_FAILED_FILE,
    TRAINING_TIMES_FILE,
    complete_marker_key,
    dictionary_folder_name,
    parse_checkpoint_key,
    read_eval,
)
from trainer.layout import dictionary_uri as layout_dictionary_uri
from trainer.loggers import make_logger
from trainer.loop import DictionaryTrainer, NonFiniteError, StepSchedule
from trainer.metrics import DeadLatentTracker
from trainer.schedules import k_at, lr_at, sparsity_coefficient_at

log = logging.getLogger(__name__)


_PERMANENT_FAILURES = (CorruptShardError, NonFiniteError)
"""Failures a restarted worker group would meet again at the same step: recorded in
``training-failed.json`` beside the checkpoints, where a restarted group finds them and stops at
once."""


@dataclass(frozen=True)
class LayerCaches:
    """One covered layer of a cross-layer transcoder: its MLP input's and output's caches."""

    input_uri: str
    input_hookpoint: str
    target_uri: str
    target_hookpoint: str


@dataclass(frozen=True)
class TrainPlan:
    """Where one dictionary's training reads from and writes to."""

    cache_uri: str
    run_uri: str
    run_name: str
    hookpoint: str
    wandb_dir: str
    label: str
    """The wandb run's and Ray Train's name: the run name, with the hookpoint when a job trains several."""
    checkpoint_uri: str
    """Root of this training's ``checkpoints/``: the run, or the hookpoint's folder of a
    job that trains several."""
    expected_shards: dict[str, int] | None = None
    """{shard name: rows} of the complete cache when training may start before the cache is
    complete (``cluster.train_while_caching``); None trains on a complete cache only."""
    target_cache_uri: str | None = None
    """A transcoder's target cache (the same tokens at ``target_hookpoint``); None for an SAE."""
    target_hookpoint: str | None = None
    """A transcoder's target hookpoint (a CLT's last layer's); its dictionary folder names both ends."""
    layers: list[LayerCaches] | None = None
    """A cross-layer transcoder's covered layers, in order; None for an SAE or a transcoder."""


def _build_sae(sae_cfg: SAEConfig, seed: int, source: DataPlan) -> torch.nn.Module:
    """The SAE; with a target in ``source`` the transcoder from ``d_model`` to ``d_out``; with
    covered layers the cross-layer transcoder, normalising each layer by its own scales."""
    if source.n_layers:
        layers = source.n_layers
        return build_sae(sae_cfg, d_in=source.d_model // layers, d_out=source.d_out // layers, seed=seed,
                         layers=layers, input_scales=source.layer_input_scales,
                         target_scales=source.layer_target_scales)
    if source.d_out is None:
        return build_sae(sae_cfg, d_in=source.d_model, seed=seed)
    return build_sae(sae_cfg, d_in=source.d_model, d_out=source.d_out, seed=seed, transcoder=True)


def _lr_schedule(train_cfg, total_steps: int) -> dict:
    warmup = min(train_cfg.lr_warmup_steps, total_steps)
    decay_steps = min(int(train_cfg.lr_decay_fraction * total_steps), total_steps - warmup)
    return {
        "warmup_steps": warmup, "total_steps": total_steps, "decay": train_cfg.lr_decay,
        "min_lr_fraction": train_cfg.min_lr_fraction, "decay_steps": decay_steps,
    }


def _step_schedule(job: JobConfig, sae_cfg: SAEConfig, sae: torch.nn.Module) -> StepSchedule:
    sparsity = k = None
    if hasattr(sae, "sparsity_coefficient") and job.train.sparsity_warmup_steps:
        final, warmup = sae.sparsity_coefficient, job.train.sparsity_warmup_steps
        sparsity = partial(sparsity_coefficient_at, final=final, warmup_steps=warmup)
    if sae_cfg.k_start is not None and job.train.k_anneal_steps:
        k = partial(k_at, k_start=sae_cfg.k_start, k_final=sae_cfg.k, anneal_steps=job.train.k_anneal_steps)
    return StepSchedule(sparsity_coefficient=sparsity, k=k)


def _abort_reason(run: ObjectStore) -> str | None:
    """Why the cache fill under this training failed (the driver writes it into the run folder,
    where the workers' tailing readers find it and stop with its text); None while it has not."""
    try:
        return run.get_bytes(PRODUCERS_FAILED_FILE).decode()
    except ObjectNotFound:
        return None


def plan_settings(job: JobConfig) -> PlanSettings:
    """The settings a worker's data plan (``activation_cache.plan``) takes from the job."""
    train = job.train
    return PlanSettings(
        batch_size=train.batch_size, epochs=train.epochs, max_tokens=train.max_tokens,
        holdout_fraction=train.holdout_fraction, seed=train.seed, shuffle_buffer_rows=train.shuffle_buffer_rows,
        read_threads=train.read_threads, prefetch_bytes=train.prefetch_mb << 20,
        normalize=job.sae.normalize_activations, follow_timeout_s=train.follow_timeout_s,
        normalization_rows=train.normalization_rows,
    )


def _data_plan(job: JobConfig, plan: TrainPlan, rank: int, world_size: int, *, global_rank: int) -> DataPlan:
    """This worker's data plan: over the complete cache, or tailing it while it is written
    (``plan.expected_shards``; also once complete, so a restarted run resumes a tailing reader)."""
    s3 = job.cache.s3_options()
    cache = open_store(plan.cache_uri, s3_options=s3)
    target_cache = open_store(plan.target_cache_uri, s3_options=s3) if plan.target_cache_uri else None
    layer_caches = [(open_store(layer.input_uri, s3_options=s3), open_store(layer.target_uri, s3_options=s3))
                    for layer in plan.layers or []] or None
    if plan.expected_shards is not None:
        run = open_store(plan.run_uri, s3_options=s3)
        return tailing_plan(cache, plan.expected_shards, plan_settings(job), rank=rank, world_size=world_size,
                            global_rank=global_rank, abort=partial(_abort_reason, run), target_cache=target_cache,
                            layer_caches=layer_caches)
    # A worker group started while the producers fill the caches waits for them to complete
    run = open_store(plan.run_uri, s3_options=s3)
    complete = partial(wait_for_complete, run=run, timeout_s=job.train.follow_timeout_s)
    target = (target_cache, complete(target_cache)) if target_cache is not None else None
    layers = [(i, complete(i), o, complete(o)) for i, o in layer_caches] if layer_caches else None
    return complete_plan(cache, complete(cache), plan_settings(job), rank=rank, world_size=world_size,
                         target=target, layers=layers)


def wait_for_complete(cache: ObjectStore, *, run: ObjectStore, timeout_s: float, poll_s: float = 1.0) -> Manifest:
    """``cache``'s manifest once it is complete: a worker group the driver started while the
    producers fill the cache waits here (stopping with the fill's error if it fails, or after
    ``timeout_s`` without the cache completing). One manifest read a ``poll_s``: a worker group of
    many ranks on S3 must not flood the store while a long fill runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = load_manifest(cache)
        if manifest is not None and manifest.complete:
            return manifest
        reason = _abort_reason(run)
        if reason is not None:
            raise TrainingStopped(f"cache {cache.uri}: {reason}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"cache {cache.uri} did not complete within train.follow_timeout_s={timeout_s:g} s")
        time.sleep(poll_s)


@dataclass
class _Dictionary:
    """One dictionary this worker trains (one variant of a sweep), with its engine and logger."""

    variant: Variant
    engine: Any
    trainer: DictionaryTrainer
    logger: Any
    uri: str
    """Where its dictionary goes (``dictionary_uri``)."""


def _start_dictionary(
    job: JobConfig, plan: TrainPlan, variant: Variant, source: DataPlan, rank: int, world_size: int,
    grid: ParallelGrid | None,
) -> _Dictionary:
    sae = _build_sae(variant.sae, job.train.seed, source)
    if grid is not None:  # each rank of a feature group keeps its slice of the latents
        parallelize_features(sae, group=grid.feature_group)
    # b_dec starts at the mean of what the dictionary predicts: its input, or a transcoder's target
    # (a CLT's target_scale is 1: it scales each layer inside itself).
    centre, centre_scale = (source.mean, source.scale) if source.d_out is None else (source.target_mean, source.target_scale)
    sae.init_b_dec(torch.tensor(centre, dtype=torch.float32)[None] * centre_scale, method="mean")
    if source.d_out is not None and not source.n_layers:  # a transcoder's encoder starts centred on its inputs
        sae.init_b_enc(torch.tensor(source.mean, dtype=torch.float32)[None] * source.scale)
    lr = variant.lr if variant.lr is not None else job.train.learning_rate(variant.sae.n_latents)
    deepspeed_cfg = job_config(job.deepspeed, world_size=world_size, parameters=sum(p.numel() for p in sae.parameters()))
    engine = wrap_in_deepspeed(
        sae, train_cfg=job.train, deepspeed_cfg=deepspeed_cfg, lr=lr, world_size=world_size, grid=grid,
        lr_multiplier=lambda step: lr_at(step, base_lr=1.0, **_lr_schedule(job.train, source.steps)),
    )
    name = f"{plan.label}-{variant.name}" if variant.name else plan.label
    config = to_dict(job)
    if variant.name:
        config.update(sae=dataclasses.asdict(variant.sae), variant=variant.name)
        config["train"]["lr"] = lr
    logger = make_logger(
        rank=rank, wandb_mode=job.logging.wandb_mode, project=job.logging.project, run_name=name,
        config=config, dir=plan.wandb_dir, group=plan.label if variant.name else None,
    )
    trainer = DictionaryTrainer(
        engine, scale=source.scale, target_scale=source.target_scale, max_steps=source.steps, logger=logger,
        log_every=job.train.log_every_steps, dead_tracker=DeadLatentTracker(variant.sae.n_latents * (source.n_layers or 1)),
        dead_after_tokens=job.train.dead_after_tokens,
        world_size=grid.data_parallel if grid else world_size, data_group=grid.data_group if grid else None,
        schedule=_step_schedule(job, variant.sae, sae), histogram_every=job.train.histogram_every_steps,
        nonfinite=job.train.nonfinite, max_skipped_steps=job.train.max_skipped_steps,
    )
    return _Dictionary(variant, engine, trainer, logger, dictionary_uri(plan, variant))


def _worker_loop(config: dict) -> None:
    entered = time.time()
    job, plan = job_from_dict(config["job"], where="trainer worker"), TrainPlan(**config["plan"])
    configure_logging(job.logging.level)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(job.cluster.train_worker_num_cpus)))
    torch.manual_seed(job.train.seed)

    # A (data x feature) grid: the ranks of a feature group hold slices of one SAE and read the
    # same batches; the data ranks read disjoint ones.
    fp = job.deepspeed.feature_parallel
    grid = build_grid(data_parallel=world_size // fp, feature_parallel=fp) if fp > 1 else None
    data_rank, data_parallel = (grid.data_rank, grid.data_parallel) if grid else (rank, world_size)
    checkpoints = open_store(plan.checkpoint_uri, s3_options=job.cache.s3_options())
    stopped = _permanent_failure(checkpoints)
    if stopped is not None:
        raise TrainingStopped(stopped["message"])
    source = _data_plan(job, plan, data_rank, data_parallel, global_rank=rank)
    dictionaries = [
        _start_dictionary(job, plan, variant, source, rank, world_size, grid)
        for variant in variants(job.sae, job.train.lr, job.sweep)
    ]
    try:
        _train_from(checkpoints, job, plan, dictionaries, source, rank, world_size, entered=entered)
    except _PERMANENT_FAILURES as err:
        _record_permanent_failure(checkpoints, err)
        raise


def _train_from(checkpoints: ObjectStore, job: JobConfig, plan: TrainPlan, dictionaries: list[_Dictionary],
                source: DataPlan, rank: int, world_size: int, *, entered: float) -> None:
    """Resume from the newest complete checkpoint (if any), train to the end, write the dictionaries;
    rank 0 then records when it entered, stepped and finished (``TRAINING_TIMES_FILE``), beside the
    restarts before it (``_note_resumed``)."""
    checkpointer = Checkpointer(checkpoints, rank=rank, world_size=world_size,
                                every_steps=job.run.checkpoint_every_steps, keep=job.run.keep_checkpoints)
    states = _checkpointed(dictionaries, source)
    done = checkpointer.restore(states)
    for dictionary in dictionaries:  # the scale the restored weights were trained with
        dictionary.trainer.scale = source.scale
    # One read of each batch feeds every dictionary of a sweep, in lockstep.
    batches = iter(source.reader)
    times: dict[str, Any] = {"entered": entered, "first_step": time.time()}
    if rank == 0:
        times["restarts"] = _note_resumed(checkpoints, plan, resumed_from=done, at=times["first_step"],
                                          attempts=job.cluster.train_max_failures + 1)
    for step in range(done + 1, source.steps + 1):
        batch = next(batches)
        for dictionary in dictionaries:
            dictionary.trainer.step(batch)
        if checkpointer.due(step, last_step=source.steps):
            checkpointer.save(step, states)
    times["last_step"] = time.time()
    for dictionary in dictionaries:
        _finish_dictionary(job, plan, dictionary, source, rank, resumed_from=done)
    if rank == 0:
        times["finished"] = time.time()
        checkpoints.put_bytes(TRAINING_TIMES_FILE, json.dumps(times).encode())


def _checkpointed(dictionaries: list[_Dictionary], source: DataPlan) -> dict[str, Any]:
    """What a worker's checkpoint holds, by the keys of its file: each dictionary's engine and
    loop, the reader's position, and the input scale with the rows it was taken from (a tailing
    run takes it from the rows committed when it starts, so a restart must not take it again)."""
    return {
        "dictionaries": {d.variant.name: EngineRankState(d.engine, extra={"loop": d.trainer}) for d in dictionaries},
        "reader": source.reader,
        "scale": AttributeState(source, "scale"),
        "rows_at_start": AttributeState(source, "rows_at_start"),
    }


def _finish_dictionary(
    job: JobConfig, plan: TrainPlan, dictionary: _Dictionary, source: DataPlan, rank: int, *, resumed_from: int
) -> None:
    # master_weights is a collective under ZeRO: every rank takes part. Buffers (BatchTopK's
    # threshold) are kept equal across ranks by the loop and come from the module.
    engine = dictionary.engine
    # A feature-parallel model gathers its slices to rank 0 of each feature group.
    state = engine.module.full_state_dict(master_weights(engine))
    if rank == 0:
        final = _build_sae(dictionary.variant.sae, job.train.seed, source)
        final.load_state_dict(state)
        summary = dictionary.trainer.summary()
        summary_metrics = {"train_tokens": summary.tokens, "train_steps": summary.steps,
                           "cache_rows_at_train_start": source.rows_at_start, "resumed_from_step": resumed_from,
                           **{f"train_{k}": int(v) for k, v in summary.nonfinite.metrics().items()}}
        write_trained_dictionary(
            final, folder=open_store(dictionary.uri, s3_options=job.cache.s3_options()),
            held_out=_held_out(job, plan, source), scale=source.scale, target_scale=source.target_scale,
            hookpoint=plan.hookpoint, target_hookpoint=plan.target_hookpoint,
            layer_hookpoints=[(layer.input_hookpoint, layer.target_hookpoint) for layer in plan.layers or []] or None,
            run_name=plan.run_name, summary=summary_metrics, curves=dictionary.trainer.history, model=job.model,
            data=job.data, logger=dictionary.logger,
            artifact=report_artifact_name(plan.run_name, dictionary.variant.name,
                                          _folder_name(plan)),
        )
    dictionary.logger.finish()
    shutdown_engine(engine)


def _held_out(job: JobConfig, plan: TrainPlan, source: DataPlan) -> HeldOut:
    s3 = job.cache.s3_options()
    target = open_store(plan.target_cache_uri, s3_options=s3) if plan.target_cache_uri else None
    layers = [(open_store(layer.input_uri, s3_options=s3), open_store(layer.target_uri, s3_options=s3))
              for layer in plan.layers or []] or None
    return HeldOut(open_store(plan.cache_uri, s3_options=s3), source.holdout, job.train.follow_timeout_s,
                   partial(_abort_reason, open_store(plan.run_uri, s3_options=s3)), target_cache=target,
                   layer_caches=layers)


def dictionary_uri(plan: TrainPlan, variant: Variant) -> str:
    """Where the dictionary of ``variant`` (of ``plan``'s hookpoint, or hookpoints for a transcoder)
    is written."""
    return layout_dictionary_uri(plan.run_uri, _folder_name(plan), variant=variant.name)


def _folder_name(plan: TrainPlan) -> str:
    return dictionary_folder_name(plan.hookpoint, plan.target_hookpoint, clt=plan.layers is not None)


def _record_permanent_failure(store: ObjectStore, err: Exception) -> None:
    """Leave the reason (``training-failed.json`` in the checkpoints' root) where a restarted
    worker group finds it before doing any work."""
    store.put_bytes(TRAINING_FAILED_FILE, json.dumps({"error": type(err).__name__, "message": str(err)}).encode())


def _permanent_failure(store: ObjectStore) -> dict | None:
    try:
        return json.loads(store.get_bytes(TRAINING_FAILED_FILE))
    except ObjectNotFound:
        return None


def _raise_if_stopped_for_good(err: WorkerGroupError, plan: TrainPlan, store: ObjectStore) -> None:
    """A worker stopped for a reason a restart would meet again: stop with that one line rather
    than Ray Train's tracebacks of every worker."""
    failures = list(err.worker_failures.values())
    if not any(isinstance(e, (*_PERMANENT_FAILURES, TrainingStopped)) for e in failures):
        return
    reason = _permanent_failure(store) or {"error": type(failures[0]).__name__, "message": str(failures[0])}
    if reason["error"] == CorruptShardError.__name__:
        # Each shard's bytes are checked before any row is used: nothing of it was trained on.
        raise CorruptShardError(
            f"cache {plan.cache_uri}: {reason['message']} (training stopped, no dictionary written; "
            f"`saeforge cache verify {plan.cache_uri}` checks every shard)"
        ) from None
    raise TrainingStopped(f"training {plan.label} stopped: {reason['message']} (no dictionary written)") from None


# --------------------------------------------------------------------------- worker-group failures


def failure_cause(failures: Mapping[int, BaseException]) -> str:
    """One line naming why a worker group failed, the ranks grouped by reason: "ranks 0, 1: process
    or node lost, ActorUnavailableError", "rank 1: ValueError: ...". Where ranks were lost, the
    others' errors are named by their type alone: they are what losing a peer does to a collective."""
    lost = {rank for rank, err in failures.items() if getattr(err, "health_check_failure", None) is not None}
    by_reason: dict[str, list[str]] = {}
    for rank, err in sorted(failures.items()):
        reason = _reason(err) if rank in lost or not lost else f"{type(err).__name__}, after the loss"
        by_reason.setdefault(reason, []).append(str(rank))
    return "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {reason}"
                     for reason, ranks in by_reason.items())


def _reason(err: BaseException) -> str:
    lost = getattr(err, "health_check_failure", None)  # Ray Train's WorkerHealthCheckFailedError
    if lost is not None:
        return lost_actor_reason(lost)
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if len(first) > 200:
        first = first[:200] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _newest_checkpoint_step(store: ObjectStore) -> int:
    """The step of the newest checkpoint with its completion marker (0 without one): where a new
    worker group resumes, unless that checkpoint proves damaged (``Checkpointer.restore`` skips it)."""
    steps = [parsed[0] for key in store.list(f"{CHECKPOINTS_DIR}/")
             if (parsed := parse_checkpoint_key(key)) is not None and key == complete_marker_key(parsed[0])]
    return max(steps, default=0)


def _read_times(store: ObjectStore) -> dict[str, Any]:
    try:
        return json.loads(store.get_bytes(TRAINING_TIMES_FILE))
    except ObjectNotFound:
        return {}


def _attempt(attempt: int, attempts: int) -> str:
    return f"attempt {attempt} of {attempts}"


class GroupFailures(UserCallback):
    """In Ray Train's controller, after a worker of the group raised or stopped answering: one
    console line saying what failed and what the job does, and the failure in
    ``training-times.json``'s ``restarts``, which the next group's rank 0 completes once it steps
    (``_note_resumed``). Ray Train's own account (each rank's error and traceback, twice) goes to the
    job's log. A failure a restart would meet again (``training-failed.json``) is the driver's to
    report, in the line it stops with, as is the last failure when no restart is left."""

    def __init__(self, plan: TrainPlan, *, max_failures: int, s3_options: dict) -> None:
        self.label, self.checkpoint_uri, self.s3_options = plan.label, plan.checkpoint_uri, s3_options
        self.max_failures = max_failures
        self.failures = 0

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        failed_at = time.time()
        self.failures += 1
        if any(isinstance(e, (*_PERMANENT_FAILURES, TrainingStopped)) for e in worker_exceptions.values()):
            return
        if self.failures > self.max_failures:  # no restart left: the driver stops with the cause
            return
        cause, attempt = failure_cause(worker_exceptions), self.failures + 1
        try:
            step = _record_failure(open_store(self.checkpoint_uri, s3_options=self.s3_options),
                                   {"failed_at": failed_at, "cause": cause, "attempt": attempt})
            where = f"checkpoint step {step}" if step else "the first step, no checkpoint yet"
        except StoreError as err:  # raised here, it would fail Ray Train's controller, and the restart with it
            where = f"the newest complete checkpoint (not recorded: {err})"
        log.warning("%s: trainer worker group failed (%s): restarting from %s (%s)", self.label, cause, where,
                    _attempt(attempt, self.max_failures + 1))


# Ray Train waits this long (by default) for a worker group's placement group, then gives that try
# up (WorkerGroupStartupTimeoutError) and tries again, as often as FailureConfig's
# controller_failure_limit allows: without a limit, for ever.
_PLACEMENT_TRY_S = 60.0


@dataclass(frozen=True)
class PlacementWait:
    """How the run's worker groups wait for room on the cluster: ``tries`` of ``try_s`` each, in
    all ``cluster.placement_timeout_s`` over the run (Ray Train counts the tries over the run, not
    per group)."""

    timeout_s: float
    workers: int
    per_worker: dict[str, float]
    """What each worker reserves: {"CPU": 1.0}, with {"GPU": 1.0} under NCCL."""

    @classmethod
    def of(cls, job: JobConfig) -> PlacementWait:
        per_worker = {"CPU": job.cluster.train_worker_num_cpus, **({"GPU": 1.0} if distributed_backend() == "nccl" else {})}
        return cls(job.cluster.placement_timeout_s, job.cluster.num_train_workers, per_worker)

    @property
    def try_s(self) -> float:
        return min(self.timeout_s / 2, _PLACEMENT_TRY_S)  # at least one line before the job stops

    @property
    def tries(self) -> int:
        return math.ceil(self.timeout_s / self.try_s - 1e-9)

    @property
    def need(self) -> str:
        """What one group needs: "2 workers x 1 CPU", "4 workers x 2 CPUs and 1 GPU"."""
        return f"{self.workers} worker{'s' if self.workers > 1 else ''} x {resources_text(self.per_worker)}"

    @contextmanager
    def in_ray_train(self) -> Iterator[None]:
        """Ray Train's try length for the ``with`` block: read by its controller from the
        environment it inherits from this process at ``fit()``."""
        before = os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)
        os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = repr(self.try_s)
        try:
            yield
        finally:
            if before is None:
                del os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR]
            else:
                os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = before


class GroupPlacement(ControllerCallback):
    """In Ray Train's controller, each time a worker group found no room on the cluster within one
    try and Ray Train tries again: one console line. The last try's failure is the driver's to
    report (``_stop_with_one_line``)."""

    def __init__(self, plan: TrainPlan, wait: PlacementWait) -> None:
        self.label, self.wait = plan.label, wait
        self.tries = 0

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        if not isinstance(current_state, ReschedulingState):
            return
        if not isinstance(getattr(current_state.training_failed_error, "controller_failure", None),
                          WorkerGroupStartupTimeoutError):
            return
        self.tries += 1
        log.warning("%s: no room on the cluster for the trainer worker group (%s) after %.0f s; waiting "
                    "on (%.0f of %.0f s, cluster.placement_timeout_s)", self.label, self.wait.need,
                    self.wait.try_s, self.tries * self.wait.try_s, self.wait.timeout_s)


def _record_failure(store: ObjectStore, restart: dict[str, Any]) -> int:
    """Add ``restart`` to ``training-times.json``'s ``restarts`` with the step of the newest
    complete checkpoint, where the next group resumes; that step."""
    restart["checkpoint_step"] = step = _newest_checkpoint_step(store)
    times = _read_times(store)
    times.setdefault("restarts", []).append(restart)
    store.put_bytes(TRAINING_TIMES_FILE, json.dumps(times).encode())
    return step


def _note_resumed(store: ObjectStore, plan: TrainPlan, *, resumed_from: int, at: float, attempts: int) -> list[dict]:
    """Rank 0 of a worker group, about to step: complete the record of the failure this group
    replaces (if any) with where and when it resumed, say so in one line; every restart so far."""
    times = _read_times(store)
    restarts = times.get("restarts", [])
    if restarts and "resumed_at" not in restarts[-1]:
        restart = restarts[-1]
        restart.update(resumed_from_step=resumed_from, resumed_at=at, seconds=at - restart["failed_at"])
        store.put_bytes(TRAINING_TIMES_FILE, json.dumps(times).encode())
        log.warning("%s: trainer worker group resumed at step %d after %.1f s (%s)", plan.label, resumed_from,
                    restart["seconds"], _attempt(restart["attempt"], attempts))
    return restarts


def _stop_with_one_line(err: ray.train.TrainingFailedError, job: JobConfig, plan: TrainPlan,
                        checkpoints: ObjectStore, wait: PlacementWait) -> None:
    """Training failed for good: the job stops naming the cause in one line, not with Ray Train's
    tracebacks of every worker (those are in the job's log)."""
    if isinstance(err, WorkerGroupError):
        _raise_if_stopped_for_good(err, plan, checkpoints)
        attempts = job.cluster.train_max_failures + 1
        cause = (f"{failure_cause(err.worker_failures)} (the worker group failed {attempts} "
                 f"time{'s' if attempts > 1 else ''}; cluster.train_max_failures={job.cluster.train_max_failures})")
    elif isinstance(err, ControllerError) and isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
        cause = no_room(f"the trainer worker group ({wait.need})", wait.timeout_s, wait.per_worker)
    elif isinstance(err, ControllerError):
        cause = f"Ray Train's controller: {_reason(err.controller_failure)}"
    else:
        cause = _reason(err)
    step = _newest_checkpoint_step(checkpoints)
    resume = f"; a rerun with resume={plan.run_name} continues from checkpoint step {step}" if step else ""
    raise JobFailed(f"training {plan.label} failed: {cause}{resume}") from None


def train_dictionary(job: JobConfig, plan: TrainPlan) -> dict[str, dict]:
    """Run the Ray Train job; return the held-out evaluation of each written dictionary, by
    variant name ('' for a job that is not a sweep)."""
    storage = Path(job.logging.dir).resolve() / "ray_train"
    wait = PlacementWait.of(job)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": to_dict(job), "plan": plan.__dict__},
        scaling_config=ScalingConfig(
            num_workers=job.cluster.num_train_workers, use_gpu=distributed_backend() == "nccl",
            resources_per_worker={"CPU": job.cluster.train_worker_num_cpus},
        ),
        torch_config=TorchConfig(backend=distributed_backend()),
        run_config=RunConfig(
            name=plan.label, storage_path=str(storage),
            # A worker that dies takes the group down; Ray Train starts a new one, which resumes
            # from the newest complete checkpoint.
            # A group with no room on the cluster: one more try a minute, at most so many in all.
            failure_config=FailureConfig(max_failures=job.cluster.train_max_failures,
                                         controller_failure_limit=wait.tries - 1),
            callbacks=[GroupFailures(plan, max_failures=job.cluster.train_max_failures,
                                     s3_options=job.cache.s3_options()),
                       GroupPlacement(plan, wait)],
        ),
    )
    checkpoints = open_store(plan.checkpoint_uri, s3_options=job.cache.s3_options())
    checkpoints.delete(TRAINING_FAILED_FILE)  # the reason an earlier attempt of this run stopped
    checkpoints.delete(TRAINING_TIMES_FILE)
    try:
        with wait.in_ray_train():
            trainer.fit()
    except ray.train.TrainingFailedError as err:
        _stop_with_one_line(err, job, plan, checkpoints, wait)
    evals = {}
    for variant in variants(job.sae, job.train.lr, job.sweep):
        evals[variant.name] = read_eval(open_store(dictionary_uri(plan, variant), s3_options=job.cache.s3_options()))
    return evals


def training_record(job: JobConfig, plan: TrainPlan) -> dict[str, Any]:
    """``plan``'s ``training-times.json``: when rank 0 of its last worker group entered
    its loop (``entered``), began and ended its steps (``first_step``, ``last_step``) and finished
    writing the dictionaries (``finished``, only once it did), as ``time.time()``; and ``restarts``,
    each restart of the worker group in order, finished training or not: ``failed_at`` (when Ray
    Train's controller learnt of the failure), ``cause`` (one line), ``attempt`` (the new group's, 2
    for the first restart), ``checkpoint_step`` (the newest complete checkpoint then); once the new
    group steps, ``resumed_from_step``, ``resumed_at`` (its first step's start) and ``seconds``
    (``resumed_at - failed_at``). Empty if no group got that far."""
    return _read_times(open_store(plan.checkpoint_uri, s3_options=job.cache.s3_options()))
