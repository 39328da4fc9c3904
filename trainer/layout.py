"""Where a run's files live: the one module that names them.

A run folder, in the object store (``<runs uri>/<run name>/``)::

    config.json                      the resolved job config, written by the driver at job start
    producers-failed.txt             why the cache fill failed under a training that tailed it
    checkpoints/step-000001200/      one checkpoint: rank-00000.safetensors ..., COMPLETE.json last
    training-failed.json             why a worker stopped for good (a restarted group stops at once)
    dictionary/<hookpoint>/          one trained dictionary (below)
    sweep/<variant>/dictionary/<hookpoint>/   the same for each variant of a sweep
    hookpoints/<hookpoint>/          a job training several hookpoints: each one's checkpoints/ and
                                     training-failed.json

A dictionary folder (the layout SAELens 6 loads, plus our own files)::

    sae_weights.safetensors   W_enc, b_enc, W_dec, b_dec (+ threshold), normalisation folded in
    cfg.json                  SAELens config (its presence marks a dictionary folder)
    sparsity.safetensors      log10 firing frequencies
    eval.json                 evaluation figures, merged into by later evaluations
    training_curves.json      the loss/L0/dead-latent curves the report draws
    report.html               the feature report
    report_features.json      the feature cards as data, to redraw the report
    activation_stats.safetensors   the held-out activations' mean and variance per dimension
    feature_stats.safetensors      each feature's largest held-out activation
    checksums.json            every other file's size and sha256; written last

Every other module takes these names from here; none spells them out. Here too are the rules
of those files: ``checksums.json`` written last and checked on reading, ``eval.json`` merged into
by later evaluations, the run config read back. Folders are anything with the object store's
``get_bytes`` / ``put_bytes`` / ``exists`` (``activation_cache.store.ObjectStore``). This module
imports no torch, Ray or DeepSpeed: ``saeforge pull`` and the config tools use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

# --------------------------------------------------------------------------- dictionary folder

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"
EVAL_FILE = "eval.json"
TRAINING_CURVES_FILE = "training_curves.json"
REPORT_FILE = "report.html"
FEATURES_FILE = "report_features.json"
ACTIVATION_STATS_FILE = "activation_stats.safetensors"
"""The held-out mean and variance that ``observe`` measures a token's relative error against
(``trainer.activation_stats``); dictionaries written before it have none."""
FEATURE_STATS_FILE = "feature_stats.safetensors"
"""Each feature's largest held-out activation, what a steer's ``--value 10x`` multiplies
(``trainer.activation_stats.FeatureStats``); dictionaries written before it have none."""
CHECKSUMS_FILE = "checksums.json"
DICTIONARY_MARKER = CONFIG_FILE
"""A folder holding this file is a dictionary folder."""

# --------------------------------------------------------------------------- run folder

RUNS_DIR = "runs"
"""Where runs go by default: ``<cache.uri>/runs/<run name>/`` (``run.uri`` unset)."""
RUNS_IN_PROGRESS_DIR = "runs-in-progress"
"""In the store's root (``cache.uri``), beside ``caches/`` and ``runs/``: ``<job identity>.json``
names the run a command without ``run.name`` started and has not finished, so that the same
command, run again, continues it (``cluster.runs``)."""
RUN_CONFIG_FILE = "config.json"
PRODUCERS_FAILED_FILE = "producers-failed.txt"
TRAINING_FAILED_FILE = "training-failed.json"
TRAINING_TIMES_FILE = "training-times.json"
"""Beside ``training-failed.json``: when rank 0 entered its loop, began and ended its steps and
finished writing the dictionaries (``time.time()``), for the job's phase split, and each restart
of the worker group (``restarts``): ``cluster.train.training_record``."""
TIMINGS_FILE = "timings.json"
"""In the run folder: seconds per phase of the job's wall time (``cluster.timing``)."""
DICTIONARY_DIR = "dictionary"
SWEEP_DIR = "sweep"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_FILE = "COMPLETE.json"
HOOKPOINTS_DIR = "hookpoints"
"""A job that trains several hookpoints keeps each one's checkpoints in ``hookpoints/<hookpoint>/``."""

_STEP_DIR = re.compile(rf"^{CHECKPOINTS_DIR}/step-(\d{{9,}})/(.+)$")


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/p", "x", "y") == "s3://b/p/x/y"`` (empty parts and extra slashes dropped).

    The same rule as ``activation_cache.store_protocol.join_uri``; trainer/ does not import the
    storage package (tests/test_package_rules.py)."""
    return "/".join([uri.rstrip("/"), *filter(None, (part.strip("/") for part in parts))])


TRANSCODER_FOLDER_JOIN = "-to-"
"""Joins a transcoder's two hookpoints in its folder name (``dictionary_folder_name``)."""


CLT_FOLDER_PREFIX = "clt-"
"""Starts a cross-layer transcoder's folder name (``dictionary_folder_name(..., clt=True)``)."""


def dictionary_folder_name(hookpoint: str, target_hookpoint: str | None = None, *, clt: bool = False) -> str:
    """The folder of a dictionary under ``dictionary/``: its hookpoint, or for a transcoder both
    ends, ``<input>-to-<target>`` (``model.layers.6.mlp:input-to-model.layers.6.mlp``); a
    cross-layer transcoder, given its first layer's input and its last layer's target, is
    ``clt-<first input>-to-<last target>``."""
    if target_hookpoint is None:
        return hookpoint
    return f"{CLT_FOLDER_PREFIX if clt else ''}{hookpoint}{TRANSCODER_FOLDER_JOIN}{target_hookpoint}"


def dictionary_uri(run_uri: str, hookpoint: str, *, variant: str = "") -> str:
    """``<run>/dictionary/<hookpoint>``, or ``<run>/sweep/<variant>/dictionary/<hookpoint>``."""
    if variant:
        return join(run_uri, SWEEP_DIR, variant, DICTIONARY_DIR, hookpoint)
    return join(run_uri, DICTIONARY_DIR, hookpoint)


def split_dictionary_uri(uri: str) -> tuple[str | None, str]:
    """(run folder, sweep variant) of ``<run>/dictionary/<hookpoint>`` or
    ``<run>/sweep/<variant>/dictionary/<hookpoint>``; (None, '') for any other place."""
    parts = uri.rstrip("/").split("/")
    if len(parts) < 3 or parts[-2] != DICTIONARY_DIR:
        return None, ""
    run, variant = parts[:-2], ""
    if len(run) >= 3 and run[-2] == SWEEP_DIR:
        run, variant = run[:-2], run[-1]
    return "/".join(run) or None, variant


def checkpoint_root(run_uri: str, hookpoint: str, *, several_hookpoints: bool) -> str:
    """The folder whose ``checkpoints/`` holds one training's checkpoints: the run, or
    ``<run>/hookpoints/<hookpoint>`` in a job that trains several hookpoints."""
    return join(run_uri, HOOKPOINTS_DIR, hookpoint) if several_hookpoints else run_uri


def checkpoint_dir(step: int) -> str:
    """``checkpoints/step-000001200``: the folder (key prefix) of the checkpoint after ``step`` steps."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    return f"{CHECKPOINTS_DIR}/step-{step:09d}"


def rank_file_key(step: int, rank: int) -> str:
    """Where rank ``rank`` writes its checkpoint state for ``step``."""
    if rank < 0:
        raise ValueError(f"rank={rank} must be >= 0")
    return f"{checkpoint_dir(step)}/rank-{rank:05d}.safetensors"


def complete_marker_key(step: int) -> str:
    """Where rank 0 writes the checkpoint's completion marker, last."""
    return f"{checkpoint_dir(step)}/{COMPLETE_FILE}"


def parse_checkpoint_key(key: str) -> tuple[int, str] | None:
    """``(step, file name)`` of a key below ``checkpoints/step-NNNNNNNNN/``; ``None`` for any other key."""
    match = _STEP_DIR.match(key)
    return (int(match.group(1)), match.group(2)) if match else None


# --------------------------------------------------------------------------- reading and writing


class Folder(Protocol):
    """What this module needs of a folder: ``activation_cache.store.ObjectStore`` has it."""

    uri: str

    def get_bytes(self, key: str) -> bytes:
        """The object; a ``FileNotFoundError`` (the store's ``ObjectNotFound``) if absent."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write the object atomically."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` names an object."""


def _read_optional(folder: Folder, key: str) -> bytes | None:
    try:
        return folder.get_bytes(key)
    except FileNotFoundError:  # the store's ObjectNotFound is one
        return None


def file_checksum(data: bytes) -> dict[str, Any]:
    """One entry of ``checksums.json``: ``{"size_bytes": ..., "sha256": ...}``."""
    return {"size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def checksums_json(files: Mapping[str, bytes]) -> bytes:
    """``checksums.json`` for ``files`` (file name: content): every file's size and sha256."""
    return _checksums_bytes({name: file_checksum(data) for name, data in files.items()})


def _checksums_bytes(sums: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(sorted(sums.items())), indent=1).encode()


def verify_checksums(checksums: bytes, read: Callable[[str], bytes], *, where: str) -> dict[str, bytes]:
    """Every file ``checksums`` lists, read with ``read(name)`` and checked against its size and
    sha256; ``{name: content}``. A ValueError names the first file that differs (``where`` is
    the folder, for the message)."""
    files = {}
    for name, expected in json.loads(checksums).items():
        data = read(name)
        if len(data) != expected["size_bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            actual = hashlib.sha256(data).hexdigest()
            raise ValueError(f"{where}/{name}: {len(data)} bytes with sha256 {actual[:12]}…, "
                             f"{CHECKSUMS_FILE} says {expected['size_bytes']} bytes, {expected['sha256'][:12]}…")
        files[name] = data
    return files


def write_dictionary(folder: Folder, files: Mapping[str, bytes]) -> None:
    """Write a dictionary's files, then ``checksums.json`` (each file's size and sha256), last:
    ``saeforge pull`` takes a folder without it for one still being written."""
    for name, data in files.items():
        folder.put_bytes(name, data)
    folder.put_bytes(CHECKSUMS_FILE, checksums_json(files))


def rewrite_files(folder: Folder, files: Mapping[str, bytes]) -> None:
    """Replace some files of a written dictionary; ``checksums.json``, if the folder has one, is
    rewritten after them with their new checksums."""
    for name, data in files.items():
        folder.put_bytes(name, data)
    checksums = _read_optional(folder, CHECKSUMS_FILE)
    if checksums is not None:
        sums = json.loads(checksums)
        sums.update({name: file_checksum(data) for name, data in files.items()})
        folder.put_bytes(CHECKSUMS_FILE, _checksums_bytes(sums))


def _json_safe(value: Any) -> Any:
    # JSON has no NaN or infinity (CE recovered is NaN when ablating changes nothing).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def eval_json(evaluation: Mapping[str, Any]) -> bytes:
    """``eval.json``'s bytes: NaN and infinities (at any depth) written as null."""
    return json.dumps(_json_safe(dict(evaluation)), indent=2, sort_keys=True, allow_nan=False).encode()


def read_eval(folder: Folder) -> dict[str, Any]:
    """The dictionary's ``eval.json``."""
    return json.loads(folder.get_bytes(EVAL_FILE))


def merged_eval(folder: Folder, sections: Mapping[str, Any]) -> bytes:
    """The folder's ``eval.json`` (empty if it has none) with ``sections`` merged in at the top
    level (the figures it held under other keys stay), as ``eval_json`` writes it."""
    existing = _read_optional(folder, EVAL_FILE)
    merged = json.loads(existing) if existing is not None else {}
    merged.update(sections)
    return eval_json(merged)


def run_config_json(config: Mapping[str, Any]) -> bytes:
    """``<run>/config.json``'s bytes for the resolved job config (a plain dict, no credentials)."""
    return json.dumps(dict(config), indent=1, sort_keys=True).encode()


def read_run_config(run: Folder) -> dict[str, Any] | None:
    """The resolved job config the driver wrote at ``<run>/config.json``, as a plain dict; None if
    the run has none."""
    data = _read_optional(run, RUN_CONFIG_FILE)
    return None if data is None else json.loads(data)
