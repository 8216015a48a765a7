"""Server-wide state shared by every session: configuration, user database, storage, registries.

One object per server process; sessions hold a reference, never a copy, so per-connection memory stays small.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Callable

from pop3d import __version__
from pop3d.auth import login_delay
from pop3d.auth import penalty

if TYPE_CHECKING:
    from pop3d.auth.base import Authenticator
    from pop3d.config import Settings
    from pop3d.pop3.handlers import Pop3Handler
    from pop3d.pop3.session import Pop3Session
    from pop3d.storage.base import Storage
    from pop3d.net.tls import TlsManager

log = logging.getLogger("pop3d")


class ServerContext:
    """Everything a session needs from its server."""

    def __init__(self, settings: Settings, auth: Authenticator, storage: Storage,
                 tls: TlsManager | None = None) -> None:
        self.settings = settings
        self.tls = tls  # None: no TLS configured (no STLS, no implicit-TLS listeners)
        a = settings.auth
        self.penalty = penalty.create(a.failure_delay, a.failure_delay_max)
        self.secure_networks = [ipaddress.ip_network(n, strict=False) for n in a.secure_networks]
        self.auth = auth
        self.storage = storage
        self.hostname = settings.server.hostname
        self.implementation = f"pop3d-{__version__}"
        self.sessions: set[Pop3Session] = set()
        self.login_delays = login_delay.for_this_process()
        self._counter = itertools.count(1)
        from pop3d.ops.metrics import build

        self.metrics = build(settings.metrics.listen)
        #: called as hook(old, new) after a SIGHUP reload swapped `settings` (TLS plugs its certificates in here)
        self.reload_hooks: list[Callable[[Settings, Settings], None]] = []

    def is_secure_network(self, address: str) -> bool:
        """True when `address` is in auth.secure_networks (cleartext passwords allowed without TLS)."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False  # e.g. a UNIX socket path: not an address we can vouch for
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.secure_networks)

    def apop_timestamp(self) -> str:
        """RFC 1939 §7: a msg-id unique per connection, `<pid.counter.clock@host>`.

        The pid is read each time: worker processes forked after this object was built must differ.
        """
        return f"<{os.getpid()}.{next(self._counter)}.{time.time_ns() // 1000}@{self.hostname}>"

    def log_session_end(self, handler: Pop3Handler) -> None:
        """One line per session end, in the spirit of Dovecot's logout line. Never a password."""
        user = handler.user.name if handler.user is not None else "-"
        c = handler.counters
        fields = {"event": "session_end", "user": user, "rip": handler.peer, "reason": handler.end_reason,
                  "top": c.top, "top_bytes": c.top_bytes, "retr": c.retr, "retr_bytes": c.retr_bytes,
                  "del": c.dele, "messages": len(handler.messages), "size": sum(m.size for m in handler.messages)}
        log.info("session end user=%s rip=%s reason=%s %s", user, handler.peer, handler.end_reason,
                 handler.summary(), extra={"fields": fields})
