"""A fast POP3 client for load generation: an asyncio.Protocol that matches replies to commands in order.

It never keeps a message body: a multi-line reply is only scanned for its terminating CRLF.CRLF (RFC 1939
§3) and counted, so one client process can drive thousands of sessions. Replies are matched to commands
in the order they were sent, which is what makes pipelining (RFC 2449 §6.6) work: `send` may write many
commands at once and returns one future per command.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import NamedTuple

_TERM = b"\r\n.\r\n"


class Reply(NamedTuple):
    ok: bool
    status: bytes  # the status line without CRLF
    octets: int  # octets of a multi-line body as sent (still dot-stuffed), terminator excluded
    done: float  # time.perf_counter() when the last octet arrived


class _Pending:
    __slots__ = ("body_start", "future", "multi", "scan")

    def __init__(self, multi: bool, future: asyncio.Future[Reply]) -> None:
        self.multi = multi
        self.future = future
        self.body_start = -1  # >= 0 once the +OK status line of a multi-line reply was seen
        self.scan = 0


class ClientProtocol(asyncio.Protocol):
    """Bytes in, Replies out. Each expected reply is a _Pending, the first one being the greeting."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buf = bytearray()
        self.pending: deque[_Pending] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.received = 0
        self.greeting = self.expect(False)

    def expect(self, multi: bool) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self.pending.append(_Pending(multi, fut))
        return fut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.buf += data
        self._parse()

    def _parse(self) -> None:
        buf = self.buf
        while self.pending:
            p = self.pending[0]
            if p.body_start < 0:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                ok = buf.startswith(b"+OK")
                if p.multi and ok:
                    p.body_start = end + 2
                    p.scan = end  # an empty body: the terminator follows the status line directly
                    continue
                status = bytes(buf[:end])
                del buf[: end + 2]
                self._done(Reply(ok, status, 0, time.perf_counter()))
                continue
            term = buf.find(_TERM, p.scan)
            if term < 0:
                p.scan = max(p.body_start - 2, len(buf) - 4)
                return
            status = bytes(buf[: p.body_start - 2])
            octets = term + 2 - p.body_start
            del buf[: term + 5]
            self._done(Reply(True, status, octets, time.perf_counter()))

    def _done(self, reply: Reply) -> None:
        fut = self.pending.popleft().future
        if not fut.done():
            fut.set_result(reply)

    def send(self, commands: list[tuple[bytes, bool]]) -> list[asyncio.Future[Reply]]:
        """Write every command in one write; return the future of each reply, in order."""
        futures = [self.expect(multi) for _, multi in commands]
        assert self.transport is not None
        self.transport.write(b"".join(line + b"\r\n" for line, _ in commands))
        return futures

    def connection_lost(self, exc: Exception | None) -> None:
        while self.pending:
            fut = self.pending.popleft().future
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed by the server"))
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def client_context(cafile: str | None) -> ssl.SSLContext:
    """Verify against `cafile` when given; otherwise encrypt without verifying (a load test, not a mail
    client: test servers usually have self-signed certificates)."""
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def connect(
    host: str, port: int, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> ClientProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: ClientProtocol(loop), host, port, ssl=tls, server_hostname=server_hostname if tls else None
    )
    return proto


async def start_tls(proto: ClientProtocol, ctx: ssl.SSLContext, server_hostname: str | None) -> None:
    """Upgrade after a `+OK` to STLS (RFC 2595 §4); the same protocol object keeps receiving."""
    loop = asyncio.get_running_loop()
    assert proto.transport is not None
    proto.buf.clear()
    new = await loop.start_tls(proto.transport, proto, ctx, server_hostname=server_hostname)
    proto.transport = new
