"""Failures a job stops with, each naming its cause in one line (the CLI prints it, exit 2)."""

from __future__ import annotations


class JobFailed(RuntimeError):
    """The job cannot go on; the message names what failed and why."""


class ProducerFailed(JobFailed):
    """Filling the cache stopped: a work unit failed too often, or no producer is left."""
