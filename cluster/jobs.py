"""``saeforge submit | status | logs | stop | list``: the training job on a Ray cluster, through
the Ray Jobs API.

``submit`` validates the config (``compose_job``), prints the cost estimate of
``cluster.estimate`` (worked out from the text and the model's config; no weights load), and
submits ``saeforge train <overrides>`` as a Ray job: the project directory travels as the job's
``working_dir`` (Ray puts it first on every job process's ``PYTHONPATH``, so the cluster runs the
code that was submitted), and the nodes supply the Python environment (the ``saeforge`` image,
or a venv on ``PATH`` when the node started) and the credentials (``AWS_*``, ``WANDB_API_KEY`` in
their own environment; never in the job).

The other commands follow ``ray job status|logs|stop|list``: the same arguments and messages.
The address is ``--address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``, else the
dashboard on this machine. Ray is imported only by the commands that talk to a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

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
    from cluster.estimate import describe_job, estimate_cost, format_estimate

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
