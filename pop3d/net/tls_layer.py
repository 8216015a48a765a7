"""Implicit TLS (RFC 8314 §3.3) as a thin protocol layer: an ssl.SSLObject on two MemoryBIOs between the
socket transport and the POP3 session, which sees an ordinary transport.

Why not the event loop's TLS transport (`create_server(ssl=...)`): uvloop's SSLProtocol mallocs a 256 KiB
read buffer per connection, and the pages the kernel writes into stay resident while the session idles.
With 20,000 idle TLS sessions that was about 13 KiB of each one's 44 KiB; here the socket transport reads
into the loop's one shared buffer and a session costs its SSLObject (OpenSSL's state, about 16 KiB with
SSL_MODE_RELEASE_BUFFERS, which CPython sets) plus this object. Everything else is the loop's usual work:
the handshake runs as bytes arrive, `tls.handshake_timeout` cuts a client that stalls it, the session is
made only once the handshake is done (so its greeting is the first application data, RFC 8314 §3.3), and
flow control passes through in both directions (`pause_reading` holds decrypted data back, so a session
waiting on a password check or the maildrop receives nothing, as with any transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

#: plaintext octets asked of SSLObject.read at a time: one TLS record at most (RFC 8446 §5.1)
_READ = 16384


class TlsLayer(asyncio.Protocol):
    """The server side of one implicit-TLS connection; `make_session()` is called after the handshake."""

    __slots__ = (
        "_app",
        "_batching",
        "_closing",
        "_in",
        "_loop",
        "_make",
        "_out",
        "_paused",
        "_raw",
        "_ssl",
        "_timer",
        "_transport",
    )

    def __init__(
        self, make_session: Callable[[], asyncio.Protocol], context: ssl.SSLContext, handshake_timeout: float
    ) -> None:
        self._make: Callable[[], asyncio.Protocol] | None = make_session
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self._app: asyncio.Protocol | None = None
        self._transport: _TlsTransport | None = None
        self._raw: asyncio.Transport | None = None
        self._paused = False  # the session asked for no data
        self._closing = False
        self._batching = False  # inside data_received: small writes wait for its one flush at the end
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(handshake_timeout, self._handshake_expired)

    # ---- from the socket -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """The handshake or the session's input. What they write meanwhile leaves in one write at the end
        (one send system call, one segment): the session ticket with the greeting, pipelined replies
        together, the last reply with close_notify. The session already batches its own replies; each
        `write` here would otherwise be a send of its own."""
        if self._closing:  # the session closed: like a closed transport, deliver nothing more
            return
        self._in.write(data)
        self._batching = True
        try:
            if self._app is None:
                self._handshake()
            if self._app is not None and not self._paused:
                self._deliver()
        finally:
            self._batching = False
            self._flush()

    def eof_received(self) -> bool:
        if self._app is not None:
            self._app.eof_received()
        return False  # the socket transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._closing = True
        if self._app is not None:
            app, self._app = self._app, None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # ---- TLS ---------------------------------------------------------------------------------------------

    def _handshake(self) -> None:
        raw = self._raw
        assert raw is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError):
            self._flush()  # the alert, if OpenSSL wrote one
            self._cancel_timer()
            raw.close()
            return
        self._cancel_timer()  # the handshake's last output (a session ticket) leaves with the greeting
        self._transport = _TlsTransport(self)
        make, self._make = self._make, None  # a closure per connection: not kept for the session's life
        assert make is not None
        self._app = make()
        self._app.connection_made(self._transport)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self._app is None and self._raw is not None:
            self._raw.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deliver(self) -> None:
        """Decrypt what arrived and hand it to the session, one call per record, until it pauses."""
        while self._app is not None and not self._paused:
            try:
                data = self._ssl.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except (ssl.SSLError, OSError):
                if self._raw is not None:
                    self._raw.abort()
                return
            if not data:  # close_notify (CPython returns b"" for it): answer it and close, as at an EOF
                self.close()
                return
            self._app.data_received(data)
            if not self._in.pending and not self._ssl.pending():
                break  # nothing left to decrypt: spare the read that would raise SSLWantReadError
        self._flush()  # a post-handshake message answered (TLS 1.3 KeyUpdate)

    def _flush(self) -> None:
        if self._out.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._out.read())

    # ---- for _TlsTransport ------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send, one record's worth at a time: a MemoryBIO never gives back the capacity it
        grew to, so handing it a 256 KiB slice at once would leave that much (and a third) with the session
        for the rest of its life."""
        if self._closing or self._raw is None:
            return
        if len(data) <= _READ:
            self._ssl.write(data)
            if not self._batching or self._out.pending > _READ:  # at most about two records wait
                self._flush()
            return
        view = memoryview(data)
        for start in range(0, len(view), _READ):
            self._ssl.write(view[start : start + _READ])
            self._flush()

    def close(self, abort: bool = False) -> None:
        if self._closing or self._raw is None:
            return
        self._closing = True
        if abort:
            self._raw.abort()
            return
        with contextlib.suppress(ssl.SSLError, OSError):
            self._ssl.unwrap()  # writes our close_notify; the peer's is not waited for (RFC 8446 §6.1)
        self._flush()
        self._raw.close()

    def pause_reading(self) -> None:
        self._paused = True
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()
            self._loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self._app is not None and not self._paused:
            self._deliver()  # records decrypted-but-held while paused

    def raw(self) -> asyncio.Transport:
        assert self._raw is not None
        return self._raw

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl


class _TlsTransport(asyncio.Transport):
    """What the session writes to: plaintext in, records out through the layer."""

    __slots__ = ("_layer",)

    def __init__(self, layer: TlsLayer) -> None:
        # no Transport.__init__: its `_extra` dict (64 octets per session) serves only the get_extra_info
        # overridden below
        self._layer = layer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._layer.write(data)

    def close(self) -> None:
        self._layer.close()

    def abort(self) -> None:
        self._layer.close(abort=True)

    def is_closing(self) -> bool:
        return self._layer.is_closing()

    def pause_reading(self) -> None:
        self._layer.pause_reading()

    def resume_reading(self) -> None:
        self._layer.resume_reading()

    def is_reading(self) -> bool:
        return not self._layer._paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._layer.raw().set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._layer.raw().get_write_buffer_size() + self._layer._out.pending

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self._layer.ssl_object()
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return sslobj.context
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "cipher":
            return sslobj.cipher()
        if name == "compression":
            return sslobj.compression()
        return self._layer.raw().get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._layer._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._layer._app is not None
        return self._layer._app
