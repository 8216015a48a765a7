"""Server-wide state shared by every session: configuration, user database, storage, registries.

One object per server process; sessions hold a reference, never a copy, so per-connection memory stays small.
Everything comes in through the constructor: what worker processes must agree on (brute-force penalties,
LOGIN-DELAY, metrics, connection limits, the verified-credentials cache) is a `SharedState` their supervisor
built before it forked (pop3d.runtime.shared); without one the context makes process-local equivalents.
Nothing here reads module globals or the environment, and nothing imports the session layer: sessions and
handlers are seen through the small protocols below.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pop3d import __version__, procid
from pop3d.auth.cred_cache import CredCache
from pop3d.auth.generation import Generation
from pop3d.auth.login_delay import LoginDelays, LoginDelayStore
from pop3d.auth.penalty import Penalty
from pop3d.net.addresses import in_networks
from pop3d.net.limits import ConnectionLimits
from pop3d.ops import logfmt
from pop3d.ops import metrics as metrics_mod
from pop3d.pop3.deadlines import Deadlines
from pop3d.pop3.protocol import VERBS

if TYPE_CHECKING:
    from pop3d.auth.base import Authenticator, User
    from pop3d.config import Settings
    from pop3d.net.tls import TlsManager
    from pop3d.storage.base import MessageInfo, Storage

log = logging.getLogger("pop3d")


@dataclass(frozen=True, slots=True)
class SharedState:
    """What every process of one server must agree on; built once, before worker processes fork."""

    penalty: Penalty  # brute-force delay per client address
    login_delays: LoginDelayStore  # RFC 2449 §6.5 LOGIN-DELAY: last login per user
    metrics: metrics_mod.NullMetrics  # Prometheus instruments (NullMetrics: metrics off)
    #: connections per address, per server, unauthenticated (pop3d.net.limits); None: counted in this process
    limits: ConnectionLimits | None = None
    #: the server secret decoys for unknown users derive from (pop3d.auth.state_secret); None: not loaded yet
    auth_secret: bytes | None = None
    #: passwords proved right lately, as keyed hashes (pop3d.auth.cred_cache); None: no cache
    cred_cache: CredCache | None = None
    #: bumped when a worker changes a password (pop3d.auth.generation); None: this process alone
    auth_generation: Generation | None = None


def process_local(settings: Settings) -> SharedState:
    """The state of a server that is a single process (or a test): nothing to share with anybody."""
    a = settings.auth
    return SharedState(
        Penalty(a.failure_delay, a.failure_delay_max),
        LoginDelays(),
        metrics_mod.build(settings.metrics.listen, VERBS),
        ConnectionLimits.from_settings(settings),
        cred_cache=CredCache(a.cache_size) if a.cache_size else None,
    )


class LiveSession(Protocol):
    """A connected session as the server sees it: something it can cut at shutdown."""

    def shutdown(self) -> None: ...


class SessionCounters(Protocol):
    """Per-session totals the end-of-session line reports."""

    @property
    def top(self) -> int: ...
    @property
    def top_bytes(self) -> int: ...
    @property
    def retr(self) -> int: ...
    @property
    def retr_bytes(self) -> int: ...
    @property
    def dele(self) -> int: ...


class EndedSession(Protocol):
    """What `log_session_end` reads of a session's protocol handler."""

    @property
    def user(self) -> User | None: ...
    @property
    def peer(self) -> str: ...
    @property
    def end_reason(self) -> str: ...
    @property
    def counters(self) -> SessionCounters: ...
    @property
    def messages(self) -> Sequence[MessageInfo]: ...
    @property
    def tried(self) -> str | None: ...  # the last user name an authentication named, logged in or not
    @property
    def mech(self) -> str | None: ...  # the last authentication method tried (USER, APOP, a SASL name)
    @property
    def auth_failures(self) -> int: ...

    def log_fields(self) -> dict[str, object]: ...


#: how a session that never logged in may end and still count as a health check (see `is_health_check`)
_PROBE_ENDINGS = frozenset({"QUIT", "disconnected"})
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case


def _base32(n: int, width: int = 0) -> str:
    out: list[str] = []
    while n or len(out) < max(width, 1):
        n, r = divmod(n, 32)
        out.append(_ID_ALPHABET[r])
    return "".join(reversed(out))


def is_health_check(handler: EndedSession) -> bool:
    """A session that never tried to authenticate (no USER, APOP or AUTH) and ended by QUIT or by hanging
    up before login: what `pop3d health` and load-balancer TCP probes do. Anything else a client can do
    (a login, a failure, a timeout, an eviction, a refused STLS) is not one, so hiding these hides no attack
    on an account."""
    return handler.user is None and handler.mech is None and handler.end_reason in _PROBE_ENDINGS


#: maildrop opens in flight per worker (ServerContext.open_gate): a few times the thread pool's size, so the
#: threads never wait for work, and a database driver keeps its pool busy
OPENS_IN_FLIGHT = 32


class ServerContext:
    """Everything a session needs from its server."""

    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        storage: Storage,
        tls: TlsManager | None = None,
        shared: SharedState | None = None,
    ) -> None:
        """`tls` None: no TLS configured (no STLS, no implicit-TLS listeners). `shared` None: this process
        is the whole server, and penalties, LOGIN-DELAY and metrics are kept here."""
        self.settings = settings
        self.tls = tls
        self.auth = auth
        self.storage = storage
        state = shared if shared is not None else process_local(settings)
        self.penalty = state.penalty
        self.login_delays = state.login_delays
        self.metrics = state.metrics
        self.limits = state.limits if state.limits is not None else ConnectionLimits.from_settings(settings)
        #: kept for reloads: a new user database must derive the same decoys (pop3d.auth.build_auth)
        self.auth_secret = state.auth_secret
        self.cred_cache = state.cred_cache
        self.auth_generation = state.auth_generation
        self.hostname = settings.server.hostname
        self.implementation = f"pop3d-{__version__}"
        self.sessions: set[LiveSession] = set()
        self._counter = itertools.count(1)
        self._sid_pid = 0  # the process the session-id prefix was drawn in (see `session_id`)
        self._sid_prefix = ""
        self._sid_counter = itertools.count(1)
        self._deadlines: Deadlines | None = None
        self._open_gate: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        #: called as hook(old, new) after a SIGHUP reload swapped `settings` (TLS plugs its certificates in here)
        self.reload_hooks: list[Callable[[Settings, Settings], None]] = []

    def deadlines(self, loop: asyncio.AbstractEventLoop) -> Deadlines:
        """The session deadlines of `loop` (one per worker; a new loop, as in tests, gets its own)."""
        d = self._deadlines
        if d is None or d.loop is not loop:
            d = self._deadlines = Deadlines(loop)
        return d

    def open_gate(self) -> asyncio.Semaphore:
        """At most OPENS_IN_FLIGHT maildrop opens at once in this worker (one per event loop).

        When thousands of clients log in at the same instant, every login past the gate would otherwise queue
        its thread-pool work item, futures and coroutine frames at once; freed afterwards, they leave the
        allocator's arenas fragmented, and the worker's memory stays at its high-water mark (about 5 KiB more
        per held session at a 10,000-client burst). Waiting at the gate costs one small future. Only the open
        is gated, not the password check or the failure delays: a client cannot hold a slot by failing.
        """
        loop = asyncio.get_running_loop()
        gate = self._open_gate
        if gate is None or gate[0] is not loop:
            gate = self._open_gate = (loop, asyncio.Semaphore(OPENS_IN_FLIGHT))
        return gate[1]

    @property
    def eager(self) -> bool:
        """May the session run an async reply at once, without a Task (pop3d.pop3.eager)? Only when neither
        the user database nor the storage needs a Task of its own (`task_free`); read per use: a reload may
        change either."""
        return self.auth.task_free and self.storage.task_free

    async def verify_password(self, name: str, password: str) -> User | None:
        """A clear password check (USER/PASS, SASL PLAIN and LOGIN) through the verified-credentials cache,
        with `auth.cache_ttl` as it is now (a reload applies to the next check)."""
        return await self.auth.verify_remembered(
            name, password, self.cred_cache, self.settings.auth.cache_ttl, self.metrics.auth_cache_hit
        )

    def is_secure_network(self, address: str) -> bool:
        """True when `address` is in auth.secure_networks (cleartext passwords allowed without TLS).

        Read from the current settings each time, so a reload applies to the next login.
        """
        return in_networks(address, self.settings.auth.secure_networks)

    def apop_timestamp(self) -> str:
        """RFC 1939 §7: a msg-id unique per connection, `<pid.counter.clock@host>`.

        The pid is read each time: worker processes forked after this object was built must differ.
        """
        return f"<{procid.current()}.{next(self._counter)}.{time.time_ns() // 1000}@{self.hostname}>"

    def session_id(self) -> str:
        """A short id for the log lines of one session, unique within this run of the server.

        A random prefix drawn once per process (6 base32 characters, 30 bits) followed by a counter. Why not
        the pid: worker processes are forked and, when one dies, replaced, and a pid may come back within one
        run (small pid spaces in containers); a prefix drawn after the fork does not depend on that, and ids
        from several hosts or runs merged into one log rarely collide either. The pid is on every line anyway
        (pop3d.ops.logfmt). Drawn lazily: a worker forked after this object was built gets its own.
        """
        pid = procid.current()
        if pid != self._sid_pid:
            self._sid_pid, self._sid_prefix = pid, _base32(secrets.randbits(30), 6)
            self._sid_counter = itertools.count(1)
        return self._sid_prefix + _base32(next(self._sid_counter))

    def log_session_end(self, handler: EndedSession) -> None:
        """One line per session end, in the spirit of Dovecot's logout line. Never a password.

        A session that logged in reports its counters; one that did not, the user it tried (if any) and how
        many authentications failed. Health checks (`is_health_check`) go to DEBUG with
        `log.health_checks = false`.
        """
        logged_in = handler.user is not None
        user = handler.user.name if handler.user is not None else "-"
        reason = handler.end_reason
        probe = is_health_check(handler)
        if not logged_in and reason == "QUIT":
            reason = "QUIT before login"
        fields: dict[str, object] = {"user": user, "rip": handler.peer, "reason": reason}
        if logged_in:
            c = handler.counters
            fields |= {
                "top": c.top,
                "top_bytes": c.top_bytes,
                "retr": c.retr,
                "retr_bytes": c.retr_bytes,
                "del": c.dele,
                "messages": len(handler.messages),
                "size": sum(m.size for m in handler.messages),
            }
            c, n, size = handler.counters, fields["messages"], fields["size"]  # Dovecot's logout counters
            text = (
                f"session end user={logfmt.text_value(user)} rip={handler.peer} reason={reason} "
                f"top={c.top}/{c.top_bytes}, retr={c.retr}/{c.retr_bytes}, del={c.dele}/{n}, size={size}"
            )
            shown: dict[str, object] = {}
        else:
            fields |= {"tried": handler.tried, "auth_failures": handler.auth_failures}
            shown = {}  # in the text only when there is something to say
            if handler.tried is not None:
                shown["tried"] = handler.tried
            if handler.auth_failures:
                shown["auth_failures"] = handler.auth_failures
            text = f"session end user=- rip={handler.peer} reason={reason}"
        shown |= handler.log_fields()
        if probe:  # said in the text only when it is one; always a boolean in JSON
            shown["health_check"] = True
        fields |= shown
        fields["health_check"] = probe
        level = logging.DEBUG if probe and not self.settings.log.health_checks else logging.INFO
        logfmt.event(log, level, "session_end", text, fields, shown)
