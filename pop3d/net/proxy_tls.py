"""Implicit-TLS listeners behind a PROXY-protocol proxy: read the header, then start TLS on the socket.

On port 995 the PROXY header comes before the TLS ClientHello (HAProxy spec §1). asyncio's TLS listeners
read first and would take the header for a broken handshake, and upgrading a transport later (start_tls)
cannot hand over ClientHello octets that arrived in the header's segment. So these listeners accept in
Python, read *exactly* the header from the socket (at least 15 octets are always header: "PROXY UNKNOWN\\r\\n"
is the shortest v1, 16 the v2 minimum; then the v2 length, or v1 octet by octet up to its CRLF), and only
then give the socket to `loop.connect_accepted_socket(..., ssl=...)`, whose TLS layer finds the ClientHello
untouched in the kernel buffer. The ProxyParser does all the validating.

A `ProxiedTlsListener` looks enough like an asyncio Server (`sockets`, `close`, `wait_closed`) for
Pop3Server's bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from pop3d.net.addresses import in_networks
from pop3d.net.proxy import V2_SIGNATURE, ProxyError, ProxyHeader, ProxyParser

log = logging.getLogger("pop3d")

_FIRST = 15  # no valid header is shorter


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ProxyError("connection closed inside the PROXY header")
        buf += chunk
    return buf


async def read_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> ProxyHeader:
    """The PROXY header, read without consuming a single octet after it."""
    parser = ProxyParser()
    first = await _recv_exact(loop, sock, _FIRST)
    header = parser.feed(first)
    if header is None and first[:12] == V2_SIGNATURE[:12]:
        fixed = await _recv_exact(loop, sock, 1)  # octet 16: now the 16-bit length is known
        header = parser.feed(fixed)
        if header is None:
            length = int.from_bytes((first + fixed)[14:16], "big")
            header = parser.feed(await _recv_exact(loop, sock, length))
    while header is None:  # v1: up to its CRLF; the parser refuses anything past 107 octets
        header = parser.feed(await _recv_exact(loop, sock, 1))
    if header.rest:  # cannot happen for a valid header read this way; never pass octets on silently
        raise ProxyError("octets after the PROXY header were consumed")
    return header


def bind(host: str, port: int, backlog: int, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for "host:port" as asyncio's create_server makes them (every address, v6-only);
    `reuse_port`: SO_REUSEPORT, for worker processes sharing the port (pop3d.runtime.workers)."""
    out: list[socket.socket] = []
    try:
        for family, type_, proto, _name, addr in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            s = socket.socket(family, type_, proto)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


class ProxiedTlsListener:
    """Accept loop for one listening socket: trust check, PROXY header, then TLS and the POP3 session."""

    def __init__(
        self,
        sock: socket.socket,
        make_session: Callable[[str], asyncio.Protocol],
        trusted: Callable[[], tuple[str, ...]],
        timeout: Callable[[], float],
        tls_options: dict[str, Any],
    ) -> None:
        self.sockets = [sock]
        self._sock = sock
        self._make = make_session
        self._trusted = trusted
        self._timeout = timeout
        self._tls = tls_options
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        self._task = self._loop.create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        while True:
            try:
                conn, addr = await self._loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed on %s: %s", self._sock.getsockname(), exc)
                await asyncio.sleep(0.1)
                continue
            task = self._loop.create_task(self._connection(conn, addr[0]))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _connection(self, conn: socket.socket, peer: str) -> None:
        conn.setblocking(False)
        try:
            if not in_networks(peer, self._trusted()):
                log.warning("PROXY header refused: peer %s is not in server.proxy_trusted", peer)
                conn.close()
                return
            try:
                header = await asyncio.wait_for(read_header(self._loop, conn), self._timeout())
            except ProxyError as exc:
                log.warning("bad PROXY header from %s: %s", peer, exc)
                conn.close()
                return
            except TimeoutError:
                log.warning("no PROXY header from %s within %.0f s", peer, self._timeout())
                conn.close()
                return
            client = header.source[0] if header.source is not None else peer
            try:
                await self._loop.connect_accepted_socket(lambda: self._make(client), conn, **self._tls)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                log.info("TLS handshake failed rip=%s: %s", client, exc)
                conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError:
            conn.close()

    def close(self) -> None:
        self._task.cancel()
        for task in list(self._pending):
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._task, *self._pending, return_exceptions=True)
