"""The `metrics.listen` HTTP endpoint: GET /metrics from one thread running a small asyncio loop.

A thread per connection (prometheus-client's own server) lets idle clients pile up threads without bound.
Here every connection is a coroutine in one thread, with a deadline for its request and for its answer,
and at most `max_connections` of them: a new connection beyond that evicts the oldest one, so idle
connections can never lock a scraper out. The exposition is generated in this thread (it reads the
workers' files in multiprocess mode), never on a POP3 event loop.

The socket is bound by `bind()` before the server drops root (a port below 1024 needs it), and served by
`start()` afterwards; `start_endpoint` in pop3d.ops.metrics does both at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from typing import TYPE_CHECKING

from pop3d.config import parse_hostport

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("pop3d")

IDLE_TIMEOUT = 10.0  # seconds for a request to arrive and for its answer to be taken
MAX_CONNECTIONS = 64
_HEAD_LIMIT = 16 * 1024  # a longer request head is not a scrape


class MetricsEndpoint:
    """A bound metrics socket; serving starts with `start(registry)`, ends with `shutdown()`."""

    def __init__(
        self, sock: socket.socket, idle_timeout: float = IDLE_TIMEOUT, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._registry: CollectorRegistry | None = None
        self._conns: dict[asyncio.StreamWriter, None] = {}  # insertion order: oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def bind(
        cls, listen: str, idle_timeout: float = IDLE_TIMEOUT, max_connections: int = MAX_CONNECTIONS
    ) -> MetricsEndpoint:
        host, port = parse_hostport(listen)
        family, stype, proto, _, addr = socket.getaddrinfo(
            host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return cls(sock, idle_timeout, max_connections)

    @property
    def server_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self, registry: CollectorRegistry) -> None:
        """Serve `registry` from a daemon thread; returns once the endpoint accepts."""
        self._registry = registry
        loop = self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(asyncio.start_server(self._handle, sock=self.sock, limit=_HEAD_LIMIT))
            started.set()
            try:
                loop.run_forever()
            finally:
                server.close()
                for writer in list(self._conns):
                    writer.transport.abort()
                loop.run_until_complete(asyncio.sleep(0))  # let the handlers see the abort
                loop.close()

        self._thread = threading.Thread(target=main, name="pop3d-metrics", daemon=True)
        # The kernel hands a signal sent to the process to any thread that does not block it. A supervisor
        # blocks SIGTERM/SIGHUP in its main thread and takes them with sigtimedwait (pop3d.runtime.workers);
        # had this thread them unblocked, a SIGTERM landing here would kill the server outright, undrained.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        started.wait(10)
        host, port = self.sock.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    def shutdown(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self.sock.close()

    def close_socket(self) -> None:
        """A forked worker's copy of the socket: closed, never served."""
        self.sock.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.max_connections:
            next(iter(self._conns)).transport.abort()  # the oldest one; its handler cleans up
        self._conns[writer] = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
            writer.write(self._answer(head))
            await asyncio.wait_for(writer.drain(), self.idle_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._conns.pop(writer, None)
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        parts = head.split(b"\r\n", 1)[0].split()
        method, path = (parts[0], parts[1].split(b"?", 1)[0]) if len(parts) == 3 else (b"", b"")
        if method not in (b"GET", b"HEAD"):
            return _response(b"405 Method Not Allowed", b"text/plain", b"GET /metrics only\n")
        if path not in (b"/metrics", b"/"):
            return _response(b"404 Not Found", b"text/plain", b"try /metrics\n")
        assert self._registry is not None
        try:
            body = generate_latest(self._registry)
        except Exception:  # a collector failing must not kill the endpoint
            log.exception("metrics: collecting failed")
            return _response(b"500 Internal Server Error", b"text/plain", b"collecting failed\n")
        return _response(b"200 OK", CONTENT_TYPE_LATEST.encode(), b"" if method == b"HEAD" else body, len(body))


def _response(status: bytes, ctype: bytes, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(size).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
