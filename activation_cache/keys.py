"""Content-addressed cache keys: the same inputs give the same cache, always."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

KEY_LENGTH = 20


def cache_key(inputs: dict) -> str:
    """Hash of everything that determines the activations (canonical JSON, sha256)."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


def file_fingerprint(path: Path, *, edge_bytes: int = 1 << 20) -> str:
    """Fast fingerprint of a large file: its size plus its first and last megabyte."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(edge_bytes))
        if size > edge_bytes:
            f.seek(max(edge_bytes, size - edge_bytes))
            digest.update(f.read(edge_bytes))
    return digest.hexdigest()[:KEY_LENGTH]


def weights_fingerprint(model_dir: Path) -> str:
    """Fingerprint of a model directory's weights and config files."""
    digest = hashlib.sha256()
    patterns = ("*.safetensors", "*.bin", "*.gguf", "*.json", "*.model")
    for path in sorted(p for pattern in patterns for p in model_dir.glob(pattern)):
        digest.update(path.name.encode())
        digest.update(file_fingerprint(path).encode())
    return digest.hexdigest()[:KEY_LENGTH]
