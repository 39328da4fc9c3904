"""``model.dtype=auto``: the dtype the producers run the model in, decided once per job.

bfloat16 where the producers multiply bf16 natively (a GPU with bf16, or a CPU with AMX or AVX-512
BF16: there a bf16 forward is several times an fp32 one), float32 elsewhere (an emulated bf16
GEMM is no faster and less exact). The driver decides before it keys the caches: the dtype is
part of the key, so a bf16 cache is never read as an fp32 one. A local cluster's producers are
processes of this machine, which reports for them; on a cluster with an address, one Ray task per
producer, with a producer's resources, reports from the nodes that run them, and bf16 is chosen
only if every report allows it.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from dataclasses import dataclass

import ray
import torch

from cluster.config import JobConfig
from cluster.errors import JobFailed
from trainer.kernels import NATIVE_BF16_CPU_FLAGS, cpu_flags, native_bf16_matmul

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class ProducerHardware:
    """What a producer's process runs the model on."""

    device: str
    """``cuda`` or ``cpu``."""
    name: str
    """The GPU's or the CPU's model name."""
    bf16_native: bool
    why: str
    """What the decision rests on, for the log."""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def producer_hardware(device: str) -> ProducerHardware:
    """This process's report as a producer on ``device`` (``cuda`` or ``cpu``)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return ProducerHardware("cuda", "no visible GPU", False, "CUDA is not available")
        name = torch.cuda.get_device_name()
        native = native_bf16_matmul("cuda")
        return ProducerHardware("cuda", name, native, "bf16 supported" if native else "no bf16 support")
    flags = sorted(cpu_flags() & NATIVE_BF16_CPU_FLAGS)
    return ProducerHardware("cpu", _cpu_name(), bool(flags),
                            f"{' and '.join(flags)} in /proc/cpuinfo" if flags else f"none of {' or '.join(sorted(NATIVE_BF16_CPU_FLAGS))}")


FIRST_PROBE_TIMEOUT_S = 300.0
"""How long ``model.dtype=auto`` waits for any node of a cluster to report for a producer."""
OTHER_PROBES_TIMEOUT_S = 10.0
"""How long it waits for the other producers' reports after the first."""


def _producer_device(job: JobConfig) -> str:
    return "cuda" if job.cluster.producer_num_gpus > 0 else "cpu"


def _reports(job: JobConfig) -> list[ProducerHardware]:
    device = _producer_device(job)
    if job.cluster.address is None:
        return [producer_hardware(device)]
    c = job.cluster
    probe = ray.remote(num_cpus=c.producer_num_cpus, num_gpus=c.producer_num_gpus,
                       scheduling_strategy="SPREAD", max_retries=1)(producer_hardware)
    refs = [probe.remote(device) for _ in range(c.num_producers)]
    # Never an unbounded wait: the nodes that answer decide; a probe the cluster has no room for
    # (a node lost, or not yet started) is not waited for beyond a few seconds after the first.
    first, _ = ray.wait(refs, num_returns=1, timeout=FIRST_PROBE_TIMEOUT_S)
    if not first:
        for ref in refs:
            ray.cancel(ref)
        raise JobFailed(f"no node of the cluster at {c.address} ran a producer's probe ({c.producer_num_cpus} CPUs, "
                        f"{c.producer_num_gpus} GPUs) within {FIRST_PROBE_TIMEOUT_S:.0f} s: is a node with room for "
                        f"a producer up?")
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=OTHER_PROBES_TIMEOUT_S)
    for ref in waiting:
        ray.cancel(ref)
    if waiting:
        log.info("model.dtype=auto: %d of %d producer probes answered; the others had no room yet", len(ready), len(refs))
    return ray.get(ready)


def resolve_model_dtype(job: JobConfig) -> JobConfig:
    """``job`` with ``model.dtype`` decided if it is ``auto`` (logged), unchanged otherwise. With a
    cluster address, Ray must be initialised."""
    if job.model.dtype != AUTO:
        return job
    reports = _reports(job)
    dtype = "bfloat16" if all(r.bf16_native for r in reports) else "float32"
    seen = "; ".join(sorted({f"{r.name} ({r.why})" for r in reports}))
    log.info("model.dtype=auto -> %s: producers on %s", dtype, seen)
    return dataclasses.replace(job, model=dataclasses.replace(job.model, dtype=dtype))
