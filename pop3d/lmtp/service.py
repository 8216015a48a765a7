"""The LMTP listeners of one serving process (`lmtp.listen`), beside its POP3 listeners.

The sockets are bound by the supervisor before it forks, one SO_REUSEPORT set per worker like the POP3
ones (pop3d.runtime.listeners), so every worker accepts LMTP from its own queue and the port opens only
when a worker serves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence

from pop3d.auth.base import Authenticator
from pop3d.config import LmtpSettings
from pop3d.lmtp.handler import DeliveryHandler
from pop3d.lmtp.protocol import Gate, PopLmtp
from pop3d.storage.base import Storage

log = logging.getLogger("pop3d.lmtp")

# aiosmtpd logs every command line (recipients included) at INFO on "mail.log": pop3d logs one line per
# delivery itself, so the library speaks only of its own problems
logging.getLogger("mail.log").setLevel(logging.WARNING)


class LmtpService:
    """Serve LMTP on already bound sockets; stop like the POP3 side (grace, then cut)."""

    def __init__(self, settings: Callable[[], LmtpSettings], auth: Callable[[], Authenticator],
                 storage: Callable[[], Storage], hostname: Callable[[], str]) -> None:  # fmt: skip
        self.settings = settings
        self.hostname = hostname
        self.handler = DeliveryHandler(settings, auth, storage, hostname)
        self.servers: list[asyncio.base_events.Server] = []
        self.live: set[PopLmtp] = set()

    def _protocol(self) -> Gate:
        return Gate(self.handler, self.settings(), self.hostname(), self.live)

    async def start(self, sockets: Sequence[socket.socket], backlog: int) -> None:
        """Listen on `sockets` (bound, not yet listening: pop3d.runtime.listeners)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.listen(backlog)
            self.servers.append(await loop.create_server(self._protocol, sock=sock, backlog=backlog))

    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self.servers for s in srv.sockets]

    async def stop(self, grace: float) -> None:
        """Stop accepting; deliveries in progress get `grace` seconds, then their connections are cut (a
        message not yet acknowledged stays with the MTA, which delivers it again)."""
        for srv in self.servers:
            srv.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.live and loop.time() < deadline:  # noqa: ASYNC110 - connections leave from their callbacks
            await asyncio.sleep(0.05)
        for proto in list(self.live):
            proto.close()
        for srv in self.servers:
            await srv.wait_closed()
