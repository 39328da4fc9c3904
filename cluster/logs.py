"""The one logging set-up of the driver, the ``saeforge`` commands and the trainer workers, and
the silencing of third-party console noise in every process of a job."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from trainer.memory import huge_page_allocations

# botocore logs each request's headers at DEBUG, the Authorization header (and so the access key
# id) among them: the HTTP libraries log at INFO at most, whatever the job's level.
_WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def configure_logging(level: str) -> None:
    """The logging set-up of the driver and of the trainer workers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _WIRE_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))


# Third-party lines a user can do nothing about, silenced where they are logged and matched by
# their opening words, so that everything else those loggers say still shows.
_NOISE = {
    # Importing DeepSpeed on a machine without a GPU: the CPU is what such a machine has.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # Ray Train's placement-group cleaner polls the State API, which is served by the dashboard
    # the local cluster runs without, and says so every few seconds.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Failed to query Ray Train Controller actor state",
    ),
}


class _DropNoise(logging.Filter):
    def __init__(self, openings: tuple[str, ...]) -> None:
        super().__init__()
        self.openings = openings

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.openings)


def quiet_third_party() -> None:
    """Silence the third-party console noise above in this process: the driver calls it, and
    Ray runs it in every worker process it starts for the job (``WORKER_SETUP_HOOK``). It must
    run before DeepSpeed is imported, which logs at its import."""
    for name, openings in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(openings))
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        # In a worker: Ray's State API, which the cleaner polls, looks for "the" Ray cluster on
        # this machine and, finding several (another user's, a stale one), its thread dies with a traceback.
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    # DeepSpeed's ZeRO gathers with torch.distributed.all_gather_into_tensor, which torch deprecates.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated", category=FutureWarning
    )


def setup_worker_process() -> None:
    """What every worker process of a job does first (``WORKER_SETUP_HOOK``): ask torch's
    allocator for huge pages before anything imports torch (``trainer.memory``), and silence the
    third-party noise (``quiet_third_party``)."""
    huge_page_allocations()
    quiet_third_party()


WORKER_SETUP_HOOK = f"{__name__}.{setup_worker_process.__name__}"
"""``setup_worker_process`` as Ray's ``runtime_env["worker_process_setup_hook"]`` names it."""
