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
_READ = 65536  # plaintext octets per SSLObject.read


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
    """Bytes in, Replies out. Each expected reply is a _Pending, the first one being the greeting.

    TLS (implicit, or after STLS) runs here, over the plain TCP transport, with an ssl.SSLObject on two
    MemoryBIOs: that is what lets a client resume a session (`wrap_bio(session=...)`, which the loops'
    TLS transports do not offer) and it costs one protocol layer less per read than a TLS transport.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.loop = loop
        self.buf = bytearray()
        self.pending: deque[_Pending] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.received = 0
        self.greeting = self.expect(False)
        self._implicit = (tls, server_hostname, session) if tls is not None else None
        self._ssl: ssl.SSLObject | None = None
        self._in = self._out = ssl.MemoryBIO()
        #: resolves when the TLS handshake is done (implicit TLS: at connect; STLS: `start_tls`)
        self.handshake: asyncio.Future[None] | None = None

    def expect(self, multi: bool) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self.pending.append(_Pending(multi, fut))
        return fut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._implicit is not None:
            self.begin_tls(*self._implicit)

    # ---- TLS on memory BIOs --------------------------------------------------------------------------

    def begin_tls(
        self, ctx: ssl.SSLContext, server_hostname: str | None, session: ssl.SSLSession | None = None
    ) -> asyncio.Future[None]:
        """Start the client handshake (resuming `session` when given); bytes from now on are TLS records."""
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname, session=session)
        self.handshake = self.loop.create_future()
        self._tls_step()
        return self.handshake

    @property
    def session(self) -> ssl.SSLSession | None:
        """The newest TLS session (TLS 1.3: from the last ticket read), to resume on the next connection."""
        return None if self._ssl is None else self._ssl.session

    @property
    def session_reused(self) -> bool:
        return self._ssl is not None and self._ssl.session_reused

    def _flush(self) -> None:
        if self._out.pending and self.transport is not None:
            self.transport.write(self._out.read())

    def _tls_step(self) -> None:
        """Advance the handshake, then decrypt whatever application data arrived."""
        sslobj, hs = self._ssl, self.handshake
        assert sslobj is not None and hs is not None
        if not hs.done():
            try:
                sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError) as exc:
                self._flush()
                hs.set_exception(exc)
                self.abort()
                return
            self._flush()
            hs.set_result(None)
        while True:
            try:
                chunk = sslobj.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the server's connection_lost follows
                break
            except (ssl.SSLError, OSError):
                self.abort()
                return
            if not chunk:
                break
            self._feed(chunk)
        self._flush()  # a KeyUpdate answered, say

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        if self._ssl is None:
            self.transport.write(data)
            return
        self._ssl.write(data)
        self.transport.write(self._out.read())

    # ---- replies ----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._ssl is None:
            self._feed(data)
        else:
            self._in.write(data)
            self._tls_step()

    def _feed(self, data: bytes) -> None:
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
        self._write(b"".join(line + b"\r\n" for line, _ in commands))
        return futures

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshake is not None and not self.handshake.done():
            self.handshake.set_exception(ConnectionError("connection closed during the TLS handshake"))
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
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> ClientProtocol:
    """Connect; with `tls`, also finish the TLS handshake (resuming `session` when given)."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: ClientProtocol(loop, tls, server_hostname, session), host, port)
    if proto.handshake is not None:
        try:
            await proto.handshake
        except BaseException:
            proto.greeting.cancel()  # nobody will await it
            proto.abort()
            raise
    return proto


async def start_tls(
    proto: ClientProtocol, ctx: ssl.SSLContext, server_hostname: str | None, session: ssl.SSLSession | None = None
) -> None:
    """Upgrade after a `+OK` to STLS (RFC 2595 §4); the same protocol object keeps receiving."""
    proto.buf.clear()
    await proto.begin_tls(ctx, server_hostname, session)
