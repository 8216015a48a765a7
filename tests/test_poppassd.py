"""poppassd (`poppassd.listen`): the Eudora/qpopper password-change dialogue over implicit TLS, its defences,
the atomic passwd-file rewrite, and the new password at the next POP3 login."""

from __future__ import annotations

import logging
import multiprocessing
import os
import poplib
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import USERS, Env, Raw, ServerThread
from hypothesis import given
from hypothesis import strategies as st
from test_cli import POP3D, free_port, start, write_config
from test_workers import greeting_pid, one_per_worker
from tls_helpers import Pki

from pop3d.auth import passwd_write, policy, schemes
from pop3d.auth.passwd_file import PasswdFileAuthenticator
from pop3d.config import PasswordPolicySettings
from pop3d.poppassd import protocol as p

NEW = "correct horse battery"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.make(tmp_path)


class Client(Raw):
    """A poppassd client over TLS, line by line: conftest's Raw on a TLS socket."""

    def __init__(self, port: int, pki: Pki) -> None:  # not Raw.__init__: it would connect in clear
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = b""
        self.greeting = self.line()

    def cmd(self, text: str | bytes) -> bytes:  # poppassd commands are text
        return super().cmd(text.encode() if isinstance(text, str) else text)

    def closed(self) -> bool:
        """True when the server closed the connection; a reset or a TLS alert counts as closed too."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True


def change(port: int, pki: Pki, user: str, old: str, new: str) -> list[bytes]:
    c = Client(port, pki)
    try:
        return [c.greeting, c.cmd(f"user {user}"), c.cmd(f"pass {old}"), c.cmd(f"newpass {new}"), c.cmd("quit")]
    finally:
        c.close()


def run_server(env: Env, pki: Pki, **sections: dict) -> ServerThread:
    base: dict[str, dict] = {"tls": pki.tls_section(), "poppassd": {"listen": ["127.0.0.1:0"]}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return ServerThread(env.settings(**base)).start()


@pytest.fixture
def server(env: Env, pki: Pki):
    st_ = run_server(env, pki)
    yield st_
    st_.stop()


def pp_port(server: ServerThread) -> int:
    assert server.server is not None
    return server.server.poppassd_addresses()[0][1]


def pop3_login(port: int, user: str, password: str) -> bool:
    c = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        c.user(user)
        c.pass_(password)
        c.quit()
        return True
    except poplib.error_proto:
        return False
    finally:
        c.close()


# --- the dialogue -----------------------------------------------------------------------------------------------


def test_full_dialogue_changes_the_password_for_the_next_pop3_login(server, env, pki):
    before = env.passwd.read_bytes()
    replies = change(pp_port(server), pki, "alice", USERS["alice"], NEW)
    assert replies[0].startswith(b"200 ") and b"poppassd" in replies[0]
    assert replies[1:] == [
        b"200 Your password please.",
        b"200 Your new password please.",
        b"200 Password changed, thank-you.",
        b"200 Bye.",
    ]
    lines = env.passwd.read_bytes().splitlines(keepends=True)
    assert lines[0].startswith(b"alice:{ARGON2ID}$argon2id$")
    assert lines[1:] == before.splitlines(keepends=True)[1:]  # bob's line, octet for octet
    assert pop3_login(server.port, "alice", NEW)
    assert not pop3_login(server.port, "alice", USERS["alice"])


def test_verbs_are_case_insensitive_and_passwords_keep_their_spaces(server, env, pki):
    c = Client(pp_port(server), pki)
    assert c.cmd("USER bob") == b"200 Your password please."
    assert c.cmd("Pass builder pass") == b"200 Your new password please."  # a space inside the password
    assert c.cmd("NewPass  two spaces before") == b"200 Password changed, thank-you."
    assert c.cmd("QUIT") == b"200 Bye."
    assert c.closed()
    assert pop3_login(server.port, "bob", " two spaces before")


def test_wrong_old_password_and_unknown_user_get_the_same_500_and_the_penalty(server, env, pki):
    c = Client(pp_port(server), pki)
    assert c.cmd("user alice") == b"200 Your password please."
    assert c.cmd("pass wrong") == b"500 Old password is incorrect."
    assert server.ctx.penalty.failures("127.0.0.1", time.monotonic()) == 1
    assert c.cmd("pass again") == b'500 Expected "user".'  # a failed pass needs a new user
    assert c.cmd("user nobody") == b"200 Your password please."  # no reply tells whether a user exists
    assert c.cmd("pass wrong") == b"500 Old password is incorrect."
    assert server.ctx.penalty.failures("127.0.0.1", time.monotonic()) == 2
    assert c.cmd("user alice") == b"200 Your password please."
    # the third failure (auth.max_failures_per_connection) closes the connection
    assert c.cmd("pass wrong") == b"500 Old password is incorrect."
    assert c.line() == b"500 Too many failures, closing connection."
    assert c.closed()
    assert env.passwd.read_text().startswith(f"alice:{{PLAIN}}{USERS['alice']}\n")


def test_penalty_is_shared_with_pop3_logins(env, pki):
    server = run_server(env, pki, auth={"failure_delay": 0.2, "failure_delay_max": 0.2})
    try:
        assert not pop3_login(server.port, "alice", "wrong")  # a POP3 failure from this address...
        assert server.ctx.penalty.delay("127.0.0.1", time.monotonic()) > 0
        c = Client(pp_port(server), pki)
        c.cmd("user alice")
        assert c.cmd(f"pass {USERS['alice']}") == b"200 Your new password please."  # ...delays, then clears
        assert server.ctx.penalty.failures("127.0.0.1", time.monotonic()) == 0
        c.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "new, why",
    [
        ("short", b"500 New password must be at least 10 characters long."),
        (USERS["alice"], b"500 New password must differ from the old one."),
        ("my-ALICE-password", b"500 New password must not contain the user name."),
        ("x" * 1025, b"500 Line too long."),  # the line limit lets the longest password through, no more
    ],
    ids=["short", "old", "name", "long"],
)
def test_policy_refusals_keep_the_password_and_allow_another_try(server, env, pki, new, why):
    before = env.passwd.read_bytes()
    c = Client(pp_port(server), pki)
    c.cmd("user alice")
    c.cmd(f"pass {USERS['alice']}")
    assert c.cmd(f"newpass {new}") == why
    assert env.passwd.read_bytes() == before
    assert c.cmd(f"newpass {NEW}") == b"200 Password changed, thank-you."
    c.close()


def test_dialogue_out_of_order_and_empty_arguments(server, pki):
    c = Client(pp_port(server), pki)
    assert c.cmd("pass x") == b'500 Expected "user".'
    assert c.cmd("newpass x") == b'500 Expected "user".'
    assert c.cmd("user") == b"500 Username required."
    assert c.cmd("user    ") == b"500 Username required."
    assert c.cmd("user alice") == b"200 Your password please."
    assert c.cmd("pass") == b"500 Password required."
    assert c.cmd("quit") == b"200 Bye."
    c.close()


def test_long_lines_garbage_and_too_many_bad_commands(env, pki):
    server = run_server(env, pki, session={"max_bad_commands": 4})
    try:
        c = Client(pp_port(server), pki)
        assert c.cmd(b"user " + b"a" * 100_000) == b"500 Line too long."
        assert c.cmd(b"user \xff\xfe") == b"500 Lines must be UTF-8 text without control characters."
        assert c.cmd(b"user a\x00b") == b"500 Lines must be UTF-8 text without control characters."
        c.sock.sendall(b"HELO\r\n")
        assert c.line() == b'500 Expected "user".'
        assert c.line() == b"500 Too many bad commands, closing connection."
        assert c.closed()
        c = Client(pp_port(server), pki)  # the server is fine
        assert c.cmd("user alice") == b"200 Your password please."
        c.close()
    finally:
        server.stop()


def test_pipelined_dialogue_is_answered_in_order(server, pki):
    c = Client(pp_port(server), pki)
    c.sock.sendall(f"user alice\r\npass {USERS['alice']}\r\nnewpass {NEW}\r\nquit\r\n".encode())
    assert [c.line() for _ in range(4)] == [
        b"200 Your password please.",
        b"200 Your new password please.",
        b"200 Password changed, thank-you.",
        b"200 Bye.",
    ]


def test_plain_tcp_gets_no_cleartext_dialogue(server):
    s = socket.create_connection(("127.0.0.1", pp_port(server)), timeout=5)
    s.sendall(b"user alice\r\npass wonderland\r\n")
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    s.close()
    assert b"200" not in data and b"500" not in data and b"password" not in data.lower()


def test_timeout_closes_the_conversation(env, pki):
    server = run_server(env, pki, poppassd={"timeout": 0.3})
    try:
        c = Client(pp_port(server), pki)
        assert c.line() == b"500 Timeout, closing connection."
        assert c.closed()
    finally:
        server.stop()


def test_connection_limits_apply(env, pki):
    server = run_server(env, pki, server={"max_connections_per_ip": 1, "limit_exempt": []})
    try:
        first = Client(pp_port(server), pki)
        second = Client(pp_port(server), pki)
        assert second.greeting.startswith(b"500 Too many connections from your address")
        first.close()
        second.close()
    finally:
        server.stop()


def test_audit_log_names_user_and_address_never_a_password(server, pki, caplog):
    caplog.set_level(logging.INFO)
    port = pp_port(server)
    c = Client(port, pki)
    c.cmd("user alice")
    c.cmd("pass not-the-password-123")
    c.close()
    change(port, pki, "alice", USERS["alice"], "short-pw")
    change(port, pki, "alice", USERS["alice"], NEW)
    server.wait_idle()
    text = caplog.text
    changes = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "password_change"]
    results = [r.fields["result"] for r in changes]  # type: ignore[attr-defined]
    assert results == ["bad_password", "refused", "changed"]
    assert all(r.fields["user"] == "alice" and r.fields["rip"] == "127.0.0.1" for r in changes)  # type: ignore[attr-defined]
    for secret in ("not-the-password-123", USERS["alice"], "short-pw", NEW):
        assert secret not in text
    hashed = Path(server.settings.auth.passwd_file).read_text().split(":")[1]
    assert hashed not in text


def test_concurrent_changes_of_two_users_are_both_kept(server, env, pki):
    port = pp_port(server)
    results: dict[str, list[bytes]] = {}

    def run(user: str) -> None:
        results[user] = change(port, pki, user, USERS[user], f"{NEW} {len(user)}")

    threads = [threading.Thread(target=run, args=(u,)) for u in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r[3] for r in results.values()] == [b"200 Password changed, thank-you."] * 2
    for user in ("alice", "bob"):
        assert pop3_login(server.port, user, f"{NEW} {len(user)}")


# --- start-up ---------------------------------------------------------------------------------------------------


def test_refuses_to_start_without_tls(env):
    cfg = write_config(env, free_port(), p='[poppassd]\nlisten = ["127.0.0.1:0"]')
    r = subprocess.run([*POP3D, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "poppassd.listen needs tls.cert and tls.key" in r.stderr


def test_refuses_a_default_scheme_that_cannot_hash(env, pki):
    cfg = write_config(
        env,
        free_port(),
        a=f'[tls]\ncert = "{pki.server_pem}"\nkey = "{pki.server_pem}"',
        p='[poppassd]\nlisten = ["127.0.0.1:0"]',
    )
    text = cfg.read_text().replace("[auth]\n", '[auth]\ndefault_scheme = "CRYPT"\n')
    cfg.write_text(text)
    r = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "auth.default_scheme: CRYPT cannot hash new passwords" in r.stderr


def test_two_workers_serve_the_new_password(env, pki):
    port, pp = free_port(), free_port()
    cfg = write_config(
        env,
        port,
        a=f'[tls]\ncert = "{pki.server_pem}"\nkey = "{pki.server_pem}"',
        p=f'[poppassd]\nlisten = ["127.0.0.1:{pp}"]',
    )
    cfg.write_text(cfg.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1))
    proc = start(cfg, port)
    try:
        assert change(pp, pki, "alice", USERS["alice"], NEW)[3] == b"200 Password changed, thank-you."
        # every worker takes it: each looks at the file at most once a second (min_check_interval)
        seen = one_per_worker(port)
        workers = set(seen)
        for c in seen.values():
            c.close()
        accepted: set[int] = set()
        deadline = time.monotonic() + 10
        while accepted != workers:
            assert time.monotonic() < deadline, f"only workers {accepted} of {workers} took the new password"
            conn = Raw(port)
            conn.cmd(b"USER alice")
            if conn.cmd(b"PASS " + NEW.encode()).startswith(b"+OK"):
                accepted.add(greeting_pid(conn))
                conn.cmd(b"QUIT")
            conn.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert "poppassd" in out
    assert NEW not in out and USERS["alice"] not in out


# --- the rewrite itself -----------------------------------------------------------------------------------------


def _is_entry_for(name: str):
    """The predicate PasswdFileAuthenticator.set_secret hands over: the line parses as that user's entry."""
    from pop3d.auth.passwd_file import _Malformed, _parse_line

    def is_entry(line: str) -> bool:
        try:
            return _parse_line(line).user.name == name
        except _Malformed:
            return False

    return is_entry


ODD_FILE = (
    b"# users of example.org\r\n"
    b"\n"
    b"alice:{PLAIN}old:1000:1000:Alice A:/home/alice:/bin/sh:userdb_quota_rule=*:storage=1G\r\n"
    b"   # indented comment alice:{PLAIN}x\n"
    b"bob:{PLAIN}builder\n"
    b"carol:{PLAIN}c:::::\n"
    b"dave:{PLAIN}d"
)


@pytest.mark.parametrize(
    "user, expect",
    [
        (
            "alice",
            b"alice:{X}new:1000:1000:Alice A:/home/alice:/bin/sh:userdb_quota_rule=*:storage=1G\r\n",
        ),
        ("bob", b"bob:{X}new\n"),
        ("carol", b"carol:{X}new:::::\n"),
        ("dave", b"dave:{X}new\n"),  # an unterminated last line gets its LF
    ],
)
def test_rewrite_changes_one_field_of_one_line(user, expect):
    out = passwd_write.rewrite(ODD_FILE, user, "{X}new", _is_entry_for(user))
    assert out is not None
    old_lines = ODD_FILE.splitlines(keepends=True)
    new_lines = out.splitlines(keepends=True)
    assert len(new_lines) == len(old_lines)
    changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b]
    assert len(changed) == 1 and new_lines[changed[0]] == expect


def test_rewrite_takes_the_entry_the_reader_takes():
    data = b"alice:\nalice:{PLAIN}first\nalice:{PLAIN}second\n"  # an empty password is no entry
    assert passwd_write.rewrite(data, "alice", "{X}n", _is_entry_for("alice")) == (
        b"alice:\nalice:{X}n\nalice:{PLAIN}second\n"
    )
    assert passwd_write.rewrite(data, "nobody", "{X}n", _is_entry_for("nobody")) is None
    assert passwd_write.rewrite(data, "alic", "{X}n", _is_entry_for("alic")) is None


async def test_set_secret_keeps_owner_mode_and_other_octets(tmp_path):
    path = tmp_path / "passwd"
    path.write_bytes(ODD_FILE)
    os.chmod(path, 0o640)
    before = os.stat(path)
    auth = PasswdFileAuthenticator(path, min_check_interval=60)
    secret = schemes.hash_password("SHA512-CRYPT", NEW)
    assert await auth.set_secret("bob", secret)
    after = os.stat(path)
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # renamed into place, never rewritten in place
    assert after.st_mtime_ns > before.st_mtime_ns
    assert path.read_bytes() == ODD_FILE.replace(b"bob:{PLAIN}builder\n", f"bob:{secret}\n".encode())
    assert sorted(os.listdir(tmp_path)) == ["passwd", "passwd.lock"]  # no temporary file left
    assert await auth.verify("bob", NEW) is not None  # this worker at once, despite min_check_interval
    assert not await auth.set_secret("nobody", secret)
    with pytest.raises(ValueError):
        await auth.set_secret("bob", "{PLAIN}a:b")


async def test_same_tick_rewrites_are_all_noticed(tmp_path):
    """Two rewrites within one clock tick still look different to a reader that loaded the first."""
    path = tmp_path / "passwd"
    path.write_bytes(b"alice:{PLAIN}a\nbob:{PLAIN}b\n")
    seen = set()
    for i in range(20):
        passwd_write.replace_secret(path, "alice", f"{{PLAIN}}{i:04d}", _is_entry_for("alice"))
        st_ = os.stat(path)
        ident = (st_.st_ino, st_.st_size, st_.st_mtime_ns)
        assert ident not in seen
        seen.add(ident)
    reader = PasswdFileAuthenticator(path, min_check_interval=0, settle=0)
    passwd_write.replace_secret(path, "alice", "{PLAIN}final-one", _is_entry_for("alice"))
    assert await reader.verify("alice", "final-one") is not None


async def test_set_secret_through_a_symlink_replaces_the_target(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "passwd").write_bytes(b"alice:{PLAIN}a\n")
    link = tmp_path / "passwd"
    link.symlink_to(real / "passwd")
    auth = PasswdFileAuthenticator(link)
    assert await auth.set_secret("alice", "{PLAIN}bbbbbbbbbb")
    assert link.is_symlink()
    assert (real / "passwd").read_bytes() == b"alice:{PLAIN}bbbbbbbbbb\n"


def _hammer(path: str, user: str, rounds: int) -> None:
    for i in range(rounds):
        passwd_write.replace_secret(path, user, f"{{PLAIN}}{user}-{i}", _is_entry_for(user))


def test_concurrent_writers_in_two_processes_lose_nothing(tmp_path):
    path = tmp_path / "passwd"
    path.write_bytes(b"# keep me\nalice:{PLAIN}a::::\nbob:{PLAIN}b\ncarol:{PLAIN}c\n")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(path), u, 40)) for u in ("alice", "bob")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert path.read_bytes() == b"# keep me\nalice:{PLAIN}alice-39::::\nbob:{PLAIN}bob-39\ncarol:{PLAIN}c\n"


def test_an_owner_that_cannot_be_kept_refuses_the_change(tmp_path, monkeypatch):
    path = tmp_path / "passwd"
    path.write_bytes(b"alice:{PLAIN}a\n")
    real_fstat = os.fstat
    calls = []

    class Foreign:  # the temporary file looks owned by someone else (as when not root and the file is not ours)
        def __init__(self, st_: os.stat_result) -> None:
            self._st = st_
            self.st_uid = st_.st_uid + 1

        def __getattr__(self, name: str) -> object:
            return getattr(self._st, name)

    def other_owner(fd: int) -> object:
        calls.append(fd)
        return real_fstat(fd) if len(calls) == 1 else Foreign(real_fstat(fd))  # the first: the passwd-file

    def refuse(*_a: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(passwd_write.os, "fstat", other_owner)
    monkeypatch.setattr(passwd_write.os, "fchown", refuse)
    with pytest.raises(passwd_write.PasswdWriteError, match="owner"):
        passwd_write.replace_secret(path, "alice", "{PLAIN}b", _is_entry_for("alice"))
    monkeypatch.undo()
    assert path.read_bytes() == b"alice:{PLAIN}a\n"
    assert sorted(os.listdir(tmp_path)) == ["passwd", "passwd.lock"]


# --- the policy and the parser ----------------------------------------------------------------------------------


def test_policy():
    pol = PasswordPolicySettings(min_length=10)
    assert policy.refusal(pol, "al", "old", "al-is-fine-here", 1024) is None  # names under 3 characters
    assert policy.refusal(pol, "bob", "old", "xxBOBxxxxxxx", 1024) is not None
    assert policy.refusal(PasswordPolicySettings(refuse_user_name=False), "bob", "o", "xxBOBxxxxxxx", 1024) is None
    assert policy.refusal(pol, "bob", "old", "tab\there-long", 1024) is not None
    assert policy.refusal(pol, "bob", "old", "é" * 10, 1024) is None
    assert policy.refusal(pol, "bob", "old", "e\u0301" * 9, 1024) is not None  # 9 characters once composed
    assert policy.refusal(pol, "bob", "old", "", 1024) == "New password required."
    assert policy.refusal(pol, "bob", "old", "é" * 6, 11) == "New password is longer than 11 octets."


@given(st.lists(st.binary(max_size=80), max_size=20), st.integers(8, 64), st.data())
def test_line_buffer_splits_like_one_read(chunks, max_line, data):
    stream = b"".join(chunks)
    whole = p.LineBuffer(max_line).feed(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    buf = p.LineBuffer(max_line)
    pieces, last = [], 0
    for cut in [*cuts, len(stream)]:
        pieces += buf.feed(stream[last:cut])
        last = cut
        assert buf.pending <= max_line
    assert pieces == whole
    expected = []
    for raw in stream.split(b"\n")[:-1]:
        content = raw[:-1] if raw.endswith(b"\r") else raw
        expected.append(content if len(content) + 2 <= max_line else None)
    assert whole == expected


@given(st.binary(max_size=200) | st.text(max_size=60).map(str.encode), st.sampled_from(list(p.Step)))
def test_parse_never_raises_and_keeps_arguments_verbatim(line, step):
    event = p.parse(line, step)
    if isinstance(event, p.Bad):
        assert event.reply.startswith(b"500 ") and event.reply.endswith(b"\r\n")
        return
    text = line.decode("utf-8")
    assert text.isprintable()
    verb, _, arg = text.partition(" ")
    assert event.verb == verb.lower() and event.verb in ("quit", step.value)
    if event.verb == "user":
        assert event.arg == arg.strip() and event.arg
    elif event.verb != "quit":
        assert event.arg == arg and event.arg


@given(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40))
def test_any_printable_password_travels_intact(password):
    if not password.isprintable():
        return
    event = p.parse(f"newpass {password}".encode(), p.Step.NEWPASS)
    assert event == p.Command("newpass", password)


def test_behind_a_proxy_the_penalty_counts_the_real_client(env, pki):
    server = run_server(env, pki, server={"proxy_protocol": True})
    try:
        raw = socket.create_connection(("127.0.0.1", pp_port(server)), timeout=10)
        raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 106\r\n")
        c = Client.__new__(Client)
        c.sock, c.buf = pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1"), b""
        assert c.line().startswith(b"200 ")
        c.cmd("user alice")
        assert c.cmd("pass wrong") == b"500 Old password is incorrect."
        assert server.ctx.penalty.failures("192.0.2.7", time.monotonic()) == 1
        assert server.ctx.penalty.failures("127.0.0.1", time.monotonic()) == 0
        c.close()
    finally:
        server.stop()
