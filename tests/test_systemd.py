"""systemd integration, with systemd emulated: a unix datagram socket as NOTIFY_SOCKET, listening sockets
passed as fds 3+ with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, signals for reload and stop.

The end-to-end test runs `python -m pop3d serve` as a real process, which also covers reload (SIGHUP),
metrics over HTTP, JSON logs and the drain on SIGTERM in the way an operator sees them.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import USERS, deliver
from tooling import needs_tool

from pop3d.runtime import systemd

ROOT = Path(__file__).resolve().parent.parent

# Puts the given fds at 3, 4, ... (as systemd does), sets LISTEN_PID to its own pid, then execs pop3d:
# the pid survives exec, so LISTEN_PID names the server process.
WRAPPER = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
high = [fcntl.fcntl(f, fcntl.F_DUPFD, 100) for f in fds]
for i, f in enumerate(high):
    os.dup2(f, 3 + i)
    os.close(f)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "pop3d"] + sys.argv[2:])
"""


class FakeSystemd:
    """The manager's side of sd_notify: an abstract-namespace datagram socket, read by a thread (as systemd
    reads it at once), so watchdog pings never fill its queue."""

    def __init__(self) -> None:
        self.name = f"pop3d-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.seen: list[str] = []
        self._next = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except OSError:
                return
            if not msg:
                return
            with self._cond:
                self.seen.append(msg)
                self._cond.notify_all()

    @property
    def address(self) -> str:
        return "@" + self.name

    def wait_for(self, state: str, timeout: float = 20) -> str:
        """The first datagram (after those already consumed) containing the line `state`."""
        return self.wait_until(lambda lines: state in lines, state, timeout)

    def wait_until(self, test: Callable[[list[str]], bool], what: str, timeout: float = 20) -> str:
        """The first datagram (after those already consumed) whose lines pass `test`."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._next < len(self.seen):
                    msg = self.seen[self._next]
                    self._next += 1
                    if test(msg.split("\n")):
                        return msg
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} from the service; got {self.seen[-20:]}")
                self._cond.wait(left)

    def consumed(self) -> list[str]:
        """The datagrams wait_for/wait_until have looked at so far."""
        with self._cond:
            return self.seen[: self._next]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


def _listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(
    args: list[str], socks: list[socket.socket], names: str, notify: FakeSystemd | None, log: Path, **env: str
) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("POP3D_", "LISTEN_", "PROMETHEUS_"))}
    full.update(PYTHONPATH=str(ROOT), LISTEN_FDNAMES=names, **env)
    if notify is not None:
        full["NOTIFY_SOCKET"] = notify.address
    fds = [s.fileno() for s in socks]
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), *args],
        pass_fds=fds,
        env=full,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _serve_one_socket(cfg: Path, names: str, log: Path, **env: str) -> tuple[subprocess.Popen[bytes], int, FakeSystemd]:
    """`pop3d serve --config cfg` handed one listening socket named `names`, as systemd would, with a fake
    manager listening on NOTIFY_SOCKET: (process, the socket's port, the fake)."""
    lsock = _listener()
    port = lsock.getsockname()[1]
    fake = FakeSystemd()
    proc = _spawn(["serve", "--config", str(cfg)], [lsock], names, fake, log, **env)
    lsock.close()  # the child has its copy; the parent's must not accept
    return proc, port, fake


def _cleanup(proc: subprocess.Popen[bytes], fake: FakeSystemd, stopped: int = 0) -> None:
    """After a test, pass or fail: a SIGSTOPped worker resumed, the server killed if still up, the fake closed."""
    if stopped:
        os.kill(stopped, signal.SIGCONT)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    fake.close()


def _pop(port: int) -> tuple[socket.socket, object]:
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    return c, c.makefile("rb")


def _config(path: Path, root: Path, passwd: Path, metrics_port: int, extra: str = "", workers: int = 0) -> None:
    """`workers` 0: one per CPU (the default)."""
    path.write_text(f"""
[server]
listen = ["127.0.0.1:1"]   # ignored: the sockets come from systemd
hostname = "test.invalid"
shutdown_grace = 0.5
workers = {workers}
[auth]
passwd_file = "{passwd}"
failure_delay = 0
[storage]
location = "{root}/mail/{{user}}/Maildir"
[log]
format = "json"
[metrics]
listen = "127.0.0.1:{metrics_port}"
{extra}
""")


def test_notify_socket_activation_reload_metrics_and_drain(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items()))
    deliver(tmp_path / "mail" / "alice" / "Maildir", b"Subject: hi\r\n\r\nhello\r\n")
    cfg = tmp_path / "pop3d.toml"
    mport = _free_port()
    _config(cfg, tmp_path, passwd, mport)
    log = tmp_path / "out.log"
    proc, port, fake = _serve_one_socket(cfg, "pop3", log, WATCHDOG_USEC="100000")
    try:
        ready = fake.wait_for("READY=1")
        assert f"STATUS=listening on 127.0.0.1:{port}" in ready.split("\n")
        fake.wait_for("WATCHDOG=1")

        c, f = _pop(port)
        assert f.readline().startswith(b"+OK pop3d ready")
        c.sendall(b"USER alice\r\nPASS wonderland\r\n")
        assert f.readline().startswith(b"+OK") and f.readline().startswith(b"+OK alice has 1 message")

        body = ""
        end = time.monotonic() + 10  # command counts reach the endpoint at the next flush (1 s)
        while 'pop3d_commands_total{verb="PASS"} 1.0' not in body and time.monotonic() < end:
            time.sleep(0.2)
            body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        assert 'pop3d_logins_total{result="ok"} 1.0' in body
        assert "pop3d_sessions_open 1.0" in body
        assert 'pop3d_commands_total{verb="PASS"} 1.0' in body

        # reload: a new passwd-file with a new user, a new listen address (needs a restart), debug logs
        passwd2 = tmp_path / "passwd2"
        passwd2.write_text("carol:{PLAIN}c4rol\n")
        _config(cfg, tmp_path, passwd2, mport, extra="")
        text = cfg.read_text().replace('listen = ["127.0.0.1:1"]', 'listen = ["127.0.0.1:2"]')
        cfg.write_text(text.replace('format = "json"', 'format = "json"\nlevel = "DEBUG"'))
        proc.send_signal(signal.SIGHUP)
        reloading = fake.wait_for("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.split("\n"))
        fake.wait_for("READY=1")

        c2, f2 = _pop(port)
        assert f2.readline().startswith(b"+OK")
        c2.sendall(b"USER carol\r\nPASS c4rol\r\nQUIT\r\n")
        assert f2.readline().startswith(b"+OK") and f2.readline().startswith(b"+OK carol has 0")
        c2.close()
        c.sendall(b"STAT\r\n")  # the session from before the reload carries on
        assert f.readline() == b"+OK 1 22\r\n"

        proc.send_signal(signal.SIGTERM)
        fake.wait_for("STOPPING=1")
        assert proc.wait(20) == 0
        assert f.readline().startswith(b"-ERR [SYS/TEMP]")  # cut after shutdown_grace, deletes nothing
        c.close()
    finally:
        _cleanup(proc, fake)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    msgs = [rec["msg"] for rec in lines]
    assert any("server.listen" in m and "restart" in m for m in msgs), msgs
    assert any(m.startswith("configuration reloaded: ") and "auth.passwd_file" in m for m in msgs), msgs
    ends = [rec for rec in lines if rec.get("event") == "session_end"]
    assert {(e["user"], e["rip"]) for e in ends} == {("alice", "127.0.0.1"), ("carol", "127.0.0.1")}
    assert next(e for e in ends if e["user"] == "alice")["reason"] == "server shutdown"
    assert (tmp_path / "mail" / "alice" / "Maildir" / "new").iterdir().__next__()  # nothing deleted


@pytest.mark.parametrize(
    ("names", "message"), [("pop3s", "tls.cert/tls.key are not set"), ("imap", "must be pop3 or pop3s")]
)
def test_socket_names_are_checked(tmp_path, names, message):
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    cfg = tmp_path / "pop3d.toml"
    _config(cfg, tmp_path, passwd, _free_port())
    lsock = _listener()
    log = tmp_path / "out.log"
    proc = _spawn(["serve", "--config", str(cfg)], [lsock], names, None, log)
    lsock.close()
    assert proc.wait(20) == 2
    assert message in log.read_text()


def test_plain_and_tls_sockets_told_apart_by_name(tmp_path):
    """LISTEN_FDNAMES=pop3:pop3s: the first socket speaks plain POP3, the second implicit TLS (RFC 8314)."""
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    cfg = tmp_path / "pop3d.toml"
    _config(cfg, tmp_path, passwd, _free_port(), extra=f'[tls]\ncert = "{pki.server_pem}"\nkey = "{pki.server_pem}"\n')
    socks = [_listener(), _listener()]
    plain_port, tls_port = (s.getsockname()[1] for s in socks)
    fake = FakeSystemd()
    proc = _spawn(["serve", "--config", str(cfg)], socks, "pop3:pop3s", fake, tmp_path / "out.log")
    for s in socks:
        s.close()
    _plain_then_tls(proc, fake, pki, plain_port, tls_port, capa=True)


def _plain_then_tls(proc: Any, fake: FakeSystemd, pki: Any, plain_port: int, tls_port: int, capa: bool = False) -> None:
    """Once READY=1: plain POP3 on `plain_port` (its CAPA offers STLS), implicit TLS on `tls_port`; then a
    clean SIGTERM. The server is killed and `fake` closed whatever happens."""
    try:
        fake.wait_for("READY=1")
        c, f = _pop(plain_port)
        assert f.readline().startswith(b"+OK pop3d ready")
        if capa:
            c.sendall(b"CAPA\r\n")
            assert b"STLS\r\n" in b"".join(iter(f.readline, b".\r\n"))
        c.close()
        raw = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
        with pki.client_context().wrap_socket(raw, server_hostname="localhost") as t:
            assert t.makefile("rb").readline().startswith(b"+OK pop3d ready")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        _cleanup(proc, fake)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the supervisor's workers)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


def test_watchdog_stops_while_a_worker_is_stopped(tmp_path):
    """WATCHDOG=1 keeps coming while both workers beat; a SIGSTOPped worker holds it back (STATUS= says which),
    so systemd's WatchdogSec= would restart the service; SIGCONT and the pings resume."""
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    cfg = tmp_path / "pop3d.toml"
    _config(cfg, tmp_path, passwd, _free_port(), workers=2)
    log = tmp_path / "out.log"
    proc, _port, fake = _serve_one_socket(cfg, "pop3", log, WATCHDOG_USEC="1000000")
    stopped = 0
    try:
        fake.wait_for("READY=1")
        for _ in range(3):  # healthy workers: the pings keep coming
            fake.wait_for("WATCHDOG=1")
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        stopped = workers[1]
        os.kill(stopped, signal.SIGSTOP)

        def withheld(lines: list[str]) -> bool:
            return any(ln.startswith("STATUS=") and "watchdog ping withheld" in ln for ln in lines)

        first = fake.wait_until(withheld, "a withheld ping")
        assert f"(pid {stopped}) has not answered" in first
        mark = len(fake.consumed())
        for _ in range(4):  # four more looks at the workers, none of them a ping
            fake.wait_until(withheld, "a withheld ping")
        assert not any("WATCHDOG=1" in msg.split("\n") for msg in fake.consumed()[mark:])

        os.kill(stopped, signal.SIGCONT)
        stopped = 0
        resumed = fake.wait_for("WATCHDOG=1")
        assert any(ln.startswith("STATUS=listening on") for ln in resumed.split("\n"))
        fake.wait_for("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        _cleanup(proc, fake, stopped)
    text = log.read_text()
    assert "withholding the watchdog ping" in text and "watchdog pings resume" in text


def test_reload_ready_waits_for_every_worker_and_restarted_workers_keep_it(tmp_path):
    """With workers, READY=1 after RELOADING=1 means every worker has the new configuration: a stopped
    worker holds it back until it runs again (then the new user logs in on every worker), and a worker
    restarted after the reload starts from the reloaded configuration, not the one the server started with.
    A SIGTERM while a reload waits for a stopped worker is not held back."""
    from test_workers import one_per_worker

    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    (tmp_path / "mail").mkdir()  # where carol's Maildir is made at her first login
    cfg = tmp_path / "pop3d.toml"
    mport = _free_port()
    _config(cfg, tmp_path, passwd, mport, workers=2)
    log = tmp_path / "out.log"
    proc, port, fake = _serve_one_socket(cfg, "pop3", log)
    stopped = 0

    def carol_everywhere() -> None:
        for conn in one_per_worker(port).values():
            assert conn.cmd(b"USER carol").startswith(b"+OK")
            assert conn.cmd(b"PASS c4rol").startswith(b"+OK carol has 0")
            conn.cmd(b"QUIT")
            conn.close()

    try:
        fake.wait_for("READY=1")
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        stopped = workers[1]
        os.kill(stopped, signal.SIGSTOP)
        passwd2 = tmp_path / "passwd2"
        passwd2.write_text("carol:{PLAIN}c4rol\n")
        _config(cfg, tmp_path, passwd2, mport, workers=2)
        proc.send_signal(signal.SIGHUP)
        fake.wait_for("RELOADING=1")
        with pytest.raises(AssertionError, match="no READY=1"):
            fake.wait_for("READY=1", timeout=1.5)  # the stopped worker has not read the new passwd-file
        os.kill(stopped, signal.SIGCONT)
        stopped = 0
        fake.wait_for("READY=1")
        carol_everywhere()

        os.kill(workers[0], signal.SIGKILL)  # its replacement must run the reloaded configuration
        end = time.monotonic() + 20
        while (len(now := _children(proc.pid)) != 2 or workers[0] in now) and time.monotonic() < end:
            time.sleep(0.05)
        assert len(now) == 2 and workers[0] not in now, now
        carol_everywhere()

        stopped = now[0]  # a reload waiting for a stuck worker does not hold a shutdown back
        os.kill(stopped, signal.SIGSTOP)
        proc.send_signal(signal.SIGHUP)
        fake.wait_for("RELOADING=1")
        proc.send_signal(signal.SIGTERM)
        fake.wait_for("STOPPING=1", timeout=10)  # not after RELOAD_TIMEOUT (30 s)
        os.kill(stopped, signal.SIGCONT)
        stopped = 0
        assert proc.wait(20) == 0
    finally:
        _cleanup(proc, fake, stopped)


@pytest.mark.parametrize(
    ("names", "tls_item"),
    [
        ("", "127.0.0.1:{port}"),  # no LISTEN_FDNAMES at all: systemd's "unknown"
        ("pop3d.socket:pop3d-tls.socket", ":{port}"),  # socket units without FileDescriptorName=, wildcard config
        ("pop3d.socket:unknown", "[::]:{port}"),
    ],
)
def test_default_named_sockets_matched_by_address(tmp_path, names, tls_item):
    """Sockets named after their unit (or not at all) are told apart by their bound address: the one in
    server.tls_listen speaks implicit TLS (RFC 8314 §3.3), the one in server.listen plain POP3."""
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    socks = [_listener(), _listener()]
    plain_port, tls_port = (s.getsockname()[1] for s in socks)
    cfg = tmp_path / "pop3d.toml"
    _config(cfg, tmp_path, passwd, _free_port(), extra=f'[tls]\ncert = "{pki.server_pem}"\nkey = "{pki.server_pem}"\n')
    listen = f'listen = ["127.0.0.1:{plain_port}"]\ntls_listen = ["{tls_item.format(port=tls_port)}"]'
    cfg.write_text(
        cfg.read_text().replace('listen = ["127.0.0.1:1"]   # ignored: the sockets come from systemd', listen)
    )
    fake = FakeSystemd()
    proc = _spawn(["serve", "--config", str(cfg)], socks, names, fake, tmp_path / "out.log")
    for s in socks:
        s.close()
    _plain_then_tls(proc, fake, pki, plain_port, tls_port)
    assert "matches server.tls_listen: implicit TLS" in (tmp_path / "out.log").read_text()


def test_default_named_socket_matching_nothing_is_plain(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    cfg = tmp_path / "pop3d.toml"
    _config(cfg, tmp_path, passwd, _free_port())  # server.listen is 127.0.0.1:1: not the socket's address
    log = tmp_path / "out.log"
    proc, port, fake = _serve_one_socket(cfg, "pop3d.socket", log)
    try:
        fake.wait_for("READY=1")
        c, f = _pop(port)
        assert f.readline().startswith(b"+OK pop3d ready")
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        _cleanup(proc, fake)
    assert f"socket 3 (pop3d.socket) on 127.0.0.1:{port} matches no server.listen" in log.read_text()


# -- pure pieces ------------------------------------------------------------------------------------------


def test_notify_datagram_and_absence(monkeypatch):
    fake = FakeSystemd()
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
        assert systemd.notify("READY=1", "STATUS=x")
        assert fake.wait_for("READY=1", 5) == "READY=1\nSTATUS=x"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not systemd.notify("READY=1")
    finally:
        fake.close()


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


def test_listen_fds_for_another_process_or_bad(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ  # unset so children do not take them
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "two")
    with pytest.raises(systemd.ActivationError, match="not a number"):
        systemd.listen_fds()


def test_address_matching_is_wildcard_aware():
    """2: same address and port; 1: same port with a wildcard on either side; 0: anything else."""
    ip = systemd._ip
    v4 = ip("127.0.0.1")
    assert v4 is not None and ip("::ffff:127.0.0.1") == v4  # a dual-stack socket's view of an IPv4 peer
    assert systemd._match(v4, 995, ["127.0.0.1:995"]) == 2
    assert systemd._match(v4, 995, ["localhost:995"]) == 2
    assert systemd._match(v4, 995, [":995", "0.0.0.0:995"]) == 1
    assert systemd._match(v4, 995, ["[::]:995"]) == 1
    assert systemd._match(v4, 995, ["127.0.0.2:995", "127.0.0.1:110", "127.0.0.1:0", "bad"]) == 0
    any6 = ip("::")
    assert any6 is not None and systemd._match(any6, 995, ["192.0.2.1:995"]) == 1  # ListenStream=995


# -- check-config in the unit's sandbox ---------------------------------------------------------------------


def _can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@needs_tool("unshare", "util-linux")
def test_check_config_warns_about_read_only_mail_and_state(tmp_path):
    """What ProtectSystem=strict does to a path ReadWritePaths= forgot: a read-only bind mount. check-config
    (run by ExecReload= in the same sandbox) names the path and the unit setting, and still exits 0."""
    if not _can_unshare_mounts():
        pytest.skip("no private mount namespace here (needs CAP_SYS_ADMIN)")
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    (tmp_path / "mail").mkdir()
    cfg = tmp_path / "pop3d.toml"
    _config(cfg, tmp_path, passwd, _free_port())
    cfg.write_text(cfg.read_text().replace("[server]\n", f'[server]\nstate_dir = "{tmp_path}/state"\n', 1))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    check = [sys.executable, "-m", "pop3d", "check-config", "--config", str(cfg)]
    free = subprocess.run(check, capture_output=True, text=True, env=env, timeout=60)
    assert free.returncode == 0, free.stderr
    assert "WARNING" not in free.stdout

    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    boxed = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(tmp_path), *check],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert boxed.returncode == 0, boxed.stderr  # a warning: serve starts, it only cannot write
    lines = boxed.stdout.splitlines()
    mail = next(ln for ln in lines if ln.startswith(f"access: storage.location {tmp_path}/mail") and "WARNING" in ln)
    assert "read-only file system" in mail and f"ReadWritePaths=-{tmp_path}/mail" in mail
    state = next(ln for ln in lines if ln.startswith(f"access: server.state_dir {tmp_path}/state"))
    assert "WARNING on a read-only file system" in state and f"ReadWritePaths=-{tmp_path}/state" in state


def test_check_config_names_protect_home_for_home_locations(tmp_path, monkeypatch):
    """`{home}/Maildir` with homes under /home: ProtectHome=yes makes /home an inaccessible read-only mount;
    check-config finds the homes in the passwd-file and says to turn ProtectHome= off."""
    from pop3d.config import Settings
    from pop3d.runtime import access

    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x::::/home/alice::\nbob:{PLAIN}y::::/home/bob::\ncarol:{PLAIN}z\n")
    settings = Settings.model_validate(
        {
            "auth": {"passwd_file": str(passwd)},
            "storage": {"location": "{home}/Maildir"},
            "server": {"state_dir": str(tmp_path / "state")},
        }
    )
    monkeypatch.setattr(access, "_read_only", lambda path: path == "/home" or path.startswith("/home/"))
    (tmp_path / "state").mkdir()
    exists = os.path.exists
    monkeypatch.setattr(access.os.path, "exists", lambda path: str(path).startswith("/home") or exists(path))
    _who, _checks, notes = access.check(settings, None)
    warning = next(n for n in notes if "WARNING" in n)
    assert warning.startswith("access: storage.location {home}/Maildir (homes in /home): WARNING on a read-only")
    assert "ProtectHome=no and ReadWritePaths=-/home in pop3d.service" in warning
    assert sum("WARNING" in n for n in notes) == 1  # /home once, not once per user; the state dir is fine
    assert access._unit_hint("/var/lib/pop3d/mbox").startswith("under systemd: StateDirectory=pop3d")
    assert access._unit_hint("/srv/mail") == "under systemd: ReadWritePaths=-/srv/mail in pop3d.service"


# -- the unit files ---------------------------------------------------------------------------------------


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(ROOT / "contrib" / "systemd" / name)
    return cp


def test_unit_files():
    svc = _unit("pop3d.service")["Service"]
    assert svc["Type"] == "notify"
    # several ExecReload= run in order, stopping at the first failure: check-config gates the SIGHUP
    lines = (ROOT / "contrib" / "systemd" / "pop3d.service").read_text().splitlines()
    reload = [ln.split("=", 1)[1] for ln in lines if ln.startswith("ExecReload=")]
    assert len(reload) == 2 and "pop3d check-config --config /etc/pop3d/pop3d.toml" in reload[0]
    assert reload[1] == "/bin/kill -HUP $MAINPID" and not reload[0].startswith("-")
    assert svc["ProtectHome"] == "yes" and "ProtectHome=no" in "\n".join(lines)  # says what to change for {home}
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict" and svc["PrivateTmp"] == "yes"
    assert "-/srv/mail" in svc["ReadWritePaths"].split()  # "-": the unit starts where it does not exist
    assert svc["StateDirectory"] == "pop3d"  # server.state_dir, writable under ProtectSystem=strict
    assert svc["User"] == "pop3d" and svc["Group"] == "mail"
    assert "pop3d serve" in svc["ExecStart"] and "WatchdogSec" in svc
    for name, fdname, port in (("pop3d.socket", "pop3", "110"), ("pop3d-tls.socket", "pop3s", "995")):
        sock = _unit(name)["Socket"]
        assert sock["FileDescriptorName"] == fdname and sock["ListenStream"] == port
        assert fdname in systemd.FD_KINDS


@needs_tool("systemd-analyze", "systemd")
def test_units_verify(tmp_path):
    """systemd's own parser: no unknown keys or bad values (the binary path is swapped for one that exists)."""
    for name in ("pop3d.service", "pop3d.socket", "pop3d-tls.socket"):
        text = (ROOT / "contrib" / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/pop3d", "/bin/true"))
    out = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            *(str(tmp_path / n) for n in ("pop3d.service", "pop3d.socket", "pop3d-tls.socket")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert not problems, problems


def test_notify_never_blocks_on_a_full_queue(monkeypatch):
    """A manager that stops reading must not stall the event loop: datagrams are dropped instead."""
    name = f"pop3d-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        results = [systemd.notify("WATCHDOG=1") for _ in range(2000)]
    assert results[0] is True and False in results
