"""mbox end to end over loopback: a real pop3d, a running MTA-like writer, dotlockfile, kill -9 mid-commit."""

from __future__ import annotations

import random
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, Raw
from tooling import needs_tool, which

from pop3d.storage.mbox.format import scan

ROOT = Path(__file__).resolve().parent.parent
DOTLOCKFILE = which("dotlockfile")

# An MTA as Postfix delivers with mailbox_delivery_lock = dotlock, fcntl: dotlock (O_EXCL), open for append,
# fcntl (POSIX) lock, write separator + ">From "-quoted message + padding line, unlock, remove the dotlock.
WRITER = r"""
import fcntl, os, sys, time
spool, count = sys.argv[1], int(sys.argv[2])
for n in range(count):
    while True:
        try:
            fd = os.open(spool + ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, b"%d\n" % os.getpid()); os.close(fd)
            break
        except FileExistsError:
            time.sleep(0.002)
    with open(spool, "ab") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        f.write(b"From mta@example.org Thu Nov 26 10:00:00 2026\nMessage-ID: <%d@mta>\n\nline\n>From quoted\n\n" % n)
        f.flush()
        fcntl.lockf(f, fcntl.LOCK_UN)
    os.unlink(spool + ".lock")
    time.sleep(0.004)
print("done", flush=True)
"""


def mbox_settings(env: Env, **kw: Any) -> dict[str, Any]:
    return {"driver": "mbox", "location": str(env.mail / "{user}"), "mbox_index_dir": str(env.root / "idx"), **kw}


def message_ids(path: Path) -> list[int]:
    data = path.read_bytes()
    out = []
    for e in scan(lambda o, n: data[o : o + n], 0, len(data), True):
        out.append(int(data[e.body : e.end].split(b"<", 1)[1].split(b"@", 1)[0]))
    return out


def login(port: int, user: bytes = b"alice", pw: bytes = b"wonderland") -> Raw:
    c = Raw(port)
    assert c.cmd(b"USER " + user).startswith(b"+OK")
    r = c.cmd(b"PASS " + pw)
    assert r.startswith(b"+OK"), r
    return c


def login_when_free(port: int, within: float = 20.0) -> Raw:
    """`login`, retried while the maildrop is locked (RFC 1939 §8: -ERR [IN-USE] is the right answer then)."""
    end = time.monotonic() + within
    while True:
        c = Raw(port)
        assert c.cmd(b"USER alice").startswith(b"+OK")
        r = c.cmd(b"PASS wonderland")
        if r.startswith(b"+OK"):
            return c
        c.close()
        assert b"[IN-USE]" in r and time.monotonic() < end, r
        time.sleep(0.05)


def mid(c: Raw, n: int) -> int:
    assert c.cmd(b"TOP %d 0" % n).startswith(b"+OK")
    head = b"\n".join(c.multi())
    return int(head.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0])


@pytest.mark.parametrize("dialect", ["mboxrd", "mboxo"])
def test_list_uidl_retr_agree(env: Env, start_server: Any, dialect: str) -> None:
    spool = env.mail / "alice"
    big = b"".join(b">From %d\n..dots\n" % i for i in range(12000))
    spool.write_bytes(b"From a\nSubject: 1\n\n>From x\n.\n\nFrom b\nSubject: 2\n\n" + big + b"\nFrom c\n\nlast")
    srv = start_server(storage=mbox_settings(env, mbox_dialect=dialect))
    c = login(srv.port)
    assert c.cmd(b"LIST").startswith(b"+OK")
    sizes = [int(x.split()[1]) for x in c.multi()]
    assert c.cmd(b"UIDL").startswith(b"+OK")
    uids = [x.split()[1] for x in c.multi()]
    assert len(sizes) == 3 and len(set(uids)) == 3
    for n, size in enumerate(sizes, 1):
        r = c.cmd(b"RETR %d" % n)
        assert r == b"+OK %d octets" % size
        lines = c.multi()
        assert sum(len(x) + 2 for x in lines) == size  # RFC 1939 §11: exact octets
        if n == 1:
            assert lines[2] == (b"From x" if dialect == "mboxrd" else b">From x")
    assert c.cmd(b"QUIT").startswith(b"+OK")


def test_mta_delivers_while_sessions_delete(env: Env, start_server: Any) -> None:
    spool = env.mail / "alice"
    spool.write_bytes(b"")
    spool.chmod(0o660)
    srv = start_server(storage=mbox_settings(env, mbox_lock_timeout=20))
    count = 400
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(spool), str(count)], stdout=subprocess.PIPE)
    rng = random.Random(3)
    deleted: set[int] = set()
    seen_uid: dict[int, bytes] = {}
    sessions = 0
    try:
        while writer.poll() is None or sessions < 10:
            sessions += 1
            c = login(srv.port)
            stat = c.cmd(b"STAT").split()
            n = int(stat[1])
            assert c.cmd(b"UIDL").startswith(b"+OK")
            uidl = {int(a): b for a, b in (x.split() for x in c.multi())}
            chosen = rng.sample(range(1, n + 1), min(n, rng.randint(0, 5)))
            ids = {k: mid(c, k) for k in chosen}
            for k, i in ids.items():  # UIDL of a message never changes while it exists
                assert seen_uid.setdefault(i, uidl[k]) == uidl[k]
            for k in chosen:
                assert c.cmd(b"DELE %d" % k).startswith(b"+OK")
            if sessions % 4 == 0:
                c.close()  # dropped without QUIT: nothing deleted
            else:
                r = c.cmd(b"QUIT")
                assert r.startswith(b"+OK"), r
                deleted |= set(ids.values())
                c.close()
            srv.wait_idle()
    finally:
        out, _ = writer.communicate(timeout=60)
    assert out == b"done\n"
    found = message_ids(spool)
    assert len(found) == len(set(found)), "a message is present twice"
    assert sorted(found) == sorted(set(range(count)) - deleted)
    assert spool.stat().st_mode & 0o777 == 0o660
    assert sessions >= 10 and deleted


@needs_tool("dotlockfile", "liblockfile-bin")
def test_external_dotlock_makes_quit_wait_or_fail(env: Env, start_server: Any) -> None:
    spool = env.mail / "alice"
    original = b"".join(b"From x\nMessage-ID: <%d@t>\n\nbody\n\n" % i for i in range(3))
    spool.write_bytes(original)
    srv = start_server(storage=mbox_settings(env, mbox_lock_timeout=0.5))
    holder = subprocess.Popen([DOTLOCKFILE, "-l", "-p", "-r", "0", f"{spool}.lock", "sleep", "60"])  # type: ignore[list-item]
    try:
        for _ in range(500):
            if Path(f"{spool}.lock").exists():
                break
            time.sleep(0.01)
        c = login(srv.port)  # reading needs only the fcntl lock: login works while an MTA holds the dotlock
        assert c.cmd(b"DELE 1").startswith(b"+OK")
        assert c.cmd(b"QUIT").startswith(b"-ERR [SYS/TEMP]")
        assert spool.read_bytes() == original
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait()
    srv.wait_idle()
    # the lock is released while pop3d waits: the commit goes through
    srv.ctx.storage.timeout = 30
    holder = subprocess.Popen([DOTLOCKFILE, "-l", "-p", "-r", "0", f"{spool}.lock", "sleep", "0.5"])  # type: ignore[list-item]
    try:
        for _ in range(500):
            if Path(f"{spool}.lock").exists():
                break
            time.sleep(0.01)
        c = login(srv.port)
        assert c.cmd(b"DELE 2").startswith(b"+OK")
        assert c.cmd(b"QUIT").startswith(b"+OK")
    finally:
        assert holder.wait() == 0
    assert message_ids(spool) == [0, 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(env: Env, port: int) -> subprocess.Popen[bytes]:
    cfg = env.root / "pop3d.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "test.invalid"\nworkers = 1\n'
        f'[auth]\npasswd_file = "{env.passwd}"\nfailure_delay = 0\n'
        f'[storage]\ndriver = "mbox"\nlocation = "{env.mail}/{{user}}"\nmbox_index_dir = "{env.root}/idx"\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "pop3d", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    end = time.monotonic() + 15
    while time.monotonic() < end:
        assert proc.poll() is None, "server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start")


def test_kill_9_during_commit_of_large_spool(env: Env) -> None:
    spool = env.mail / "alice"
    body = b"y" * 16000 + b"\n"
    n_msgs = 2000  # about 32 MB
    spool.write_bytes(b"".join(b"From x\nMessage-ID: <%d@t>\n\n%s\n" % (i, body) for i in range(n_msgs)))
    port = free_port()
    survivors = set(range(n_msgs))
    appended = n_msgs
    journal = env.root / "idx" / "alice.pop3d-journal"
    for trigger in (".tmp", "", 0.3):  # while the journal is written, while the spool is moved, at random
        proc = serve(env, port)
        try:
            c = login_when_free(port)
            n = int(c.cmd(b"STAT").split()[1])
            assert n == len(survivors)
            c.send(b"".join(b"DELE %d\r\n" % k for k in range(1, n + 1, 2)) + b"QUIT\r\n")
            if isinstance(trigger, str):
                end = time.monotonic() + 20
                while not Path(f"{journal}{trigger}").exists() and time.monotonic() < end:
                    if select.select([c.sock], [], [], 0)[0]:
                        break  # the QUIT reply is in: the commit is over, the window was missed
                    # busy-wait otherwise: the window is a few milliseconds
            else:
                time.sleep(random.uniform(0, trigger))
        finally:
            proc.kill()
            proc.wait()
        with open(spool, "ab") as f:  # the MTA goes on delivering while pop3d is down
            f.write(b"From mta\nMessage-ID: <%d@t>\n\nnew\n\n" % appended)
        proc = serve(env, port)
        try:
            end = time.monotonic() + 20  # the restart alone settles an interrupted commit, no login needed
            while (journal.exists() or Path(f"{journal}.tmp").exists()) and time.monotonic() < end:
                time.sleep(0.02)
            found = message_ids(spool)
            c = login_when_free(port)  # the restart's own settling holds the lock until its open() ends
            assert int(c.cmd(b"STAT").split()[1]) == len(found)
            assert c.cmd(b"QUIT").startswith(b"+OK")
        finally:
            proc.kill()
            proc.wait()
        old = sorted(survivors)
        new = [m for i, m in enumerate(old) if i % 2 == 1]
        assert found in ([*old, appended], [*new, appended]), f"kill at {trigger!r}: lost or doubled mail"
        survivors = set(found)
        appended += 1


HOLD_FCNTL = """
import fcntl, sys
f = open(sys.argv[1], "r+b")
fcntl.lockf(f, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_login_answers_sys_temp_while_an_mta_writes_and_in_use_for_a_second_session(
    env: Env, start_server: Any
) -> None:
    spool = env.mail / "alice"
    spool.write_bytes(b"From x\nMessage-ID: <1@t>\n\nbody\n\n")
    srv = start_server(storage=mbox_settings(env, mbox_lock_timeout=0.3))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FCNTL, str(spool)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout and holder.stdout.readline() == "locked\n"
        c = Raw(srv.port)
        c.cmd(b"USER alice")
        assert c.cmd(b"PASS wonderland").startswith(b"-ERR [SYS/TEMP]")  # RFC 3206: try again later
        c.close()
    finally:
        holder.communicate("")
    srv.wait_idle()
    a = login(srv.port)
    b = Raw(srv.port)
    b.cmd(b"USER alice")
    assert b.cmd(b"PASS wonderland").startswith(b"-ERR [IN-USE]")  # RFC 2449 §8.1.1
    assert a.cmd(b"STAT") == b"+OK 1 " + str(len(b"Message-ID: <1@t>\r\n\r\nbody\r\n")).encode()
    assert a.cmd(b"QUIT").startswith(b"+OK")
