"""One command and its reply, timed and counted; the connection a session starts with.

Latency is from the write of a command to the last octet of its reply; a reply `-ERR` is recorded as
`VERB-failed`, apart from the successes (a failed PASS waits out the server's failure delay: mixing the two
would hide both). Every failure raises `BenchError`, whose `kind` is what the run counts it under.
"""

from __future__ import annotations

import asyncio
import errno
import re
import ssl
import time
from dataclasses import dataclass, field

from pop3d.bench.client import ClientProtocol, Reply, connect, start_tls
from pop3d.bench.stats import Stats

_CODE = re.compile(rb"^-ERR \[([A-Z/-]+)\]")


class BenchError(Exception):
    """A session failed; `kind` is the key it is counted under."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


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
    login: str = "user"  # one of pop3d.bench.names.LOGINS
    message_counts: dict[str, int] = field(default_factory=dict)  # pipelined: user -> count seen by STAT
    resume: bool = False  # TLS: resume each user's previous session, as a mail client does
    tls_sessions: dict[str, ssl.SSLSession] = field(default_factory=dict)  # resume: user -> newest session
    clients: int = 0  # concurrent clients of this generator process (idle: "all held" means this many)


def error_kind(verb: str, reply: Reply) -> str:
    m = _CODE.match(reply.status)
    return f"-ERR {verb} [{m[1].decode()}]" if m else f"-ERR {verb}"


def _expire(fut: asyncio.Future[Reply]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def wait_reply(fut: asyncio.Future[Reply], verb: str, limit: float) -> Reply:
    """The reply, or BenchError after `limit` seconds. One timer handle, where asyncio.wait_for adds a
    waiter future and callbacks per command: this is the generator's hottest await."""
    timer = fut.get_loop().call_later(limit, _expire, fut)
    try:
        return await fut
    except TimeoutError:
        raise BenchError(f"timeout {verb}") from None
    except ConnectionError:
        raise BenchError(f"closed during {verb}") from None
    finally:
        timer.cancel()


def check(stats: Stats, verb: str, reply: Reply, seconds: float) -> Reply:
    """Record the latency under VERB or VERB-failed; raise for `-ERR`."""
    if reply.ok:
        stats.record(verb, seconds)
        return reply
    stats.record(verb + "-failed", seconds)
    raise BenchError(error_kind(verb, reply))


async def command(
    conn: ClientProtocol, stats: Stats, rc: RunConfig, line: bytes, multi: bool = False, label: str | None = None
) -> Reply:
    verb = label or line.split(b" ", 1)[0].decode()
    t0 = time.perf_counter()
    (fut,) = conn.send([(line, multi)])
    reply = await wait_reply(fut, verb, rc.timeout)
    return check(stats, verb, reply, reply.done - t0)


async def open_connection(
    rc: RunConfig, stats: Stats, t0: float | None = None, user: str | None = None
) -> ClientProtocol:
    """Connect and read the greeting (latency `connect`, from `t0` when given: the scheduled arrival of an
    open-loop session, so a late start counts against the latency as a real client would see it), then
    STLS if asked. With `rc.resume`, the TLS handshake resumes `user`'s previous session (`remember`)."""
    t0 = time.perf_counter() if t0 is None else t0
    session = rc.tls_sessions.get(user) if rc.resume and user is not None else None
    try:
        conn = await asyncio.wait_for(
            connect(rc.host, rc.port, rc.ssl_context if rc.tls == "tls" else None, rc.server_hostname, session),
            rc.timeout,
        )
    except TimeoutError:
        raise BenchError("timeout connect") from None
    except ssl.SSLError as exc:
        raise BenchError(f"tls {exc.reason or type(exc).__name__}") from None
    except OSError as exc:
        raise BenchError(f"connect {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}") from None
    try:
        greeting = await wait_reply(conn.greeting, "greeting", rc.timeout)
        if not greeting.ok:
            raise BenchError(error_kind("greeting", greeting))
        stats.record("connect", greeting.done - t0)
        if rc.tls == "stls":
            await command(conn, stats, rc, b"STLS")
            assert rc.ssl_context is not None
            try:
                await asyncio.wait_for(start_tls(conn, rc.ssl_context, rc.server_hostname, session), rc.timeout)
            except TimeoutError:
                raise BenchError("timeout STLS handshake") from None
            except (ssl.SSLError, OSError) as exc:
                raise BenchError(f"tls {getattr(exc, 'reason', None) or type(exc).__name__}") from None
    except BaseException:
        conn.abort()
        raise
    if session is not None and conn.session_reused:
        stats.tls_resumed += 1
    return conn


def remember(rc: RunConfig, conn: ClientProtocol, user: str) -> None:
    """After a session: keep its newest TLS session (TLS 1.3: the last ticket) for the user's next one."""
    if rc.resume and (session := conn.session) is not None:
        rc.tls_sessions[user] = session
