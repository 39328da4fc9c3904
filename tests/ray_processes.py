"""Finding the processes of a test's own local Ray cluster: they descend from the test's process
(``ray.init`` starts the cluster as its children), so another cluster's on the machine is never
picked."""

from __future__ import annotations

import os
from pathlib import Path


def _parent_pid(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants_titled(title: bytes) -> list[int]:
    """PIDs of this process's descendants whose title starts with ``title`` (Ray titles its
    workers by what they run: ``ray::Producer``, ``ray::RayTrainWorker...``, ``ray::_evaluate_task``)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if not cmdline.read_bytes().startswith(title):
                continue
            pid = ancestor = int(cmdline.parent.name)
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = _parent_pid(ancestor)
        except OSError:  # the process ended while we looked
            continue
        if ancestor == os.getpid():
            pids.append(pid)
    return sorted(pids)
