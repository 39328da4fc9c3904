"""A real HTTP reverse proxy between S3 clients and an S3 endpoint that injects faults.

``fault_proxy(upstream_url, faults)`` starts one on 127.0.0.1 on a free port and yields the
running :class:`S3FaultProxy`; its ``url`` is the endpoint to give clients. Requests and replies
pass byte for byte (the client's Host header too: SigV4 signs it, and the endpoint checks the
signature against what it receives). For a configured fraction of requests, chosen by a seeded
RNG, the proxy instead:

- ``drop``: closes the connection without forwarding the request;
- ``lost_reply``: forwards the request, then closes without replying (the write happened);
- ``truncate``: forwards, then closes half-way through the reply (through the body, or through
  the head when the body is empty);
- ``error_500`` / ``error_503``: replies ``500 InternalError`` / ``503 SlowDown`` with an S3 XML
  error body, without forwarding;
- ``delay``: holds the reply back ``delay_s`` seconds, then forwards normally.

Targeted modes: every request whose method is in ``fail_methods`` and whose path matches
``fail_key_pattern`` gets ``500 InternalError`` (so retries run out on one named key); and once
more than ``full_after_bytes`` bytes have been PUT, every further PUT gets the reply a full MinIO
gives (``507 XMinioStorageFull``). ``requests``, ``faults``, ``faulted`` and ``served`` count
what happened.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

FAULT_KINDS = ("drop", "lost_reply", "truncate", "error_500", "error_503", "delay")
STORAGE_FULL_MESSAGE = (
    "Storage backend has reached its minimum free drive threshold. Please delete a few objects to proceed."
)
_UPSTREAM_TIMEOUT_S = 60.0
# Hop-by-hop headers are the proxy's own business on each side, never forwarded.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"})


@dataclass(frozen=True)
class Faults:
    """What the proxy does to the requests it forwards; fractions are per request, in [0, 1]."""

    drop: float = 0.0
    lost_reply: float = 0.0
    truncate: float = 0.0
    error_500: float = 0.0
    error_503: float = 0.0
    delay: float = 0.0
    delay_s: float = 0.2
    """How long a delayed reply is held back."""
    seed: int = 0
    max_faults: int | None = None
    """Inject at most this many of the faults above, then forward every request untouched."""
    fail_key_pattern: str | None = None
    """A regex searched in the unquoted request path (``/bucket/key``): matching requests fail."""
    fail_methods: frozenset[str] = field(default_factory=lambda: frozenset({"PUT"}))
    full_after_bytes: int | None = None
    """Refuse PUTs with 507 XMinioStorageFull once more than this many bytes were PUT."""

    def __post_init__(self) -> None:
        fractions = {kind: getattr(self, kind) for kind in FAULT_KINDS}
        bad = {k: v for k, v in fractions.items() if not 0.0 <= v <= 1.0}
        if bad or sum(fractions.values()) > 1.0:
            raise ValueError(f"fault fractions {fractions} must each lie in [0, 1] and sum to at most 1")


class S3FaultProxy(ThreadingHTTPServer):
    """The running proxy: a threaded HTTP/1.1 server (keep-alive) on 127.0.0.1."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream_url: str, faults: Faults):
        upstream = urlparse(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"upstream_url={upstream_url!r}: expected http://host:port")
        self.upstream = (upstream.hostname, upstream.port or 80)
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        """Requests received, by method."""
        self.faults: Counter[str] = Counter()
        """Faults injected, by kind (``FAULT_KINDS``, ``failed_key``, ``storage_full``)."""
        self.faulted: Counter[tuple[str, str, str]] = Counter()
        """Faults injected, by (kind, method, unquoted request path ``/bucket/key``)."""
        self.served: Counter[tuple[str, str]] = Counter()
        """Requests the endpoint answered with 2xx, by (method, unquoted path), the reply
        delivered or not (a PUT counted here was written)."""
        self.bytes_put = 0
        self.configure(faults)
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def configure(self, faults: Faults) -> None:
        """Apply ``faults`` from the next request on (its RNG starts again from its seed, and
        ``max_faults`` counts from ``reset_counters``)."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)
            self._fail_key = re.compile(faults.fail_key_pattern) if faults.fail_key_pattern else None

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.faulted.clear()
            self.served.clear()

    def _choose(self, method: str, path: str) -> str | None:
        """The fault for this request (counted), or None to forward it untouched."""
        with self._lock:
            self.requests[method] += 1
            faults = self._faults
            if self._fail_key is not None and method in faults.fail_methods and self._fail_key.search(path):
                kind: str | None = "failed_key"
            elif method == "PUT" and faults.full_after_bytes is not None and self.bytes_put > faults.full_after_bytes:
                kind = "storage_full"
            else:
                kind, draw = None, self._rng.random()
                for candidate in FAULT_KINDS:
                    draw -= getattr(faults, candidate)
                    if draw < 0:
                        kind = candidate
                        break
                if kind is not None and faults.max_faults is not None:
                    if sum(self.faults[k] for k in FAULT_KINDS) >= faults.max_faults:
                        kind = None
            if kind is not None:
                self.faults[kind] += 1
                self.faulted[kind, method, path] += 1
            return kind

    def _count_served(self, method: str, path: str, body_bytes: int) -> None:
        with self._lock:
            self.served[method, path] += 1
            if method == "PUT":
                self.bytes_put += body_bytes


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: S3FaultProxy

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass  # one line per request would drown the test output

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    # http.server dispatches on the method name.
    def do_GET(self) -> None:  # noqa: N802
        self._proxy()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET  # noqa: N815

    def _read_body(self) -> tuple[bytes, int]:
        """The request body as received (chunked framing kept), and its payload size."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline(65537)
                raw += line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers (botocore puts checksums there), then a blank line
                        trailer = self.rfile.readline(65537)
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                raw += self.rfile.read(size + 2)
            body = bytes(raw)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        decoded = self.headers.get("X-Amz-Decoded-Content-Length")
        return body, int(decoded) if decoded is not None else len(body)

    def _proxy(self) -> None:
        body, payload_bytes = self._read_body()
        path = unquote(urlparse(self.path).path)
        kind = self.server._choose(self.command, path)
        if kind == "drop":
            return self._drop()
        if kind in ("error_500", "failed_key"):
            return self._send_error(500, "InternalError", "We encountered an internal error. Please try again.", path)
        if kind == "error_503":
            return self._send_error(503, "SlowDown", "Please reduce your request rate.", path)
        if kind == "storage_full":
            return self._send_error(507, "XMinioStorageFull", STORAGE_FULL_MESSAGE, path)
        try:
            status, reason, headers, reply = self._forward(body)
        except (OSError, http.client.HTTPException):
            return self._drop()  # the endpoint itself failed: the client sees a dropped connection
        if 200 <= status < 300:
            self.server._count_served(self.command, path, payload_bytes)
        if kind == "lost_reply":
            return self._drop()
        if kind == "delay":
            threading.Event().wait(self.server._faults.delay_s)
        head = self._head(status, reason, headers, len(reply))
        if kind == "truncate":
            # Without a body to cut, cut the status line: a head cut after it would parse as complete.
            cut = head + reply[: len(reply) // 2] if len(reply) >= 2 else head[: len("HTTP/1.1 2")]
            self.wfile.write(cut)
            self.wfile.flush()
            return self._drop()
        self.wfile.write(head + reply)
        self.wfile.flush()

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.server.upstream, timeout=_UPSTREAM_TIMEOUT_S)
            try:
                conn = self._upstream
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        conn.putheader(name, value)
                conn.endheaders()
                if body:
                    conn.send(body)
                response = conn.getresponse()
                reply = response.read()
                headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
                if response.will_close:
                    self._close_upstream()
                return response.status, response.reason, headers, reply
            except (OSError, http.client.HTTPException):
                self._close_upstream()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _head(self, status: int, reason: str, headers: list[tuple[str, str]], body_bytes: int) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in headers:
            lower = name.lower()
            if lower == "transfer-encoding":
                continue  # the body goes out whole, with its length
            if lower == "content-length" and self.command != "HEAD":
                continue
            lines.append(f"{name}: {value}")
        if self.command != "HEAD":
            lines.append(f"Content-Length: {body_bytes}")
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_error(self, status: int, code: str, message: str, path: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
        if self.command == "HEAD":  # a reply to HEAD has no body, only its length
            headers.append(("Content-Length", str(len(xml))))
            xml = b""
        reasons = {500: "Internal Server Error", 503: "Service Unavailable", 507: "Insufficient Storage"}
        self.wfile.write(self._head(status, reasons[status], headers, len(xml)) + xml)
        self.wfile.flush()

    def _drop(self) -> None:
        """Close the client's connection at once, as a crashed server or a middlebox would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def fault_proxy(upstream_url: str, faults: Faults | None = None) -> Iterator[S3FaultProxy]:
    """A proxy to ``upstream_url`` serving in a background thread; stopped on exit."""
    proxy = S3FaultProxy(upstream_url, faults or Faults())
    thread = threading.Thread(target=proxy.serve_forever, name="s3-fault-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()

