"""The first protocol of a connection when `server.proxy_protocol` is on: read the PROXY header, then hand over.

Order matters (HAProxy spec §1): the header precedes any server greeting, so the POP3 session is created
only once the header is parsed, with the *client's* address as its peer; logs, login penalties and metrics
then see the real client. The session then takes the transport over with `transport.set_protocol`, so
this gate costs nothing after the first packet. A peer outside `server.proxy_trusted`, a malformed header
or none within `session.timeout_authorization` seconds: the connection is closed without a word, because
an untrusted peer could otherwise claim any address.

Implicit TLS (port 995) behind a proxy uses pop3d.net.proxy_tls instead: there the header precedes the TLS
ClientHello, so it has to be read off the socket before the TLS layer exists.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pop3d.net.addresses import in_networks
from pop3d.net.proxy import ProxyError, ProxyParser

log = logging.getLogger("pop3d")


class ProxyGate(asyncio.Protocol):
    """Waits for the PROXY header, then replaces itself by `make_session(client_host)`."""

    __slots__ = ("_make", "_parser", "_peer", "_timeout", "_timer", "_transport", "_trusted")

    def __init__(
        self, make_session: Callable[[str], asyncio.Protocol], trusted: tuple[str, ...], timeout: float
    ) -> None:
        self._make = make_session
        self._trusted = trusted
        self._timeout = timeout
        self._parser = ProxyParser()
        self._transport: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "-"

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else str(peer)
        if not in_networks(self._peer, self._trusted):
            log.warning("PROXY header refused: peer %s is not in server.proxy_trusted", self._peer)
            transport.abort()
            return
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        try:
            header = self._parser.feed(data)
        except ProxyError as exc:
            log.warning("bad PROXY header from %s: %s", self._peer, exc)
            self._cancel()
            self._transport.abort()
            return
        if header is None:
            return
        self._cancel()
        client = header.source[0] if header.source is not None else self._peer
        if header.source is not None:
            log.debug("PROXY v%d from %s: client %s port %d", header.version, self._peer, client, header.source[1])
        session = self._make(client)
        transport = self._transport
        transport.set_protocol(session)
        session.connection_made(transport)
        if header.rest and not transport.is_closing():
            session.data_received(header.rest)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        log.warning("no PROXY header from %s within %.0f s", self._peer, self._timeout)
        self._transport.abort()
