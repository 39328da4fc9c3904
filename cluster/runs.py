"""Which run a ``saeforge train`` trains: ``run.name``, or without one the run the same command
left unfinished, or a new one.

Without ``run.name`` a run is named from the time and its first cache key, so each invocation
would start a new run: a command run again after its driver was killed would train from scratch.
Instead, while such a run is in progress, a small record in the store's root
(``runs-in-progress/<job identity>.json``) names it. The job identity hashes the resolved config
without the run's name (``run.name``, ``resume``) and the keys of the caches the job reads, so it is
the same for the same command on the same inputs. The record holds the run's name, when it first
started and its driver (``activation_cache.lease.Holder``, as the writer lease names its holder):

- a job that finds no record starts a new run and writes one (a conditional put: of two identical
  commands started at once, one writes it);
- a job that finds one whose driver ran on this host and is gone continues that run (its cache
  resumes from the committed shards, its training from the newest complete checkpoint) and takes
  the record over;
- a job that finds one whose driver is alive, or ran on another host (where this one cannot tell),
  starts a new run beside it and leaves the record alone;
- the job that finishes the run removes the record, also one that finished it under its name
  (``resume=<name>``): the same command, run again after that, starts a new run.

A job that fails keeps its record: once its process is gone, the same command continues the run.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass

from activation_cache.keys import cache_key
from activation_cache.lease import Holder
from activation_cache.store import ObjectNotFound, ObjectStore
from cluster.config import JobConfig, to_dict
from trainer.layout import RUNS_IN_PROGRESS_DIR

log = logging.getLogger(__name__)


def job_identity(job: JobConfig, cache_keys: list[str]) -> str:
    """What makes two invocations the same command: the resolved config without the run's name,
    and the keys of the caches the job reads (the config names the text and the model by path
    only; the keys hash their content)."""
    config = to_dict(job)
    del config["run"]["name"], config["resume"]
    return cache_key({"config": config, "caches": cache_keys})


def new_run_name(first_cache_key: str) -> str:
    """A new run's name: the time and the start of the job's first cache key."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{first_cache_key[:8]}"


@dataclass(frozen=True)
class RunRecord:
    """``runs-in-progress/<job identity>.json``: the run in progress and the driver training it."""

    run_name: str
    started: str
    """When the run first started (the driver's local time), for the log line of a job that continues it."""
    holder: Holder

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunRecord | None:
        """The record, or None for an unreadable one (a new run replaces it)."""
        try:
            raw = json.loads(data)
            return cls(run_name=raw["run_name"], started=raw["started"], holder=Holder(**raw["holder"]))
        except (ValueError, TypeError, KeyError):
            return None


def _read(root: ObjectStore, key: str) -> tuple[RunRecord | None, str | None]:
    """The record at ``key`` and its version; (None, None) when there is none."""
    try:
        data, version = root.get_versioned(key)
    except ObjectNotFound:
        return None, None
    record = RunRecord.from_json(data)
    if record is None:
        log.warning("%s/%s is unreadable: a new run replaces it", root.uri, key)
    return record, version


@dataclass(frozen=True)
class RunInProgress:
    """The run a job trains, and where the record naming it lives."""

    name: str
    root: ObjectStore
    """The store's root (``cache.uri``)."""
    key: str
    """``runs-in-progress/<job identity>.json``."""
    owner: str | None
    """The holder's owner id of the record this job wrote; None when it wrote none (``run.name``
    given, or a run started beside a live one)."""

    def finished(self) -> None:
        """Remove the record if it names this run and is this job's, or its driver is gone (a run
        interrupted, then finished with ``resume=<name>``): the same command now starts a new run."""
        record, _ = _read(self.root, self.key)
        if record is None or record.run_name != self.name:
            return
        if record.holder.owner == self.owner or record.holder.process_is_gone():
            self.root.delete(self.key)


def start_run(job: JobConfig, root: ObjectStore, cache_keys: list[str]) -> RunInProgress:
    """The run ``job`` trains: ``run.name`` if given; else the run the same command left unfinished
    when its driver (on this host) is gone, said in one log line; else a new run, recorded as in
    progress until it finishes."""
    key = f"{RUNS_IN_PROGRESS_DIR}/{job_identity(job, cache_keys)}.json"
    if job.run.name is not None:
        return RunInProgress(job.run.name, root, key, owner=None)
    record, version = _read(root, key)
    if record is not None and not record.holder.process_is_gone():
        return _beside(record, root, key, cache_keys[0])
    name = record.run_name if record is not None else new_run_name(cache_keys[0])
    mine = RunRecord(name, record.started if record is not None else time.strftime("%Y-%m-%d %H:%M:%S"),
                     Holder.this_process(name))
    if root.put_if(key, mine.to_json(), version=version) is None:  # an identical command got there first
        return _beside(_read(root, key)[0], root, key, cache_keys[0])
    if record is not None:
        log.info("continuing run %s (started %s), interrupted: its driver, pid %d on %s, is gone; "
                 "give run.name=<a new name> to start another", name, record.started, record.holder.pid,
                 record.holder.host)
    return RunInProgress(name, root, key, owner=mine.holder.owner)


def _beside(other: RunRecord | None, root: ObjectStore, key: str, first_cache_key: str) -> RunInProgress:
    """A new run beside the one of the same command another driver holds (alive, or on another host)."""
    name = new_run_name(first_cache_key)
    if other is not None and name == other.run_name:  # started within the same second
        name = f"{name}-{uuid.uuid4().hex[:4]}"
    if other is not None:
        log.info("run %s of the same command is in progress (driver pid %d on %s): starting run %s beside it "
                 "(resume=%s continues that one if it was interrupted)", other.run_name, other.holder.pid,
                 other.holder.host, name, other.run_name)
    return RunInProgress(name, root, key, owner=None)
