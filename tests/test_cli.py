"""The `pop3d` command as a sysadmin runs it: real processes, signals, kill -9."""

from __future__ import annotations

import os
import poplib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import USERS, deliver

POP3D = [sys.executable, "-m", "pop3d"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(env, port: int, **extra: str) -> Path:
    cfg = env.root / "pop3d.toml"
    lines = [
        "[server]",
        f'listen = ["127.0.0.1:{port}"]',
        'hostname = "test.invalid"',
        "shutdown_grace = 1.0",
        "[auth]",
        f'passwd_file = "{env.passwd}"',
        "failure_delay = 0",
        "[storage]",
        'driver = "maildir"',
        f'location = "{env.mail}/{{user}}/Maildir"',
    ]
    cfg.write_text("\n".join(lines) + "\n" + "".join(f"{v}\n" for v in extra.values()))
    return cfg


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start")


def wait_port_closed(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.02)
    raise AssertionError(f"port {port} still accepting: orphaned workers?")


def start(cfg: Path, port: int, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*POP3D, "serve", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )
    wait_port(port, proc)
    return proc


def test_check_config_ok(env):
    cfg = write_config(env, 110)
    r = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout


@pytest.mark.parametrize(
    "bad, key",
    [
        ('[server]\nlisten = ["nohostport"]\n', "server.listen"),
        ("[server]\nbacklog = -3\n", "server.backlog"),
        ('[storage]\nlocation = "/srv/mail"\n', "storage.location"),
        ('[storage]\ndriver = "floppy"\n', "storage.driver"),
        ("[sesion]\ntimeout = 700\n", "sesion"),
        ("[server\n", "config file"),
    ],
)
def test_bad_config_one_line_exit_2(env, bad, key):
    cfg = env.root / "bad.toml"
    cfg.write_text(bad)
    r = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and key in r.stderr


def test_env_override_bad_value_names_key(env):
    cfg = write_config(env, 110)
    r = subprocess.run(
        [*POP3D, "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "POP3D_SESSION__LOGIN_DELAY": "soon"},
    )
    assert r.returncode == 2 and "session.login_delay" in r.stderr


def test_missing_passwd_file_is_a_config_error(env):
    cfg = write_config(env, 110)
    env.passwd.unlink()
    r = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "auth.passwd_file" in r.stderr


def test_passwd_command_makes_a_working_entry(env, start_server):
    from pop3d.auth.schemes import split_scheme, verify

    r = subprocess.run(
        [*POP3D, "passwd", "carol", "--scheme", "SHA512-CRYPT"], input="s3cret pw\n", capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("carol:{SHA512-CRYPT}$6$")
    assert verify(*split_scheme(line.split(":", 1)[1]), "s3cret pw")
    env.passwd.write_text(line + "\n")
    srv = start_server()
    p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    p.user("carol")
    assert p.pass_("s3cret pw").startswith(b"+OK")
    p.quit()


def test_passwd_default_scheme_is_strong():
    r = subprocess.run([*POP3D, "passwd"], input="pw\n", capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("{ARGON2ID}$argon2id$")


def test_demo(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [*POP3D, "serve", "--demo", "--demo-dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "POP3D_SERVER__LISTEN": f'["127.0.0.1:{port}"]'},
    )
    try:
        wait_port(port, proc)
        p = poplib.POP3("127.0.0.1", port, timeout=10)
        p.user("demo")
        p.pass_("demo")
        count, _ = p.stat()
        assert count >= 3
        assert any(ln == b".hidden" for ln in p.retr(2)[1])
        p.quit()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
    assert f"curl pop3://127.0.0.1:{port}/ -u demo:demo" in out
    assert "session end user=demo" in out
    assert proc.returncode == 0


def test_sigterm_drains_then_cuts_and_deletes_nothing(env):
    md = env.maildir("alice")
    deliver(md, b"Subject: x\n\nx\n")
    port = free_port()
    proc = start(write_config(env, port), port)
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    p.user("alice")
    p.pass_(USERS["alice"])
    p.dele(1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # no longer accepting
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert p.noop().startswith(b"+OK")  # within the grace period the session still works
    out, _ = proc.communicate(timeout=15)  # grace over: the session is cut
    assert proc.returncode == 0
    assert "reason=server shutdown" in out
    assert len(list((md / "new").iterdir())) == 1  # the DELE was never committed


def test_kill_9_leaves_no_stale_lock(env):
    deliver(env.maildir("alice"), b"Subject: x\n\nx\n")
    port = free_port()
    cfg = write_config(env, port)
    proc = start(cfg, port)
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    p.user("alice")
    p.pass_(USERS["alice"])  # holds the maildrop lock
    proc.kill()
    proc.wait()
    wait_port_closed(port)  # workers die with their supervisor (PR_SET_PDEATHSIG), within milliseconds
    proc = start(cfg, port)
    try:
        q = poplib.POP3("127.0.0.1", port, timeout=10)
        q.user("alice")
        assert q.pass_(USERS["alice"]).startswith(b"+OK")
        assert q.stat()[0] == 1
        q.quit()
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_logout_line_never_shows_password(env):
    deliver(env.maildir("alice"), b"Subject: x\n\nx\n")
    port = free_port()
    proc = start(write_config(env, port), port)
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    p.user("alice")
    with pytest.raises(poplib.error_proto):
        p.pass_("wrong-secret-xyz")
    p.user("alice")
    p.pass_(USERS["alice"])
    p.retr(1)
    p.quit()
    time.sleep(0.3)
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    assert "wrong-secret-xyz" not in out and USERS["alice"] not in out
    assert "session end user=alice rip=127.0.0.1 reason=QUIT top=0/0, retr=1/" in out
