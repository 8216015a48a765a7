"""pop3d.storage.postgres.pool.QueryPool with fake connections: the bound, the hand-over to waiters, and
what happens to a connection whose statement did not end normally (no database needed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pop3d.storage.postgres import pool as pool_mod
from pop3d.storage.postgres.pool import QueryPool


class FakeConn:
    """Answers `fetchval(query)` once `release` is set (None: at once); `fail` makes the next statement raise."""

    made = 0

    def __init__(self) -> None:
        FakeConn.made += 1
        self.n = FakeConn.made
        self.closed = self.terminated = False
        self.release: asyncio.Event | None = None
        self.fail: Exception | None = None

    def is_closed(self) -> bool:
        return self.closed or self.terminated

    def terminate(self) -> None:
        self.terminated = True

    async def close(self, timeout: float | None = None) -> None:
        self.closed = True

    async def fetchval(self, query: str, *args: object) -> Any:
        if self.release is not None:
            await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return (query, self.n)


class Connector:
    def __init__(self) -> None:
        self.conns: list[FakeConn] = []
        self.fail: Exception | None = None

    async def __call__(self) -> FakeConn:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        conn = FakeConn()
        self.conns.append(conn)
        return conn


async def test_statements_reuse_one_connection_and_never_exceed_the_bound() -> None:
    connect = Connector()
    pool = QueryPool(connect, 2, 300.0)
    assert await pool.run("fetchval", "a") == ("a", connect.conns[0].n)
    assert await pool.run("fetchval", "b") == ("b", connect.conns[0].n)
    assert len(connect.conns) == 1
    gate = asyncio.Event()

    async def slow(query: str) -> Any:
        return await pool.run("fetchval", query)

    for conn in connect.conns:
        conn.release = gate
    tasks = [asyncio.ensure_future(slow(f"q{i}")) for i in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert pool.count == 2 and len(connect.conns) == 2  # three statements wait for a connection
    for conn in connect.conns:
        conn.release = gate
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [q for q, _ in results] == [f"q{i}" for i in range(5)] and len(connect.conns) == 2
    assert pool.count == 2


async def test_a_statement_that_fails_or_is_cancelled_leaves_its_connection_closed() -> None:
    connect = Connector()
    pool = QueryPool(connect, 1, 300.0)
    await pool.run("fetchval", "warm")
    first = connect.conns[0]
    first.fail = OSError("connection reset")
    with pytest.raises(OSError):
        await pool.run("fetchval", "x")
    assert first.terminated and pool.count == 0
    assert (await pool.run("fetchval", "y"))[1] != first.n  # a new connection
    second = connect.conns[1]
    second.release = asyncio.Event()
    task = asyncio.ensure_future(pool.run("fetchval", "stuck"))
    await asyncio.sleep(0)
    task.cancel()  # the client went away mid-statement: the connection's state is unknown
    with pytest.raises(asyncio.CancelledError):
        await task
    assert second.terminated and pool.count == 0


async def _one_busy() -> tuple[QueryPool, FakeConn, asyncio.Event, asyncio.Future[Any]]:
    """A pool of one connection, busy with a statement that ends when the returned event is set."""
    connect = Connector()
    pool = QueryPool(connect, 1, 300.0)
    await pool.run("fetchval", "warm")
    conn = connect.conns[0]
    release = conn.release = asyncio.Event()
    busy = asyncio.ensure_future(pool.run("fetchval", "busy"))
    await asyncio.sleep(0)
    return pool, conn, release, busy


async def test_waiters_are_served_in_turn_and_a_cancelled_one_passes_its_connection_on() -> None:
    pool, conn, release, busy = await _one_busy()
    gone = asyncio.ensure_future(pool.run("fetchval", "gone"))
    later = asyncio.ensure_future(pool.run("fetchval", "later"))
    await asyncio.sleep(0)
    release.set()
    await asyncio.sleep(0)  # `busy` ends and hands the connection to `gone`, which has not run yet...
    assert busy.done() and not gone.done()
    gone.cancel()  # ...and is cancelled before it does
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await later == ("later", conn.n)  # the connection went on to the next waiter
    assert FakeConn.made == conn.n and pool.count == 1 and not conn.is_closed()


async def test_a_failed_connect_frees_its_place_for_a_waiter() -> None:
    connect = Connector()
    connect.fail = OSError("refused")
    pool = QueryPool(connect, 1, 300.0)
    with pytest.raises(OSError):
        await pool.run("fetchval", "x")
    assert pool.count == 0
    connect.fail = None
    assert (await pool.run("fetchval", "y"))[0] == "y" and pool.count == 1


async def test_an_idle_connection_is_closed_after_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(pool_mod.time, "monotonic", lambda: now[0])
    connect = Connector()
    pool = QueryPool(connect, 3, 300.0)
    gate = asyncio.Event()

    async def held(query: str) -> Any:
        return await pool.run("fetchval", query)

    tasks = [asyncio.ensure_future(held(f"q{i}")) for i in range(2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for conn in connect.conns:
        conn.release = gate
    gate.set()
    await asyncio.gather(*tasks)
    assert pool.count == 2
    now[0] += 301  # both unused for longer than `idle`: the next return closes the coldest one
    await pool.run("fetchval", "again")
    await asyncio.sleep(0)
    assert pool.count == 1 and sum(c.closed for c in connect.conns) == 1


async def test_close_closes_the_idle_and_refuses_waiters() -> None:
    pool, conn, release, busy = await _one_busy()
    waiting = asyncio.ensure_future(pool.run("fetchval", "waiting"))
    await asyncio.sleep(0)
    await pool.close()
    with pytest.raises(ConnectionError):
        await waiting
    release.set()
    assert (await busy)[0] == "busy"  # a statement under way ends; its connection is then closed
    assert conn.is_closed() and pool.count == 0
    with pytest.raises(ConnectionError):
        await pool.run("fetchval", "after")


async def test_a_waiter_cancelled_when_woken_to_connect_passes_that_turn_on() -> None:
    """A discarded connection wakes one waiter to make a new one; if that waiter is gone, the next gets
    the turn, rather than waiting for some other statement to come by."""
    pool, conn, release, busy = await _one_busy()
    gone = asyncio.ensure_future(pool.run("fetchval", "gone"))
    later = asyncio.ensure_future(pool.run("fetchval", "later"))
    await asyncio.sleep(0)
    conn.fail = OSError("connection reset")
    release.set()
    await asyncio.sleep(0)  # `busy` fails: its connection is discarded and `gone` woken to connect...
    assert busy.done() and not gone.done()
    gone.cancel()  # ...but is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await gone
    with pytest.raises(OSError):
        await busy
    assert (await asyncio.wait_for(later, 5))[0] == "later"
    assert pool.count == 1
