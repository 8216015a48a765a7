"""Everything a server does while it may still be root: made before privileges drop, before any fork.

Sockets (systemd's, or bound here: pop3d.runtime.listeners), the TLS key and certificates, the metrics
port. What comes after the drop (the user database, maildrops, the shared files of the workers) is opened
with the unprivileged user's rights.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pop3d.config import Settings
from pop3d.runtime import systemd
from pop3d.runtime.listeners import ListenError, close, open_listeners
from pop3d.runtime.systemd import Inherited

if TYPE_CHECKING:
    from pop3d.net.tls import TlsManager
    from pop3d.ops.endpoint import MetricsEndpoint


@dataclass
class Bound:
    """What one serving process gets: its listening sockets and the TLS state read while root."""

    sockets: list[Inherited]
    activated: bool = False  # the sockets came from systemd
    tls: TlsManager | None = None
    listener_ssl: ssl.SSLContext | None = None  # for implicit-TLS listeners
    metrics: MetricsEndpoint | None = None  # bound, not yet serving; None in workers
    lmtp: list[Inherited] = field(default_factory=list)  # `lmtp.listen` (pop3d.lmtp.service), bound by us


@dataclass
class Prepared:
    """All of it for a whole server: one set of sockets per worker slot (one set for `workers = 1`)."""

    slots: list[list[Inherited]]
    addresses: list[tuple[str, int, bool]]  # (host, port, implicit TLS) as bound
    activated: bool
    tls: TlsManager | None = None
    listener_ssl: ssl.SSLContext | None = None
    metrics: MetricsEndpoint | None = None
    lmtp: list[list[Inherited]] = field(default_factory=list)  # one set per worker slot, like `slots`
    closed: bool = field(default=False, init=False)

    def for_slot(self, slot: int, with_metrics: bool = False) -> Bound:
        return Bound(
            self.slots[slot],
            self.activated,
            self.tls,
            self.listener_ssl,
            self.metrics if with_metrics else None,
            self.lmtp[slot] if self.lmtp else [],
        )

    def close_listeners(self) -> None:
        """Our own copies of the bound sockets (systemd's stay: the manager owns them)."""
        if not self.closed:
            if not self.activated:
                close(self.slots)
            close(self.lmtp)  # always pop3d's own, even when systemd passed the POP3 sockets
            self.closed = True

    def close(self) -> None:
        self.close_listeners()
        if self.metrics is not None:
            self.metrics.shutdown()


def prepare(settings: Settings, copies: int) -> Prepared:
    """Bind or take over the listeners, load TLS, bind the metrics port. Raises ListenError (OSError),
    ActivationError, or ConfigError-worthy ssl errors (the CLI has checked the files already)."""
    inherited = systemd.listen_fds(settings.server.listen, settings.server.tls_listen)
    tls_socket = next((i for i in inherited if i.kind == "tls"), None)
    if tls_socket is not None and settings.tls.cert is None:
        raise systemd.ActivationError(f"systemd passed a {tls_socket.name!r} socket but tls.cert/tls.key are not set")
    tls = listener_ssl = None
    if settings.tls.cert is not None:
        from pop3d.net.tls import TlsManager

        tls = TlsManager(settings.tls)
        if settings.server.tls_listen or settings.poppassd.listen or tls_socket is not None:
            listener_ssl = tls.listener_context()
    if inherited:
        prepared = Prepared(
            [inherited] * copies,
            [(*i.sock.getsockname()[:2], i.kind == "tls") for i in inherited if i.kind != "poppassd"],
            True,
        )
    else:
        cfg = settings.server
        slots, addresses = open_listeners(cfg.listen, cfg.tls_listen, copies, settings.poppassd.listen)
        prepared = Prepared(slots, addresses, False)
    prepared.tls, prepared.listener_ssl = tls, listener_ssl
    if settings.lmtp.listen:
        try:
            prepared.lmtp, _ = open_listeners(settings.lmtp.listen, [], copies)
        except ListenError as exc:
            prepared.close()
            raise ListenError(exc.errno, f"lmtp.listen {exc}") from None
    if settings.metrics.listen:
        from pop3d.ops.endpoint import MetricsEndpoint

        try:
            prepared.metrics = MetricsEndpoint.bind(settings.metrics.listen)
        except OSError as exc:
            prepared.close()
            raise ListenError(exc.errno, f"metrics.listen {settings.metrics.listen}: {exc.strerror}") from None
    return prepared
