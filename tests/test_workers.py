"""`server.workers > 1`: forked workers sharing the port, the lock across them, restarts, signals."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import USERS, Raw, deliver
from test_cli import POP3D, free_port, start, write_config

ROOT = Path(__file__).resolve().parent.parent


def worker_pids(parent: int) -> set[int]:
    text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    return {int(p) for p in text.split()}


def greeting_pid(c: Raw) -> int:
    m = re.search(rb"<(\d+)\.", c.greeting)
    assert m, c.greeting
    return int(m[1])


def one_per_worker(port: int, want: int = 2, tries: int = 200) -> dict[int, Raw]:
    """Open connections until `want` distinct workers answered (SO_REUSEPORT hashes per connection)."""
    found: dict[int, Raw] = {}
    for _ in range(tries):
        c = Raw(port)
        pid = greeting_pid(c)
        if pid in found:
            c.close()
        else:
            found[pid] = c
            if len(found) == want:
                return found
    raise AssertionError(f"only workers {sorted(found)} answered in {tries} connections")


def config_with_workers(env, port: int, n: int) -> Path:
    cfg = write_config(env, port)
    cfg.write_text(cfg.read_text().replace("[server]\n", f"[server]\nworkers = {n}\n", 1))
    return cfg


def test_lock_holds_across_workers(env):
    deliver(env.maildir("alice"), b"Subject: x\n\nx\n")
    port = free_port()
    proc = start(config_with_workers(env, port, 2), port)
    try:
        assert len(worker_pids(proc.pid)) == 2
        conns = list(one_per_worker(port).values())
        a, b = conns
        assert a.cmd(b"USER alice").startswith(b"+OK")
        assert a.cmd(b"PASS " + USERS["alice"].encode()).startswith(b"+OK")
        assert b.cmd(b"USER alice").startswith(b"+OK")
        assert b.cmd(b"PASS " + USERS["alice"].encode()).startswith(b"-ERR [IN-USE]")
        assert a.cmd(b"QUIT").startswith(b"+OK")
        a.close()
        c = next(iter(one_per_worker(port, want=1).values()))
        assert c.cmd(b"USER alice").startswith(b"+OK")
        assert c.cmd(b"PASS " + USERS["alice"].encode()).startswith(b"+OK")  # released at QUIT
        c.cmd(b"QUIT")
        b.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "2 workers listening on" in out


def test_dead_worker_is_restarted_and_signals_are_forwarded(env):
    port = free_port()
    proc = start(config_with_workers(env, port, 2), port)
    try:
        for c in one_per_worker(port).values():  # both have started: a death now is not a start-up failure
            c.close()
        first = worker_pids(proc.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            now = worker_pids(proc.pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.05)
        now = worker_pids(proc.pid)
        assert len(now) == 2 and victim not in now and (first - {victim}) <= now
        replacement = (now - first).pop()
        seen = set()
        end = time.monotonic() + 10
        while replacement not in seen and time.monotonic() < end:  # the replacement listens too, soon
            c = Raw(port)
            seen.add(greeting_pid(c))
            c.close()
            time.sleep(0.01)
        assert replacement in seen
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None  # SIGHUP does not stop anything
        assert worker_pids(proc.pid) == now
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("supervisor did not stop:\n" + proc.communicate()[0]) from None
    assert proc.returncode == 0
    assert f"(pid {victim}) killed by signal {int(signal.SIGKILL)}; restarting it" in out
    assert out.count("SIGHUP: re-reading the configuration") == 1  # the supervisor's; workers log at DEBUG
    assert out.count("signal received, stopping") == 2  # SIGINT reached both workers as SIGTERM


def test_workers_one_does_not_fork(env):
    port = free_port()
    proc = start(config_with_workers(env, port, 1), port)
    try:
        assert worker_pids(proc.pid) == set()
        c = Raw(port)
        assert greeting_pid(c) == proc.pid
        c.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_port_in_use_fails_before_forking(env):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [*POP3D, "serve", "--config", str(config_with_workers(env, port, 2))],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    assert r.returncode == 1
    assert "cannot listen" in r.stderr and str(port) in r.stderr


def test_open_files_limit_is_raised_to_hard():
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 256:
        pytest.skip("needs a finite hard limit")
    code = (
        "from pop3d.runtime.workers import raise_nofile_limit; import resource; raise_nofile_limit(); "
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard)),
    )
    assert r.stdout.split() == [str(hard), str(hard)], r.stderr


def tls_workers(env, tmp_path: Path, client_ca: bool = False):  # type: ignore[no-untyped-def]
    """pop3d with 2 workers, cleartext and implicit TLS (and verified client certificates with `client_ca`):
    (pki, process, TLS port, cleartext port)."""
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    port, tls_port = free_port(), free_port()
    cfg = config_with_workers(env, port, 2)
    cfg.write_text(
        cfg.read_text().replace("[server]\n", f'[server]\ntls_listen = ["127.0.0.1:{tls_port}"]\n', 1)
        + f'[tls]\ncert = "{pki.server_pem}"\nkey = "{pki.server_pem}"\n'
        + (f'client_ca = "{pki.cafile}"\n' if client_ca else "")
    )
    return pki, start(cfg, port), tls_port, port


def test_workers_serve_implicit_tls_too(env, tmp_path):
    import socket

    pki, proc, tls_port, _port = tls_workers(env, tmp_path)
    try:
        ctx = pki.client_context()
        with (
            socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            assert s.recv(100).startswith(b"+OK")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert f"127.0.0.1:{tls_port}" in out


def _sample(body: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m[1])


def test_metrics_add_up_across_workers(env):
    """Counters of both workers are summed by the supervisor's endpoint (issue 7, workers > 1)."""
    import urllib.request

    port, mport = free_port(), free_port()
    cfg = config_with_workers(env, port, 2)
    cfg.write_text(cfg.read_text() + f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    proc = start(cfg, port)
    try:
        conns = one_per_worker(port)  # one connection on each worker
        for c, user in zip(conns.values(), ["alice", "bob"], strict=True):
            assert c.cmd(f"USER {user}".encode()).startswith(b"+OK")
            assert c.cmd(f"PASS {USERS[user]}".encode()).startswith(b"+OK")
            assert c.cmd(b"STAT").startswith(b"+OK")
            assert c.cmd(b"QUIT").startswith(b"+OK")
            c.close()
        bad = Raw(port)
        bad.cmd(b"USER alice")
        assert bad.cmd(b"PASS wrong").startswith(b"-ERR [AUTH]")
        bad.cmd(b"QUIT")
        bad.close()
        url = f"http://127.0.0.1:{mport}/metrics"
        deadline = time.monotonic() + 10
        while True:  # command counters reach the shared files within a second
            body = urllib.request.urlopen(url, timeout=10).read().decode()
            try:
                assert _sample(body, 'pop3d_logins_total{result="ok"}') == 2
                assert _sample(body, 'pop3d_commands_total{verb="STAT"}') == 2
                assert _sample(body, "pop3d_auth_failures_total") == 1
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_login_delay_holds_across_workers(env):
    """A second login within LOGIN-DELAY is refused even when it lands on the other worker."""
    port = free_port()
    cfg = config_with_workers(env, port, 2)
    cfg.write_text(cfg.read_text().replace("[server]\n", "[session]\nlogin_delay = 300\n[server]\n", 1))
    proc = start(cfg, port)
    try:
        first, second = one_per_worker(port).values()
        assert first.cmd(b"USER alice").startswith(b"+OK")
        assert first.cmd(b"PASS " + USERS["alice"].encode()).startswith(b"+OK")
        assert first.cmd(b"QUIT").startswith(b"+OK")
        assert second.cmd(b"USER alice").startswith(b"+OK")
        assert second.cmd(b"PASS " + USERS["alice"].encode()).startswith(b"-ERR [LOGIN-DELAY]")
        assert second.cmd(b"USER bob").startswith(b"+OK")  # per user
        assert second.cmd(b"PASS " + USERS["bob"].encode()).startswith(b"+OK")
        second.cmd(b"QUIT")
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_failure_penalty_holds_across_workers(env):
    """The second failure from one address earns the doubled delay even on the other worker."""
    port = free_port()
    cfg = config_with_workers(env, port, 2)
    cfg.write_text(cfg.read_text().replace("failure_delay = 0", "failure_delay = 0.2"))
    proc = start(cfg, port)
    try:
        for c in one_per_worker(port).values():
            assert c.cmd(b"USER alice").startswith(b"+OK")
            assert c.cmd(b"PASS wrong").startswith(b"-ERR [AUTH]")
            c.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    delays = re.findall(r"auth failed user='alice' rip=127\.0\.0\.1.* delay=([0-9.]+)s", out)
    assert delays == ["0.2", "0.4"], out
