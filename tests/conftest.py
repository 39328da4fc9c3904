"""Shared fixtures: a real S3 endpoint (SeaweedFS ``weed mini``) on 127.0.0.1, on free ports.

``s3_server`` (session) starts one SeaweedFS per test session; ``s3_bucket_uri`` (function)
gives each test a fresh bucket and points the standard AWS environment variables at the server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from s3_server import S3Server, started_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint on 127.0.0.1 for the whole session, with its own credentials."""
    with started_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)


@pytest.fixture
def s3_bucket_uri(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<fresh bucket>/prefix``, with the AWS_* variables set for this test."""
    from activation_cache.s3 import S3Store

    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"saeforge-test-{uuid.uuid4().hex[:16]}"
    S3Store(f"s3://{bucket}").ensure_bucket()
    return f"s3://{bucket}/prefix"


@pytest.fixture(scope="module")
def ray_cluster(s3_server: S3Server) -> Iterator[str]:
    """One real local Ray cluster (2 CPUs) per test module; yields its session directory (its logs)."""
    import ray

    # Ray workers inherit the environment the local cluster starts with, as they would on a
    # real node; credentials are never passed through the job's config or runtime_env.
    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    context = ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
                       runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}})
    yield context.address_info["session_dir"]
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: tiny matmuls gain nothing from a second one on a busy
    2-core machine, only synchronisation."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The tiny random Llama + tokenizer fixtures live beside this file.
pytest_plugins = ["tiny_model"]
