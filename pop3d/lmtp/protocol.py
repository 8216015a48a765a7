"""aiosmtpd's LMTP server with pop3d's limits, and the gate that admits a connection to it.

* Gate (one per accepted connection): a peer outside `lmtp.trusted` hears `554 5.7.1` and is disconnected,
  and so, with `421 4.3.2`, is a connection past `lmtp.max_connections` of this worker; only then is the
  aiosmtpd protocol built (its constructor is not cheap) and handed the transport (`set_protocol`).
  No PROXY header is ever read here, whatever `server.proxy_protocol` says: the MTA connects itself.
* Lines: aiosmtpd refuses a DATA line over 1001 octets (RFC 5321 §4.5.3.1.6), which would bounce real mail
  with long lines that a local delivery agent must keep; here a line may be MAX_LINE octets (the reader's
  buffer bound per connection), command lines stay capped at 512 by aiosmtpd.
* Replies: aiosmtpd's size refusals get the RFC 3463 code `5.3.4` the MTA reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope

from pop3d.config import LmtpSettings
from pop3d.lmtp.handler import DeliveryHandler, Transaction
from pop3d.net.addresses import networks

log = logging.getLogger("pop3d.lmtp")

MAX_LINE = 1024 * 1024

_REWORDED = {
    b"552 Error: Too much mail data": b"552 5.3.4 Message too big for this system",
    b"552 Error: message size exceeds fixed maximum message size": b"552 5.3.4 Message too big for this system",
}


class PopLmtp(LMTP):
    """One LMTP connection."""

    line_length_limit = MAX_LINE

    def __init__(self, handler: DeliveryHandler, cfg: LmtpSettings, hostname: str, on_lost: Callable[[PopLmtp], None],
                 loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        super().__init__(
            handler,
            data_size_limit=cfg.max_message_size,
            hostname=hostname,
            ident="pop3d LMTP",
            timeout=cfg.timeout,
            loop=loop,
        )
        self._on_lost = on_lost

    def _create_envelope(self) -> Envelope:
        return Transaction()

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = status.encode("ascii", "replace")
        await super().push(_REWORDED.get(status, status))

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._on_lost(self)

    def close(self) -> None:
        """Cut the connection (shutdown after the grace period)."""
        if self.transport is not None:
            self.transport.close()


class Gate(asyncio.Protocol):
    """Admit or refuse one connection, then hand the transport to a PopLmtp (see the module docstring)."""

    def __init__(self, handler: DeliveryHandler, cfg: LmtpSettings, hostname: str,
                 live: set[PopLmtp]) -> None:  # fmt: skip
        self.handler, self.cfg, self.hostname, self.live = handler, cfg, hostname, live

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else ""
        if host not in networks(self.cfg.trusted):
            log.warning("lmtp: connection from %s refused: not in lmtp.trusted", host or "?")
            transport.write(b"554 5.7.1 Not authorised to deliver here\r\n")
            transport.close()
            return
        if len(self.live) >= self.cfg.max_connections:
            log.warning("lmtp: connection from %s refused: lmtp.max_connections reached", host)
            transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
            transport.close()
            return
        proto = PopLmtp(self.handler, self.cfg, self.hostname, self.live.discard, asyncio.get_running_loop())
        self.live.add(proto)
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # bytes of a refused peer before the close: ignored
        return None
