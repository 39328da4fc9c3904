"""Fixtures of the cluster tests: one real local Ray cluster per module and the tiny job."""

from __future__ import annotations

import os

import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    # Ray workers inherit the environment the local cluster starts with, as they would on a
    # real node; credentials are never passed through the job's config or runtime_env.
    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}})
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)
