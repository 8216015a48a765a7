"""How a benchmark session logs in (`--login`): USER/PASS, APOP, or SASL AUTH with PLAIN or SCRAM-SHA-256.

Which ones a maildrop allows depends on how its password is stored: APOP needs the clear secret ({PLAIN}),
SCRAM a {PLAIN} or {SCRAM-SHA-256} entry, USER/PASS and PLAIN work with every scheme (`pop3d mkmaildrops
--scheme` says which). A login's latency is recorded under the command that decides it: `PASS`, `APOP`, or
`AUTH` for the whole SASL exchange (first line to the final `+OK`, client-side SCRAM work included).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Awaitable, Callable

import scramp

from pop3d.bench.client import ClientProtocol, Reply
from pop3d.bench.commands import BenchError, RunConfig, check, command, wait_reply
from pop3d.bench.names import LOGINS
from pop3d.bench.stats import Stats

_TIMESTAMP = re.compile(rb"<[^<>\s]+>")  # RFC 1939 §7: the greeting's msg-id, e.g. <1896.697170952@host>

Login = Callable[[ClientProtocol, Stats, RunConfig, str, str], Awaitable[None]]


async def user_pass(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    await command(conn, stats, rc, b"USER " + user.encode())
    await command(conn, stats, rc, b"PASS " + password.encode())


def _apop_line(conn: ClientProtocol, user: str, password: str) -> bytes:
    """RFC 1939 §7: APOP name MD5(timestamp + secret) in lower-case hex."""
    m = _TIMESTAMP.search(conn.greeting.result().status)
    if m is None:
        raise BenchError("no APOP timestamp in the greeting")
    digest = hashlib.md5(m[0] + password.encode()).hexdigest()
    return b"APOP %s %s" % (user.encode(), digest.encode())


async def apop(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    await command(conn, stats, rc, _apop_line(conn, user, password))


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data) or b"="


async def _sasl(conn: ClientProtocol, rc: RunConfig, line: bytes) -> Reply:
    (fut,) = conn.send([(line, False)])
    return await wait_reply(fut, "AUTH", rc.timeout)


def _challenge(reply: Reply) -> bytes:
    """The data of a `+ base64` continuation (RFC 5034 §4); BenchError for anything else."""
    if reply.ok or not reply.status.startswith(b"+"):
        raise BenchError("-ERR AUTH" if not reply.ok else "AUTH: +OK before the exchange ended")
    try:
        return base64.b64decode(reply.status[1:].strip(), validate=True)
    except ValueError:
        raise BenchError("AUTH: challenge is not base64") from None


def _plain_line(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + _b64(b"\0%s\0%s" % (user.encode(), password.encode()))


async def plain(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    """RFC 4616 with the initial response on the AUTH line (RFC 5034 §4)."""
    t0 = time.perf_counter()
    reply = await _sasl(conn, rc, _plain_line(user, password))
    check(stats, "AUTH", reply, reply.done - t0)


async def scram(conn: ClientProtocol, stats: Stats, rc: RunConfig, user: str, password: str) -> None:
    """RFC 5802 / RFC 7677 without channel binding; the server signature is checked, then an empty response
    acknowledges server-final (RFC 5034 §4: POP3 cannot carry it with +OK)."""
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    t0 = time.perf_counter()
    reply = await _sasl(conn, rc, b"AUTH SCRAM-SHA-256 " + _b64(client.get_client_first().encode()))
    if not reply.ok and reply.status.startswith(b"-"):
        check(stats, "AUTH", reply, reply.done - t0)
    try:
        client.set_server_first(_challenge(reply).decode())
        reply = await _sasl(conn, rc, _b64(client.get_client_final().encode()))
        if reply.status.startswith(b"-"):
            check(stats, "AUTH", reply, reply.done - t0)
        client.set_server_final(_challenge(reply).decode())
    except (scramp.ScramException, UnicodeDecodeError):
        raise BenchError("AUTH: SCRAM exchange failed on the client side") from None
    reply = await _sasl(conn, rc, b"")
    check(stats, "AUTH", reply, reply.done - t0)


BY_NAME: dict[str, Login] = {"user": user_pass, "apop": apop, "plain": plain, "scram": scram}
assert tuple(BY_NAME) == LOGINS


def one_line(conn: ClientProtocol, login: str, user: str, password: str) -> list[bytes]:
    """The command lines of a login that needs no challenge round trip (one of PIPELINABLE)."""
    if login == "user":
        return [b"USER " + user.encode(), b"PASS " + password.encode()]
    if login == "apop":
        return [_apop_line(conn, user, password)]
    if login == "plain":
        return [_plain_line(user, password)]
    raise ValueError(f"--login {login} cannot be pipelined")
