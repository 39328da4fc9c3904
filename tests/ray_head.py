"""``ray start`` nodes of a test's own: free ports, their own temp dirs, stopped by their own PIDs.

``ray stop`` stops every Ray process on the machine (other tests' and other users' clusters too),
so a node started here is stopped (or killed) by the session its ``ray start`` ran in (its daemons
stay in it) or a command line naming its temp dir, and their children.

``started_ray_head`` gives a head alone; ``started_ray_cluster`` a head without CPUs (the driver's
node: no work lands there) and worker nodes, all on this machine (``--node-ip-address=127.0.0.1``;
Ray 2.60 lists every node under the machine's own IP), which a test can kill the way a machine
dies (``RayCluster.kill_node``: SIGKILL to everything the node started) and replace
(``RayCluster.add_worker_node``).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class RayWorkerNode:
    """A running worker node (``ray start --address=<head>``)."""

    name: str
    """``worker-<n>``, in the order the cluster started them."""
    node_manager_port: int
    """Its raylet's port: ``ray.nodes()`` lists it as ``NodeManagerPort``, which tells this node
    from the others on 127.0.0.1."""
    num_cpus: int
    temp_root: str
    """The folder under which the node keeps its files (``<temp_root>/ray``); its daemons name it
    on their command lines (its workers retitle themselves ``ray::...``)."""
    session_id: int
    """The session (``setsid``) its ``ray start`` ran in: the raylet, its agents and its workers
    stay in it."""


def ray_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without a Ray address, with token authentication off (Ray 2.60 turns it on
    where a token exists), no usage reporting, and this venv's ``bin`` first on ``PATH``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu", **(extra or {}))
    return env


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for ``bind(0)`` and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Below the kernel's ephemeral range and above Ray's default worker ports (10002-19999, which
# other clusters on this machine use): no port the OS assigns to someone else (a Ray worker bound
# to 0, a gRPC client's source port) can be one of these between our choosing and Ray binding it.
# Chosen from the ephemeral range instead, a node's dashboard agent once found its port taken and
# the raylet, which shares its fate, died before joining (CI, 2026-12-06).
_OWN_PORTS = range(20000, min(_ephemeral_low(), 32768))


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1, free a moment ago, outside the ephemeral range
    (``_OWN_PORTS``); held together while chosen, so no two are the same."""
    sockets: list[socket.socket] = []
    try:
        for port in random.sample(_OWN_PORTS, len(_OWN_PORTS)):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
            if len(sockets) == n:
                return [s.getsockname()[1] for s in sockets]
        raise RuntimeError(f"fewer than {n} free ports in {_OWN_PORTS}")
    finally:
        for sock in sockets:
            sock.close()


def _ray_start(args: list[str], temp_root: str) -> int:
    """Run ``ray start <args>`` in a session of its own; its PID (the session's id) once it returned."""
    log_path = Path(temp_root) / "ray-start.log"
    with log_path.open("w") as log:
        start = subprocess.Popen([str(VENV_BIN / "ray"), "start", *args], env=ray_environment(),
                                 start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert start.wait(timeout=180) == 0, log_path.read_text()
    except BaseException:
        _signal_processes(start.pid, temp_root, signal.SIGKILL)
        raise
    return start.pid


@contextmanager
def started_ray_head(
    *, dashboard: bool = False, num_cpus: int = 1, object_store_bytes: int = 100 * 2**20
) -> Iterator[RayHead]:
    """A head on 127.0.0.1 for the ``with`` block; its processes are stopped and its files removed after."""
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes:
    # a short dir in /tmp, not pytest's tmp_path.
    temp_root = tempfile.mkdtemp(prefix="sf-ray-", dir="/tmp")
    names = ["port", "ray-client-server-port", "dashboard-agent-listen-port", *(["dashboard-port"] if dashboard else [])]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    args = ["--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--include-dashboard={str(dashboard).lower()}", f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_bytes}", "--disable-usage-stats", f"--temp-dir={temp_root}/ray",
            *(f"--{name}={port}" for name, port in ports.items())]
    head = None
    try:
        head = RayHead(f"127.0.0.1:{ports['port']}",
                       f"http://127.0.0.1:{ports['dashboard-port']}" if dashboard else None, temp_root,
                       _ray_start(args, temp_root))
        yield head
    finally:
        if head is not None:
            stop_ray_head(head)
        shutil.rmtree(temp_root, ignore_errors=True)


def start_worker_node(head: RayHead, *, name: str, num_cpus: int = 2,
                      object_store_bytes: int = 100 * 2**20) -> RayWorkerNode:
    """``ray start --address=<head>`` on 127.0.0.1 with ``num_cpus`` CPUs, every port its own and
    free, its files in a temp dir of its own; stop it with ``stop_ray_node`` (or kill it with
    ``kill_ray_node``) and remove ``temp_root`` after."""
    temp_root = tempfile.mkdtemp(prefix="sf-rayw-", dir="/tmp")  # unix socket paths < 108 bytes
    names = ["node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    # Workers bind ports the OS picks (0), not Ray's default range 10002-19999 shared by every
    # cluster on the machine.
    args = [f"--address={head.gcs_address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_bytes}", "--disable-usage-stats", f"--temp-dir={temp_root}/ray",
            "--min-worker-port=0", "--max-worker-port=0", *(f"--{n}={port}" for n, port in ports.items())]
    try:
        session_id = _ray_start(args, temp_root)
    except BaseException:
        shutil.rmtree(temp_root, ignore_errors=True)
        raise
    return RayWorkerNode(name, ports["node-manager-port"], num_cpus, temp_root, session_id)


def _node_processes(session_id: int, temp_root: str) -> dict[int, object]:
    """The processes of one node: those in the session its ``ray start`` ran in or naming its temp
    dir on their command line, and their children; never this process or its parents."""
    import psutil

    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in ours:
                continue
            if os.getsid(proc.pid) == session_id or any(temp_root in a for a in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True) if c.pid not in ours)
        except (psutil.Error, OSError):
            continue
    return found


def _signal_processes(session_id: int, temp_root: str, sig: signal.Signals) -> list[str]:
    """Send ``sig`` to the node's processes; the command lines of those it reached."""
    import psutil

    reached = []
    for proc in _node_processes(session_id, temp_root).values():
        try:
            cmdline = " ".join(proc.cmdline())
            proc.send_signal(sig)
            reached.append(cmdline)
        except psutil.Error:
            pass
    return reached


def stop_ray_node(node: RayHead | RayWorkerNode) -> None:
    """Stop this node's processes only: SIGTERM, then SIGKILL after 5 s."""
    import psutil

    found = _node_processes(node.session_id, node.temp_root)
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


stop_ray_head = stop_ray_node


def kill_ray_node(node: RayWorkerNode) -> list[str]:
    """Kill the node the way a machine dies: SIGKILL, at once, to its raylet, its object store,
    its agents and its workers (and their children), none warned; sweep again for any a dying
    raylet started meanwhile. The command lines of the processes killed."""
    import psutil

    killed = []
    for _ in range(5):
        hit = _signal_processes(node.session_id, node.temp_root, signal.SIGKILL)
        if not hit:
            break
        killed += hit
        psutil.wait_procs(list(_node_processes(node.session_id, node.temp_root).values()), timeout=5)
    return killed


@dataclass
class RayCluster:
    """A head on 127.0.0.1 and the worker nodes alive now (``started_ray_cluster``)."""

    head: RayHead
    worker_cpus: int
    object_store_bytes: int
    nodes: list[RayWorkerNode] = field(default_factory=list)
    """The worker nodes alive, in the order they started."""
    started: list[RayWorkerNode] = field(default_factory=list)
    """Every worker node started, killed ones included (their files are removed at the end)."""

    def add_worker_node(self, attempts: int = 2) -> RayWorkerNode:
        """Start one more worker node; once this process is connected (``ray.init``), wait until
        the cluster lists it alive with its CPUs. A node that does not join (its raylet dies with
        an agent that failed to start, as seen once under CI load) is killed and started afresh,
        up to ``attempts`` times; the last failure names the node's agent log."""
        for attempt in itertools.count(1):
            node = start_worker_node(self.head, name=f"worker-{len(self.started)}", num_cpus=self.worker_cpus,
                                     object_store_bytes=self.object_store_bytes)
            self.started.append(node)
            self.nodes.append(node)
            try:
                self.wait_for_nodes(timeout_s=90)
                return node
            except AssertionError:
                self.kill_node(node)
                if attempt == attempts:
                    raise AssertionError(f"{node.name} did not join in {attempts} starts; its last agent "
                                         f"log: {_log_tail(node, 'dashboard_agent.log')}") from None

    def kill_node(self, node: RayWorkerNode) -> list[str]:
        """SIGKILL every process ``node`` started (``kill_ray_node``); it leaves ``nodes``. The
        command lines of the processes killed."""
        self.nodes.remove(node)
        return kill_ray_node(node)

    def wait_for_nodes(self, timeout_s: float = 120) -> None:
        """Once this process is connected (``ray.init``): wait until every node in ``nodes`` is
        listed alive with its CPUs (a node that just started may not have registered yet)."""
        import ray

        if not ray.is_initialized():
            return
        wanted = {n.node_manager_port for n in self.nodes}
        deadline = time.monotonic() + timeout_s
        while True:
            alive = {n["NodeManagerPort"] for n in ray.nodes()
                     if n["Alive"] and n["Resources"].get("CPU", 0) >= self.worker_cpus}
            if wanted <= alive:
                return
            assert time.monotonic() < deadline, f"worker nodes {sorted(wanted - alive)} did not join within {timeout_s} s"
            time.sleep(0.2)

    def nodes_running(self, title: bytes) -> list[RayWorkerNode]:
        """The live worker nodes of this cluster (never another cluster's) that run a process Ray
        titled ``title...`` (``b"ray::RayTrainWorker"``), in the order of those processes' PIDs."""
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmdline.read_bytes().startswith(title):
                    pids.append(int(cmdline.parent.name))
            except OSError:  # the process ended while we looked
                continue
        nodes = [self.node_of(pid) for pid in sorted(pids)]
        return [node for node in nodes if node is not None]

    def node_of(self, pid: int) -> RayWorkerNode | None:
        """The live worker node process ``pid`` belongs to, if any."""
        for node in self.nodes:
            if pid in _node_processes(node.session_id, node.temp_root):
                return node
        return None


def _log_tail(node: RayWorkerNode, name: str, lines: int = 20) -> str:
    """The last ``lines`` lines of one of the node's Ray logs (``<temp_root>/ray/session_*/logs/<name>``)."""
    found = sorted(Path(node.temp_root, "ray").glob(f"session_*/logs/{name}"))
    return "\n".join(found[-1].read_text(errors="replace").splitlines()[-lines:]) if found else f"(no {name})"


@contextmanager
def started_ray_cluster(
    *, worker_nodes: int = 2, worker_cpus: int = 2, object_store_bytes: int = 100 * 2**20
) -> Iterator[RayCluster]:
    """A head without CPUs (where the driver connects: no task or actor that needs a CPU lands
    there) and ``worker_nodes`` worker nodes of ``worker_cpus`` CPUs, all on 127.0.0.1, for the
    ``with`` block; every node started is stopped and its files removed after."""
    with ExitStack() as stack:
        head = stack.enter_context(started_ray_head(num_cpus=0, object_store_bytes=object_store_bytes))
        cluster = RayCluster(head, worker_cpus, object_store_bytes)

        def stop_workers() -> None:
            for node in cluster.started:
                stop_ray_node(node)
                shutil.rmtree(node.temp_root, ignore_errors=True)

        stack.callback(stop_workers)  # before the head's own exit stops it
        for _ in range(worker_nodes):
            cluster.add_worker_node()
        yield cluster
