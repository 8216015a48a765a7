"""Listeners, start-up and graceful shutdown.

Shutdown order (SIGTERM/SIGINT): stop accepting, let sessions finish for `server.shutdown_grace` seconds,
then cut the rest. A cut session never enters UPDATE, so it deletes nothing (RFC 1939 §6); a session that
is already committing (after QUIT) is left to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pop3d.auth import build_auth, state_secret
from pop3d.config import ConfigError, Settings, parse_hostport
from pop3d.net.proxy_gate import ProxyGate
from pop3d.net.proxy_tls import ProxiedTlsListener, bind
from pop3d.pop3.context import ServerContext, SharedState, process_local
from pop3d.pop3.protocol import CommandParser
from pop3d.pop3.session import Pop3Session
from pop3d.runtime.listeners import address_text
from pop3d.runtime.startup import Bound
from pop3d.runtime.systemd import ActivationError, Inherited
from pop3d.storage import build_storage

if TYPE_CHECKING:
    from pop3d.net.tls import TlsManager
    from pop3d.runtime import privileges
    from pop3d.runtime.heartbeat import Heartbeat
    from pop3d.runtime.reload_rounds import ReloadAck
    from pop3d.storage.postgres import Database

log = logging.getLogger("pop3d")


def build_context(
    settings: Settings, shared: SharedState | None = None, tls: TlsManager | None = None
) -> ServerContext:
    """Wire the configured user database, storage driver and TLS into a context.

    `shared`: what this process shares with its sibling workers (pop3d.runtime.shared); None for a server
    that is a single process, whose context then keeps that state itself. `tls`: certificates loaded
    earlier (before dropping root: pop3d.runtime.startup); loaded here when None and configured.
    """
    if tls is None and settings.tls.cert is not None:
        from pop3d.net.tls import TlsManager

        tls = TlsManager(settings.tls)
    if shared is None or shared.auth_secret is None:
        # a single process (or a test): read the secret here; a supervisor reads it once for all its workers
        shared = dataclasses.replace(
            shared or process_local(settings), auth_secret=state_secret.load_or_create(settings.server.state_dir)
        )
    auth = build_auth(settings.auth, shared.auth_secret, _user_database(settings), shared.auth_generation)
    return ServerContext(settings, auth, build_storage(settings.storage), tls, shared)


def _user_database(settings: Settings) -> Database | None:
    """The worker's database handle for `auth.driver = "postgres"` (auth.dsn, else storage.dsn): the same
    object, hence the same pool, as the postgres storage driver's when the DSNs agree. None otherwise."""
    if settings.auth.driver != "postgres":
        return None
    from pop3d.storage.postgres import shared

    return shared(settings.auth.dsn or settings.storage.dsn, settings.storage.pool_size)


class Pop3Server:
    """The listening sockets of one process and the sessions they accepted."""

    def __init__(
        self,
        ctx: ServerContext,
        inherited: list[Inherited] | None = None,
        activated: bool = True,
        listener_ssl: ssl.SSLContext | None = None,
        worker: bool = False,
    ) -> None:
        """`inherited`: listening sockets bound already, by systemd (`activated`) or by pop3d before it
        dropped root (pop3d.runtime.startup); they replace `server.listen`/`tls_listen`.
        `listener_ssl`: the implicit-TLS context, made while the key was readable; else made here.
        `worker`: one of a supervisor's workers, whose start-up lines the supervisor logs (once, not per
        worker): here they go to DEBUG."""
        self.ctx = ctx
        self._info = logging.DEBUG if worker else logging.INFO
        self._counting_tls = False
        self._activated = activated
        self._listener_ssl = listener_ssl
        self.servers: list[asyncio.base_events.Server] = []
        self.tls_servers: list[asyncio.base_events.Server] = []  # the implicit-TLS subset of `servers`
        self.poppassd_servers: list[asyncio.base_events.Server] = []  # poppassd.listen (not in `servers`)
        self._background: set[asyncio.Future[Any]] = set()
        self.inherited = inherited or []
        # AUTH always; STLS only when TLS is configured (RFC 2595 §4: otherwise it is an unknown command)
        self.parser = CommandParser.with_extensions(stls=ctx.tls is not None)

    def protocol(self) -> asyncio.Protocol:
        """A new connection's protocol: the PROXY gate when `server.proxy_protocol` is on (read per connection,
        so a reload switches it), else the POP3 session itself."""
        ctx = self.ctx
        cfg = ctx.settings.server
        if cfg.proxy_protocol:
            parser = self.parser
            return ProxyGate(
                lambda rip: Pop3Session(ctx, parser, peer=rip),
                tuple(cfg.proxy_trusted),
                ctx.settings.session.timeout_authorization,
            )
        return Pop3Session(ctx, self.parser)

    def tls_protocol(self) -> asyncio.Protocol:
        """Implicit-TLS listeners without PROXY protocol: the session right behind the TLS layer."""
        return Pop3Session(self.ctx, self.parser)

    def _tls_layer(self) -> Callable[[], asyncio.Protocol]:
        """Implicit TLS on pop3d.net.tls_layer (a TLS transport of the loop costs more memory per session)."""
        from pop3d.net.tls_layer import TlsLayer

        options = self._tls_options()
        context, timeout = options["ssl"], options["ssl_handshake_timeout"]
        return lambda: TlsLayer(self.tls_protocol, context, timeout)

    def _proxied_tls(self, sock: socket.socket) -> ProxiedTlsListener:
        """Implicit TLS behind a proxy: the header is read from the socket before TLS starts (proxy_tls)."""
        ctx, parser = self.ctx, self.parser
        return ProxiedTlsListener(
            sock,
            lambda rip: Pop3Session(ctx, parser, peer=rip),
            lambda: tuple(ctx.settings.server.proxy_trusted),
            lambda: ctx.settings.session.timeout_authorization,
            self._tls_options(),
        )

    def poppassd_protocol(self) -> asyncio.Protocol:
        """A poppassd connection (pop3d.poppassd): implicit TLS, with the POP3 sessions' limits and penalty."""
        from pop3d.poppassd.session import PoppassdSession

        return PoppassdSession(self.ctx)

    async def _poppassd_listener(self, sock: socket.socket | None, host: str = "", port: int = 0) -> None:
        """One poppassd listener on `sock` (bound already) or host:port: implicit TLS, behind the PROXY
        header when `server.proxy_protocol` is on, as the POP3 implicit-TLS listeners."""
        from pop3d.poppassd.session import PoppassdSession

        ctx = self.ctx
        cfg = ctx.settings.server
        if cfg.proxy_protocol:
            for s in [sock] if sock is not None else bind(host, port, cfg.backlog):
                self.poppassd_servers.append(
                    ProxiedTlsListener(  # type: ignore[arg-type]
                        s,
                        lambda rip: PoppassdSession(ctx, peer=rip),
                        lambda: tuple(ctx.settings.server.proxy_trusted),
                        lambda: ctx.settings.poppassd.timeout,
                        self._tls_options(),
                    )
                )
            return
        loop = asyncio.get_running_loop()
        if sock is not None:
            backlog: dict[str, Any] = {} if self._activated else {"backlog": cfg.backlog}
            srv = await loop.create_server(self.poppassd_protocol, sock=sock, **backlog, **self._tls_options())
        else:
            srv = await loop.create_server(
                self.poppassd_protocol, host or None, port, backlog=cfg.backlog, reuse_address=True,
                **self._tls_options(),
            )  # fmt: skip
        self.poppassd_servers.append(srv)

    def poppassd_addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self.poppassd_servers for s in srv.sockets]

    def _tls_options(self) -> dict[str, Any]:
        assert self.ctx.tls is not None  # config validation guarantees it
        if self._listener_ssl is None:
            self._listener_ssl = self.ctx.tls.listener_context()
        if not self._counting_tls:
            from pop3d.ops.metrics import count_handshakes

            count_handshakes(self._listener_ssl, self.ctx.metrics)
            self._counting_tls = True
        return {"ssl": self._listener_ssl, "ssl_handshake_timeout": self.ctx.settings.tls.handshake_timeout}

    async def start(self) -> None:
        self.ctx.metrics.start_flushing(asyncio.get_running_loop())
        if self.inherited:
            await self._start_inherited()
        else:
            await self._start_configured()
        # storage drivers with crash journals (mbox) settle interrupted commits without waiting for a login
        self._background.add(task := asyncio.ensure_future(self.ctx.storage.recover_interrupted()))
        task.add_done_callback(self._background.discard)

    async def _start_configured(self) -> None:
        """Listeners from `server.listen` (plain) and `server.tls_listen` (implicit TLS)."""
        loop = asyncio.get_running_loop()
        cfg = self.ctx.settings.server
        listeners = [(*parse_hostport(item), False) for item in cfg.listen]
        listeners += [(*parse_hostport(item), True) for item in cfg.tls_listen]
        for host, port, implicit in listeners:
            if implicit and cfg.proxy_protocol:
                for sock in bind(host, port, cfg.backlog):
                    listener = self._proxied_tls(sock)
                    self.servers.append(listener)  # type: ignore[arg-type]
                    self.tls_servers.append(listener)  # type: ignore[arg-type]
                continue
            srv = await loop.create_server(
                self._tls_layer() if implicit else self.protocol,
                host or None,
                port,
                backlog=cfg.backlog,
                reuse_address=True,
            )
            self.servers.append(srv)
            if implicit:
                self.tls_servers.append(srv)
        for item in self.ctx.settings.poppassd.listen:
            await self._poppassd_listener(None, *parse_hostport(item))
        log.log(self._info, "listening on %s", ", ".join(self.addresses_text()))
        self._log_poppassd()

    async def _start_inherited(self) -> None:
        loop = asyncio.get_running_loop()
        # asyncio calls listen() again: with server.backlog for the sockets we bound (systemd's: unchanged)
        backlog: dict[str, Any] = {} if self._activated else {"backlog": self.ctx.settings.server.backlog}
        for inh in self.inherited:
            if not self._activated:  # bound before the drop (pop3d.runtime.listeners), listening from now
                inh.sock.listen(self.ctx.settings.server.backlog)
            if inh.kind == "poppassd":
                await self._poppassd_listener(inh.sock)
                continue
            if inh.kind == "tls":
                if self.ctx.tls is None:
                    raise ActivationError(f"systemd passed a {inh.name!r} socket but tls.cert/tls.key are not set")
                if self.ctx.settings.server.proxy_protocol:
                    srv: Any = self._proxied_tls(inh.sock)
                else:
                    srv = await loop.create_server(self._tls_layer(), sock=inh.sock, **backlog)
                self.servers.append(srv)
                self.tls_servers.append(srv)
            else:
                self.servers.append(await loop.create_server(self.protocol, sock=inh.sock, **backlog))
        if self._activated:
            log.log(
                self._info,
                "listening on %s (sockets from systemd; server.listen is not used)",
                ", ".join(self.addresses_text()),
            )
        else:
            log.log(self._info, "listening on %s", ", ".join(self.addresses_text()))
        self._log_poppassd()

    def _log_poppassd(self) -> None:
        if self.poppassd_servers:
            where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.poppassd_addresses())
            log.log(self._info, "poppassd listening on %s (implicit TLS)", where)

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
        for srv in self.servers + self.poppassd_servers:
            srv.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # sessions leave ctx.sessions from their own callbacks; polling keeps shutdown logic out of them
        while self.ctx.sessions and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.ctx.sessions:
            log.info("grace period over, closing %d session(s)", len(self.ctx.sessions))
            for session in list(self.ctx.sessions):
                session.shutdown()
            # sessions release their maildrops in connection_lost; give that a moment
            cutoff = loop.time() + 5
            while self.ctx.sessions and loop.time() < cutoff:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        for srv in self.servers + self.poppassd_servers:
            await srv.wait_closed()
        self.ctx.metrics.stop_flushing()
        log.info("stopped")


async def serve(
    settings: Settings,
    on_ready: Callable[[Pop3Server], None] | None = None,
    load: Callable[[], Settings] | None = None,
    bound: Bound | None = None,
    shared: SharedState | None = None,
    heartbeat: Heartbeat | None = None,
    *,
    worker: bool | None = None,
    reload_ack: ReloadAck | None = None,
) -> None:
    """Run a server until SIGTERM or SIGINT; SIGHUP reloads through `load` (pop3d.runtime.reload).

    Under systemd: sockets come from LISTEN_FDS when socket-activated, and the manager hears READY=1 once
    we listen, RELOADING=1/READY=1 around a reload, STOPPING=1 when we drain, WATCHDOG=1 if asked.
    `bound`: the sockets, TLS state and metrics port made before privileges were dropped
    (pop3d.runtime.startup); None binds them here. A worker's `bound` has no metrics port (its supervisor
    serves the summed metrics) and `shared` is its share with the other workers; it does not talk to
    systemd either (its supervisor removed NOTIFY_SOCKET) but, when the unit has a watchdog, beats into
    `heartbeat` from its loop, which the supervisor reads before each WATCHDOG=1, and runs each reload inside
    `reload_ack.answering()`, which tells the supervisor when it may say READY=1 (pop3d.runtime.reload_rounds).
    """
    from pop3d.ops import metrics
    from pop3d.runtime import systemd
    from pop3d.runtime.reload import reload
    from pop3d.runtime.startup import prepare

    if bound is None:
        bound = prepare(settings, 1).for_slot(0, with_metrics=True)
    if worker is None:
        worker = shared is not None  # a supervisor's worker: the supervisor logs start-up and reload outcomes
    info = logging.DEBUG if worker else logging.INFO
    ctx = build_context(settings, shared, bound.tls)
    server = Pop3Server(ctx, bound.sockets, bound.activated, bound.listener_ssl, worker=worker)
    await server.start()
    lmtp = None
    if bound.lmtp:  # LMTP delivery (RFC 2033) beside POP3: never behind a PROXY header
        from pop3d.lmtp.service import LmtpService

        lmtp = LmtpService(
            lambda: ctx.settings.lmtp, lambda: ctx.auth, lambda: ctx.storage, lambda: ctx.settings.server.hostname
        )
        await lmtp.start([inh.sock for inh in bound.lmtp], ctx.settings.server.backlog)
        log.log(info, "LMTP on %s", ", ".join(address_text(h, p) for h, p in lmtp.addresses()))
    endpoint = bound.metrics
    if endpoint is not None:
        if isinstance(ctx.metrics, metrics.Metrics):
            endpoint.start(metrics.exposition_registry(ctx.metrics))
        else:
            endpoint.close_socket()
            endpoint = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        with reload_ack.answering() if reload_ack is not None else contextlib.nullcontext():
            if load is None:
                log.info("SIGHUP: no configuration file to re-read")
                if ctx.tls is not None:  # still re-read the certificates
                    ctx.tls.reload()
                return
            ctx.auth.reload_soon()  # the user database too, even if the configuration does not load
            log.log(info, "SIGHUP: re-reading the configuration")
            systemd.notify(*systemd.reloading_states())
            reload(ctx, load, quiet=worker)
            systemd.notify("READY=1", _status(server))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    # a forked worker starts with these blocked (pop3d.runtime.workers): from here on they are handled, not fatal
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
    watchdog = None
    if heartbeat is not None:
        watchdog = _Watchdog(loop, heartbeat.period, heartbeat.beat)
    elif (interval := systemd.watchdog_interval()) is not None:
        watchdog = _Watchdog(loop, interval, lambda: systemd.notify("WATCHDOG=1"))
    if on_ready is not None:
        on_ready(server)
    systemd.notify("READY=1", _status(server))
    await stop.wait()
    systemd.notify("STOPPING=1", "STATUS=draining sessions")
    log.info("signal received, stopping (grace %.0f s)", ctx.settings.server.shutdown_grace)
    if lmtp is not None:
        await asyncio.gather(server.stop(), lmtp.stop(ctx.settings.server.shutdown_grace))
    else:
        await server.stop()
    if watchdog is not None:
        watchdog.cancel()
    if endpoint is not None:
        endpoint.shutdown()


def _status(server: Pop3Server) -> str:
    return f"STATUS=listening on {', '.join(server.addresses_text())}"


class _Watchdog:
    """WATCHDOG=1 (or a worker's heartbeat) from the event loop itself, so a stuck loop (not just a live
    process) trips WatchdogSec=."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, ping: Callable[[], object]) -> None:
        self._loop, self._interval, self._ping_once = loop, interval, ping
        self._handle = loop.call_soon(self._ping)

    def _ping(self) -> None:
        self._ping_once()
        self._handle = self._loop.call_later(self._interval, self._ping)

    def cancel(self) -> None:
        self._handle.cancel()


def serve_forever(
    settings: Settings, on_ready: Callable[[list[str]], None] | None = None, load: Callable[[], Settings] | None = None
) -> int:
    """The `pop3d serve` main: in this process for `server.workers = 1`, else under a Supervisor.

    Order: resolve `server.user` (a missing one is a ConfigError), raise the open-files limit (each
    connection is a descriptor), bind everything that may need root (pop3d.runtime.startup), drop root for
    good (pop3d.runtime.privileges), and only then build the contexts, fork workers and serve. Returns the
    exit status.
    """
    from pop3d.runtime import cpus, privileges, workers
    from pop3d.runtime.startup import prepare

    settings, load = cpus.resolve_workers(settings, load)  # server.workers = 0: one per usable CPU
    target = privileges.resolve(settings.server)  # a missing user is a ConfigError before anything binds
    switch = privileges.check_start(target)  # also logs the warning when root stays root
    soft, hard = workers.raise_nofile_limit()
    log.info("open-files limit %d (hard %d)", soft, hard)
    count = settings.server.workers
    prepared = prepare(settings, count)
    if switch and target is not None:
        try:
            privileges.preload()
            privileges.drop(target)
            _check_as_user(settings, target)
        except BaseException:
            prepared.close()
            raise
    if count == 1:
        from pop3d.pop3.context import process_local
        from pop3d.runtime.shared import persistent_local

        bound = prepared.for_slot(0, with_metrics=True)
        # the penalty and LOGIN-DELAY history survive a restart (server.state_dir), as under a supervisor
        state, keeper, delay_dir, own_dir = persistent_local(settings, process_local(settings))
        ready = (lambda srv: on_ready(srv.addresses_text())) if on_ready else None
        try:
            run(lambda: serve(settings, ready, load, bound, state, worker=False))
        finally:
            keeper.save()
            if own_dir:
                shutil.rmtree(delay_dir, ignore_errors=True)
        return 0

    reloads = _Reloads(settings, load)

    def worker_main(bound: Bound, shared: SharedState, links: workers.WorkerLinks) -> None:
        """One forked worker: its own loop on its own listeners, with the settings in force (a worker restarted
        after a reload must not go back to the ones the server started with); tells the supervisor once it
        serves."""

        def ready(server: Pop3Server) -> None:
            if links.ready_fd >= 0:
                os.write(links.ready_fd, b"r")
                os.close(links.ready_fd)

        current = reloads.current
        run(lambda: serve(current, ready, load, bound, shared, links.heartbeat, reload_ack=links.reload))

    sup = workers.Supervisor(settings, worker_main, prepared)
    sup.on_hup = reloads.check
    return sup.run((lambda s: on_ready(s.addresses_text())) if on_ready else None)


class _Reloads:
    """The supervisor's side of SIGHUP: load and check the configuration once and log what will change;
    its workers then apply it quietly (pop3d.runtime.reload), so the outcome is one line, not one per worker."""

    def __init__(self, settings: Settings, load: Callable[[], Settings] | None) -> None:
        self.current, self.load = settings, load  # `current`: what a worker (re)started now must run

    def check(self) -> None:
        from pop3d.runtime.reload import check

        if self.load is None:
            return
        log.info("SIGHUP: re-reading the configuration")
        p = check(self.current, self.load)
        if p is not None:
            self.current = p.settings


def _check_as_user(settings: Settings, target: privileges.Target) -> None:
    """Right after the drop: what every session needs must be readable now, not only as root."""
    if settings.auth.driver != "passwd-file":
        return
    path = settings.auth.passwd_file
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"auth.passwd_file: cannot read {path} as {target.user}: {exc.strerror} "
            f"(pop3d check-config tells what the user can reach)"
        ) from None


def run(coro_factory: Callable[[], asyncio.Future[None] | object]) -> None:
    """Run the main coroutine on uvloop when it is installed, plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the server must not need it
        asyncio.run(coro_factory())  # type: ignore[arg-type]
        return
    uvloop.run(coro_factory())  # type: ignore[arg-type]
