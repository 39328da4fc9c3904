"""The one logging set-up of the driver, the ``saeforge`` commands and the trainer workers."""

from __future__ import annotations

import logging

# botocore logs each request's headers at DEBUG, the Authorization header (and so the access key
# id) among them: the HTTP libraries log at INFO at most, whatever the job's level.
_WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def configure_logging(level: str) -> None:
    """The logging set-up of the driver and of the trainer workers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _WIRE_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
