"""A Hugging Face-format copy of a GGUF model, made once per machine.

Reading a GGUF file costs seconds of Python before any weight moves: transformers parses its
metadata field by field (twice: config and weights), maps every tensor name and de-quantises each
tensor, in every process that loads it (each producer, the evaluation, the driver's tokenizer).
The copy holds the de-quantised float32 weights as safetensors (memory-mapped: a load is a copy
of the bytes), the config and the tokenizer; a model loaded from it equals the one loaded from
the GGUF file bit for bit. It keeps the GGUF source's model id and revision (the fingerprint of
the GGUF file), so cache keys and dictionaries do not depend on which of the two was read.

Copies live under ``$SAEFORGE_MODEL_CACHE`` (default ``~/.cache/saeforge/models``), one folder
per source revision, written to a temporary folder and renamed into place: processes that convert
at once each finish their own and the first rename wins.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

import torch

log = logging.getLogger(__name__)


class _Source(Protocol):
    """What this module reads of ``activation_cache.hooking.ModelSource`` (which imports this
    module: it finds the copy for every load)."""

    directory: Path
    gguf_file: str | None
    model_id: str
    revision: str


Source = TypeVar("Source", bound=_Source)

MODEL_CACHE_ENV = "SAEFORGE_MODEL_CACHE"
COMPLETE_MARKER = "converted.json"


def model_cache_root() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "saeforge" / "models").expanduser()


def copy_folder(source: _Source) -> Path:
    """Where the copy of the GGUF ``source`` lives (whether or not it exists yet)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.model_id).strip("-")
    return model_cache_root() / f"{name}-{source.revision}"


def existing_copy(source: Source) -> Source | None:
    """The copy of a GGUF ``source`` as a source of its own, if it has been made; None otherwise
    (and for a source that is not GGUF)."""
    if source.gguf_file is None:
        return None
    folder = copy_folder(source)
    if not (folder / COMPLETE_MARKER).is_file():
        return None
    return replace(source, directory=folder, gguf_file=None)


def convert(source: Source) -> Source:
    """The copy of a GGUF ``source``, made now if it does not exist yet (a source that is not GGUF
    is its own)."""
    if source.gguf_file is None:
        return source
    found = existing_copy(source)
    if found is not None:
        return found
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder = copy_folder(source)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # readable by every user of the machine, as the package it came from
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype="float32")
        # transformers refuses to save a model it loaded from GGUF: the same weights in a model
        # built from the config without its quantisation record save as any other
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file).save_pretrained(staging)
        marker = {"model_id": source.model_id, "revision": source.revision, "gguf_file": source.gguf_file}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        try:
            staging.rename(folder)
        except OSError:  # another process renamed its copy first
            if not (folder / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s (%s) to %s in %.1f s", source.model_id, source.gguf_file, folder, time.perf_counter() - start)
    return replace(source, directory=folder, gguf_file=None)

