"""What one benchmark session does, per scenario, and how it is counted.

Counting rules (the numbers are compared with independent generators, so they must be honest):
* a session counts only when the server answered `+OK` to its QUIT (RFC 1939 §6: the UPDATE state ran);
* a message counts when its whole RETR reply arrived; its octets are the body as sent on the wire
  (dot-stuffed, CRLF line ends, without the terminating `.` line);
* every failure is counted once, by kind (`connect ECONNREFUSED`, `-ERR PASS [IN-USE]`, `timeout RETR`,
  `closed during STAT`), and ends that session;
* latency is from the write of a command to the last octet of its reply; for a pipelined write, from the
  write of the whole batch, which is what a pipelining client waits.
"""

from __future__ import annotations

import asyncio
import errno
import random
import re
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pop3d.bench.client import ClientProtocol, Reply, connect, start_tls
from pop3d.bench.hist import Histogram

SCENARIOS = ("poll", "download", "download-delete", "idle", "pipelined")
_CODE = re.compile(rb"^-ERR \[([A-Z/-]+)\]")


class BenchError(Exception):
    """A session failed; `kind` is the key it is counted under."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass
class Stats:
    """What one generator process measured; merged across processes by `merge`."""

    sessions: int = 0
    logins: int = 0
    messages: int = 0
    octets: int = 0
    received: int = 0
    held: int = 0  # idle: sessions logged in right now
    held_max: int = 0
    unfinished: int = 0  # sessions still running when the run ended (neither counted nor errors)
    errors: Counter[str] = field(default_factory=Counter)
    latency: dict[str, Histogram] = field(default_factory=dict)

    def hist(self, verb: str) -> Histogram:
        h = self.latency.get(verb)
        if h is None:
            h = self.latency[verb] = Histogram()
        return h

    def to_state(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in ("sessions", "logins", "messages", "octets", "received", "held_max", "unfinished")
        }
        d["errors"] = dict(self.errors)
        d["latency"] = {verb: h.to_state() for verb, h in self.latency.items()}
        return d

    def merge(self, state: dict[str, Any]) -> None:
        for k in ("sessions", "logins", "messages", "octets", "received", "held_max", "unfinished"):
            setattr(self, k, getattr(self, k) + state[k])
        self.errors.update(state["errors"])
        for verb, h in state["latency"].items():
            self.hist(verb).merge(Histogram.from_state(h))


@dataclass
class RunConfig:
    host: str
    port: int
    scenario: str
    deadline: float = 0.0  # loop.time() after which no new session starts and idle sessions QUIT
    timeout: float = 30.0  # per command
    tls: str | None = None  # None, "tls" (implicit, RFC 8314) or "stls" (RFC 2595)
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    noop_interval: float = 5.0
    message_counts: dict[str, int] = field(default_factory=dict)  # pipelined: user -> count seen by STAT
    clients: int = 0  # concurrent clients of this generator process (idle: "all held" means this many)


def _error_kind(verb: str, reply: Reply) -> str:
    m = _CODE.match(reply.status)
    return f"-ERR {verb} [{m[1].decode()}]" if m else f"-ERR {verb}"


async def _wait(fut: Awaitable[Reply], verb: str, limit: float) -> Reply:
    try:
        return await asyncio.wait_for(fut, limit)
    except TimeoutError:
        raise BenchError(f"timeout {verb}") from None
    except ConnectionError:
        raise BenchError(f"closed during {verb}") from None


async def command(
    conn: ClientProtocol, stats: Stats, rc: RunConfig, line: bytes, multi: bool = False, label: str | None = None
) -> Reply:
    verb = label or line.split(b" ", 1)[0].decode()
    t0 = time.perf_counter()
    (fut,) = conn.send([(line, multi)])
    reply = await _wait(fut, verb, rc.timeout)
    stats.hist(verb).add(reply.done - t0)
    if not reply.ok:
        raise BenchError(_error_kind(verb, reply))
    return reply


async def open_connection(rc: RunConfig, stats: Stats) -> ClientProtocol:
    """Connect and read the greeting (latency `connect`), then STLS if asked."""
    t0 = time.perf_counter()
    try:
        conn = await asyncio.wait_for(
            connect(rc.host, rc.port, rc.ssl_context if rc.tls == "tls" else None, rc.server_hostname),
            rc.timeout,
        )
    except TimeoutError:
        raise BenchError("timeout connect") from None
    except ssl.SSLError as exc:
        raise BenchError(f"tls {exc.reason or type(exc).__name__}") from None
    except OSError as exc:
        raise BenchError(f"connect {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}") from None
    try:
        greeting = await _wait(conn.greeting, "greeting", rc.timeout)
        if not greeting.ok:
            raise BenchError(_error_kind("greeting", greeting))
        stats.hist("connect").add(greeting.done - t0)
        if rc.tls == "stls":
            await command(conn, stats, rc, b"STLS")
            assert rc.ssl_context is not None
            try:
                await asyncio.wait_for(start_tls(conn, rc.ssl_context, rc.server_hostname), rc.timeout)
            except TimeoutError:
                raise BenchError("timeout STLS handshake") from None
            except (ssl.SSLError, OSError) as exc:
                raise BenchError(f"tls {getattr(exc, 'reason', None) or type(exc).__name__}") from None
    except BaseException:
        conn.abort()
        raise
    return conn


async def _login(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    await command(conn, stats, rc, b"USER " + user.encode())
    await command(conn, stats, rc, b"PASS " + password.encode())
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
    await _download(conn, stats, rc, user, password, delete=True)


async def pipelined(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    """The whole session in one write: USER PASS STAT UIDL RETR 1..n QUIT (RFC 2449 §6.6 PIPELINING).

    n is what STAT said in this user's previous session (0 the first time): a client cannot know it before.
    """
    n = rc.message_counts.get(user, 0)
    cmds = [
        (b"USER " + user.encode(), False),
        (b"PASS " + password.encode(), False),
        (b"STAT", False),
        (b"UIDL", True),
        *((b"RETR %d" % i, True) for i in range(1, n + 1)),
        (b"QUIT", False),
    ]
    t0 = time.perf_counter()
    futures = conn.send(cmds)
    for (line, _), fut in zip(cmds, futures, strict=True):
        verb = line.split(b" ", 1)[0].decode()
        reply = await _wait(fut, verb, rc.timeout)
        stats.hist(verb).add(reply.done - t0)
        if not reply.ok:
            raise BenchError(_error_kind(verb, reply))
        if verb == "PASS":
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
    "idle": idle,
    "pipelined": pipelined,
}


async def one_session(scenario: Scenario, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    """Run one session; count its failure by kind instead of raising. The connection is always closed."""
    conn: ClientProtocol | None = None
    try:
        conn = await open_connection(rc, stats)
        await scenario(conn, stats, rc, user, password)
    except BenchError as exc:
        stats.errors[exc.kind] += 1
    finally:
        if conn is not None:
            stats.received += conn.received
            if conn.transport is not None:
                conn.transport.close()
