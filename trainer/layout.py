"""Where a run's files live: the one module that names them.

A run folder, in the object store (``<runs uri>/<run name>/``)::

    config.json                      the resolved job config, written by the driver at job start
    producers-failed.txt             why the cache fill failed under a training that tailed it
    checkpoints/step-000001200/      one checkpoint: rank-00000.safetensors ..., COMPLETE.json last
    checkpoints/training-failed.json why a worker stopped for good (a restarted group stops at once)
    dictionary/<hookpoint>/          one trained dictionary (below)
    sweep/<variant>/dictionary/<hookpoint>/   the same for each variant of a sweep

A dictionary folder (the layout SAELens 6 loads, plus our own files)::

    sae_weights.safetensors   W_enc, b_enc, W_dec, b_dec (+ threshold), normalisation folded in
    cfg.json                  SAELens config (its presence marks a dictionary folder)
    sparsity.safetensors      log10 firing frequencies
    eval.json                 evaluation figures, merged into by later evaluations
    training_curves.json      the loss/L0/dead-latent curves the report draws
    report.html               the feature report
    report_features.json      the feature cards as data, to redraw the report
    checksums.json            every other file's size and sha256; written last

Every other module takes these names from here; none spells them out. This module imports no
torch, Ray or DeepSpeed: ``saeforge pull`` and the config tools use it cheaply.
"""

from __future__ import annotations

import re

# --------------------------------------------------------------------------- dictionary folder

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"
EVAL_FILE = "eval.json"
TRAINING_CURVES_FILE = "training_curves.json"
REPORT_FILE = "report.html"
FEATURES_FILE = "report_features.json"
CHECKSUMS_FILE = "checksums.json"
DICTIONARY_MARKER = CONFIG_FILE
"""A folder holding this file is a dictionary folder."""

# --------------------------------------------------------------------------- run folder

RUN_CONFIG_FILE = "config.json"
PRODUCERS_FAILED_FILE = "producers-failed.txt"
TRAINING_FAILED_FILE = "training-failed.json"
DICTIONARY_DIR = "dictionary"
SWEEP_DIR = "sweep"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_FILE = "COMPLETE.json"

_STEP_DIR = re.compile(rf"^{CHECKPOINTS_DIR}/step-(\d{{9,}})/(.+)$")


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/p", "x", "y") == "s3://b/p/x/y"`` (empty parts and extra slashes dropped)."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def dictionary_uri(run_uri: str, hookpoint: str, *, variant: str = "") -> str:
    """``<run>/dictionary/<hookpoint>``, or ``<run>/sweep/<variant>/dictionary/<hookpoint>``."""
    if variant:
        return join(run_uri, SWEEP_DIR, variant, DICTIONARY_DIR, hookpoint)
    return join(run_uri, DICTIONARY_DIR, hookpoint)


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
