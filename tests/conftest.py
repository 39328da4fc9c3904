"""Shared fixtures: a real S3 endpoint (SeaweedFS ``weed mini``) on 127.0.0.1, on free ports.

``s3_server`` (session) starts one SeaweedFS per test session; ``s3_bucket_uri`` (function)
gives each test a fresh bucket and points the standard AWS environment variables at the server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

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


@pytest.fixture
def engine_factory() -> Iterator[Callable[..., Any]]:
    """``make(sae, *, batch_size, lr, zero_stage=2, lr_multiplier=None)``: a one-rank DeepSpeed
    engine around ``sae``; every engine made is shut down after the test."""
    from trainer.config import DeepSpeedConfig, TrainConfig
    from trainer.engine import shutdown_engine, wrap_in_deepspeed

    made = []

    def make(sae: Any, *, batch_size: int, lr: float, zero_stage: int = 2, lr_multiplier: Any = None) -> Any:
        engine = wrap_in_deepspeed(sae, train_cfg=TrainConfig(batch_size=batch_size),
                                   deepspeed_cfg=DeepSpeedConfig(zero_stage=zero_stage), lr=lr, world_size=1,
                                   lr_multiplier=lr_multiplier)
        made.append(engine)
        return engine

    yield make
    for engine in reversed(made):  # the first made the process group, and removes it last
        shutdown_engine(engine)


# The tiny random Llama + tokenizer fixtures live beside this file.
pytest_plugins = ["tiny_model", "dictionary_folders"]
