"""One worker's link to PostgreSQL: a bounded connection pool plus one lock connection.

* The query pool (pop3d.storage.postgres.pool: at most `storage.pool_size` asyncpg connections) carries
  every query: snapshots, bodies, commits, deliveries and, with `auth.driver = "postgres"`, user look-ups,
  one statement each. A session holds no connection while idle, so 10,000 idle sessions cost the pool's
  few connections, not 10,000.
* The lock connection holds the RFC 1939 §4 maildrop locks as PostgreSQL *session* advisory locks, many on
  one connection. PostgreSQL drops them when that connection goes: at once when the worker dies on a live
  host (the kernel closes the socket), and within about 30 s of a network partition thanks to the TCP
  keepalives and `tcp_user_timeout` set on both ends (`SERVER_SETTINGS`, `_keepalive`).
* Nothing connects before it is needed, and everything is bound to the process and event loop that made
  it: a worker forked from a supervisor that touched this object makes its own connections, never using an
  inherited socket.

When the lock connection dies, every lock it held is gone; the maildrops that held one are told
(`LockHolder.lock_lost`) and refuse to commit, and the next login opens a new lock connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Final, Protocol

import asyncpg

from pop3d import procid
from pop3d.storage.postgres.pool import QueryPool

log = logging.getLogger(__name__)

#: TCP keepalives and user timeout asked of the *server* for this session's socket (they are ordinary
#: session settings, no superuser needed; ignored on unix sockets): idle 10 s, then 3 probes 5 s apart,
#: and unacknowledged data for 25 s, so PostgreSQL drops a partitioned node, and its locks, within 30 s.
SERVER_SETTINGS: Final[dict[str, str]] = {
    "application_name": "pop3d",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "25000",
}
#: seconds a query may take before the session gets -ERR [SYS/TEMP]
COMMAND_TIMEOUT: Final[float] = 30.0
#: seconds to establish a connection
CONNECT_TIMEOUT: Final[float] = 10.0
#: seconds a query connection may stay unused before it is closed
IDLE_CLOSE: Final[float] = 300.0
#: advisory lock namespace (the first int4 key): "P3" so other applications' locks on the same database
#: never collide with a maildrop lock, whose second key is the user's id
LOCK_SPACE: Final[int] = 0x5033

#: the user's id and its maildrop lock in one round trip (no row: the user has no users row yet)
_LOCK = "SELECT id, pg_try_advisory_lock($1, id) AS got FROM users WHERE name = $2"
_UNLOCK = "SELECT pg_advisory_unlock($1, $2)"
_UNLOCK_NAME = "SELECT pg_advisory_unlock($1, id) FROM users WHERE name = $2"

#: exceptions that mean "the database cannot be reached or failed this statement"; InternalClientError is
#: what asyncpg raises for a connection the server has just terminated while it was in use
DB_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)


class LockHolder(Protocol):
    """A maildrop holding a lock on the lock connection."""

    def lock_lost(self) -> None: ...


def _keepalive(conn: Any) -> None:
    """The same keepalives on our end of a TCP connection, so this node notices a dead server in time too."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 25000)


async def _connect(dsn: str) -> Any:
    """asyncpg.connect in a Task of its own: it enters asyncio.timeout, which needs the current Task, and a
    session may run a login's first step before it has one (pop3d.pop3.eager: the postgres drivers are
    `task_free`). Statements need no Task: a connection times them out with its own timers."""
    return await asyncio.ensure_future(asyncpg.connect(**connect_kwargs(dsn)))


class NoUserRow(LookupError):
    """The user has no users row (a maildrop of a user from another user database, never seen here)."""


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg arguments for `dsn` (a libpq URI; empty: all from the PG* environment variables)."""
    return {
        "dsn": dsn or None,
        "server_settings": dict(SERVER_SETTINGS),
        "command_timeout": COMMAND_TIMEOUT,
        "timeout": CONNECT_TIMEOUT,
        "statement_cache_size": 64,
    }


class Database:
    """A DSN and a pool size; the connections themselves live in one `Link` per process and event loop
    (a worker forked after this object was made, or a test running two servers in two threads, gets its
    own). Every method must be called from a running event loop."""

    def __init__(self, dsn: str, pool_size: int) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._links: dict[tuple[int, int], Link] = {}
        self._last: Link | None = None  # the link `link()` returned last

    def link(self) -> Link:
        """The connections of the running process and loop, made on first use."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last.loop is loop and last.pid == procid.current():  # every query asks: no system call
            return last
        key = (procid.current(), id(loop))
        found = self._links.get(key)
        if found is None or found.loop is not loop:
            for stale in [k for k, v in self._links.items() if k[0] != key[0] or v.loop.is_closed()]:
                del self._links[stale]  # a forked parent's or a closed loop's: never touch their sockets
            found = self._links[key] = Link(self, loop)
        self._last = found
        return found

    async def fetch(self, query: str, *args: object) -> list[Any]:
        return list(await self.link().queries.run("fetch", query, *args))

    async def fetchrow(self, query: str, *args: object) -> Any:
        return await self.link().queries.run("fetchrow", query, *args)

    async def fetchval(self, query: str, *args: object) -> Any:
        return await self.link().queries.run("fetchval", query, *args)

    async def execute(self, query: str, *args: object) -> str:
        return str(await self.link().queries.run("execute", query, *args))

    async def try_lock(self, name: str, holder: LockHolder) -> tuple[int, int] | None:
        return await self.link().try_lock(name, holder)

    async def unlock(self, name: str, holder: LockHolder) -> None:
        await self.link().unlock(name, holder)

    async def close(self) -> None:
        """Close this loop's pool and lock connection (releasing its locks)."""
        link = self._links.pop((procid.current(), id(asyncio.get_running_loop())), None)
        if link is self._last:
            self._last = None
        if link is not None:
            await link.close()


class Link:
    """The pool and the lock connection of one process and loop."""

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop) -> None:
        self.db = db
        self.loop = loop
        self.pid = procid.current()
        #: the query connections (pool.QueryPool: at most `pool_size`, closed after IDLE_CLOSE s unused)
        self.queries = QueryPool(self._query_connection, db.pool_size, IDLE_CLOSE)
        self._lock_conn: Any = None
        self._lock_conn_lock = asyncio.Lock()  # one statement at a time on the lock connection
        #: user name -> the maildrop holding its lock here, and the user's id (None while being taken)
        self._held: dict[str, tuple[LockHolder, int | None]] = {}
        self._releasing: set[asyncio.Task[None]] = set()  # releases after a cancelled try_lock

    async def _query_connection(self) -> Any:
        conn = await _connect(self.db.dsn)
        _keepalive(conn)
        return conn

    async def _locker(self) -> Any:
        """The lock connection, connected now if it is not (the first login, or after it was lost)."""
        conn = self._lock_conn
        if conn is not None and not conn.is_closed():
            return conn
        self._lost(conn)
        conn = await _connect(self.db.dsn)
        _keepalive(conn)
        conn.add_termination_listener(self._lost)
        self._lock_conn = conn
        return conn

    def _lost(self, conn: Any) -> None:
        """The lock connection closed: PostgreSQL released every lock it held; tell their maildrops."""
        if conn is None or conn is not self._lock_conn:
            return
        self._lock_conn = None
        held, self._held = self._held, {}
        if held:
            log.error("postgres: lock connection lost; %d session(s) lose their maildrop lock", len(held))
        for holder, _ in held.values():
            holder.lock_lost()

    async def try_lock(self, name: str, holder: LockHolder) -> tuple[int, int] | None:
        """Take the maildrop lock of user `name` for `holder`, and learn the user's id, in one round trip.
        None when another session holds it, else (the user's id, the lock connection's server pid: for
        the commit's check that the lock is still ours). NoUserRow when the user has no users row."""
        if name in self._held:  # advisory locks stack within one connection: refuse ourselves here
            return None
        self._held[name] = (holder, None)  # reserved before any await: a second login here is refused
        try:
            async with self._lock_conn_lock:
                conn = await self._locker()
                self._held[name] = (holder, None)  # again: a lost connection in between cleared the table
                row = await conn.fetchrow(_LOCK, LOCK_SPACE, name)
        except BaseException:
            if self._holder(name) is holder:
                del self._held[name]
                # cancelled (client gone) or failed after the server may have granted it: release it again
                # (harmless when it was not granted), or it would stay held as long as the connection
                releasing = self.loop.create_task(self._release(name))
                self._releasing.add(releasing)  # kept: asyncio holds Tasks only weakly
                releasing.add_done_callback(self._releasing.discard)
            raise
        if row is None or not row["got"]:
            if self._holder(name) is holder:
                del self._held[name]
            if row is None:
                raise NoUserRow(name)
            return None
        user_id = int(row["id"])
        if self._holder(name) is holder:  # else the connection was lost meanwhile, and `holder` was told
            self._held[name] = (holder, user_id)
        return user_id, int(conn.get_server_pid())

    def _holder(self, name: str) -> LockHolder | None:
        found = self._held.get(name)
        return None if found is None else found[0]

    async def unlock(self, name: str, holder: LockHolder) -> None:
        """Release `holder`'s lock; nothing to do when the lock connection died (the lock went with it)."""
        found = self._held.get(name)
        if found is None or found[0] is not holder:
            return
        user_id = found[1]
        conn = self._lock_conn
        if conn is None or conn.is_closed():
            del self._held[name]
            return
        # by id; by name while try_lock's statement is still queued (this one runs after it: the lock is fair)
        query, key = (_UNLOCK, user_id) if user_id is not None else (_UNLOCK_NAME, name)
        try:
            async with self._lock_conn_lock:
                await conn.fetchval(query, LOCK_SPACE, key)
        except DB_ERRORS as exc:
            # the lock would outlive the session: drop the connection, which releases all of them
            log.error("postgres: cannot release a maildrop lock (%s); resetting the lock connection", exc)
            conn.terminate()
            self._lost(conn)
        finally:
            if self._holder(name) is holder:
                del self._held[name]

    async def _release(self, name: str) -> None:
        conn = self._lock_conn
        if conn is None or conn.is_closed() or name in self._held:
            return
        try:
            async with self._lock_conn_lock:
                await conn.fetchval(_UNLOCK_NAME, LOCK_SPACE, name)
        except DB_ERRORS:
            conn.terminate()
            self._lost(conn)

    def held(self) -> int:
        """Locks held through this link (for tests)."""
        return len(self._held)

    def lock_pid(self) -> int | None:
        """The server pid of the lock connection, if connected."""
        conn = self._lock_conn
        return None if conn is None or conn.is_closed() else int(conn.get_server_pid())

    async def close(self) -> None:
        conn = self._lock_conn
        if conn is not None:
            self._lost(conn)
            with contextlib.suppress(*DB_ERRORS):
                await conn.close(timeout=5)
        await self.queries.close()


_SHARED: dict[tuple[str, int], Database] = {}


def shared(dsn: str, pool_size: int) -> Database:
    """The Database of this process for (`dsn`, `pool_size`): storage, auth and delivery of one worker share
    it, and a SIGHUP that rebuilds a driver keeps it (so a node holds at most `pool_size` + 1 connections
    per worker). Connections are made lazily and bound to their process, so calling this before a fork is
    harmless."""
    key = (dsn, pool_size)
    db = _SHARED.get(key)
    if db is None:
        db = _SHARED[key] = Database(dsn, pool_size)
    return db
