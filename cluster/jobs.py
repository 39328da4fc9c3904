"""``saeforge submit | status | logs | stop | list``: the training job on a Ray cluster, through
the Ray Jobs API, and what it will cost before it starts.

``submit`` validates the config (``compose_job``), prints a cost estimate worked out from the text
and the model's config (no weights load), and submits ``saeforge train <overrides>`` as a Ray job:
the project directory travels as the job's ``working_dir`` (Ray puts it first on every job
process's ``PYTHONPATH``, so the cluster runs the code that was submitted), and the nodes supply
the Python environment (the ``saeforge`` image, or a venv on ``PATH`` when the node started) and
the credentials (``AWS_*``, ``WANDB_API_KEY`` in their own environment; never in the job).

The other commands follow ``ray job status|logs|stop|list``: the same arguments and messages.
The address is ``--address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``, else the
dashboard on this machine. Ray is imported only by the commands that talk to a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from cluster.config import JobConfig

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""Where Ray's own job CLI looks for the address, in this order."""

WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "wandb",
    "/store", "/outputs", "/build", "/dist",
]
"""Left out of the uploaded working directory (gitignore patterns, relative to the project root):
environments, caches and run outputs. Ray also honours the project's ``.gitignore``; these hold
for a copy without one, and keep the package far below Ray's 512 MiB limit."""

JOB_ENV_VARIABLES = ("WANDB_MODE",)
"""The only environment variables the job carries (``runtime_env.env_vars``), each set from the
config: a job's runtime environment is stored in the cluster's metadata and shown by the
dashboard, so credentials stay in the nodes' own environment."""

# --- the cost estimate -------------------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
STATE_BYTES = {"fp32": {"weights": 4, "grads": 4, "optimizer": 8},
               "bf16": {"weights": 2, "grads": 2, "optimizer": 12}}
"""Bytes per SAE parameter in a DeepSpeed engine with Adam, 16 in all: fp32 weights, gradients and
two moments; or bf16 weights and gradients over fp32 master weights and moments."""
ENCODER_CHUNK_LATENTS = 4096
"""Latents whose pre-activations one step holds at once (benchmarks/plan_scale.py's working-memory model)."""


def forward_flops_per_token(*, forward_parameters: float, layers_run: int, context_length: int, d_model: int) -> float:
    """A forward pass to the hookpoint: ``2 N + 2 n_layer n_ctx d`` (Kaplan et al. 2020, table 1),
    N the non-embedding parameters of the layers that run."""
    return 2 * forward_parameters + 2 * layers_run * context_length * d_model


def trainer_flops_per_token(*, d_model: int, n_latents: int) -> float:
    """One training token through one SAE: ``6 d n``, the encoder's (d x n) GEMM forward (2 d n)
    and backward (4 d n) counted dense. The decoder and the top-k work on k latents only and are
    left out; TopK's sparse kernels skip most of the backward, so this overstates their work and
    the measured rate below, taken with the same formula, absorbs the difference."""
    return 6 * d_model * n_latents


# Rates measured on the 2-core reference machine (benchmarks/RESULTS.md), turned into FLOP/s per
# CPU by the two formulas above so that they carry over to other models and widths. Rough: CPU
# only (no GPU figure has been measured), linear in CPUs, communication and start-up left out.
PRODUCER_MEASURED_TOKENS_PER_S = 699.0
"""bench_producer: the producer path, SmolLM2-135M in fp32 to model.layers.15 (16 of its 30 layers,
56,641,536 non-embedding parameters), context 256, one CPU thread."""
PRODUCER_FLOPS_PER_CPU = PRODUCER_MEASURED_TOKENS_PER_S * forward_flops_per_token(
    forward_parameters=56_641_536, layers_run=16, context_length=256, d_model=576)
TRAINER_MEASURED_TOKENS_PER_S = 4287.0
"""bench_scale: TopK, 16,384 latents x d_model 512, fp32, in the job's DeepSpeed engine on two
ranks of one CPU thread each."""
TRAINER_FLOPS_PER_CPU = TRAINER_MEASURED_TOKENS_PER_S * trainer_flops_per_token(d_model=512, n_latents=16384) / 2
BF16_TRAINER_SPEEDUP = 8685 / 4034
"""bench_trainer, 16,384 latents: the same step with bf16 GEMMs against fp32 (2.15x)."""


@dataclass(frozen=True)
class JobShape:
    """What the estimate needs beyond the config, read from the text and the model's config."""

    tokens: int
    """Tokens forwarded by the producers (whole sequences)."""
    rows: int
    """Activation rows per hookpoint (tokens minus excluded ones, such as BOS)."""
    train_rows: int
    """Rows per hookpoint outside the held-out shards."""
    d_model: int
    """The model's residual width (the forward pass's cost)."""
    n_hookpoints: int
    layers_run: int
    """Decoder layers a forward pass runs (up to the deepest hookpoint)."""
    n_layers: int
    model_parameters: int
    non_embedding_parameters: int
    caches_complete: int = 0
    """Hookpoints whose cache is already complete: reused, their producers skipped."""
    hookpoint_widths: tuple[int, ...] = ()
    """What each hookpoint captures (``mlp.down_proj:input``: intermediate_size); empty: d_model each."""

    @property
    def widths(self) -> tuple[int, ...]:
        return self.hookpoint_widths or (self.d_model,) * self.n_hookpoints


class CostEstimate(NamedTuple):
    """The figures ``saeforge submit`` prints before it submits."""

    tokens: int
    """Tokens the producers forward (0 when every cache is reused)."""
    activation_bytes: int
    """Activation values in the caches: rows x d_model x dtype bytes, summed over hookpoints."""
    sae_parameters: int
    """Parameters of every dictionary the job trains (``2 n d + n + d`` each)."""
    dictionaries: int
    """Dictionaries trained: hookpoints x sweep variants."""
    state_bytes_per_worker: float
    """SAE weights, gradients and Adam state on one trainer worker, as ZeRO and feature
    parallelism divide them (all variants of a sweep train at once)."""
    working_bytes_per_worker: float
    """One step's working memory on one trainer worker."""
    model_bytes_per_producer: int
    """The model's weights in one producer."""
    producer_flops: float
    trained_tokens: int
    """Training tokens per dictionary (epochs over the training shards, capped by train.max_tokens)."""
    trainer_flops: float
    producer_seconds: float | None
    """At the measured CPU rate; None where producers run on GPUs (no rate measured)."""
    trainer_seconds: float


def _worker_bytes(job: JobConfig, n_latents: int, k: int, d: int) -> tuple[float, float]:
    """(state, working) bytes of one variant on one worker: benchmarks/plan_scale.py's model with
    this job's precision and per-rank batch."""
    f = job.deepspeed.feature_parallel
    dp = job.cluster.num_train_workers // f
    stage = job.deepspeed.zero_stage
    params = (2 * n_latents * d + n_latents) / f + d  # b_dec (d values) is replicated
    divisors = {"weights": dp if stage >= 3 else 1, "grads": dp if stage >= 2 else 1, "optimizer": dp if stage >= 1 else 1}
    per_byte = STATE_BYTES[job.deepspeed.precision]
    state = sum(params * per_byte[part] / divisors[part] for part in per_byte)
    batch = job.train.batch_size // dp
    working = 2 * batch * d * 4 + batch * ENCODER_CHUNK_LATENTS * 2 + 4 * batch * k * 8
    if stage == 3:  # the forward gathers the slice's whole W_enc and W_dec
        working += 2 * per_byte["weights"] * n_latents * d / f
    return state, working


def estimate_cost(job: JobConfig, shape: JobShape) -> CostEstimate:
    """The job's size, memory, work and an ETA from the measured rates (pure arithmetic)."""
    from cluster.sweep import variants

    d, widths = shape.d_model, shape.widths
    dictionaries = variants(job.sae, job.train.lr, job.sweep)
    produce = shape.caches_complete < shape.n_hookpoints
    tokens = shape.tokens if produce else 0
    producer_flops = tokens * forward_flops_per_token(
        forward_parameters=shape.non_embedding_parameters * shape.layers_run / shape.n_layers,
        layers_run=shape.layers_run, context_length=job.data.context_length, d_model=d)
    trained = shape.train_rows * job.train.epochs
    if job.train.max_tokens is not None:
        trained = min(trained, job.train.max_tokens)
    # The hookpoints train one after another, a sweep's variants at once: the widest hookpoint's
    # variants together are the peak.
    memory = max(([_worker_bytes(job, v.sae.n_latents, v.sae.k, w) for v in dictionaries] for w in widths),
                 key=lambda parts: sum(state + working for state, working in parts))
    trainer_flops = sum(trained * trainer_flops_per_token(d_model=w, n_latents=v.sae.n_latents)
                        for w in widths for v in dictionaries)
    producer_cpus = job.cluster.num_producers * job.cluster.producer_num_cpus
    trainer_rate = job.cluster.num_train_workers * job.cluster.train_worker_num_cpus * TRAINER_FLOPS_PER_CPU
    if job.deepspeed.precision == "bf16":
        trainer_rate *= BF16_TRAINER_SPEEDUP
    return CostEstimate(
        tokens=tokens,
        activation_bytes=shape.rows * sum(widths) * DTYPE_BYTES[job.cache.dtype],
        sae_parameters=sum(2 * v.sae.n_latents * w + v.sae.n_latents + w for w in widths for v in dictionaries),
        dictionaries=shape.n_hookpoints * len(dictionaries),
        state_bytes_per_worker=sum(state for state, _ in memory),
        working_bytes_per_worker=sum(working for _, working in memory),
        model_bytes_per_producer=shape.model_parameters * DTYPE_BYTES[job.model.dtype],
        producer_flops=producer_flops,
        trained_tokens=trained,
        trainer_flops=trainer_flops,
        producer_seconds=None if job.cluster.producer_num_gpus > 0 else producer_flops / (producer_cpus * PRODUCER_FLOPS_PER_CPU),
        trainer_seconds=trainer_flops / trainer_rate,
    )


def _bytes(size: float) -> str:
    from cluster.cache_cli import human_bytes

    return human_bytes(int(size))


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "< 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _eta(job: JobConfig, est: CostEstimate) -> str:
    train = _duration(est.trainer_seconds) + " training"
    if est.tokens == 0:
        return f"{train} (caches complete: no producers)"
    if est.producer_seconds is None:
        return f"{train} + producing on GPUs (no GPU rate measured)"
    produce = _duration(est.producer_seconds) + " producing"
    if job.cluster.train_while_caching:
        return f"{_duration(max(est.producer_seconds, est.trainer_seconds))} ({produce}, {train}, overlapped)"
    return f"{_duration(est.producer_seconds + est.trainer_seconds)} ({produce} + {train})"


def format_estimate(job: JobConfig, shape: JobShape, est: CostEstimate) -> str:
    """The estimate as a small aligned table."""
    hookpoints = shape.n_hookpoints
    per = f" per hookpoint x {hookpoints}" if hookpoints > 1 else ""
    widths = (f"d_model {shape.widths[0]}{per}" if len(set(shape.widths)) == 1
              else "(" + " + ".join(str(w) for w in shape.widths) + ") values, one width per hookpoint")
    f, dp = job.deepspeed.feature_parallel, job.cluster.num_train_workers // job.deepspeed.feature_parallel
    grid = f"ZeRO {job.deepspeed.zero_stage}, {job.deepspeed.precision}, {dp} data-parallel" + (f" x {f} feature-parallel" if f > 1 else "")
    rows = [
        ("tokens", f"{shape.tokens:,} forwarded, {shape.rows:,} activation rows{per}"
                   + ("" if est.tokens else " (cached already)")),
        ("activation cache", f"{_bytes(est.activation_bytes)} ({shape.rows:,} rows x {widths} x {job.cache.dtype})"),
        ("SAE parameters", f"{est.sae_parameters:,} in {est.dictionaries} dictionar{'y' if est.dictionaries == 1 else 'ies'} (2 n d + n + d each)"),
        ("memory per worker", f"{_bytes(est.state_bytes_per_worker)} weights, gradients, Adam ({grid}) "
                              f"+ {_bytes(est.working_bytes_per_worker)} per step"),
        ("model per producer", f"{_bytes(est.model_bytes_per_producer)} ({shape.model_parameters:,} parameters, {job.model.dtype})"),
        ("FLOPs", f"{est.producer_flops:.2e} producing (2 N + 2 L ctx d per token, {shape.layers_run} of {shape.n_layers} layers), "
                  f"{est.trainer_flops:.2e} training (6 d n per token, {est.trained_tokens:,} tokens per dictionary)"),
        ("ETA", _eta(job, est)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["cost estimate (rough: CPU rates measured on the 2-core reference machine, benchmarks/RESULTS.md)"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


# --- reading the job's shape (tokenizes the text, reads the model's config) --------------

_LAYER_INDEX = re.compile(r"\.(\d+)(?=[.:]|$)")


def _model_parameters(job: JobConfig) -> tuple[int, int, int, int]:
    """(all parameters, non-embedding parameters, decoder layers, residual width) from a
    skeleton built on the meta device: no weights load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from activation_cache.hooking import resolve_model_source

    source = resolve_model_source(job.model)
    config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in skeleton.parameters())  # tied weights once
    embeddings = skeleton.get_input_embeddings().weight
    head = skeleton.get_output_embeddings()
    embedding = embeddings.numel() + (head.weight.numel() if head is not None and head.weight is not embeddings else 0)
    return total, total - embedding, int(config.num_hidden_layers), int(embeddings.shape[1])


def _cache_complete(job: JobConfig, cache_uri: str) -> bool:
    """Whether the cache exists complete (then the job reuses it); False where the store cannot
    be read from this machine (the estimate then counts the producers' work)."""
    from activation_cache.manifest import load_manifest
    from activation_cache.store import StoreError, open_store

    try:
        manifest = load_manifest(open_store(cache_uri, s3_options=job.cache.s3_options()))
    except StoreError:
        return False
    return manifest is not None and manifest.complete


def describe_job(job: JobConfig) -> JobShape:
    """Plan the job's caches as the driver will (same tokens, same cache keys), without loading
    weights; raises what the driver would raise for bad text, model files or shard counts."""
    from activation_cache.store import open_store
    from cluster.driver import absolute_uri, check_shard_count, expected_shards, plan_caches
    from cluster.train import holdout_count

    plans = plan_caches(job, open_store(absolute_uri(job.cache.uri), s3_options=job.cache.s3_options()))
    check_shard_count(job, plans[0])
    shards = expected_shards(job, plans[0])
    names = sorted(shards)
    held_out = holdout_count(len(names), job.train.holdout_fraction)
    total, non_embedding, n_layers, d_model = _model_parameters(job)
    indices = [_LAYER_INDEX.search(p.hookpoint) for p in plans]
    layers_run = n_layers if any(i is None for i in indices) else max(int(i.group(1)) for i in indices) + 1
    return JobShape(
        tokens=int(plans[0].tokens.size), rows=sum(shards.values()), train_rows=sum(shards[n] for n in names[:-held_out]),
        d_model=d_model, n_hookpoints=len(plans), hookpoint_widths=tuple(p.meta.d_model for p in plans), layers_run=min(layers_run, n_layers), n_layers=n_layers,
        model_parameters=total, non_embedding_parameters=non_embedding,
        caches_complete=sum(_cache_complete(job, p.uri) for p in plans),
    )


# --- the Ray Jobs API ---------------------------------------------------------------------


class JobsApiError(ValueError):
    """The Jobs API could not be reached or refused a request; one line naming the address or
    the job. A ValueError so that the command line reports it like a bad value (exit 2)."""


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``, else this machine's dashboard."""
    if address:
        return address
    return next((os.environ[v] for v in ADDRESS_VARIABLES if os.environ.get(v)), DEFAULT_ADDRESS)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def _api_errors(address: str) -> Iterator[None]:
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        raise JobsApiError(f"Ray Jobs API at {address}: {_first_line(err)} (RAY_AUTH_MODE=token with the "
                           "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
    except (ConnectionError, requests.RequestException) as err:
        raise JobsApiError(f"cannot reach the Ray Jobs API at {address}: {_first_line(err)}") from None
    except RuntimeError as err:  # the client's wrapping of an HTTP error, e.g. a job that does not exist
        raise JobsApiError(f"Ray Jobs API at {address}: {_first_line(err)}") from None


def connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A client of the Jobs API at ``resolve_address(address)``, and that address."""
    from ray.job_submission import JobSubmissionClient

    resolved = resolve_address(address)
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its argument; the
    # address chosen above (the flag first) must win.
    saved = {v: os.environ.pop(v) for v in ADDRESS_VARIABLES if v in os.environ}
    try:
        with _api_errors(resolved):
            return JobSubmissionClient(resolved), resolved
    finally:
        os.environ.update(saved)


def project_root() -> Path:
    """The directory holding ``pyproject.toml`` and the packages: the job's ``working_dir``."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ValueError(f"no pyproject.toml in {root}: submit from a checkout of saeforge (pip install -e)")
    return root


def job_overrides(job: JobConfig, overrides: list[str]) -> list[str]:
    """The overrides the job runs with on the cluster: the user's, plus ``cluster.address=auto``
    unless an address is set, so the job's driver joins the cluster it runs on instead of
    starting one. Relative store paths are refused: the job's working directory is a copy."""
    for name, uri in (("cache.uri", job.cache.uri), ("run.uri", job.run.uri)):
        if uri is not None and "://" not in uri and not Path(uri).is_absolute():
            raise ValueError(f"{name}={uri!r} is a relative path, which a job on a cluster resolves inside its copy of "
                             "the project: give s3://bucket/prefix or an absolute path every node shares")
    return list(overrides) if job.cluster.address else [*overrides, "cluster.address=auto"]


def runtime_env(job: JobConfig, root: Path) -> dict:
    """The job's runtime environment: the project as ``working_dir`` and the config's
    ``JOB_ENV_VARIABLES``, nothing from this machine's environment."""
    values = {"WANDB_MODE": job.logging.wandb_mode}
    return {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES),
            "env_vars": {name: values[name] for name in JOB_ENV_VARIABLES}}


def entrypoint(overrides: list[str]) -> str:
    """The shell command the job runs on the cluster."""
    return shlex.join(["saeforge", "train", *overrides])


def _status_lines(client: JobSubmissionClient, job_id: str) -> tuple[str, str]:
    """(status, message) in the words of ``ray job status``."""
    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    lines = {
        JobStatus.SUCCEEDED: [f"Job '{job_id}' succeeded"],
        JobStatus.STOPPED: [f"Job '{job_id}' was stopped"],
        JobStatus.FAILED: [f"Job '{job_id}' failed"],
    }.get(info.status, [f"Status for job '{job_id}': {info.status}"])
    if info.message and info.status not in (JobStatus.SUCCEEDED, JobStatus.STOPPED):
        lines.append(f"Status message: {info.message}")
    return str(info.status), "\n".join(lines)


def _follow(client: JobSubmissionClient, address: str, job_id: str) -> int:
    """Stream the job's logs until it ends, then its status; 1 if it failed (``ray job submit``'s rule)."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    with _api_errors(address):
        try:
            asyncio.run(tail())
        except KeyboardInterrupt:  # the job goes on: say so, since Ctrl-C on a local run stops it
            sys.stdout.write(f"\nstopped following job '{job_id}', which goes on (saeforge stop {job_id} stops it)\n")
            return 130
        status, text = _status_lines(client, job_id)
    sys.stdout.write(text + "\n")
    return 1 if status == "FAILED" else 0


# --- the commands ---------------------------------------------------------------------------


def _print_estimate(job: JobConfig) -> None:
    try:
        shape = describe_job(job)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (the estimate reads the text and the model's config on this "
                                "machine: --no-estimate skips it)") from None
    sys.stdout.write(format_estimate(job, shape, estimate_cost(job, shape)) + "\n")
    sys.stdout.flush()


def submit(args: argparse.Namespace) -> int:
    from cluster.config import compose_job

    job = compose_job(args.overrides)
    overrides = job_overrides(job, args.overrides)
    compose_job(overrides)  # what the cluster runs must compose too
    env, command = runtime_env(job, project_root()), entrypoint(overrides)
    client, address = (None, "") if args.dry_run else connect(args.address)  # an unreachable cluster fails first
    if not args.no_estimate:
        _print_estimate(job)
    if client is None:
        sys.stdout.write(f"dry run: would submit `{command}` with working_dir {env['working_dir']}\n")
        return 0
    with _api_errors(address):
        job_id = client.submit_job(entrypoint=command, runtime_env=env, submission_id=args.submission_id,
                                   metadata={"saeforge_run": job.run.name or ""})
    sys.stdout.write(
        f"Job '{job_id}' submitted successfully\n"
        f"Next steps\n  saeforge logs --follow {job_id}\n  saeforge status {job_id}\n  saeforge stop {job_id}\n"
    )
    sys.stdout.flush()
    return _follow(client, address, job_id) if args.follow else 0


def status(args: argparse.Namespace) -> int:
    client, address = connect(args.address)
    with _api_errors(address):
        sys.stdout.write(_status_lines(client, args.job_id)[1] + "\n")
    return 0


def logs(args: argparse.Namespace) -> int:
    client, address = connect(args.address)
    if args.follow:
        return _follow(client, address, args.job_id)
    with _api_errors(address):
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def stop(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus

    client, address = connect(args.address)
    sys.stdout.write(f"Attempting to stop job '{args.job_id}'\n")
    with _api_errors(address):
        client.stop_job(args.job_id)
        if args.no_wait:
            return 0
        sys.stdout.write(f"Waiting for job '{args.job_id}' to exit (disable with --no-wait):\n")
        while (current := client.get_job_status(args.job_id)) not in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED):
            sys.stdout.write(f"Job has not exited yet. Status: {current}\n")
            sys.stdout.flush()
            time.sleep(1)
        sys.stdout.write(_status_lines(client, args.job_id)[1] + "\n")
    return 0


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def list_jobs(args: argparse.Namespace) -> int:
    client, address = connect(args.address)
    with _api_errors(address):
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [("SUBMISSION ID", "STATUS", "START", "END", "ENTRYPOINT")]
    for j in jobs:
        command = j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:79] + "…"
        rows.append((j.submission_id or j.job_id or "-", str(j.status), _when(j.start_time), _when(j.end_time), command))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        sys.stdout.write(("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[4]).rstrip() + "\n")
    return 0


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """``submit``, ``status``, ``logs``, ``stop`` and ``list``, each with ``--address``."""

    def command(name: str, help_text: str, func, *, job_id: bool = True) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("--address", default=None, help="the Ray dashboard, e.g. http://head:8265 (default: "
                            f"RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else {DEFAULT_ADDRESS})")
        if job_id:
            parser.add_argument("job_id", help="the submission id that `saeforge submit` printed")
        parser.set_defaults(func=func)
        return parser

    submit_ = command("submit", "validate, estimate the cost and submit `saeforge train` as a Ray job", submit, job_id=False)
    submit_.add_argument("overrides", nargs="*", help="Hydra overrides, as for `saeforge train`")
    submit_.add_argument("--submission-id", default=None, help="the job's id (default: one Ray makes)")
    submit_.add_argument("-f", "--follow", action="store_true", help="stream the logs until the job ends (exit 1 if it failed)")
    submit_.add_argument("--dry-run", action="store_true", help="validate and estimate; submit nothing")
    submit_.add_argument("--no-estimate", action="store_true",
                         help="skip the estimate (it reads the text and the model's config on this machine)")
    command("status", "the status of a job", status)
    logs_ = command("logs", "the logs of a job", logs)
    logs_.add_argument("-f", "--follow", action="store_true", help="follow the logs (like `tail -f`) until the job ends")
    stop_ = command("stop", "stop a job", stop)
    stop_.add_argument("--no-wait", action="store_true", help="return without waiting for the job to exit")
    command("list", "the jobs on the cluster", list_jobs, job_id=False)
