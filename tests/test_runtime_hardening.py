"""Process-level hardening: dropping root, one pop3d per address, a bounded metrics endpoint, check-config."""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import deliver
from test_cli import POP3D, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
TEST_USER = "pop3dtest"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", TEST_USER], check=True, capture_output=True)
        return pwd.getpwnam(TEST_USER)


@pytest.fixture
def site(user: pwd.struct_passwd) -> Iterator[Path]:
    """A passwd-file and a Maildir the unprivileged user can reach (pytest's tmp_path is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="pop3d-hardening-"))
    root.chmod(0o755)
    (root / "passwd").write_text("alice:{PLAIN}secret\n")
    (root / "passwd").chmod(0o644)
    maildir = root / "mail" / "alice" / "Maildir"
    deliver(maildir, b"Subject: hi\r\n\r\nhello\r\n")
    for path in [root / "mail", *(root / "mail").rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def config(site: Path, port: int, workers: int, *extra: str) -> Path:
    cfg = site / f"pop3d-{port}.toml"
    cfg.write_text(
        "\n".join(
            [
                "[server]",
                f'listen = ["127.0.0.1:{port}"]',
                'hostname = "test.invalid"',
                "shutdown_grace = 0.5",
                f"workers = {workers}",
                *extra,
                "[auth]",
                f'passwd_file = "{site}/passwd"',
                "failure_delay = 0",
                "[storage]",
                f'location = "{site}/mail/{{user}}/Maildir"',
            ]
        )
        + "\n"
    )
    return cfg


def serve(cfg: Path, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*POP3D, "serve", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    wait_port(port, proc)
    return proc


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def ids(pid: int) -> tuple[list[int], list[int]]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return [int(x) for x in status["Uid"].split()], [int(x) for x in status["Gid"].split()]


def workers_of(pid: int, n: int) -> list[int]:
    end = time.monotonic() + 15
    while time.monotonic() < end:
        children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        if len(children) >= n:
            return children
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} workers")


def login_and_retr(port: int) -> bytes:
    c = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        c.user("alice")
        c.pass_("secret")
        return b"\n".join(c.retr(1)[1])
    finally:
        c.quit()


@needs_root
@pytest.mark.parametrize("workers", [1, 2])
def test_root_drops_to_server_user_in_every_process(site, user, workers):
    port = free_port()
    proc = serve(config(site, port, workers, f'user = "{TEST_USER}"'), port)
    try:
        pids = [proc.pid] + (workers_of(proc.pid, 2) if workers > 1 else [])
        for pid in pids:
            uids, gids = ids(pid)
            assert uids == [user.pw_uid] * 4, (pid, uids)  # real, effective, saved, filesystem
            assert gids == [user.pw_gid] * 4, (pid, gids)
        assert b"hello" in login_and_retr(port)
    finally:
        out = stop(proc)
    assert f"running as {TEST_USER} (uid {user.pw_uid}" in out
    assert "running as root" not in out


@needs_root
def test_root_without_server_user_warns(site):
    port = free_port()
    proc = serve(config(site, port, 1), port)
    out = stop(proc)
    warnings = [line for line in out.splitlines() if "WARNING" in line and "running as root" in line]
    assert len(warnings) == 1 and "set server.user" in warnings[0], out


def test_unknown_server_user_is_a_config_error(site):
    r = subprocess.run(
        [*POP3D, "serve", "--config", str(config(site, free_port(), 1, 'user = "no-such-user-pop3d"'))],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["pop3d: server.user: no such user 'no-such-user-pop3d'"]


@pytest.mark.parametrize(("first", "second"), [(2, 2), (2, 1), (1, 2), (1, 1)])
def test_second_instance_on_the_same_address_is_refused(site, first, second):
    port = free_port()
    running = serve(config(site, port, first), port)
    try:
        r = subprocess.run(
            [*POP3D, "serve", "--config", str(config(site, port, second))],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    finally:
        stop(running)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("pop3d:")]
    assert errors == [f"pop3d: cannot listen: 127.0.0.1:{port}: address already in use by pid {running.pid}"], r.stderr
    assert "Traceback" not in r.stderr


def test_metrics_endpoint_is_bounded():
    from pop3d.ops.metrics import Metrics, start_endpoint

    m = Metrics()
    m.login("ok")
    before = threading.active_count()
    endpoint = start_endpoint("127.0.0.1:0", m.registry, idle_timeout=2.0, max_connections=16)
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", endpoint.server_port), timeout=30))
        assert threading.active_count() <= before + 2  # one serving thread, not one per connection
        body = urllib.request.urlopen(f"http://127.0.0.1:{endpoint.server_port}/metrics", timeout=10).read()
        assert b'pop3d_logins_total{result="ok"} 1.0' in body
        # the newest idle connection was not evicted: the idle timeout closes it
        assert idle[-1].recv(1) == b""
        # the oldest were evicted to stay under the cap
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()
        endpoint.shutdown()


@needs_root
def test_check_config_reports_what_the_user_can_reach(site, user):
    cfg = config(site, 110, 1, f'user = "{TEST_USER}"')
    ok = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert f"privileges: serves as {TEST_USER}" in ok.stdout
    assert f"access: auth.passwd_file {site}/passwd: readable by {TEST_USER}" in ok.stdout
    assert f"access: storage.location {site}/mail (fixed part of" in ok.stdout
    assert f"searchable by {TEST_USER}" in ok.stdout
    (site / "passwd").chmod(0o600)
    bad = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert f"access: auth.passwd_file {site}/passwd: NOT readable by {TEST_USER}" in bad.stdout
    assert bad.stderr.strip() == f"pop3d: auth.passwd_file {site}/passwd: not readable by {TEST_USER}"


@needs_root
def test_check_config_warns_about_root(site):
    r = subprocess.run(
        [*POP3D, "check-config", "--config", str(config(site, 110, 1))], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert "privileges: running as root: every session reads maildrops with root's rights" in r.stdout
    assert "access: auth.passwd_file" in r.stdout and "readable by root" in r.stdout
