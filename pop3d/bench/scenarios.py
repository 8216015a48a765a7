"""What one benchmark session does, per scenario, and how it is counted.

Counting rules (the numbers are compared with independent generators, so they must be honest):
* a session counts only when the server answered `+OK` to its QUIT (RFC 1939 §6: the UPDATE state ran);
* a message counts when its whole RETR reply arrived; its octets are the body as sent on the wire
  (dot-stuffed, CRLF line ends, without the terminating `.` line);
* every failure is counted once, by kind (`connect ECONNREFUSED`, `-ERR PASS [IN-USE]`, `timeout RETR`,
  `closed during STAT`), and ends that session;
* latency is from the write of a command to the last octet of its reply (pop3d.bench.commands); for a
  pipelined write, from the write of the whole batch, which is what a pipelining client waits. `session` is
  a whole successful session, from its start (open loop: its scheduled arrival) to the `+OK` of QUIT.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from pop3d.bench import logins
from pop3d.bench.client import ClientProtocol, Reply
from pop3d.bench.commands import BenchError, RunConfig, check, command, open_connection, remember, wait_reply
from pop3d.bench.names import SCENARIOS
from pop3d.bench.stats import LATENCY_KEYS, Stats

__all__ = ["BY_NAME", "LATENCY_KEYS", "SCENARIOS", "BenchError", "RunConfig", "Stats", "one_session"]


async def _login(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    await logins.BY_NAME[rc.login](conn, stats, rc, user, password)
    stats.logins += 1


def _count(reply: Reply) -> int:
    try:
        return int(reply.status.split()[1])
    except (IndexError, ValueError):
        raise BenchError("malformed STAT") from None


async def _quit(conn: ClientProtocol, stats: Stats, rc: RunConfig) -> None:
    await command(conn, stats, rc, b"QUIT")
    stats.sessions += 1


async def poll(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    await _login(conn, stats, rc, user, password)
    await command(conn, stats, rc, b"STAT")
    await _quit(conn, stats, rc)


async def _download(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str, delete: bool) -> None:
    await _login(conn, stats, rc, user, password)
    n = _count(await command(conn, stats, rc, b"STAT"))
    await command(conn, stats, rc, b"UIDL", multi=True)
    for i in range(1, n + 1):
        reply = await command(conn, stats, rc, b"RETR %d" % i, multi=True)
        stats.messages += 1
        stats.octets += reply.octets
        if delete:
            await command(conn, stats, rc, b"DELE %d" % i)
    await _quit(conn, stats, rc)


async def download(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    await _download(conn, stats, rc, user, password, delete=False)


async def download_delete(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    """RETR and DELE every message: the maildrops are empty after the first session of each user."""
    await _download(conn, stats, rc, user, password, delete=True)


async def top_list(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    """A client showing a message list: LIST, then the headers of each message (TOP n 0, RFC 1939 §7).

    Only TOP replies count as messages and octets (headers plus the blank line, as sent)."""
    await _login(conn, stats, rc, user, password)
    n = _count(await command(conn, stats, rc, b"STAT"))
    await command(conn, stats, rc, b"LIST", multi=True)
    for i in range(1, n + 1):
        reply = await command(conn, stats, rc, b"TOP %d 0" % i, multi=True)
        stats.messages += 1
        stats.octets += reply.octets
    await _quit(conn, stats, rc)


async def pipelined(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    """The whole session in one write: USER PASS STAT UIDL RETR 1..n QUIT (RFC 2449 §6.6 PIPELINING).

    n is what STAT said in this user's previous session (0 the first time): a client cannot know it before.
    The login is USER/PASS, APOP or AUTH PLAIN with an initial response (one line each way, so it pipelines).
    """
    n = rc.message_counts.get(user, 0)
    login = logins.one_line(conn, rc.login, user, password)
    cmds = [
        *((line, False) for line in login),
        (b"STAT", False),
        (b"UIDL", True),
        *((b"RETR %d" % i, True) for i in range(1, n + 1)),
        (b"QUIT", False),
    ]
    t0 = time.perf_counter()
    futures = conn.send(cmds)
    for i, ((line, _), fut) in enumerate(zip(cmds, futures, strict=True)):
        verb = line.split(b" ", 1)[0].decode()
        reply = await wait_reply(fut, verb, rc.timeout)
        check(stats, verb, reply, reply.done - t0)
        if i == len(login) - 1:  # the reply that decides the login
            stats.logins += 1
        elif verb == "STAT":
            rc.message_counts[user] = _count(reply)
        elif verb == "RETR":
            stats.messages += 1
            stats.octets += reply.octets
    stats.sessions += 1


async def idle(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    """Log in, then NOOP every `noop_interval` seconds (first one at a random phase) until the deadline.

    NOOPs sent while this process is still logging its sessions in are counted as `NOOP-ramp`: `NOOP` is
    the latency with every session held, the number the idle scenario is about.
    """
    await _login(conn, stats, rc, user, password)
    loop = asyncio.get_running_loop()
    stats.held += 1
    stats.held_max = max(stats.held_max, stats.held)
    try:
        delay = random.uniform(0, rc.noop_interval)
        while loop.time() + delay < rc.deadline:
            await asyncio.sleep(delay)
            held = stats.held >= rc.clients
            await command(conn, stats, rc, b"NOOP", label="NOOP" if held else "NOOP-ramp")
            delay = rc.noop_interval
        await asyncio.sleep(max(0.0, rc.deadline - loop.time()))
    finally:
        stats.held -= 1
    await _quit(conn, stats, rc)


Scenario = Callable[[ClientProtocol, Stats, RunConfig, str, str], Awaitable[None]]
BY_NAME: dict[str, Scenario] = {
    "poll": poll,
    "download": download,
    "download-delete": download_delete,
    "top-list": top_list,
    "idle": idle,
    "pipelined": pipelined,
}
assert tuple(BY_NAME) == SCENARIOS


async def one_session(
    scenario: Scenario, stats: Stats, rc: RunConfig, user: str, password: str, scheduled: float | None = None
) -> None:
    """Run one session; count its failure by kind instead of raising. The connection is always closed.

    `scheduled` (time.perf_counter()) is an open-loop arrival's due time: `connect` and `session` are then
    measured from it, so a session the generator started late is as late in the results (no coordinated
    omission)."""
    t0 = time.perf_counter() if scheduled is None else scheduled
    conn: ClientProtocol | None = None
    try:
        conn = await open_connection(rc, stats, t0, user)
        await scenario(conn, stats, rc, user, password)  # returns only after the +OK to QUIT
        stats.record("session", time.perf_counter() - t0)
        remember(rc, conn, user)
    except BenchError as exc:
        stats.errors[exc.kind] += 1
    finally:
        if conn is not None:
            stats.received += conn.received
            if conn.transport is not None:
                conn.transport.close()
