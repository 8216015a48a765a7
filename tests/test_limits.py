"""Hostile network clients against a real pop3d on loopback: connection limits, floods, slowloris.

Socket-level counterparts of the unit tests in tests/test_session.py (flow control, login deadline, limits
policy). Each test stays under ~20 s and a few hundred sockets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

from conftest import USERS, Raw, deliver
from test_cli import free_port, start, write_config
from test_workers import worker_pids

from pop3d.net.proxy import encode_v1

REFUSED = b"-ERR [SYS/TEMP]"


def greeted_or_refused(port: int) -> tuple[bool, socket.socket, bytes]:
    """Connect and read the first line: (greeted, socket, line)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        line = _line(s)
    except ConnectionResetError:  # accepted by a worker that was just killed
        line = b""
    return line.startswith(b"+OK"), s, line


def _line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def _eof(s: socket.socket, timeout: float = 10) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def config(env, port: int, workers: int = 1, **server: str) -> Path:
    cfg = write_config(env, port)
    extra = "".join(f"{k} = {v}\n" for k, v in {"workers": str(workers), **server}.items())
    cfg.write_text(cfg.read_text().replace("[server]\n", "[server]\n" + extra, 1))
    return cfg


def stop(proc) -> str:  # type: ignore[no-untyped-def]
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    return str(out)


# ---- per-address limit ------------------------------------------------------------------------------------


def test_per_address_limit_refuses_with_sys_temp(start_server):
    srv = start_server(server={"max_connections_per_ip": 20, "limit_exempt": []})
    held = []
    for _ in range(20):
        ok, s, line = greeted_or_refused(srv.port)
        assert ok, line
        held.append(s)
    for _ in range(30):
        ok, s, line = greeted_or_refused(srv.port)
        assert not ok and line.startswith(REFUSED), line
        assert _eof(s)
        s.close()
    held.pop().close()
    end = time.monotonic() + 5
    while True:  # the freed slot is released once the server saw the close
        ok, s, line = greeted_or_refused(srv.port)
        held.append(s)
        if ok or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert ok, line
    for s in held:
        s.close()


def test_loopback_exempt_by_default(start_server):
    srv = start_server(server={"max_connections_per_ip": 3})
    conns = [Raw(srv.port) for _ in range(10)]
    assert all(c.greeting.startswith(b"+OK") for c in conns)
    for c in conns:
        c.close()


def test_proxy_client_address_is_limited_not_the_proxy(start_server):
    srv = start_server(server={"proxy_protocol": True, "max_connections_per_ip": 2, "limit_exempt": []})

    def via_proxy(client: str) -> tuple[bool, socket.socket, bytes]:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(encode_v1((client, 40000), ("127.0.0.1", 110)))
        line = _line(s)
        return line.startswith(b"+OK"), s, line

    results = [via_proxy("192.0.2.1") for _ in range(3)]
    assert [ok for ok, _, _ in results] == [True, True, False]
    assert results[2][2].startswith(REFUSED)
    more = [via_proxy(f"192.0.2.{i}") for i in range(2, 6)]  # other clients through the same proxy
    assert all(ok for ok, _, _ in more)
    for _, s, _ in results + more:
        s.close()


# ---- unauthenticated connections --------------------------------------------------------------------------


def test_oldest_unauthenticated_is_evicted_never_a_logged_in_one(env, start_server):
    deliver(env.maildir("alice"), b"Subject: x\n\nx\n")
    srv = start_server(server={"max_unauthenticated": 5})
    alice = Raw(srv.port)
    assert alice.cmd(b"USER alice").startswith(b"+OK")
    assert alice.cmd(b"PASS " + USERS["alice"].encode()).startswith(b"+OK")
    waiting = [Raw(srv.port) for _ in range(5)]
    newer = [Raw(srv.port) for _ in range(3)]  # each evicts the oldest waiting login
    for c in waiting[:3]:
        assert c.line().startswith(b"-ERR [SYS/TEMP] too many connections")
        assert c.closed()
    for c in waiting[3:] + newer:
        assert c.cmd(b"CAPA").startswith(b"+OK")
    assert alice.cmd(b"STAT").startswith(b"+OK 1 ")  # the logged-in session is never touched
    for c in [alice, *waiting, *newer]:
        c.close()


# ---- across worker processes ------------------------------------------------------------------------------


def test_limits_hold_across_workers_and_survive_a_killed_worker(env):
    port = free_port()
    proc = start(config(env, port, workers=2, max_connections_per_ip="6", limit_exempt="[]"), port)
    held: list[tuple[int, socket.socket]] = []
    try:
        time.sleep(0.3)  # wait_port's probe connection is released
        pids: set[int] = set()
        for _ in range(200):  # fill the limit, with connections on both workers (SO_REUSEPORT hashes)
            ok, s, line = greeted_or_refused(port)
            if not ok:  # a slot given back below is released once the server saw the close
                s.close()
                time.sleep(0.02)
                continue
            pid = int(line.split(b"<", 1)[1].split(b".", 1)[0])
            held.append((pid, s))
            if len(held) == 6:
                if len({q for q, _ in held}) == 2:
                    break
                held.pop()[1].close()
        pids = {q for q, _ in held}
        assert len(held) == 6 and pids == worker_pids(proc.pid)
        for _ in range(10):
            ok, s, line = greeted_or_refused(port)
            s.close()
            assert not ok and line.startswith(REFUSED), line
        # kill -9 the worker holding the most of them: its slots must come back once it is reaped
        victim = max(pids, key=lambda p: sum(1 for q, _ in held if q == p))
        lost = sum(1 for q, _ in held if q == victim)
        os.kill(victim, signal.SIGKILL)
        held = [(q, s) for q, s in held if q != victim]
        got = 0
        end = time.monotonic() + 10
        while got < lost and time.monotonic() < end:
            ok, s, line = greeted_or_refused(port)
            if ok:
                held.append((0, s))
                got += 1
            else:
                s.close()
                time.sleep(0.1)
        assert got == lost, f"only {got} of {lost} slots of the killed worker came back"
        ok, s, line = greeted_or_refused(port)
        s.close()
        assert not ok and line.startswith(REFUSED)  # and not one more
    finally:
        for _, s in held:
            s.close()
        out = stop(proc)
    assert "restarting it" in out


# ---- floods -----------------------------------------------------------------------------------------------


def _flood(s: socket.socket, line: bytes, limit: int, seconds: float) -> int:
    """Send `line` over and over without reading, until `limit` octets, `seconds`, or the server stops
    reading (send blocks) or hangs up. Returns octets sent."""
    chunk = line * (65536 // len(line))
    s.settimeout(1.0)
    sent = 0
    end = time.monotonic() + seconds
    with contextlib.suppress(OSError):  # TimeoutError (server stopped reading), reset (server hung up)
        while sent < limit and time.monotonic() < end:
            s.sendall(chunk)
            sent += len(chunk)
    return sent


def test_flood_that_never_reads_cannot_grow_the_server(env):
    deliver(env.maildir("alice"), b"Subject: flood\n\n" + b"x" * 1000 + b"\n")
    port = free_port()
    proc = start(config(env, port), port)
    try:
        time.sleep(0.3)
        before = rss_kib(proc.pid)
        flooder = Raw(port)
        assert flooder.cmd(b"USER alice").startswith(b"+OK")
        assert flooder.cmd(b"PASS " + USERS["alice"].encode()).startswith(b"+OK")
        flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(_flood(flooder.sock, b"RETR 1\r\n", 4 << 20, 8)))
        t.start()
        time.sleep(1.0)
        other = Raw(port)  # the loop is not stalled: someone else is served meanwhile
        assert other.greeting.startswith(b"+OK") and other.cmd(b"NOOP").startswith(b"-ERR")
        t.join(15)
        grown = rss_kib(proc.pid) - before
        assert grown < 16 * 1024, f"server grew {grown} KiB after a {result} octet flood"
        pre = socket.create_connection(("127.0.0.1", port), timeout=10)  # before login: cut, not buffered
        pre.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _flood(pre, b"CAPA\r\n", 4 << 20, 8)
        assert rss_kib(proc.pid) - before < 16 * 1024
        assert _eof(pre)
        other.close()
        flooder.close()
        pre.close()
    finally:
        out = stop(proc)
    assert "max_unsent_before_login" in out


# ---- slowloris --------------------------------------------------------------------------------------------


def test_slowloris_is_cut_at_the_login_deadline(start_server):
    srv = start_server(session={"timeout_authorization": 1.5})
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.setblocking(False)
    received = b""
    closed = False
    end = time.monotonic() + 6
    for octet in (b"CAPA\r\nNOOP\r\nUSER alice\r\n" * 3)[:30]:  # a byte every 0.2 s: never idle
        if time.monotonic() > end:
            break
        with contextlib.suppress(BlockingIOError):
            while chunk := s.recv(65536):
                received += chunk
            closed = True
        if closed:
            break
        with contextlib.suppress(OSError):
            s.send(bytes([octet]))
        time.sleep(0.2)
    s.close()
    assert closed and received.endswith(b"-ERR login timeout: log in sooner\r\n"), received[-200:]
