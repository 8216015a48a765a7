"""Listeners, start-up and graceful shutdown.

Shutdown order (SIGTERM/SIGINT): stop accepting, let sessions finish for `server.shutdown_grace` seconds,
then cut the rest. A cut session never enters UPDATE, so it deletes nothing (RFC 1939 §6); a session that
is already committing (after QUIT) is left to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Callable

from pop3d.config import Settings, parse_hostport
from pop3d.context import ServerContext
from pop3d.protocol import CommandParser
from pop3d.session import Pop3Session

log = logging.getLogger("pop3d")


def build_context(settings: Settings) -> ServerContext:
    """Wire the configured user database and storage driver into a context."""
    from pop3d.auth.passwd_file import PasswdFileAuthenticator
    from pop3d.storage import build_storage

    auth = PasswdFileAuthenticator(settings.auth.passwd_file)
    tls = None
    if settings.tls.cert is not None:
        from pop3d.tls import TlsManager

        tls = TlsManager(settings.tls)
    return ServerContext(settings, auth, build_storage(settings.storage), tls)


class Pop3Server:
    """The listening sockets of one process and the sessions they accepted."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.servers: list[asyncio.base_events.Server] = []
        self.tls_servers: list[asyncio.base_events.Server] = []  # the implicit-TLS subset of `servers`
        self._background: set[asyncio.Future[object]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.ctx.settings.server
        # AUTH always; STLS only when TLS is configured (RFC 2595 §4: otherwise it is an unknown command)
        parser = CommandParser.with_extensions(stls=self.ctx.tls is not None)
        listeners = [(item, False) for item in cfg.listen] + [(item, True) for item in cfg.tls_listen]
        for item, implicit in listeners:
            host, port = parse_hostport(item)
            tls: dict[str, Any] = {}
            if implicit:
                assert self.ctx.tls is not None  # config validation guarantees it
                tls = {"ssl": self.ctx.tls.listener_context(),
                       "ssl_handshake_timeout": self.ctx.settings.tls.handshake_timeout}
            srv = await loop.create_server(
                lambda: Pop3Session(self.ctx, parser), host or None, port,
                backlog=cfg.backlog, reuse_address=True, **tls,
            )
            self.servers.append(srv)
            if implicit:
                self.tls_servers.append(srv)
        log.info("listening on %s", ", ".join(self.addresses_text()))
        # storage drivers with crash journals (mbox) settle interrupted commits without waiting for a login
        recover = getattr(self.ctx.storage, "recover_interrupted", None)
        if recover is not None:
            self._background.add(task := asyncio.ensure_future(recover()))
            task.add_done_callback(self._background.discard)

    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs; with port 0 in the config, the ports the kernel chose."""
        return [s.getsockname()[:2] for srv in self.servers for s in srv.sockets]

    def tls_addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self.tls_servers for s in srv.sockets]

    def addresses_text(self) -> list[str]:
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.addresses()]

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, wait up to `grace` seconds for sessions, then cut the rest."""
        grace = self.ctx.settings.server.shutdown_grace if grace is None else grace
        for srv in self.servers:
            srv.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.ctx.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.ctx.sessions:
            log.info("grace period over, closing %d session(s)", len(self.ctx.sessions))
            for session in list(self.ctx.sessions):
                session.shutdown()
            # sessions release their maildrops in connection_lost; give that a moment
            cutoff = loop.time() + 5
            while self.ctx.sessions and loop.time() < cutoff:
                await asyncio.sleep(0.01)
        for srv in self.servers:
            await srv.wait_closed()
        log.info("stopped")


async def serve(settings: Settings, on_ready: Callable[[Pop3Server], None] | None = None) -> None:
    """Run a server until SIGTERM or SIGINT."""
    ctx = build_context(settings)
    server = Pop3Server(ctx)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ctx.tls is not None:  # SIGHUP: new certificates for new handshakes; live sessions keep theirs
        loop.add_signal_handler(signal.SIGHUP, ctx.tls.reload)
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    log.info("signal received, stopping (grace %.0f s)", settings.server.shutdown_grace)
    await server.stop()


def run(coro_factory: Callable[[], "asyncio.Future[None] | object"]) -> None:
    """Run the main coroutine on uvloop when it is installed, plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the server must not need it
        asyncio.run(coro_factory())  # type: ignore[arg-type]
        return
    uvloop.run(coro_factory())  # type: ignore[arg-type]
