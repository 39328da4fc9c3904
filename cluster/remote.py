"""One function run as a Ray task on an existing cluster (``saeforge steer --address``): joined,
never started here; a GPU where the cluster has one, as the job's evaluation task runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import ray

from cluster.logs import WORKER_SETUP_HOOK

T = TypeVar("T")


def run_on_cluster(address: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` as one Ray task on the cluster at ``address`` (``host:port`` or
    ``ray://host:10001``); its result comes back. The nodes run the same code (the node image)."""
    ray.init(address=address, log_to_driver=True, runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(fn)
        return ray.get(task.remote(*args, **kwargs))
    finally:
        ray.shutdown()
