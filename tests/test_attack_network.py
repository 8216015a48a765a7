"""Attacks from the network before (and just after) login: pipelined floods, slowloris, connection limits.

Each test performs the attack over loopback against a real server and checks what the hardened server must
guarantee. Each attack succeeded against the server before its fix.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from attackkit import MIB, Line, Pop3dProcess, blast, drain, first_line
from conftest import USERS, Env, deliver

pytestmark = pytest.mark.timeout(60)

#: a pre-login client whose replies are never read may make the server hold at most this much more memory
FLOOD_GROWTH_LIMIT = 16 * MIB


def base_sections(env: Env, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "auth": {"passwd_file": str(env.passwd), "failure_delay": 0},
        "storage": {"location": str(env.mail / "{user}" / "Maildir")},
    }
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return sections


@pytest.fixture
def spawn(env: Env):  # type: ignore[no-untyped-def]
    """spawn(**sections) -> a started Pop3dProcess for this test's Env; killed at teardown."""
    started: list[Pop3dProcess] = []

    def start(name: str = "pop3d", memory_cap: int = 768 * MIB, **sections: dict[str, Any]) -> Pop3dProcess:
        p = Pop3dProcess(env.root, base_sections(env, **sections), name=name, memory_cap=memory_cap)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.kill()


def small_rcvbuf_socket(port: int) -> socket.socket:
    """A client that reads nothing and offers the server as little kernel buffer as it can."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def warm_up(port: int) -> None:
    """Legitimate traffic first, so lazily imported modules and allocator arenas are in the baseline."""
    c = Line(port)
    c.send(b"CAPA\r\n" * 2000)
    for _ in range(2000):
        assert c.line().startswith(b"+OK")
        c.multi()
    assert c.login("bob", USERS["bob"]).startswith(b"+OK")
    c.cmd(b"QUIT")
    c.close()
    time.sleep(0.3)


def others_still_served(port: int) -> None:
    """Another client is greeted, logs in and is answered while the attack is going on."""
    c = Line(port, timeout=5)
    assert c.greeting.startswith(b"+OK"), c.greeting
    assert c.login("bob", USERS["bob"]).startswith(b"+OK")
    assert c.cmd(b"STAT").startswith(b"+OK")
    c.cmd(b"QUIT")
    c.close()


# -- pipelined floods ---------------------------------------------------------------------------------------


def test_capa_flood_never_read_cannot_grow_the_server(spawn: Any) -> None:
    """Attack: before login, pipeline `CAPA` 400,000 times (2.4 MB in, ~65 MB of replies) and never read.

    Required: the server stops reading while unsent output is above `server.write_buffer` (synchronous
    replies included) and closes a pre-login connection whose unsent output passes a few KiB; its memory
    grows by less than 16 MiB, and other clients are greeted and served meanwhile.
    """
    srv = spawn(memory_cap=512 * MIB)
    warm_up(srv.port)
    srv.reset_memory_baseline()
    s = small_rcvbuf_socket(srv.port)
    sent = blast(s, b"CAPA\r\n" * 10_000, 400_000 * 6, seconds=8)
    assert sent > 6_000, "the flood did not even get its first 1,000 commands out"  # an attack did happen
    time.sleep(1.0)  # let the server chew on what it accepted
    others_still_served(srv.port)
    growth = srv.peak_growth()
    assert growth < FLOOD_GROWTH_LIMIT, f"server memory grew by {growth / MIB:.0f} MiB from one unread client"
    got, eof = drain(s, 16 * MIB, seconds=5)
    s.close()
    assert eof, f"the flooding pre-login connection was not closed ({got} octets of replies were waiting)"


def test_retr_flood_never_read_cannot_grow_the_server(env: Env, spawn: Any) -> None:
    """Attack: log in, pipeline `RETR 1` 1,500 times for a 100 KiB message (~150 MB of replies), never read.

    Required: reading pauses while unsent output is above `server.write_buffer`, so the server holds at most
    about that much for the connection (less than 16 MiB of growth), and others are served meanwhile.
    """
    line = b"y" * 99 + b"\n"
    deliver(env.maildir("alice"), b"Subject: big\n\n" + line * 1000)  # 100,000 octets: one synchronous reply
    srv = spawn(memory_cap=512 * MIB)
    warm_up(srv.port)
    c = Line(srv.port)
    assert c.login("alice", USERS["alice"]).startswith(b"+OK")
    assert c.cmd(b"RETR 1").startswith(b"+OK")
    c.multi()  # the message path is warm too
    srv.reset_memory_baseline()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = blast(c.sock, b"RETR 1\r\n" * 1500, 1500 * 8, seconds=8)
    assert sent == 1500 * 8, f"only {sent} octets of the pipeline went out"
    time.sleep(1.5)
    others_still_served(srv.port)
    growth = srv.peak_growth()
    c.close()
    assert growth < FLOOD_GROWTH_LIMIT, f"server memory grew by {growth / MIB:.0f} MiB from one unread client"


def test_streamed_retr_flood_stays_bounded(env: Env, spawn: Any) -> None:
    """Attack: pipeline `RETR 1` 200 times for a 4 MiB message (streamed in slices) and never read.

    Streamed bodies already wait for the transport (pause_writing): this guards that it stays so (growth
    under 16 MiB, others served).
    """
    line = b"z" * 1023 + b"\n"
    deliver(env.maildir("alice"), b"Subject: huge\n\n" + line * 4096)
    srv = spawn(memory_cap=512 * MIB)
    warm_up(srv.port)
    srv.reset_memory_baseline()
    c = Line(srv.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert c.login("alice", USERS["alice"]).startswith(b"+OK")
    blast(c.sock, b"RETR 1\r\n" * 200, 200 * 8, seconds=3)
    time.sleep(1.5)
    others_still_served(srv.port)
    growth = srv.peak_growth()
    c.close()
    assert growth < FLOOD_GROWTH_LIMIT, f"server memory grew by {growth / MIB:.0f} MiB from one unread client"


# -- slowloris ------------------------------------------------------------------------------------------------


SLOW = [
    pytest.param(b"CAPA\r\n" * 20, id="partial-line-trickle"),
    pytest.param(b"X" * 100, id="never-ending-line"),
]


@pytest.mark.parametrize("stream", SLOW)
def test_slowloris_cannot_hold_an_unauthenticated_session(start_server: Any, stream: bytes) -> None:
    """Attack: connect and send one byte every 0.5 s, never logging in (complete CAPA commands arrive every
    3 s in the first variant, one endless line in the second).

    Required: a client must finish logging in within `session.timeout_authorization` seconds of connecting,
    whatever it sends: with 2 s the server closes the connection by 2 s plus slack.
    """
    srv = start_server(session={"timeout_authorization": 2})
    c = Line(srv.port)
    t0 = time.monotonic()
    closed_at = None
    for b in stream:
        try:
            c.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic() - t0
            break
        if c.closed_within(0.5):
            closed_at = time.monotonic() - t0
            break
        if time.monotonic() - t0 > 6:
            break
    c.close()
    assert closed_at is not None, "the trickling client was still connected after 6 s (limit 2 s)"
    assert closed_at < 3.5, f"closed only after {closed_at:.1f} s (limit 2 s)"


def test_idle_unauthenticated_session_is_closed(start_server: Any) -> None:
    """Baseline of the slowloris test: a client that sends nothing is closed after the authorization timer."""
    srv = start_server(session={"timeout_authorization": 2})
    c = Line(srv.port)
    assert c.closed_within(3.5)
    c.close()


# -- connection limits ------------------------------------------------------------------------------------------


def refused(line: bytes, client: Line | None) -> bool:
    """A refused connection: `-ERR [SYS/TEMP] ...` (or nothing at all) and then the server closes it."""
    if client is None:
        return True
    ok = line.startswith(b"-ERR [SYS/TEMP]") and client.closed_within(3)
    client.close()
    return ok


def open_greeted(port: int, n: int, source: str | None = None) -> list[Line]:
    out: list[Line] = []
    for _ in range(n):
        line, c = first_line(port, source)
        assert c is not None and line.startswith(b"+OK"), f"connection {len(out) + 1} not greeted: {line!r}"
        out.append(c)
    return out


def greeted_again(port: int, source: str | None = None, seconds: float = 3) -> bool:
    """After a slot was freed, a new connection is greeted (the server may need a moment to notice)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        line, c = first_line(port, source)
        if c is not None:
            c.close()
        if line.startswith(b"+OK"):
            return True
        time.sleep(0.1)
    return False


def test_per_address_limit(start_server: Any) -> None:
    """Attack: one address opens connection after connection to exhaust the server's descriptors.

    Required: past `server.max_connections_per_ip` (addresses in `server.limit_exempt` not counted), a new
    connection from that address gets `-ERR [SYS/TEMP]` and is closed; other addresses are not affected;
    a freed slot can be used again.
    """
    srv = start_server(
        server={"max_connections_per_ip": 3, "max_connections": 100, "max_unauthenticated": 100, "limit_exempt": []}
    )
    held = open_greeted(srv.port, 3, source="127.0.0.1")
    for _ in range(5):
        assert refused(*first_line(srv.port, "127.0.0.1"))
    other = open_greeted(srv.port, 2, source="127.0.0.2")  # another address still gets in
    held.pop().close()
    assert greeted_again(srv.port, "127.0.0.1")
    for c in held + other:
        c.close()


def test_total_connection_limit(start_server: Any) -> None:
    """Attack: many addresses together open more connections than the server should hold.

    Required: past `server.max_connections` a new connection is admitted only by closing the oldest
    unauthenticated one (as Dovecot's login processes do when full); when every held connection is logged in,
    the new one gets `-ERR [SYS/TEMP]` and is closed. Logged-in sessions are never evicted.
    """
    srv = start_server(
        server={"max_connections": 2, "max_connections_per_ip": 100, "max_unauthenticated": 100, "limit_exempt": []}
    )
    alice = Line(srv.port, source="127.0.0.1")
    assert alice.login("alice", USERS["alice"]).startswith(b"+OK")
    idle = open_greeted(srv.port, 1, source="127.0.0.2")  # full now: one logged in, one not
    newcomer = open_greeted(srv.port, 1, source="127.0.0.3")  # admitted by closing the unauthenticated one
    assert idle[0].closed_within(3), "the unauthenticated connection was not evicted when full"
    assert newcomer[0].cmd(b"QUIT").startswith(b"+OK")
    newcomer[0].close()
    bob = Line(srv.port, source="127.0.0.4")
    assert bob.login("bob", USERS["bob"]).startswith(b"+OK")  # full again, every slot logged in
    for i in range(3):
        assert refused(*first_line(srv.port, f"127.0.1.{i + 1}"))
    for u in (alice, bob):
        assert u.cmd(b"NOOP") == b"+OK", "a logged-in session was evicted"
        assert u.cmd(b"QUIT").startswith(b"+OK")
        u.close()
    assert greeted_again(srv.port, "127.0.2.1")


def test_unauthenticated_connections_evict_oldest_not_logged_in(start_server: Any) -> None:
    """Attack: fill the server with connections that never log in, locking out real users.

    Required: with `server.max_unauthenticated` reached, a new connection is admitted and the *oldest
    unauthenticated* one is closed; a logged-in session is never evicted.
    """
    srv = start_server(
        server={"max_unauthenticated": 3, "max_connections_per_ip": 100, "max_connections": 100, "limit_exempt": []}
    )
    user = Line(srv.port)
    assert user.login("alice", USERS["alice"]).startswith(b"+OK")
    idle = open_greeted(srv.port, 3)
    newcomers = open_greeted(srv.port, 2)  # each evicts the oldest idle one
    assert idle[0].closed_within(3), "the oldest unauthenticated connection was not closed"
    assert idle[1].closed_within(3), "the second oldest unauthenticated connection was not closed"
    assert not idle[2].closed_within(0.3)
    assert newcomers[1].cmd(b"CAPA").startswith(b"+OK")
    assert user.cmd(b"NOOP") == b"+OK", "a logged-in session was evicted"
    assert user.cmd(b"QUIT").startswith(b"+OK")
    for c in idle + newcomers + [user]:
        c.close()


def test_loopback_is_exempt_by_default(start_server: Any) -> None:
    """Loopback is in the default `server.limit_exempt`: 60 connections from 127.0.0.1 (more than the default
    50 per address) are all greeted, so local monitoring and proxies keep working."""
    srv = start_server()
    held = open_greeted(srv.port, 60, source="127.0.0.1")
    for c in held:
        c.close()


def test_per_address_limit_holds_across_workers(env: Env, spawn: Any) -> None:
    """Attack: spread connections over worker processes (SO_REUSEPORT) to get past a per-process limit.

    Required: `server.max_connections_per_ip` counts the connections of all workers (`server.workers = 2`).
    """
    srv = spawn(
        server={
            "workers": 2,
            "max_connections_per_ip": 4,
            "max_connections": 100,
            "max_unauthenticated": 100,
            "limit_exempt": [],
        }
    )
    time.sleep(0.5)  # the start-up probe connection is gone
    results = [first_line(srv.port, "127.0.0.1") for _ in range(12)]
    greeted = [c for line, c in results if c is not None and line.startswith(b"+OK")]
    pids = {int(c.greeting.split(b"<", 1)[1].split(b".", 1)[0]) for c in greeted}
    others = [(line, c) for line, c in results if not (c is not None and line.startswith(b"+OK"))]
    assert len(greeted) == 4, f"{len(greeted)} of 12 connections from one address were admitted (limit 4)"
    assert all(refused(line, c) for line, c in others)
    assert pids, "no worker greeted anybody"
    for c in greeted:
        c.close()
