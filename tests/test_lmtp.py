"""LMTP delivery end to end: the stdlib's smtplib.LMTP against `pop3d serve` on loopback, read back over POP3.

RFC 2033 §4.2: after DATA, one reply per accepted recipient, in order; smtplib's sendmail reads only one,
so the transaction is driven command by command here.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attackkit import Pop3dProcess, free_port
from conftest import Env, Raw
from tooling import needs_tool, which

DOTLOCKFILE = which("dotlockfile")

#: every line ends CRLF as LMTP carries it; a dot line, a "From " line, a line longer than RFC 5321's 1000
BODY = (
    b"From: a@example.org\r\nTo: alice@example.org\r\nSubject: hi\r\n\r\n"
    b"line one\r\n.\r\n..two dots\r\nFrom the start\r\n>From quoted\r\n" + b"x" * 3000 + b"\r\nlast\r\n"
)


def lmtp_server(env: Env, driver: str = "maildir", *, workers: int = 1, server: dict[str, Any] | None = None,
                storage_extra: dict[str, Any] | None = None, **lmtp: Any) -> tuple[Pop3dProcess, int]:  # fmt: skip
    port = free_port()
    storage: dict[str, Any] = {"location": str(env.mail / "{user}" / "Maildir")}
    if driver == "mbox":
        storage = {"driver": "mbox", "location": str(env.mail / "{user}"), "mbox_index_dir": str(env.root / "idx")}
    sections: dict[str, dict[str, Any]] = {
        "server": {"workers": workers, **(server or {})},
        "auth": {"passwd_file": str(env.passwd), "failure_delay": 0},
        "storage": {**storage, **(storage_extra or {})},
        "lmtp": {"listen": [f"127.0.0.1:{port}"], **lmtp},
    }
    proc = Pop3dProcess(env.root, sections)
    if (server or {}).get("proxy_protocol"):
        proc.start = _start_behind_proxy.__get__(proc)  # type: ignore[method-assign]
    proc.start()
    end = time.monotonic() + 15  # the LMTP listeners start right after the POP3 ones
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            assert time.monotonic() < end, proc.output()
            time.sleep(0.05)


def _start_behind_proxy(self: Pop3dProcess, timeout: float = 15) -> Pop3dProcess:
    """Pop3dProcess.start waits for a POP3 greeting, which a PROXY-protocol listener never sends first."""
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with open(self.log_path, "wb") as log:
        self.proc = subprocess.Popen([sys.executable, "-m", "pop3d", "serve", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert self.proc.poll() is None, self.output()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return self
        time.sleep(0.05)
    raise AssertionError(self.output())


@pytest.fixture
def servers() -> Iterator[list[Pop3dProcess]]:
    started: list[Pop3dProcess] = []
    yield started
    for proc in started:
        proc.kill()


def connect(port: int) -> smtplib.LMTP:
    c = smtplib.LMTP("127.0.0.1", port, timeout=30)
    c.ehlo_or_helo_if_needed()  # LHLO (RFC 2033 §4.1)
    return c


Replies = list[tuple[int, bytes]]


def transaction(c: smtplib.LMTP, sender: str, rcpts: list[str], body: bytes) -> tuple[Replies, Replies]:
    """(RCPT replies, DATA replies): one DATA reply per accepted recipient (RFC 2033 §4.2)."""
    code, msg = c.mail(sender)
    assert code == 250, msg
    rcpt = [c.rcpt(r) for r in rcpts]
    accepted = sum(1 for code, _ in rcpt if code == 250)
    if not accepted:
        c.rset()
        return rcpt, []
    code, msg = c.docmd("DATA")
    assert code == 354, msg
    c.send(smtplib.quotedata(body.decode("latin-1")).encode("latin-1") + b".\r\n")
    return rcpt, [c.getreply() for _ in range(accepted)]


def retr_all(port: int, user: bytes = b"alice", pw: bytes = b"wonderland") -> list[bytes]:
    c = Raw(port)
    assert c.cmd(b"USER " + user).startswith(b"+OK")
    assert c.cmd(b"PASS " + pw).startswith(b"+OK")
    n = int(c.cmd(b"STAT").split()[1])
    out = []
    for i in range(1, n + 1):
        r = c.cmd(b"RETR %d" % i)
        assert r.startswith(b"+OK"), r
        lines = c.multi()
        body = b"".join(ln + b"\r\n" for ln in lines)
        assert r == b"+OK %d octets" % len(body)  # LIST/RETR size is exactly what is sent
        out.append(body)
    assert c.cmd(b"QUIT").startswith(b"+OK")
    return out


def test_one_reply_per_recipient_unknown_user_refused_at_rcpt(env: Env, servers: list[Pop3dProcess]) -> None:
    proc, port = lmtp_server(env)
    servers.append(proc)
    c = connect(port)
    rcpt, data = transaction(c, "sender@example.org", ["alice@example.org", "nobody@example.org", "bob@x"], BODY)
    assert rcpt[0][0] == 250
    assert rcpt[1][0] == 550 and rcpt[1][1].startswith(b"5.1.1")
    assert rcpt[2][0] == 250
    assert [code for code, _ in data] == [250, 250]
    assert b"alice@example.org" in data[0][1] and b"bob@x" in data[1][1]
    c.quit()
    for user, pw in ((b"alice", b"wonderland"), (b"bob", b"builder pass")):
        (got,) = retr_all(proc.port, user, pw)
        assert got.startswith(b"Return-Path: <sender@example.org>\r\nReceived: from ")
        assert got.endswith(b"\r\n\r\n" + BODY.split(b"\r\n\r\n", 1)[1])
        assert got.split(b"\r\n\r\n", 1)[1] == BODY.split(b"\r\n\r\n", 1)[1]
        assert got[got.index(b"From: a@example.org") :] == BODY  # the delivered octets follow unchanged


def test_maildir_file_is_standard_with_lf_line_ends(env: Env, servers: list[Pop3dProcess]) -> None:
    proc, port = lmtp_server(env, trace_headers=False)
    servers.append(proc)
    c = connect(port)
    _, data = transaction(c, "<>", ["alice@example.org"], BODY)
    assert data[0][0] == 250
    (path,) = (env.maildir("alice") / "new").iterdir()
    stored = path.read_bytes()
    assert stored == BODY.replace(b"\r\n", b"\n")
    assert f",S={len(stored)},W={len(BODY)}" in path.name and len(path.name) <= 70
    assert path.stat().st_mode & 0o777 == 0o600
    assert env.maildir("alice").stat().st_mode & 0o777 == 0o700
    assert not list((env.maildir("alice") / "tmp").iterdir())
    assert retr_all(proc.port) == [BODY]


def test_blocked_maildir_answers_451_for_that_recipient_only(env: Env, servers: list[Pop3dProcess]) -> None:
    (env.mail / "alice").write_bytes(b"a file where the maildir's parent should be")  # ENOTDIR, even for root
    proc, port = lmtp_server(env)
    servers.append(proc)
    c = connect(port)
    rcpt, data = transaction(c, "s@example.org", ["alice@example.org", "bob@example.org"], BODY)
    assert [code for code, _ in rcpt] == [250, 250]
    assert data[0][0] == 451 and data[0][1].startswith(b"4.3.0")
    assert data[1][0] == 250
    assert (env.mail / "alice").read_bytes().startswith(b"a file")


def test_delivery_during_a_session_shows_in_the_next_one_only(env: Env, servers: list[Pop3dProcess]) -> None:
    proc, port = lmtp_server(env)
    servers.append(proc)
    c = connect(port)
    assert transaction(c, "s@x", ["alice@x"], b"Subject: first\r\n\r\none\r\n")[1][0][0] == 250
    pop = Raw(proc.port)
    assert pop.cmd(b"USER alice").startswith(b"+OK")
    assert pop.cmd(b"PASS wonderland").startswith(b"+OK")
    stat = pop.cmd(b"STAT")
    assert stat.startswith(b"+OK 1 ")
    # the session holds the maildrop lock: the delivery does not wait for it (RFC 1939 §4 is about sessions)
    assert transaction(c, "s@x", ["alice@x"], b"Subject: second\r\n\r\ntwo\r\n")[1][0][0] == 250
    assert pop.cmd(b"STAT") == stat  # numbering fixed for the session
    assert pop.cmd(b"LIST").startswith(b"+OK")
    assert len(pop.multi()) == 1
    assert pop.cmd(b"RETR 2").startswith(b"-ERR")
    assert pop.cmd(b"DELE 1").startswith(b"+OK")
    assert pop.cmd(b"QUIT").startswith(b"+OK")
    (left,) = retr_all(proc.port)
    assert left.endswith(b"Subject: second\r\n\r\ntwo\r\n")


def test_proxy_protocol_is_not_expected_on_lmtp(env: Env, servers: list[Pop3dProcess]) -> None:
    proc, port = lmtp_server(env, server={"proxy_protocol": True})
    servers.append(proc)
    c = connect(port)  # no PROXY header first: LHLO right away
    assert transaction(c, "s@x", ["alice@x"], b"Subject: p\r\n\r\nbody\r\n")[1][0][0] == 250
    c.quit()


def test_two_workers_both_deliver(env: Env, servers: list[Pop3dProcess]) -> None:
    proc, port = lmtp_server(env, workers=2)
    servers.append(proc)
    for i in range(6):
        c = connect(port)
        assert transaction(c, "s@x", ["alice@x"], b"Subject: %d\r\n\r\nbody\r\n" % i)[1][0][0] == 250
        c.quit()
    assert len(retr_all(proc.port)) == 6


def test_limits(env: Env, servers: list[Pop3dProcess]) -> None:
    proc, port = lmtp_server(env, max_message_size=4096, max_recipients=2, trace_headers=False)
    servers.append(proc)
    c = connect(port)
    assert b"SIZE 4096" in c.ehlo_resp  # type: ignore[operator]
    code, msg = c.mail("s@x", ["SIZE=5000"])  # RFC 1870: refused before the data is sent
    assert (code, msg[:5]) == (552, b"5.3.4")
    c.rset()
    _, data = transaction(c, "s@x", ["alice@x"], b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 80)
    assert data == [(552, b"5.3.4 Message too big for this system")]
    rcpt, data = transaction(c, "s@x", ["alice@x", "bob@x", "alice@y"], b"Subject: ok\r\n\r\nx\r\n")
    assert [code for code, _ in rcpt] == [250, 250, 452]
    assert [code for code, _ in data] == [250, 250]
    c.quit()
    assert len(retr_all(proc.port)) == 1


def test_untrusted_peer_and_hostile_input(env: Env, servers: list[Pop3dProcess]) -> None:
    proc, port = lmtp_server(env, trusted=["10.0.0.0/8"])
    servers.append(proc)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(100).startswith(b"554 5.7.1")
        assert s.recv(100) == b""
    proc.kill()
    servers.clear()
    proc, port = lmtp_server(env)
    servers.append(proc)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"HELO x\r\nMAIL FROM:<a@b>\r\n")  # HELO is no LMTP verb (RFC 2033 §4.1)
        assert f.readline().startswith(b"500")
        assert f.readline().startswith(b"503")
        s.sendall(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<" + b"a" * 2000 + b"@x>\r\n")
        while f.readline().startswith(b"250-"):
            pass
        assert f.readline().startswith(b"250")  # MAIL
        assert f.readline().startswith(b"500")  # command line too long
        s.sendall(b"RCPT TO:<alice\x01@x>\r\nRCPT TO:<../../etc@x>\r\nRCPT TO:<alice@x>\r\nDATA\r\n")
        assert f.readline()[:3] in (b"550", b"553", b"501")
        assert f.readline().startswith(b"550 5.1.1")
        assert f.readline().startswith(b"250")
        assert f.readline().startswith(b"354")
        s.sendall(b"Subject: x\r\n\r\n" + b"z" * 5000 + b"\r\n.\r\n")  # a line past RFC 5321's 1000: kept
        assert f.readline().startswith(b"250 2.0.0")
    (got,) = retr_all(proc.port)
    assert got.endswith(b"z" * 5000 + b"\r\n")


# ---- mbox ---------------------------------------------------------------------------------------------------


def test_mbox_delivery_round_trip_and_session_isolation(env: Env, servers: list[Pop3dProcess]) -> None:
    spool = env.mail / "alice"
    spool.write_bytes(b"From old@x Thu Nov 26 10:00:00 2026\nSubject: old\n\nold body\n")  # no padding line
    proc, port = lmtp_server(env, "mbox")
    servers.append(proc)
    pop = Raw(proc.port)
    assert pop.cmd(b"USER alice").startswith(b"+OK")
    assert pop.cmd(b"PASS wonderland").startswith(b"+OK")
    assert pop.cmd(b"STAT").startswith(b"+OK 1 ")
    c = connect(port)
    _, data = transaction(c, "<>", ["alice@x"], BODY)
    assert data[0][0] == 250  # the open session (its lock) does not hold the delivery up
    assert pop.cmd(b"STAT").startswith(b"+OK 1 ")
    assert pop.cmd(b"QUIT").startswith(b"+OK")
    old, new = retr_all(proc.port)
    assert old == b"Subject: old\r\n\r\nold body\r\n"
    assert new.startswith(b"Return-Path: <>\r\n") and new[new.index(b"From: a@example.org") :] == BODY
    stored = spool.read_bytes()
    assert b"\n\nFrom MAILER-DAEMON " in stored and stored.endswith(b"last\n\n")
    assert b"\n>From the start\n>>From quoted\n" in stored  # mboxrd quoting, undone when read
    _, data = transaction(c, "s@x", ["alice@x"], b"Subject: 3\r\n\r\nthree\r\n")
    assert data[0][0] == 250
    assert len(retr_all(proc.port)) == 3  # the index took the appended tail


@needs_tool("dotlockfile", "liblockfile-bin")
def test_mbox_dotlock_held_by_an_mta_defers_with_451(env: Env, servers: list[Pop3dProcess]) -> None:
    spool = env.mail / "alice"
    proc, port = lmtp_server(env, "mbox", storage_extra={"mbox_lock_timeout": 0.5})
    servers.append(proc)
    spool.write_bytes(b"")
    holder = subprocess.Popen([DOTLOCKFILE, "-l", "-p", "-r", "0", f"{spool}.lock", "sleep", "60"])  # type: ignore[list-item]
    try:
        for _ in range(500):
            if Path(f"{spool}.lock").exists():
                break
            time.sleep(0.01)
        c = connect(port)
        _, data = transaction(c, "s@x", ["alice@x", "bob@x"], b"Subject: x\r\n\r\nx\r\n")
        assert data[0][0] == 451 and data[0][1].startswith(b"4.3.0")
        assert data[1][0] == 250
        assert spool.read_bytes() == b""
    finally:
        holder.terminate()
        holder.wait()
    _, data = transaction(c, "s@x", ["alice@x"], b"Subject: x\r\n\r\nx\r\n")
    assert data[0][0] == 250
    assert len(retr_all(proc.port)) == 1
