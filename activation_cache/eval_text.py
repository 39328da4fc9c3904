"""The text a trained dictionary is evaluated on: the held-out sequences of its run, or a text
given instead. The spliced evaluation (``cluster.evaluation``) and the steer audit
(``interp.audit``) read the same held-out sequences the cache held out of training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from activation_cache.config import DataConfig
from activation_cache.plan import holdout_count
from activation_cache.producing import split_units
from activation_cache.text import excluded_token_ids, pack_sequences

__all__ = ["EvalText", "held_out_text", "text_source"]


@dataclass(frozen=True)
class EvalText:
    """The sequences a dictionary is evaluated on."""

    tokens: np.ndarray
    """Token ids (n_sequences, context_length)."""
    sequence_ids: np.ndarray
    """(n_sequences,) each sequence's index in the job's packed token stream (the cache's ``sequence_id``)."""
    excluded_token_ids: frozenset[int]
    """Tokens whose activations are neither replaced nor scored."""
    source: str
    """Where the text came from, for the report."""


def held_out_text(
    tokens: np.ndarray, *, sequences_per_shard: int, holdout_fraction: float, max_tokens: int,
    excluded: frozenset[int], source: str,
) -> EvalText:
    """The sequences of the held-out work units (the last ``ceil(holdout_fraction * n_units)``,
    the shards ``activation_cache.plan.split_holdout`` holds out), the first ``max_tokens // context``
    of them (at least one)."""
    units = split_units(tokens, sequences_per_shard)
    held = units[-holdout_count(len(units), holdout_fraction):]
    rows = np.concatenate([u.tokens for u in held])
    ids = np.concatenate([np.arange(u.first_sequence_id, u.first_sequence_id + len(u.tokens)) for u in held])
    n = max(1, max_tokens // tokens.shape[1])
    return EvalText(rows[:n], ids[:n], excluded, f"held-out units of {source}")


def text_source(data: DataConfig, source: str, max_tokens: int, tokenizer: Any) -> EvalText:
    """All of ``source`` (up to ``max_tokens``, at least one sequence), packed as the job packs its text."""
    data = dataclasses.replace(data, source=source, max_tokens=max(max_tokens, data.context_length))
    tokens = pack_sequences(data, tokenizer)
    return EvalText(tokens, np.arange(len(tokens)), excluded_token_ids(data, tokenizer), source)
