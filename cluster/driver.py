"""The job driver: config -> cache (reused or filled by producers) -> trained dictionary.

Everything that can be checked cheaply (config, text, model files, hookpoint, object store) is
checked before Ray starts or a model loads.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from activation_cache.converted import convert
from activation_cache.hooking import describe_model, load_tokenizer, resolve_model_source
from activation_cache.inspection import CACHES_DIR, SHARDS_DIR
from activation_cache.keys import cache_key
from activation_cache.lease import LeaseClaim
from activation_cache.manifest import MANIFEST_KEY, Manifest, check_paired_caches, load_manifest
from activation_cache.plan import holdout_count
from activation_cache.producing import split_units, unit_rows
from activation_cache.schema import CorruptShardError, ShardMeta, sha256_hex
from activation_cache.store import ObjectStore, join_uri, open_store
from activation_cache.text import check_source, excluded_token_ids, pack_sequences
from cluster.config import JobConfig, to_dict
from cluster.errors import JobFailed
from cluster.evaluation import evaluate_in_ray
from cluster.logs import WORKER_SETUP_HOOK, keep_job_log_in
from cluster.precision import resolve_model_dtype
from cluster.producer import ProductionReport, fill_cache, producer_factory
from cluster.runs import start_run
from cluster.sweep import variants
from cluster.timing import Fault, JobTimes
from cluster.train import (
    LayerCaches,
    TrainPlan,
    dictionary_uri,
    train_dictionary,
    training_record,
)
from trainer.checkpoint import newest_complete_checkpoint
from trainer.engine import distributed_backend
from trainer.layout import (
    CHECKPOINTS_DIR,
    PRODUCERS_FAILED_FILE,
    RUN_CONFIG_FILE,
    RUNS_DIR,
    TIMINGS_FILE,
    checkpoint_root,
    run_config_json,
)

log = logging.getLogger(__name__)


@dataclass
class HookpointResult:
    """One hookpoint's cache and dictionary."""

    hookpoint: str
    cache_uri: str
    cache_reused: bool
    tokens_cached: int
    dictionary_uri: str
    eval: dict
    variant: str = ""
    """The sweep variant ('' when the job is not a sweep)."""
    target_hookpoint: str | None = None
    """A transcoder's target hookpoint (``hookpoint`` is its input; a CLT's last layer's target);
    None for an SAE."""
    target_cache_uri: str | None = None
    """The target hookpoint's cache (a CLT's last layer's)."""
    layers: int = 0
    """Layers a cross-layer transcoder covers (``hookpoint`` is its first layer's input); 0 otherwise."""


@dataclass
class JobResult:
    """What ``saeforge train`` reports at the end: one entry per hookpoint (per hookpoint and
    variant for a sweep), in the order given."""

    hookpoints: list[HookpointResult]
    producer_tokens_per_second: float
    seconds: float
    times: JobTimes | None = None
    """Where the wall time went, by phase."""


def absolute_uri(uri: str) -> str:
    """Plain relative paths resolve against the driver's working directory, so every Ray
    process (whatever its own cwd) writes to the same place."""
    if "://" in uri:
        return uri
    return f"file://{Path(uri).expanduser().resolve()}"


@dataclass
class CachePlan:
    """The cache of one hookpoint: its key, where it lives, and the work to fill it. The
    caches of one job share ``tokens`` (one forward pass fills them all)."""

    key: str
    key_inputs: dict
    uri: str
    meta: ShardMeta
    tokens: np.ndarray
    excluded_token_ids: frozenset[int]

    @property
    def hookpoint(self) -> str:
        return self.meta.hookpoint


def plan_caches(job: JobConfig, root: ObjectStore) -> list[CachePlan]:
    """Tokenize the text and derive each hookpoint's content-addressed cache key (no model
    weights load) with the dtype the producers run (``model.dtype=auto`` is decided first)."""
    job = resolve_model_dtype(job)
    check_source(job.data.source, job.data.text_column)
    source = resolve_model_source(job.model)
    hookpoints, widths = describe_model(source, job.model.all_hookpoints)
    if source.gguf_file is not None:  # once per machine: every later load of the job reads the copy
        source = convert(source)
    tokenizer = load_tokenizer(source)
    tokens = pack_sequences(job.data, tokenizer)
    excluded = excluded_token_ids(job.data, tokenizer)
    shared = {
        "model": source.model_id, "revision": source.revision, "model_dtype": job.model.dtype,
        "dataset": job.data.source, "tokenizer": f"{type(tokenizer).__name__}:{len(tokenizer)}",
        "tokens_sha256": sha256_hex(tokens.tobytes()), "context_length": job.data.context_length,
        "dtype": job.cache.dtype, "excluded_token_ids": sorted(excluded),
        "sequences_per_shard": job.cache.sequences_per_shard, "format": 1,
    }
    plans = []
    for hookpoint, d_model in zip(hookpoints, widths, strict=True):
        key_inputs = {**shared, "hookpoint": hookpoint}
        key = cache_key(key_inputs)
        meta = ShardMeta(model=source.model_id, revision=source.revision, hookpoint=hookpoint,
                         d_model=d_model, dtype=job.cache.dtype, cache_key=key)
        plans.append(CachePlan(key, key_inputs, join_uri(root.uri, CACHES_DIR, key), meta, tokens, excluded))
    return plans


def check_shard_count(job: JobConfig, plan: CachePlan) -> None:
    """Refuse, in one line, a job whose cache would leave a trainer worker without a training shard."""
    n_units = math.ceil(len(plan.tokens) / job.cache.sequences_per_shard)
    n_holdout = holdout_count(n_units, job.train.holdout_fraction)
    if n_units - n_holdout < job.cluster.num_train_workers:
        raise ValueError(
            f"the cache would hold {n_units} shards ({n_holdout} held out) but "
            f"cluster.num_train_workers={job.cluster.num_train_workers} needs one training shard each: "
            f"raise data.max_tokens={job.data.max_tokens} or lower "
            f"cache.sequences_per_shard={job.cache.sequences_per_shard}"
        )


def _existing_manifest(store: ObjectStore, plan: CachePlan) -> Manifest:
    manifest = load_manifest(store)
    if manifest is None:
        return Manifest(cache_key=plan.key, key_inputs=plan.key_inputs, model=plan.meta.model,
                        revision=plan.meta.revision, hookpoint=plan.meta.hookpoint,
                        d_model=plan.meta.d_model, dtype=plan.meta.dtype)
    if (manifest.d_model, manifest.dtype) != (plan.meta.d_model, plan.meta.dtype):
        raise ValueError(
            f"cache {store.uri} holds d_model={manifest.d_model} dtype={manifest.dtype} but the job "
            f"expects d_model={plan.meta.d_model} dtype={plan.meta.dtype}"
        )
    return manifest


def check_existing_caches(job: JobConfig, plans: list[CachePlan]) -> None:
    """Refuse, before anything is written or Ray starts, a cache already at a plan's key whose
    manifest is unreadable, disagrees with the model's d_model or the job's dtype, or lists a shard
    its store lacks. One listing per cache, no shard read: a cache can hold terabytes, and the
    reader checks each shard's size and checksum as it reads it. A transcoder's two caches must
    record the same model and token stream (``check_paired_caches``)."""
    manifests = {}
    for plan in plans:
        store = open_store(plan.uri, s3_options=job.cache.s3_options())
        manifest = manifests[plan.uri] = _existing_manifest(store, plan)  # a garbled manifest raises, naming it
        if not manifest.shards:
            continue
        present = set(store.list(SHARDS_DIR))
        missing = [entry.name for entry in manifest.shards if entry.name not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CorruptShardError(
                f"shard {missing[0]}{more}: listed in {store.uri}/{MANIFEST_KEY} but missing from the store; "
                f"`saeforge cache verify {store.uri}` checks every shard, deleting the cache rebuilds it"
            )
    for training in _trainings(job, plans):
        first = training.inputs[0]
        for other in [*training.inputs[1:], *training.targets]:
            check_paired_caches(manifests[first.uri], manifests[other.uri], input_uri=first.uri, target_uri=other.uri)


def _init_ray(job: JobConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Every worker process of the job (ours and Ray Train's own) starts by silencing the
    # third-party console noise.
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    if job.cluster.address:
        ray.init(address=job.cluster.address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # "local" starts a cluster of our own: without an address Ray joins RAY_ADDRESS or the
        # cluster last started on this machine (/tmp/ray/ray_current_cluster), even a dead one.
        num_cpus = job.cluster.num_cpus or max(os.cpu_count() or 1, math.ceil(_cpus_for_both(job)))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=job.cluster.object_store_memory_bytes, runtime_env=runtime_env)


def _cpus_for_both(job: JobConfig) -> float:
    """CPUs the producers and the trainer workers reserve together."""
    c = job.cluster
    return c.num_producers * c.producer_num_cpus + c.num_train_workers * c.train_worker_num_cpus


def _room_for_both(job: JobConfig) -> bool:
    """Whether the cluster holds the producers and the trainer workers at once: then the workers
    start (Ray Train's worker group, their processes and imports: 15 s on 2 cores) while the
    producers fill the caches, and wait for them to complete. Without room they would hold CPUs
    a replacement producer needs, so they start after the fill as before."""
    c, available = job.cluster, ray.cluster_resources()
    gpus = c.num_producers * c.producer_num_gpus + (c.num_train_workers if distributed_backend() == "nccl" else 0)
    return available.get("CPU", 0) >= _cpus_for_both(job) and available.get("GPU", 0) >= gpus


@dataclass
class CacheReport:
    """The caches a job reads, once complete."""

    manifests: dict[str, Manifest]
    """Each hookpoint's complete manifest."""
    reused: dict[str, bool]
    """Whether each hookpoint's cache was complete before the job started."""
    producer_tokens_per_second: float
    fills: list[ProductionReport] = field(default_factory=list)
    """The fills this job ran (none when every cache was reused)."""


def build_caches(
    job: JobConfig, plans: list[CachePlan], *, job_name: str = "saeforge",
    on_commit: Callable[[dict[str, Manifest], list], None] | None = None,
) -> CacheReport:
    """Complete every hookpoint's cache: reuse complete ones, resume or fill the others, all
    from one forward pass per work unit. ``on_commit`` is called with the manifests and the live
    producers after each unit is committed, and with no producers while waiting for another job
    (an exception it raises stops the fill).

    A cache is filled only under its writer lease (``activation_cache.lease``): a cache another
    job is filling is waited for, and taken over (resumed from its committed shards) if that job
    dies."""
    s3 = job.cache.s3_options()
    stores = {p.hookpoint: open_store(p.uri, s3_options=s3) for p in plans}
    manifests = {p.hookpoint: _existing_manifest(stores[p.hookpoint], p) for p in plans}
    reused = {h: m.complete for h, m in manifests.items()}
    for plan in plans:
        manifest = manifests[plan.hookpoint]
        if manifest.complete:
            log.info("cache %s is complete (%d rows): reusing it", plan.uri, manifest.rows)
    claims = {
        p.hookpoint: LeaseClaim(stores[p.hookpoint], job=job_name, ttl_s=job.cache.lease_ttl_s)
        for p in plans if not manifests[p.hookpoint].complete
    }
    by_hookpoint = {p.hookpoint: p for p in plans}
    tokens_per_second = 0.0
    fills = []
    while claims:
        leases = {h: lease for h, claim in claims.items() if (lease := claim.try_acquire()) is not None}
        if not leases:
            _wait_for_writers(job, claims, stores, manifests, by_hookpoint, on_commit)
            continue
        try:
            # Read again under the lease: a previous holder may have committed more since.
            held = {h: _existing_manifest(stores[h], by_hookpoint[h]) for h in leases}
            todo = [by_hookpoint[h] for h, m in held.items() if not m.complete]
            manifests.update(held)
            if todo:
                report = _fill(job, todo, held, on_commit, before_commit=lambda h, held=leases: held[h].check())
                manifests.update(report.manifests)
                tokens_per_second = report.tokens_per_second
                fills.append(report)
        finally:
            for lease in leases.values():
                lease.release()
        for hookpoint in leases:
            del claims[hookpoint]
    return CacheReport(manifests, reused, tokens_per_second, fills)


def _wait_for_writers(
    job: JobConfig, claims: dict[str, LeaseClaim], stores: dict[str, ObjectStore],
    manifests: dict[str, Manifest], plans: dict[str, CachePlan],
    on_commit: Callable[[dict[str, Manifest], list], None] | None,
) -> None:
    """One wait for the caches other jobs hold: drop the claims on those now complete."""
    time.sleep(min(job.cache.lease_ttl_s / 4, 5.0))
    for hookpoint in list(claims):
        manifests[hookpoint] = _existing_manifest(stores[hookpoint], plans[hookpoint])
        if manifests[hookpoint].complete:
            log.info("cache %s was completed by another job: reusing it", stores[hookpoint].uri)
            del claims[hookpoint]
    if on_commit is not None:
        on_commit(manifests, [])


def _fill(
    job: JobConfig, todo: list[CachePlan], manifests: dict[str, Manifest],
    on_commit: Callable[[dict[str, Manifest], list], None] | None,
    before_commit: Callable[[str], None],
) -> ProductionReport:
    """Producers fill the caches of ``todo`` (this job holds their leases)."""
    for plan in todo:
        if manifests[plan.hookpoint].shards:
            log.info("resuming cache %s: %d shards already committed", plan.uri, len(manifests[plan.hookpoint].shards))
    s3 = job.cache.s3_options()
    make_producer = producer_factory(
        num_cpus=job.cluster.producer_num_cpus, num_gpus=job.cluster.producer_num_gpus,
        max_restarts=job.cluster.producer_max_restarts, model_cfg=job.model,
        caches={p.hookpoint: (p.uri, p.meta) for p in todo}, s3_options=s3,
        excluded_token_ids=todo[0].excluded_token_ids, compression=job.cache.compression_codec,
    )
    started = time.time()
    producers = [make_producer() for _ in range(job.cluster.num_producers)]
    loads = [p.load_times.remote() for p in producers]  # answered once each model is loaded
    try:
        report = fill_cache(
            producers=producers, units=split_units(todo[0].tokens, job.cache.sequences_per_shard),
            manifests={p.hookpoint: manifests[p.hookpoint] for p in todo},
            cache_uris={p.hookpoint: p.uri for p in todo}, s3_options=s3,
            units_per_producer=job.cluster.units_per_producer, make_producer=make_producer,
            max_replacements=job.cluster.producer_replacements,
            max_unit_attempts=job.cluster.unit_max_attempts, on_commit=on_commit,
            before_commit=before_commit,
        )
        report.loads = _answered(loads)
        report.started, report.finished = started, time.time()
        return report
    finally:
        for actor in producers:
            ray.kill(actor)


def _answered(refs: list) -> list:
    """The answers of the actors that gave one (a producer that died before it had its model, or
    was replaced, has none)."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    answers = []
    for ref in ready:
        try:
            answers.append(ray.get(ref))
        except ray.exceptions.RayError:
            continue
    return answers


def expected_shards(job: JobConfig, plan: CachePlan) -> dict[str, int]:
    """{shard name: rows} of the complete cache, known from the tokens alone (a trainer that
    starts before the cache is complete plans its steps and its holdout split from these)."""
    units = split_units(plan.tokens, job.cache.sequences_per_shard)
    return {u.shard_name: unit_rows(u, plan.excluded_token_ids) for u in units}


@dataclass(frozen=True)
class Training:
    """One dictionary the job trains (each variant of a sweep), by the caches it reads: an SAE's
    one input; a transcoder's input and target; a cross-layer transcoder's inputs and targets,
    one of each per covered layer, in layer order."""

    inputs: list[CachePlan]
    targets: list[CachePlan]

    @property
    def first(self) -> CachePlan:
        return self.inputs[0]

    @property
    def target(self) -> CachePlan | None:
        """The target of a per-layer transcoder (None for an SAE or a CLT)."""
        return self.targets[0] if len(self.inputs) == 1 and self.targets else None

    @property
    def clt(self) -> bool:
        return len(self.inputs) > 1


def _trainings(job: JobConfig, plans: list[CachePlan]) -> list[Training]:
    """What the job trains: one SAE per hookpoint, one transcoder from the first cache
    (``model.hookpoint``) to the second (``model.target_hookpoint``), or one cross-layer transcoder
    from the first half of the caches (the covered layers' MLP inputs) to the second (their outputs)."""
    if job.model.clt_layers:
        half = len(plans) // 2
        return [Training(plans[:half], plans[half:])]
    if job.model.target_hookpoint is not None:
        return [Training([plans[0]], [plans[1]])]
    return [Training([p], []) for p in plans]


def _train_plans(job: JobConfig, plans: list[CachePlan], root: ObjectStore, run_name: str) -> list[TrainPlan]:
    runs_root = absolute_uri(job.run.uri) if job.run.uri else join_uri(root.uri, RUNS_DIR)
    trainings = _trainings(job, plans)
    several = len(trainings) > 1
    # The caches of one job share their tokens and exclusions, so their shards have the same rows.
    expected = expected_shards(job, plans[0]) if job.cluster.train_while_caching else None
    return [
        TrainPlan(
            cache_uri=t.first.uri, run_uri=join_uri(runs_root, run_name), run_name=run_name, hookpoint=t.first.hookpoint,
            label=f"{run_name}-{t.first.hookpoint}" if several else run_name,
            checkpoint_uri=checkpoint_root(join_uri(runs_root, run_name), t.first.hookpoint, several_hookpoints=several),
            wandb_dir=str(Path(job.logging.dir).resolve() / run_name / (t.first.hookpoint if several else "")),
            expected_shards=expected,
            target_cache_uri=t.target.uri if t.target else None,
            target_hookpoint=t.targets[-1].hookpoint if t.targets else None,
            layers=[LayerCaches(i.uri, i.hookpoint, o.uri, o.hookpoint) for i, o in zip(t.inputs, t.targets, strict=True)]
            if t.clt else None,
        )
        for t in trainings
    ]


def _train_while_caching(
    job: JobConfig, plans: list[CachePlan], train_plans: list[TrainPlan]
) -> tuple[CacheReport, list[dict[str, dict]]]:
    """Fill the caches in a thread while the dictionaries train on the shards already committed
    (``cluster.train_while_caching``; train plans with ``expected_shards``), or while their worker
    groups start and wait for the caches to complete (train plans without).

    A fill that fails writes the reason to the run folder, where the trainer's tailing readers
    find it and stop; the job then stops with the fill's error. A training that fails stops
    the fill at its next commit (what was committed stays: a rerun resumes)."""
    run = open_store(train_plans[0].run_uri, s3_options=job.cache.s3_options())
    run.delete(PRODUCERS_FAILED_FILE)  # a reason left by an earlier attempt of this run
    training_failed = threading.Event()
    outcome: dict = {}

    def stop_if_training_failed(manifests, producers) -> None:
        if training_failed.is_set():
            raise JobFailed("training failed: cache filling stopped (committed shards stay; a rerun resumes)")

    def fill() -> None:
        try:
            outcome["report"] = build_caches(job, plans, job_name=train_plans[0].run_name, on_commit=stop_if_training_failed)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = err
            if not training_failed.is_set():
                outcome["aborted"] = True
                run.put_bytes(PRODUCERS_FAILED_FILE, f"filling the cache failed: {err}".encode())

    filler = threading.Thread(target=fill, name="saeforge-fill", daemon=True)
    filler.start()
    try:
        evals = [train_dictionary(job, p) for p in train_plans]
    except BaseException:
        training_failed.set()
        filler.join()
        if outcome.get("aborted"):  # the fill failed first: the training stopped because of it
            raise outcome["error"] from None
        raise
    filler.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["report"], evals


def _check_resumable(job: JobConfig, train_plans: list[TrainPlan]) -> None:
    for plan in train_plans:
        store = open_store(plan.checkpoint_uri, s3_options=job.cache.s3_options())
        if newest_complete_checkpoint(store.list(f"{CHECKPOINTS_DIR}/"), store.get_bytes) is None:
            raise ValueError(f"resume={job.resume!r}: no complete checkpoint under {plan.checkpoint_uri}/{CHECKPOINTS_DIR}/")


def _result(training: Training, plan: TrainPlan, variant, evaluation: dict, report: CacheReport) -> HookpointResult:
    first, last_target = training.first, (training.targets[-1] if training.targets else None)
    return HookpointResult(
        hookpoint=first.hookpoint, cache_uri=first.uri, cache_reused=report.reused[first.hookpoint],
        tokens_cached=report.manifests[first.hookpoint].rows, dictionary_uri=dictionary_uri(plan, variant),
        eval=evaluation, variant=variant.name,
        target_hookpoint=last_target.hookpoint if last_target else None,
        target_cache_uri=last_target.uri if last_target else None,
        layers=len(training.inputs) if training.clt else 0,
    )


def run_job(job: JobConfig) -> JobResult:
    """``saeforge train``: fill (or reuse) each hookpoint's cache, train, write and evaluate the
    dictionaries."""
    start = time.perf_counter()
    root = open_store(absolute_uri(job.cache.uri), s3_options=job.cache.s3_options())
    root.list(f"{CACHES_DIR}/")  # fails fast on a missing bucket or bad credentials
    if job.cluster.address is not None:  # its producers report their hardware from their nodes
        _init_ray(job)
    job = resolve_model_dtype(job)  # before the caches are keyed: the dtype is part of the key
    plans = plan_caches(job, root)
    check_shard_count(job, plans[0])
    check_existing_caches(job, plans)
    run = start_run(job, root, [p.key for p in plans])  # run.name, the same command's interrupted run, or a new one
    run_name = run.name
    train_plans = _train_plans(job, plans, root, run_name)
    if job.resume is not None:
        _check_resumable(job, train_plans)
    keep_job_log_in(Path(job.logging.dir).resolve() / run_name)  # saeforge train's log, once the input is accepted
    # The resolved config beside the run's outputs (``saeforge eval`` rebuilds the held-out text
    # from it); credentials are never part of it.
    run_store = open_store(train_plans[0].run_uri, s3_options=job.cache.s3_options())
    run_store.put_bytes(RUN_CONFIG_FILE, run_config_json(to_dict(job)))
    _init_ray(job)
    times = JobTimes()
    ray_up = time.time()
    times.add("start-up", ray_up - times.started)
    if job.cluster.train_while_caching or _room_for_both(job):
        if not job.cluster.train_while_caching:
            log.info("the trainer workers start beside the producers and wait for the complete caches")
        report, evals = _train_while_caching(job, plans, train_plans)
        times.overlapping = job.cluster.train_while_caching
        cached = max([ray_up, *(f.finished for f in report.fills)])
    else:
        report = build_caches(job, plans, job_name=run_name)
        cached = time.time()
        evals = [train_dictionary(job, p) for p in train_plans]
    trained = time.time()
    _time_caching(times, job, report, ray_up, cached)
    _time_training(times, job, train_plans, cached, trained)
    eval_load = 0.0
    if job.eval.enabled:  # one Ray task loads the model once for every hookpoint and variant
        uris = [dictionary_uri(t, v) for t in train_plans for v in variants(job.sae, job.train.lr, job.sweep)]
        evaluations = evaluate_in_ray(job, uris, tokens=plans[0].tokens,
                                      excluded_token_ids=plans[0].excluded_token_ids, eval_cfg=job.eval)
        merged = iter(evaluations)
        evals = [{v.name: next(merged) for v in variants(job.sae, job.train.lr, job.sweep)} for _ in train_plans]
        # the task's model load is counted with the producers'
        parts = evaluations.timings
        eval_load = parts.model_load
        times.faults += evaluations.faults
        times.notes["evaluation"] = (f"spliced forwards {parts.spliced:.1f} s, steer audit {parts.audit:.1f} s, wandb "
                                     f"{parts.logging:.1f} s, task start {parts.task_start:.1f} s; model load "
                                     f"{parts.model_load:.1f} s under model loads")
    evaluated = time.time()
    times.add("model loads", eval_load)
    times.add("evaluation", evaluated - trained - eval_load)
    results = [
        _result(training, t, variant, by_variant[variant.name], report)
        for training, t, by_variant in zip(_trainings(job, plans), train_plans, evals, strict=True)
        for variant in variants(job.sae, job.train.lr, job.sweep)
    ]
    done = time.time()
    times.add("report", done - evaluated)
    run_store.put_bytes(TIMINGS_FILE, times.to_json(done))
    run.finished()  # the same command, run again, starts a new run
    return JobResult(
        hookpoints=results,
        producer_tokens_per_second=report.producer_tokens_per_second, seconds=time.perf_counter() - start,
        times=times,
    )


def _time_caching(times: JobTimes, job: JobConfig, report: CacheReport, began: float, cached: float) -> None:
    """Model loads: each fill's producers, from their creation until the last had its model;
    caching: the rest of the fills (and, unless training overlapped, the checks around them)."""
    loads = sum(max(x.ready for x in f.loads) - f.started for f in report.fills if f.loads)
    times.add("model loads", loads)
    if times.overlapping:
        times.add("caching", sum(f.finished - f.started for f in report.fills) - loads)
    else:
        times.add("caching", cached - began - loads)
    if report.fills and report.fills[0].loads:
        first = report.fills[0].loads
        times.notes["model loads"] = (f"{len(first)} producers in parallel, {job.model.dtype}: each load "
                                      f"{max(x.ready - x.load_started for x in first):.1f} s after "
                                      f"{max(x.load_started - x.process_started for x in first):.1f} s of process start")
    times.faults += [Fault("caching", fault.line(), fault.work_redone_s) for f in report.fills for fault in f.faults]
    tokens = sum(f.tokens_forwarded for f in report.fills)
    caching = times.seconds["caching"]
    times.notes["caching"] = (f"{tokens:,} tokens at {tokens / caching:,.0f} tokens/s once the models were loaded"
                              if tokens and caching else "every cache reused")


def _time_training(times: JobTimes, job: JobConfig, plans: list[TrainPlan], began: float, trained: float) -> None:
    """Training: the worker groups starting, stepping and shutting down; rank 0 writing the
    dictionaries (held-out figures, features, report page) counts as report."""
    group = engines = stepping = writing = 0.0
    for plan in plans:
        marks = training_record(job, plan)
        times.faults += [_restart_fault(plan, restart) for restart in marks.get("restarts", [])]
        if "finished" not in marks:  # a worker group that did not finish cleanly: all of it is training
            continue
        writing += marks["finished"] - marks["last_step"]
        stepping += marks["last_step"] - marks["first_step"]
        if len(plans) == 1:  # a worker group started beside the fill entered before the caches completed
            group, engines = max(0.0, marks["entered"] - began), marks["first_step"] - max(marks["entered"], began)
    times.add("training", trained - began - writing)
    times.add("report", writing)
    times.notes["training"] = f"steps {stepping:.1f} s" + (
        f" after {group:.1f} s of Ray Train starting its workers and {engines:.1f} s of engines, wandb and data plan"
        if group or engines else "")
    times.notes["report"] = f"rank 0 writing the dictionar{'y' if len(plans) == 1 else 'ies'} {writing:.1f} s"


def _restart_fault(plan: TrainPlan, restart: dict) -> Fault:
    """A worker group restart as the closing summary counts it: the seconds from the failure to the
    new group's first step (the steps after the checkpoint, redone, are not in them)."""
    if "resumed_at" not in restart:  # the new group never stepped: the training failed after all
        return Fault("training", f"{plan.label}: trainer worker group failed ({restart['cause']}); not resumed", 0.0)
    return Fault("training", f"{plan.label}: trainer worker group failed ({restart['cause']}): resumed from "
                             f"checkpoint step {restart['resumed_from_step']} (attempt {restart['attempt']})",
                 restart["seconds"])
