"""The `pop3d` command as a sysadmin runs it: real processes, signals, kill -9."""

from __future__ import annotations

import os
import poplib
import re
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
        [*POP3D, "serve", "--demo", "--demo-dir", str(tmp_path / "demo"), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
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


def test_demo_listen_option_then_variable_then_default(tmp_path, monkeypatch):
    from pop3d import demo

    monkeypatch.delenv("POP3D_SERVER__LISTEN", raising=False)
    assert demo.prepare(tmp_path).server.listen == [demo.DEMO_LISTEN]
    monkeypatch.setenv("POP3D_SERVER__LISTEN", '["127.0.0.1:2"]')
    assert demo.prepare(tmp_path).server.listen == ["127.0.0.1:2"]
    assert demo.prepare(tmp_path, ["127.0.0.1:3", "[::1]:3"]).server.listen == ["127.0.0.1:3", "[::1]:3"]


# -- every failure: one line on stderr, a documented exit status (README "Exit status") ---------------------


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `pop3d ARGV` in this process with `stdin`; (status, stderr) after checking stderr is one line."""
    import io

    from pop3d.cli import main

    def run(argv: list[str], stdin: str = "") -> tuple[int, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse
            status = int(exc.code or 0)
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return status, err

    return run


@pytest.mark.parametrize(
    "argv, status, fragment",
    [
        ([], 2, "pop3d: the following arguments are required: command (see pop3d --help)"),
        (["nosuch"], 2, "invalid choice: 'nosuch'"),
        (["serve", "--config", "{tmp}/missing.toml"], 2, "missing.toml: not found"),
        (["check-config", "--config", "{tmp}"], 2, "not a regular file"),
        (["serve", "--listen", "127.0.0.1:1"], 2, "--listen is for --demo"),
        (["serve", "--demo", "--demo-dir", "{tmp}/d", "--listen", "nohost"], 2, "--listen: 'nohost' is not host:port"),
        (["serve", "--demo", "--demo-dir", "{file}/d"], 1, "pop3d serve: {file}/d: Not a directory"),
        (["health", "nohost"], 2, "address: 'nohost' is not host:port"),
        (["health", "127.0.0.1:99999"], 2, "port 99999 out of range"),
        (["health", "--timeout", "-1", "127.0.0.1:1"], 2, "--timeout: -1 is not a positive number"),
        (["health", "--timeout", "soon"], 2, "pop3d health: argument --timeout: invalid float value: 'soon'"),
        (["passwd", "--scheme", "MD5"], 2, "--scheme: unknown scheme 'MD5'"),
        (["passwd", "a:b"], 2, "user name 'a:b'"),
        (["passwd"], 2, "empty password"),
        (["passwd", "--scheme", "PLAIN"], 2, "password refused"),  # stdin "a:b", see below
        (["bench", "nohost", "--users", "{users}"], 2, "'nohost' is not host:port"),
        (["bench", "127.0.0.1:1", "--users", "{tmp}/missing"], 2, "missing"),
        (["bench", "127.0.0.1:1", "--users", "{users}", "-c", "0"], 2, "--concurrency"),
        (["bench", "127.0.0.1:1", "--users", "{users}", "-c", "many"], 2, "invalid int value: 'many'"),
        (["mkmaildrops", "{file}/d"], 1, "pop3d mkmaildrops: {file}/d"),
        (["mkmaildrops", "{tmp}/d", "--size", "4q"], 2, "4q"),
        (["mkmaildrops", "{tmp}/d", "--users", "0"], 2, "--users"),
    ],
)
def test_bad_input_one_line_and_exit_status(cli, tmp_path, argv, status, fragment):
    names = {"tmp": str(tmp_path), "file": str(tmp_path / "a-file"), "users": str(tmp_path / "users.txt")}
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "users.txt").write_text("alice:pw\n")
    got, err = cli([a.format(**names) for a in argv], stdin="a:b\n" if "PLAIN" in argv else "")
    assert got == status, err
    assert fragment.format(**names) in err


def test_passwd_blf_crypt_long_password_one_line():
    r = subprocess.run(
        [*POP3D, "passwd", "--scheme", "BLF-CRYPT"], input="x" * 100 + "\n", capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stdout == ""
    assert (
        r.stderr
        == "pop3d: password refused: BLF-CRYPT passwords are limited to 72 bytes (or choose another --scheme)\n"
    )


def test_passwd_help_lists_schemes_and_login_methods():
    from pop3d.auth.schemes import SCHEMES

    r = subprocess.run([*POP3D, "passwd", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ") and ln.split()[0] in SCHEMES}
    assert set(rows) == set(SCHEMES)
    for name, row in rows.items():
        assert "USER/PASS, AUTH PLAIN, AUTH LOGIN" in row, row
        assert ("APOP" in row) == (name == "PLAIN"), row
        assert ("CRAM-MD5" in row.split(None, 1)[1]) == (name in ("PLAIN", "CRAM-MD5")), row
        assert ("SCRAM-SHA-256" in row.split(None, 1)[1]) == (name in ("PLAIN", "SCRAM-SHA-256")), row


def test_unreadable_config_file(cli, tmp_path, monkeypatch):
    cfg = tmp_path / "pop3d.toml"
    cfg.write_text("")
    cfg.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make open() refuse as the kernel would for anybody else
        import pop3d.config

        def refuse(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(pop3d.config, "open", refuse, raising=False)
    assert cli(["check-config", "--config", str(cfg)]) == (
        2,
        f"pop3d: config file {cfg}: cannot read: Permission denied\n",
    )


def test_env_typo_from_the_command_line(env):
    cfg = write_config(env, 110)
    r = subprocess.run(
        [*POP3D, "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "POP3D_SESION__TIMEOUT": "700", "POP3D_CONFIG_FILE": str(cfg)},
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "pop3d: POP3D_SESION__TIMEOUT: unknown section 'sesion' (did you mean POP3D_SESSION__TIMEOUT?)\n"


def test_exit_statuses_are_the_documented_ones():
    from pop3d import cli

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Exit status", 1)[1].split("\n#", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == {cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_USAGE, cli.EXIT_INTERRUPTED}
