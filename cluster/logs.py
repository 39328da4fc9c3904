"""The one logging set-up of the driver, the ``saeforge`` commands and the trainer workers, and
the silencing of third-party console noise in every process of a job.

``saeforge train``'s console shows our own lines only (``OUR_PACKAGES``, in the driver and,
forwarded by Ray, in its workers); everything else the job's processes say (third-party logs,
Ray's dumps and tracebacks, wandb's chatter) goes to the job's log file,
``<logging.dir>/<run name>/saeforge.log`` (``job_logging``, ``keep_job_log_in``).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.memory import huge_page_allocations

log = logging.getLogger(__name__)

OUR_PACKAGES = ("cluster", "trainer", "activation_cache", "interp", "saeforge")
"""The loggers whose lines a user reads on the console (``saeforge`` is the command's own)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""Every line of ours, in the driver and in the workers: the driver tells the workers' lines of
ours from third-party output Ray forwards by it (``_OUR_LINE``)."""

JOB_LOG_FILE = "saeforge.log"
"""The job's full log, in ``<logging.dir>/<run name>/`` beside its wandb files."""

_OUR_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    rf"(?:{'|'.join(OUR_PACKAGES)})(?:\.\w+)*: "
)

# botocore logs each request's headers at DEBUG, the Authorization header (and so the access key
# id) among them: the HTTP libraries log at INFO at most, whatever the job's level.
_WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def _ours(logger_name: str) -> bool:
    return logger_name.split(".", 1)[0] in OUR_PACKAGES


def _cap_wire_loggers(level: int) -> None:
    for name in _WIRE_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, level))


def configure_logging(level: str) -> None:
    """The logging set-up of the trainer workers and of the commands other than ``train``."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in OUR_PACKAGES:
        logging.getLogger(name).setLevel(level)
    _cap_wire_loggers(logging.getLevelName(level))


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _ours(record.name)


class JobLog(logging.Handler):
    """The job's full log: every record of the driver (DEBUG, third-party included) and every line
    Ray forwards to it from the cluster. Held in memory (the last ``max_held_lines``) until the
    run's log folder is known (``open_in``), then written there as it comes."""

    def __init__(self, max_held_lines: int = 100_000) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._held: collections.deque[str] = collections.deque(maxlen=max_held_lines)
        self._dropped = 0
        self._file: Any = None
        self.path: Path | None = None
        """Where the log is written; None until ``open_in``."""
        self.closed = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - logging's own convention: a bad record must not raise
            self.handleError(record)
            return
        if self._file is not None:
            self._file.write(text)
            return
        if len(self._held) == self._held.maxlen:
            self._dropped += 1
        self._held.append(text)

    def open_in(self, folder: Path) -> None:
        """Write the log to ``folder / JOB_LOG_FILE`` from now on, the lines held so far first; a
        second call leaves it where it is."""
        with self.lock:
            if self._file is not None:
                return
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / JOB_LOG_FILE
            self._file = self.path.open("a", encoding="utf-8", buffering=1)  # line-buffered
            if self._dropped:
                self._file.write(f"({self._dropped} earlier lines were not kept)\n")
            self._file.writelines(self._held)
            self._held.clear()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._held.clear()
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()


class _Console(logging.StreamHandler):
    """Our records on the standard error the process started with, whatever ``sys.stderr`` is now:
    ``saeforge train`` called in-process (tests) keeps only its one-line error on a captured
    ``sys.stderr``, as before the job had a console of its own."""

    @property
    def stream(self) -> Any:
        return sys.__stderr__

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # Above the progress bar, which is cleared and drawn again: a line logged mid-fill (a
        # producer lost) would otherwise start after the bar's last frame, on the bar's line.
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def _prints_to_console(handler: logging.Handler) -> bool:
    """A handler that prints to this process's stdout or stderr: Ray's ``PlainRayHandler`` finds
    ``sys.stderr`` as it emits, transformers' and DeepSpeed's hold the one of their import."""
    from ray._private.log import PlainRayHandler

    if isinstance(handler, PlainRayHandler):
        return True
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, _Console)
            and handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


_job_log: JobLog | None = None
"""The log of the job this process runs (``job_logging``)."""


class _Mute(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def job_logging(level: str) -> Iterator[JobLog]:
    """``saeforge train``'s driver, for the ``with`` block: our records at ``level`` and above on
    the console (stderr); every record, DEBUG and third-party included, in the job's log
    (``JobLog``, opened in the run's folder by ``keep_job_log_in``); Ray's forwarding of the
    cluster's output routed the same way (``route_ray_output``). Enter it once the driver's imports
    are done: third-party loggers they set up to print for themselves (Ray's ``ray``, DeepSpeed's,
    transformers') are muted there and pass their records to the root logger's handlers instead.
    The process's logging is as it was after the block (``saeforge train`` runs in-process in tests)."""
    global _job_log
    root = logging.getLogger()
    mute, muted = _Mute(), [h for h in root.handlers if _prints_to_console(h)]
    propagating = _third_party_consoles()
    for logger, _ in propagating:
        muted += [h for h in logger.handlers if _prints_to_console(h)]
        logger.propagate = True
    for handler in muted:
        handler.addFilter(mute)
    console = _Console()
    console.setLevel(level)
    console.addFilter(_OursOnly())
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    _job_log = JobLog()
    saved_level = root.level
    root.addHandler(console)
    root.addHandler(_job_log)
    root.setLevel(logging.DEBUG)
    _cap_wire_loggers(logging.DEBUG)
    logging.captureWarnings(True)  # third-party warnings.warn: the log, not the console
    unroute = route_ray_output()
    try:
        yield _job_log
    finally:
        unroute()
        logging.captureWarnings(False)
        root.removeHandler(console)
        root.removeHandler(_job_log)
        root.setLevel(saved_level)
        _job_log.close()
        for handler in muted:
            handler.removeFilter(mute)
        for logger, propagate in propagating:
            logger.propagate = propagate


def _third_party_consoles() -> list[tuple[logging.Logger, bool]]:
    """Third-party loggers that print to the console themselves, with their ``propagate``."""
    return [(logger, logger.propagate) for name, logger in list(logging.root.manager.loggerDict.items())
            if isinstance(logger, logging.Logger) and not _ours(name)
            and any(_prints_to_console(h) for h in logger.handlers)]


def keep_job_log_in(folder: Path) -> Path | None:
    """Write the job's log into ``folder`` (the run's log folder, ``<logging.dir>/<run name>``)
    once it is known; its path, or None where no job log is kept (``run_job`` called from Python,
    not through ``saeforge train``)."""
    if _job_log is None or _job_log.closed:
        return None
    _job_log.open_in(folder)
    return _job_log.path


# --------------------------------------------------------------------------- Ray's forwarding

_RAY_OUTPUT = logging.getLogger("ray.output")
"""What Ray forwards to the driver that is not ours: the job's log only."""

_NODE_MARKED_DEAD = re.compile(
    r"The node with node id: (?P<node_id>\w+) and address: (?P<address>\S+) .*?has been marked dead "
    r"because (?P<why>[^.(]+)"
)


def _origin(data: dict) -> str:
    """Ray's prefix for a batch of forwarded lines: ``(RayTrainWorker pid=123, ip=...)``, ``(raylet)``."""
    pid = data.get("pid")
    if pid in ("raylet", "gcs_server", "autoscaler"):
        return f"({pid})"
    name = data.get("actor_name") or data.get("task_name") or ""
    return f"({name}{' ' if name else ''}pid={pid}, ip={data.get('ip')})"


def _note_lost_node(message: str) -> None:
    """One console line for Ray's notice that a node died (the rest of the notice, and the dead
    raylet's last log lines its agent sends, go to the job's log)."""
    dead = _NODE_MARKED_DEAD.search(message)
    if dead is not None:
        log.warning("Ray node %s (node id %s) lost: marked dead because %s", dead["address"],
                    dead["node_id"][:8], dead["why"].strip())


def _routed(print_worker_logs: Callable, autoscaler_events: Callable) -> Callable:
    def print_ours_log_theirs(data: dict, print_file: Any, ignore_prefix: bool = False) -> None:
        lines = data.get("lines") or []
        if data.get("pid") == "autoscaler":  # the monitor's whole log comes: Ray prints its events only
            lines = list(autoscaler_events(lines))
        ours = [line for line in lines if _OUR_LINE.match(line)]
        if len(ours) < len(lines):
            origin = _origin(data)
            for line in lines:
                if not _OUR_LINE.match(line):
                    _RAY_OUTPUT.info("%s %s", origin, line)
            if data.get("pid") == "raylet":
                for line in lines:
                    _note_lost_node(line)
        if ours:
            print_worker_logs({**data, "lines": ours}, print_file, ignore_prefix)

    print_ours_log_theirs.routes = print_worker_logs  # the function it wraps: routed once only
    return print_ours_log_theirs


def route_ray_output() -> Callable[[], None]:
    """On the driver: of what Ray prints for the cluster (the output of every worker process with
    ``log_to_driver``, and the error notices the GCS and the raylets push to every driver: a node
    marked dead, a dead raylet's last log lines with its ``[state-dump]``), only our lines reach the
    console; the rest goes to the job's log. A lost node gets one line of ours (``_note_lost_node``).

    Both paths end in ``ray._private.worker.print_worker_logs``, looked up at each call: the one
    place to route them, as Ray offers no setting that keeps the error notices off the console.
    Returns what undoes it."""
    from ray._private import worker

    if hasattr(worker.print_worker_logs, "routes"):
        return lambda: None
    original = worker.print_worker_logs
    worker.print_worker_logs = _routed(original, worker.filter_autoscaler_events)

    def unroute() -> None:
        worker.print_worker_logs = original

    return unroute


# --------------------------------------------------------------------------- worker processes

# Third-party lines a user can do nothing about, silenced where they are logged and matched by
# their opening words, so that everything else those loggers say still shows.
_NOISE = {
    # Importing DeepSpeed on a machine without a GPU: the CPU is what such a machine has.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # Ray Train's placement-group cleaner polls the State API, which is served by the dashboard
    # the local cluster runs without, and says so every few seconds.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Failed to query Ray Train Controller actor state",
    ),
}


class _DropNoise(logging.Filter):
    def __init__(self, openings: tuple[str, ...]) -> None:
        super().__init__()
        self.openings = openings

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.openings)


def quiet_third_party() -> None:
    """Silence the third-party console noise above in this process: the driver calls it, and
    Ray runs it in every worker process it starts for the job (``WORKER_SETUP_HOOK``). It must
    run before DeepSpeed is imported, which logs at its import."""
    for name, openings in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(openings))
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        # In a worker: Ray's State API, which the cleaner polls, looks for "the" Ray cluster on
        # this machine and, finding several (another user's, a stale one), its thread dies with a traceback.
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    # DeepSpeed's ZeRO gathers with torch.distributed.all_gather_into_tensor, which torch deprecates.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated", category=FutureWarning
    )


class _OurLines(logging.StreamHandler):
    """A worker process's lines of ours, on its stderr in ``LOG_FORMAT`` (Ray Train sets the root
    logger of its processes to print the bare message, which the driver could not tell from
    third-party output)."""


def _our_lines_to_stderr() -> None:
    """In a worker process: our loggers print in ``LOG_FORMAT`` to stderr, which Ray forwards to the
    driver, and not through the root logger; WARNING and above until ``configure_logging`` sets the
    job's level (a trainer worker's)."""
    for name in OUR_PACKAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _OurLines) for h in logger.handlers):
            handler = _OurLines(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def setup_worker_process() -> None:
    """What every worker process of a job does first (``WORKER_SETUP_HOOK``): ask torch's
    allocator for huge pages before anything imports torch (``trainer.memory``), silence the
    third-party noise (``quiet_third_party``) and mark our lines for the driver
    (``_our_lines_to_stderr``)."""
    huge_page_allocations()
    quiet_third_party()
    _our_lines_to_stderr()


WORKER_SETUP_HOOK = f"{__name__}.{setup_worker_process.__name__}"
"""``setup_worker_process`` as Ray's ``runtime_env["worker_process_setup_hook"]`` names it."""
