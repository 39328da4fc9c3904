"""A ``ray start --head`` of a test's own: free ports, its own temp dir, stopped by its own PIDs.

``ray stop`` stops every Ray process on the machine (other tests' and other users' clusters too),
so a head started here is stopped by the session ``ray start`` ran in (its daemons stay in it) or
a command line naming its temp dir, and their children.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ranks import free_port

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class RayHead:
    """A running head node."""

    gcs_address: str
    """``127.0.0.1:<port>``: what ``ray.init(address=...)`` takes."""
    dashboard_url: str | None
    """``http://127.0.0.1:<port>`` when started with the dashboard (the Jobs API), else None."""
    temp_root: str
    """``RAY_TMPDIR`` under which this head keeps its files (``<temp_root>/ray``), its
    ``ray_current_cluster`` marker among them: a process run with ``RAY_TMPDIR=temp_root`` finds
    this head as "the cluster last started on the machine"; no other process does."""
    session_id: int


def ray_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without a Ray address, with token authentication off (Ray 2.60 turns it on
    where a token exists), no usage reporting, and this venv's ``bin`` first on ``PATH``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu", **(extra or {}))
    return env


@contextmanager
def started_ray_head(
    *, dashboard: bool = False, num_cpus: int = 1, object_store_bytes: int = 100 * 2**20
) -> Iterator[RayHead]:
    """A head on 127.0.0.1 for the ``with`` block; its processes are stopped and its files removed after."""
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes:
    # a short dir in /tmp, not pytest's tmp_path.
    temp_root = tempfile.mkdtemp(prefix="sf-ray-", dir="/tmp")
    names = ["port", "ray-client-server-port", "dashboard-agent-listen-port", *(["dashboard-port"] if dashboard else [])]
    ports = {name: free_port() for name in names}
    command = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--include-dashboard={str(dashboard).lower()}", f"--num-cpus={num_cpus}",
               f"--object-store-memory={object_store_bytes}", "--disable-usage-stats", f"--temp-dir={temp_root}/ray",
               *(f"--{name}={port}" for name, port in ports.items())]
    log_path = Path(temp_root) / "ray-start.log"
    with log_path.open("w") as log:
        start = subprocess.Popen(command, env=ray_environment(), start_new_session=True, stdout=log,
                                 stderr=subprocess.STDOUT)
    head = RayHead(f"127.0.0.1:{ports['port']}",
                   f"http://127.0.0.1:{ports['dashboard-port']}" if dashboard else None, temp_root, start.pid)
    try:
        assert start.wait(timeout=180) == 0, log_path.read_text()
        yield head
    finally:
        stop_ray_head(head)
        shutil.rmtree(temp_root, ignore_errors=True)


def stop_ray_head(head: RayHead) -> None:
    """Stop this head's processes only: SIGTERM, then SIGKILL after 5 s."""
    import psutil

    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in ours:
                continue
            if os.getsid(proc.pid) == head.session_id or any(head.temp_root in a for a in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True) if c.pid not in ours)
        except (psutil.Error, OSError):
            continue
    for proc in found.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
