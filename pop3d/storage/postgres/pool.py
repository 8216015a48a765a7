"""The query connections of one worker: at most `size` asyncpg connections, each running one statement at a
time, made when needed. One unused for `idle` seconds is closed when the next statement ends (no timer per
connection); one whose socket closed meanwhile (a server restart, a failover) is skipped when taken.

Why not asyncpg.Pool: pop3d runs single statements only (a login's snapshot, a download's bodies, the QUIT
commit: each one statement, its own transaction), and the pool's acquire/release machinery around each
of them (a proxy object per acquire, a shielded Task and an inactivity timer per release) cost about as
much client CPU as the statement itself (~45 µs of ~50 µs measured on loopback). Here a statement takes an
idle connection from a stack, runs, and puts it back; a waiter gets the connection handed over directly.

A connection whose statement did not end normally (cancelled because the client went away, a timeout, a
lost socket, any error) is not reused: it is closed, and the next statement makes a new one. An error in
a statement of ours is a bug or an outage either way; a fresh connection is the safe answer to both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any


class QueryPool:
    """Bounded, lazily connected query connections for one event loop."""

    def __init__(self, connect: Callable[[], Awaitable[Any]], size: int, idle: float) -> None:
        self._connect = connect
        self._size = size
        self._idle_after = idle
        self._idle: list[tuple[Any, float]] = []  # a stack: the warmest connection is reused first
        self._count = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._closed = False
        self._closing: set[asyncio.Future[None]] = set()  # idle connections being closed (kept: the loop
        # holds its Tasks only weakly)

    @property
    def count(self) -> int:
        """Connections open or being opened (for tests)."""
        return self._count

    async def run(self, method: str, query: str, *args: object) -> Any:
        """`conn.<method>(query, *args)` on a connection of the pool (fetch, fetchrow, fetchval, execute)."""
        conn = await self._get()
        try:
            result = await getattr(conn, method)(query, *args)
        except BaseException:
            self._discard(conn)
            raise
        self._put(conn)
        return result

    async def _get(self) -> Any:
        while True:
            while self._idle:
                conn, _ = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._count -= 1
            if self._closed:
                raise ConnectionError("the database link is closed")
            if self._count < self._size:
                self._count += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._count -= 1
                    self._wake()  # a waiter may try to connect in our place
                    raise
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                conn = await fut
            except asyncio.CancelledError:
                if not fut.done() or fut.cancelled():
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                elif fut.exception() is None:  # served just as we were cancelled: pass it on
                    handed = fut.result()
                    if handed is not None:
                        self._put(handed)  # a connection
                    else:
                        self._wake()  # room to make one
                raise
            if conn is not None:
                return conn
            # woken without a connection: one was discarded, so there is room to make one

    def _put(self, conn: Any) -> None:
        if self._closed or conn.is_closed():
            self._discard(conn)
            return
        if self._hand(conn):
            return
        now = time.monotonic()
        self._idle.append((conn, now))
        if now - self._idle[0][1] > self._idle_after:  # the coldest one has been unused too long
            old, _ = self._idle.pop(0)
            self._count -= 1
            closing = asyncio.ensure_future(_close(old))  # a goodbye, not a reset: it is idle
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def _discard(self, conn: Any) -> None:
        """Forget `conn` and close it at once (its state is unknown); a waiter may now make a connection."""
        self._count -= 1
        if not conn.is_closed():
            conn.terminate()
        self._wake()

    def _wake(self) -> None:
        """Tell the first waiter there is room to make a connection."""
        self._hand(None)

    def _hand(self, conn: Any) -> bool:
        """Give `conn` (None: room to make one) to the first waiter still waiting; False when none is."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    async def close(self) -> None:
        """Close the idle connections now; those in use are closed when their statement ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._count -= 1
            await _close(conn)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("the database link is closed"))


async def _close(conn: Any) -> None:
    """Close politely (a Terminate message), or at once if the server does not answer in time."""
    try:
        await conn.close(timeout=5)
    except Exception:
        conn.terminate()
