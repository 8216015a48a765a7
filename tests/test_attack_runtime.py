"""Attacks on the running server as a whole: root privileges kept, user names that escape the mail root, a
passwd-file caught half-written, the metrics endpoint, and a second instance on the same address.
Each attack succeeded against the server before its fix.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attackkit import POP3D, ROOT, Line, Pop3dProcess, children, free_port, gids, thread_count, uids
from conftest import USERS, Env

pytestmark = pytest.mark.timeout(60)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test is about dropping root")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any uid can traverse and read (pytest's tmp_path is 0700 root), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="pop3d-attack-", dir="/tmp"))
    d.chmod(0o755)
    (d / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items()))
    (d / "passwd").chmod(0o644)
    (d / "mail").mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sections_in(d: Path, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "auth": {"passwd_file": str(d / "passwd"), "failure_delay": 0},
        "storage": {"location": str(d / "mail" / "{user}" / "Maildir")},
    }
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


# -- privileges --------------------------------------------------------------------------------------------------


@needs_root
def test_server_user_drops_root_in_supervisor_and_workers(open_dir: Path) -> None:
    """Attack surface: any bug in a pop3d process that runs as root is a root compromise.

    Required: started as root with `server.user = "nobody"`, every process (supervisor and workers) runs as
    that uid (real, effective, saved, fs) and its group after binding, and still greets clients.
    """
    nobody = pwd.getpwnam("nobody")
    srv = Pop3dProcess(open_dir, sections_in(open_dir, server={"user": "nobody", "workers": 2})).start()
    try:
        workers = children(srv.pid)
        assert len(workers) == 2, workers
        for pid in [srv.pid, *workers]:
            assert uids(pid) == [nobody.pw_uid] * 4, f"pid {pid}: Uid {uids(pid)}"
            assert gids(pid) == [nobody.pw_gid] * 4, f"pid {pid}: Gid {gids(pid)}"
        c = Line(srv.port)
        assert c.greeting.startswith(b"+OK")
        c.close()
    finally:
        srv.kill()


@needs_root
def test_running_as_root_without_server_user_warns(open_dir: Path) -> None:
    """Attack surface: an operator who never set `server.user` runs every session as root without knowing.

    Required: started as root with `server.user` empty, a WARNING naming the risk (root) is logged.
    """
    srv = Pop3dProcess(open_dir, sections_in(open_dir)).start()
    try:
        time.sleep(0.3)
        out = srv.output()
    finally:
        srv.kill()
    warnings = [ln for ln in out.splitlines() if " WARNING " in ln and "root" in ln.lower()]
    assert warnings, f"no warning about running as root:\n{out}"


# -- user names that escape the mail root ------------------------------------------------------------------------

ESCAPES = [
    pytest.param("..", "{user}", id="dot-dot"),
    pytest.param(".", "{user}", id="dot"),
    pytest.param("a/b", "{user}", id="slash"),
    pytest.param("nohome", "{home}", id="empty-home"),
]


@pytest.mark.parametrize(("name", "field"), ESCAPES)
def test_user_names_that_would_escape_the_mail_root(
    env: Env, start_server: Any, caplog: pytest.LogCaptureFixture, name: str, field: str
) -> None:
    """Attack: a passwd-file entry (or a future user database) with the name `..`, `.`, `a/b`, or a `{home}`
    location for an entry with an empty home, so the maildrop path points outside the user's own place.

    Required: the login answers `-ERR [SYS/PERM]`, with exactly one log line (WARNING or above) and no
    traceback.
    """
    env.passwd.write_text(f"{name}:{{PLAIN}}secret-{len(name)}:5000:5000::::\n")
    location = str(env.mail / "{user}" / "Maildir") if field == "{user}" else "{home}/Maildir"
    srv = start_server(storage={"location": location})
    caplog.set_level(logging.INFO)
    caplog.clear()
    c = Line(srv.port)
    assert c.cmd(b"USER " + name.encode()).startswith(b"+OK")
    reply = c.cmd(b"PASS secret-%d" % len(name))
    c.cmd(b"QUIT")
    c.close()
    srv.wait_idle()
    assert reply.startswith(b"-ERR [SYS/PERM]"), reply
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks, f"logged with a traceback: {tracebacks}"
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, f"expected one log line about it, got {loud}"
    escaped = {
        "..": env.root / "Maildir",
        ".": env.mail / "Maildir",
        "a/b": env.mail / "a",
        "nohome": Path("/Maildir"),
    }[name]
    assert not escaped.exists(), f"{escaped} was created"


# -- the passwd-file caught half-written -------------------------------------------------------------------------


def test_passwd_file_rewritten_in_place_never_fails_a_correct_login(env: Env, start_server: Any) -> None:
    """Attack (or an operator's editor): rewrite the passwd-file in place: truncate it, then write it slowly
    in two parts (the first ends in the middle of alice's password), while alice logs in again and again.

    Required: no login with the correct password fails during the rewrite.
    """
    srv = start_server()
    content = "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items())
    cut = content.index("wonderland") + len("wonder")
    done = threading.Event()

    def rewrite() -> None:
        time.sleep(0.3)
        with open(env.passwd, "r+") as f:
            f.truncate(0)
            f.flush()
            time.sleep(1.5)  # longer than the passwd-file's stat interval (1 s)
            f.write(content[:cut])
            f.flush()
            time.sleep(1.5)
            f.write(content[cut:])
            f.flush()
        time.sleep(0.5)
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    results: list[bytes] = []
    try:
        while not done.is_set():
            c = Line(srv.port)
            results.append(c.login("alice", USERS["alice"]))
            c.cmd(b"QUIT")
            c.close()
            time.sleep(0.05)
    finally:
        writer.join()
    failed = [r for r in results if not r.startswith(b"+OK")]
    assert len(results) > 20, "too few logins to cover the rewrite"
    assert not failed, f"{len(failed)} of {len(results)} correct logins failed, e.g. {failed[0]!r}"


# -- the metrics endpoint -----------------------------------------------------------------------------------------


def test_idle_metrics_connections_make_no_threads_and_are_closed(open_dir: Path) -> None:
    """Attack: open 300 connections to `metrics.listen` and send nothing.

    Required: they do not make 300 threads in the server (thread count grows by less than 30), the endpoint
    still answers, and idle connections are closed after a timeout (here: within 15 s).
    """
    mport = free_port()
    srv = Pop3dProcess(open_dir, sections_in(open_dir, metrics={"listen": f"127.0.0.1:{mport}"})).start()
    idle: list[socket.socket] = []
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        assert b"pop3d_" in body
        before = thread_count(srv.pid)
        end = time.monotonic() + 10
        while len(idle) < 300 and time.monotonic() < end:
            idle.append(socket.create_connection(("127.0.0.1", mport), timeout=5))
            time.sleep(0.005)  # paced: a full accept queue would cost 1 s SYN retries, not threads
        assert len(idle) >= 100, f"only {len(idle)} connections in 10 s"
        time.sleep(1.0)
        grown = thread_count(srv.pid) - before
        assert grown < 30, f"{len(idle)} idle metrics connections made {grown} threads"
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        assert b"pop3d_" in body
        first = idle[0]
        first.settimeout(15)
        try:
            closed = first.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        assert closed, "an idle metrics connection was still open after 15 s"
    finally:
        for s in idle:
            s.close()
        srv.kill()


# -- a second instance ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "workers",
    [
        pytest.param(1, id="one-process"),
        pytest.param(2, id="workers"),
    ],
)
def test_second_instance_on_a_served_address_fails(open_dir: Path, workers: int) -> None:
    """Attack (or accident): start a second `pop3d serve` on an address a running pop3d serves; with
    SO_REUSEPORT it would quietly take half of the connections (with its own, maybe older, configuration).

    Required: the second one fails at start with one line naming the address and exit status 1.
    """
    first = Pop3dProcess(open_dir, sections_in(open_dir, server={"workers": workers})).start()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            second = subprocess.run(
                [*POP3D, "serve", "--config", str(first.config)],
                capture_output=True,
                text=True,
                timeout=8,
                env=env,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError("the second pop3d started on the same address and kept running") from None
    finally:
        first.kill()
    assert second.returncode == 1, (second.returncode, second.stderr)
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "127.0.0.1" in lines[0] and str(first.port) in lines[0], lines[0]
    assert "Traceback" not in second.stdout + second.stderr
