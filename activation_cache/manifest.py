"""The manifest: the one file readers trust.

``<cache>/manifest.json`` lists the committed shards (row counts, byte sizes, checksums), the
cache key and its inputs, normalisation statistics and whether the cache is complete. A shard
becomes visible only when a manifest listing it is written; the store's ``put_bytes`` is atomic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from activation_cache.store import ObjectNotFound, ObjectStore

MANIFEST_KEY = "manifest.json"


@dataclass
class ShardEntry:
    """One committed shard."""

    name: str
    """Key relative to the cache root, e.g. ``shards/unit-000012.arrow``."""
    rows: int
    size_bytes: int
    sha256: str
    first_sequence_id: int
    """Sequences ``first_sequence_id .. first_sequence_id + n_sequences - 1`` produced this shard."""
    n_sequences: int
    nonfinite_rows: int = 0
    """Rows holding NaN or Inf. They stay in the shard (every token once); the statistics leave
    them out and the trainer skips their batches (``train.nonfinite``)."""


@dataclass
class ActivationStats:
    """Running statistics over every committed row whose values are all finite (``rows`` counts
    those), mergeable shard by shard."""

    rows: int = 0
    norm_sum: float = 0.0
    sum: list[float] = field(default_factory=list)
    sum_sq: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, acts: np.ndarray) -> ActivationStats:
        """Statistics of the finite rows of ``acts`` (n_rows, d_model): one NaN or Inf would make
        the normalisation scale, taken from these, NaN for the whole cache."""
        acts64 = acts.astype(np.float64)
        acts64 = acts64[np.isfinite(acts64).all(axis=1)]
        return cls(
            rows=len(acts64),
            norm_sum=float(np.linalg.norm(acts64, axis=1).sum()),
            sum=acts64.sum(0).tolist(),
            sum_sq=(acts64**2).sum(0).tolist(),
        )

    def merge(self, other: ActivationStats) -> ActivationStats:
        if not self.sum:
            return ActivationStats(other.rows, other.norm_sum, list(other.sum), list(other.sum_sq))
        return ActivationStats(
            rows=self.rows + other.rows,
            norm_sum=self.norm_sum + other.norm_sum,
            sum=(np.asarray(self.sum) + np.asarray(other.sum)).tolist(),
            sum_sq=(np.asarray(self.sum_sq) + np.asarray(other.sum_sq)).tolist(),
        )

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / self.rows if self.rows else float("nan")

    def mean(self) -> np.ndarray:
        return np.asarray(self.sum) / max(self.rows, 1)

    def var(self) -> np.ndarray:
        return np.asarray(self.sum_sq) / max(self.rows, 1) - self.mean() ** 2


@dataclass
class Manifest:
    """The state of one cache."""

    cache_key: str
    key_inputs: dict
    model: str
    revision: str
    hookpoint: str
    d_model: int
    dtype: str
    shards: list[ShardEntry] = field(default_factory=list)
    stats: ActivationStats = field(default_factory=ActivationStats)
    complete: bool = False
    format_version: str = "1"

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def size_bytes(self) -> int:
        return sum(s.size_bytes for s in self.shards)

    @property
    def nonfinite_rows(self) -> int:
        return sum(s.nonfinite_rows for s in self.shards)

    def with_shard(self, entry: ShardEntry, stats: ActivationStats) -> Manifest:
        """A copy listing ``entry`` too (replacing an entry of the same name, never duplicating)."""
        if any(s.name == entry.name for s in self.shards):
            raise ValueError(f"shard {entry.name} is already committed to cache {self.cache_key}")
        shards = sorted([*self.shards, entry], key=lambda s: s.name)
        return Manifest(**{**self.__dict__, "shards": shards, "stats": self.stats.merge(stats)})

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "manifest.json") -> Manifest:
        try:
            raw = json.loads(data)
            raw["shards"] = [ShardEntry(**s) for s in raw["shards"]]
            raw["stats"] = ActivationStats(**raw["stats"])
            return cls(**raw)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{source}: not a valid saeforge manifest ({err})") from None


def load_manifest(store: ObjectStore) -> Manifest | None:
    """The committed manifest of the cache rooted at ``store``, or None if there is none."""
    try:
        data = store.get_bytes(MANIFEST_KEY)
    except ObjectNotFound:
        return None
    return Manifest.from_json(data, source=f"{store.uri}/{MANIFEST_KEY}")


def commit_manifest(store: ObjectStore, manifest: Manifest) -> None:
    """Publish ``manifest``: one atomic write; its shards must already be in the store."""
    store.put_bytes(MANIFEST_KEY, manifest.to_json())


PAIRED_KEY_INPUTS = ("model", "revision", "model_dtype", "dataset", "tokenizer", "tokens_sha256", "context_length",
                     "excluded_token_ids", "sequences_per_shard")
"""The cache key inputs a transcoder's input and target caches (a cross-layer transcoder's every
input and target cache) must share: one forward pass of one model over one token stream fills them
all (the hookpoint, the width and the stored dtype may differ)."""


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_paired_caches(
    input: Manifest, target: Manifest, *, input_uri: str, target_uri: str, target_role: str = "target",
) -> None:
    """Refuse, in one line naming the first difference with both values, two caches that are not
    the input and target of one forward pass: a different model, revision, model dtype, dataset,
    tokenizer, token stream, context length, token exclusion or shard size (those ``key_inputs``
    both manifests record: caches written before a key input existed are compared on the rest),
    or different shards or row counts. Shard lists are compared whole once both caches are
    complete; while either is still being written, the row counts of the shards both list.
    ``target_role`` names the second cache in the message (``"input"`` for a cross-layer
    transcoder's later layer's input cache)."""
    def refuse(what: str, a: object, b: object) -> None:
        raise ValueError(f"input cache {input_uri} has {what}={_shown(a)} but {target_role} cache {target_uri} has "
                         f"{what}={_shown(b)}: a transcoder's caches must come from one forward pass "
                         "over the same tokens")

    for key in ("model", "revision"):
        if getattr(input, key) != getattr(target, key):
            refuse(key, getattr(input, key), getattr(target, key))
    for key in PAIRED_KEY_INPUTS:
        if key in input.key_inputs and key in target.key_inputs and input.key_inputs[key] != target.key_inputs[key]:
            refuse(key, input.key_inputs[key], target.key_inputs[key])
    rows, target_rows = {s.name: s.rows for s in input.shards}, {s.name: s.rows for s in target.shards}
    if input.complete and target.complete and rows.keys() != target_rows.keys():
        name = min(rows.keys() ^ target_rows.keys())
        holder, other = (input_uri, target_uri) if name in rows else (target_uri, input_uri)
        raise ValueError(f"shard {name} is in complete cache {holder} but not in complete cache {other}: a "
                         "transcoder's caches must list the same shards")
    for name in sorted(rows.keys() & target_rows.keys()):
        if rows[name] != target_rows[name]:
            refuse(f"rows of shard {name}", rows[name], target_rows[name])


def check_cache_group(
    inputs: Sequence[tuple[str, Manifest]], targets: Sequence[tuple[str, Manifest]],
) -> None:
    """Refuse a cross-layer transcoder's caches (``(uri, manifest)`` of each layer's input and
    target cache, in layer order) unless one forward pass filled them all: every cache is checked
    against the first input's (``check_paired_caches``), and the input caches share one width, as
    do the target caches."""
    first_uri, first = inputs[0]
    for role, group in (("input", inputs[1:]), ("target", targets)):
        for uri, manifest in group:
            check_paired_caches(first, manifest, input_uri=first_uri, target_uri=uri, target_role=role)
    for role, group in (("input", inputs), ("target", targets)):
        for other_uri, other in group[1:]:
            uri, manifest = group[0]
            if other.d_model != manifest.d_model:
                raise ValueError(f"{role} cache {uri} holds d_model={manifest.d_model} but {role} cache {other_uri} "
                                 f"holds d_model={other.d_model}: a cross-layer transcoder's {role} caches share "
                                 "one width")
