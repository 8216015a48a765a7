"""`pop3d uidl import`: the UIDLs another server announced are the ones pop3d announces afterwards.

End to end with Debian's Dovecot (dovecot-pop3d) serving a Maildir to a client that records its UIDLs;
then the parsers for each source with hand-made files, and hypothesis on the hostile-input paths.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.config import load_settings
from pop3d.migrate import sources
from pop3d.migrate.uidl_import import UserReport, plan
from pop3d.storage.base import MessageInfo
from pop3d.storage.maildir import uidlist
from tests.conftest import ServerThread
from tests.tooling import require_tool

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _uidls(port: int, user: str = "alice", password: str = "secret") -> dict[int, str]:
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        p.user(user)
        p.pass_(password)
        _, lines, _ = p.uidl()
        return {int(n): u for n, u in (line.decode().split(" ", 1) for line in lines)}
    finally:
        p.quit()


def _make_maildir(root: Path, owner: int) -> Path:
    maildir = root / "mail" / "alice" / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for i in range(1, 6):
        body = f"From: a@example.org\nSubject: message {i}\n\nbody {i}\n".encode()
        sub, suffix = ("cur", ":2,S") if i % 2 else ("new", "")
        (maildir / sub / f"170000000{i}.M{i}P{100 + i}.mail.example.org{suffix}").write_bytes(body)
    for path in [root / "mail", *root.joinpath("mail").rglob("*")]:
        os.chown(path, owner, owner)
    return maildir


@pytest.fixture
def dovecot_root() -> Iterator[Path]:
    """A world-traversable temporary directory (Dovecot's mail processes run as `mail`, and pytest's
    temporary directories are 0700)."""
    if os.geteuid() != 0:
        pytest.skip("Dovecot must start as root to serve a passwd-file user as `mail`")
    root = Path(tempfile.mkdtemp(prefix="pop3d-dovecot-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _dovecot(root: Path, port: int, fmt: str) -> subprocess.Popen[bytes]:
    binary = require_tool("dovecot", "dovecot-pop3d")
    mail = pwd.getpwnam("mail")
    run = root / f"run-{port}"
    run.mkdir()
    (root / "state").mkdir(exist_ok=True)
    conf = root / "dovecot.conf"
    conf.write_text(
        f"""protocols = pop3
listen = 127.0.0.1
base_dir = {run}
state_dir = {root}/state
log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{root}/mail/%u/Maildir
first_valid_uid = {mail.pw_uid}
first_valid_gid = {mail.pw_gid}
pop3_uidl_format = {fmt}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
"""
    )
    proc = subprocess.Popen([binary, "-c", str(conf), "-F"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    log = (root / "dovecot.log").read_text() if (root / "dovecot.log").exists() else ""
    pytest.fail(f"dovecot did not start: {proc.stderr.read() if proc.stderr else b''!r} {log[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _import(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pop3d", "uidl", "import", "--config", str(config), *extra],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["%08Xu%08Xv", "%f"])
def test_pop3d_serves_dovecots_uidls_after_import(dovecot_root: Path, fmt: str) -> None:
    root = dovecot_root
    mail = pwd.getpwnam("mail")
    maildir = _make_maildir(root, mail.pw_uid)
    (root / "passwd").write_text(f"alice:{{PLAIN}}secret:{mail.pw_uid}:{mail.pw_gid}::{root}/mail/alice\n")
    (root / "passwd").chmod(0o644)
    proc = _dovecot(root, _free_port(), fmt)
    try:
        port = int(next(line for line in (root / "dovecot.conf").read_text().splitlines()
                        if line.strip().startswith("port =")).split("=")[1])  # fmt: skip
        before = _uidls(port)
    finally:
        _stop(proc)
    assert len(before) == 5 and (maildir / "dovecot-uidlist").exists()
    config = root / "pop3d.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\nstate_dir = "{root}/pop3d-state"\n'
        f'[auth]\npasswd_file = "{root}/passwd"\n[storage]\nlocation = "{root}/mail/{{user}}/Maildir"\n'
    )
    fmt_args = ["--dovecot-format", fmt]
    dry = _import(config, "--from", "dovecot", *fmt_args)
    assert dry.returncode == 0, dry.stderr
    assert not (maildir / uidlist.UIDLIST).exists()  # a dry run writes nothing
    assert "alice: 5 messages" in dry.stdout
    done = _import(config, "--from", "dovecot", *fmt_args, "--apply")
    assert done.returncode == 0, done.stderr + done.stdout
    again = _import(config, "--from", "dovecot", *fmt_args, "--apply")
    assert "0 unchanged" in again.stdout  # idempotent
    srv = ServerThread(load_settings(config, environ={})).start()
    try:
        assert _uidls(srv.port) == before
        # new mail gets pop3d's own UIDL next to the imported ones
        (maildir / "new" / "1800000000.M9P9.mail.example.org").write_bytes(b"Subject: new\n\nnew\n")
        os.chown(maildir / "new" / "1800000000.M9P9.mail.example.org", mail.pw_uid, mail.pw_gid)
        after = _uidls(srv.port)
        assert {n: after[n] for n in before} == before
        assert after[6] == "1800000000.M9P9.mail.example.org"
    finally:
        srv.stop()


# ---- parsers ------------------------------------------------------------------------------------------


V3 = (
    b"3 V1796061017 N4 Gc010e21c59b70d6bde1b000083ecc375\n"
    b"1 W34 :1700000001.M1P1.host\n"
    b"2 W34 G0123abcd :1700000002.M2P1.host:2,S\n"
    b"3 O-kept-from-qpopper W34 :1700000003.M3P1.host\n"
)


def test_dovecot_v3_default_format() -> None:
    ids = sources.dovecot_uidls(V3)
    assert ids["1700000001.M1P1.host"] == "000000016b0db759"  # as Dovecot 2.3 announced it (lower-case hex)
    assert ids["1700000002.M2P1.host"] == "000000026b0db759"  # the info part is not part of the name
    assert ids["1700000003.M3P1.host"] == "-kept-from-qpopper"  # an O field is the explicit POP3 UIDL


def test_dovecot_formats() -> None:
    parsed = sources.parse_dovecot_uidlist(V3)
    rec = parsed.records[1]
    assert sources.render_dovecot("%f", rec, parsed.uidvalidity) == "1700000002.M2P1.host"
    assert sources.render_dovecot("%u.%v", rec, parsed.uidvalidity) == "2.1796061017"
    assert sources.render_dovecot("%g", rec, parsed.uidvalidity) == "0123abcd"
    assert sources.render_dovecot("%{uid}-%Uf", rec, parsed.uidvalidity) == "2-1700000002.M2P1.HOST"
    assert sources.render_dovecot("%4f%%", rec, parsed.uidvalidity) == "1700%"
    for bad in ("%m", "%q", "%{nope}", "abc%"):
        with pytest.raises(ValueError):
            sources.check_format(bad)


def test_dovecot_v1() -> None:
    ids = sources.dovecot_uidls(b"1 1234 3\n1 1700000001.M1P1.host\n2 1700000002.M2P1.host:2,\n")
    assert ids == {"1700000001.M1P1.host": "00000001000004d2", "1700000002.M2P1.host": "00000002000004d2"}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"2 1 1\n",
        b"3 N4\n",
        b"3 V1\n1 :a\n1 :b\n",
        b"3 V1\n0 :a\n",
        b"3 V1\nx :a\n",
        b"3 V1\n1 W3\n",
        b"3 V99999999999\n",
        b"3 V1\n1 :a/../b\n",
        b"1 1 2\n1\n",
        b"\xff\xfe",
    ],
)
def test_dovecot_refuses_broken_lists(data: bytes) -> None:
    with pytest.raises(ValueError):
        sources.parse_dovecot_uidlist(data)


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_dovecot_parser_never_crashes(data: bytes) -> None:
    try:
        parsed = sources.parse_dovecot_uidlist(data)
    except ValueError:
        return
    for rec in parsed.records:  # whatever was accepted is renderable
        sources.render_dovecot(sources.DOVECOT_DEFAULT_FORMAT, rec, parsed.uidvalidity)


@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                                                            exclude_characters="/:"), min_size=1,
                                                                            max_size=40)),
                max_size=20, unique_by=lambda t: t[0]))  # fmt: skip
@settings(max_examples=100, deadline=None)
def test_dovecot_round_trip(rows: list[tuple[int, str]]) -> None:
    data = b"3 V7 N1\n" + b"".join(f"{uid} W1 :{name}\n".encode() for uid, name in rows)
    parsed = sources.parse_dovecot_uidlist(data)
    assert [(r.uid, r.name) for r in parsed.records] == rows


def test_courier_sizelist() -> None:
    data = (
        b"/3 5 1700000000\n"
        b"1700000001.M1P1.host:2,S 30 1:1700000000:0\n"
        b"1700000002.M2P1 with space 31 2:1700000000:1\n"
        b"1700000003.M3P1.host 32 3:0:0\n"
    )
    assert sources.courier_uidls(data) == {
        "1700000001.M1P1.host": "UID1-1700000000",
        "1700000002.M2P1 with space": "UID2-1700000000",
        "1700000003.M3P1.host": "UID3",
    }
    assert sources.courier_uidls(b"/2 3 9\na 1 1:9\n") == {"a": "UID1-9"}  # version 2: no UTF-8 field


@pytest.mark.parametrize(
    "data", [b"", b"3 1 1\n", b"/4 1 1\n", b"/3 1 1\na 1\n", b"/3 1 1\na x 1:1:0\n", b"/3 1\na 1 1:1\na 1 2:1\n"]
)
def test_courier_refuses_broken_lists(data: bytes) -> None:
    with pytest.raises(ValueError):
        sources.courier_uidls(data)


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_courier_parser_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        sources.courier_uidls(data)


def test_xuidl_header() -> None:
    assert sources.find_xuidl(b"From: a\r\nX-UIDL: 7a5b6c\r\nSubject: x\r\n\r\nX-UIDL: body\r\n") == "7a5b6c"
    assert sources.find_xuidl(b"x-uidl:\tabc  \nSubject: x\n\nbody\n") == "abc"
    assert sources.find_xuidl(b"Subject: x\n\nX-UIDL: in-the-body\n") is None
    assert sources.find_xuidl(b"X-UIDL: \n\n") is None


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_xuidl_never_crashes(data: bytes) -> None:
    found = sources.find_xuidl(data)
    assert found is None or (found and " " not in found)


# ---- the map file and the plan --------------------------------------------------------------------------


def test_uidlist_file_rules() -> None:
    good = b"pop3d-uidlist 1\nown1 UIDL1\nown2 UIDL2\n"
    assert uidlist.parse(good) == {"own1": "UIDL1", "own2": "UIDL2"}
    for bad in (
        b"pop3d-uidlist 2\n",
        b"pop3d-uidlist 1\nown1 UIDL1",  # truncated
        b"pop3d-uidlist 1\nown1 A\nown2 A\n",  # RFC 1939 §7: unique
        b"pop3d-uidlist 1\nown1 " + b"x" * 71 + b"\n",  # 70 characters at most
        b"pop3d-uidlist 1\nown1 \x7f\n",
        b"pop3d-uidlist 1\nown1 a b\n",
        b"pop3d-uidlist 1\nown1 A\nown1 B\n",
    ):
        with pytest.raises(ValueError):
            uidlist.parse(bad)


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_uidlist_parser_never_crashes(data: bytes) -> None:
    try:
        parsed = uidlist.parse(b"pop3d-uidlist 1\n" + data)
    except ValueError:
        return
    assert all(uidlist.valid_uidl(v) for v in parsed.values())
    assert len(set(parsed.values())) == len(parsed)


def test_uidlist_load_is_safe(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert uidlist.load(fd, None, str(tmp_path)) == {}  # absent
        (tmp_path / "secret").write_text("pop3d-uidlist 1\na b\n")
        (tmp_path / uidlist.UIDLIST).symlink_to(tmp_path / "secret")
        assert uidlist.load(fd, None, str(tmp_path)) == {}  # a link is not followed
        (tmp_path / uidlist.UIDLIST).unlink()
        os.mkfifo(tmp_path / uidlist.UIDLIST)
        assert uidlist.load(fd, None, str(tmp_path)) == {}  # a FIFO does not block
        (tmp_path / uidlist.UIDLIST).unlink()
        with open(tmp_path / uidlist.UIDLIST, "wb") as f:
            f.truncate(uidlist.MAX_MAP + 1)
        assert uidlist.load(fd, None, str(tmp_path)) == {}  # too big: never read
        assert "ignored" in caplog.text
    finally:
        os.close(fd)


def test_apply_keeps_uidls_unique() -> None:
    msgs = [MessageInfo(1, "a", "new/a"), MessageInfo(1, "b", "new/b"), MessageInfo(1, "c", "new/c")]
    back = uidlist.apply(msgs, {"a": "X", "b": "c"}, "test")  # "c" is another message's own UIDL
    assert [m.uid for m in msgs] == ["X", "b", "c"] and back == {"X": "a"}


class _Drop:
    def __init__(self, names: list[str]) -> None:
        self.messages = [MessageInfo(1, n, f"cur/{n}:2,S") for n in names]

    def own_uid(self, info: MessageInfo) -> str:
        return info.uid


def test_plan_refuses_what_rfc1939_forbids() -> None:
    drop = _Drop(["m1", "m2", "m3", "m4", "m5", "m6"])
    old = {"m1": "A", "m2": "B", "m3": "B", "m4": "x" * 71, "m5": "m6"}
    report = UserReport("alice")
    new = plan(report, drop, old, {})  # type: ignore[arg-type]
    assert new == {"m1": "A"}
    assert report.unknown == 1 and len(report.refused) == 4
    assert report.changes == [("m1", "m1", "A")]


# ---- the command's outcomes -------------------------------------------------------------------------------


def _config(env, **storage: str) -> Path:  # type: ignore[no-untyped-def]
    cfg = env.root / "pop3d.toml"
    extra = "".join(f'{k} = "{v}"\n' for k, v in storage.items())
    cfg.write_text(
        f'[server]\nstate_dir = "{env.root}/state"\n[auth]\npasswd_file = "{env.passwd}"\n'
        f'[storage]\nlocation = "{env.mail}/{{user}}/Maildir"\n{extra}'
    )
    return cfg


def test_courier_and_xuidl_imports_end_to_end(env) -> None:  # type: ignore[no-untyped-def]
    md = env.maildir("alice")
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1700000001.M1P1.host:2,S").write_bytes(b"X-UIDL: qp-0001\nSubject: a\n\na\n")
    (md / "new" / "1700000002.M2P1.host").write_bytes(b"Subject: b\n\nX-UIDL: not-a-header\n")
    (md / "courierpop3dsizelist").write_text("/3 3 77\n1700000001.M1P1.host:2,S 30 1:77:0\n")
    cfg = _config(env)
    r = _import(cfg, "--from", "courier", "--user", "alice", "--apply")
    assert r.returncode == 0, r.stderr
    assert "1700000001.M1P1.host: 1700000001.M1P1.host -> UID1-77" in r.stdout
    assert "1 unknown to the old server" in r.stdout
    r = _import(cfg, "--from", "xuidl", "--apply")  # every user of the passwd-file; bob has no maildir
    assert r.returncode == 0, r.stderr
    assert "1700000001.M1P1.host: UID1-77 -> qp-0001" in r.stdout and "bob: skipped" in r.stdout
    srv = ServerThread(load_settings(cfg, environ={})).start()
    try:
        from tests.conftest import USERS

        p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        p.user("alice")
        p.pass_(USERS["alice"])
        assert [line.split()[1] for line in p.uidl()[1]] == [b"qp-0001", b"1700000002.M2P1.host"]
        p.quit()
    finally:
        srv.stop()


def test_command_failures(env) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(env)
    r = _import(cfg, "--from", "dovecot", "--user", "nobody-here")
    assert r.returncode == 1 and "no such user" in r.stdout
    r = _import(cfg, "--from", "dovecot", "--dovecot-format", "%m")
    assert r.returncode == 2 and "%m" in r.stderr
    md = env.maildir("alice")
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "dovecot-uidlist").write_text("9 nonsense\n")
    r = _import(cfg, "--from", "dovecot", "--user", "alice")
    assert r.returncode == 1 and "unsupported dovecot-uidlist version" in r.stdout
    mbox = _config(env, driver="mbox")
    assert _import(mbox, "--from", "xuidl").returncode == 0
    r = _import(mbox, "--from", "dovecot")
    assert r.returncode == 2 and "storage.driver is mbox" in r.stderr


async def test_a_user_in_session_is_reported_in_use(env) -> None:  # type: ignore[no-untyped-def]
    from pop3d.storage.maildir.drop import MaildirDrop

    md = env.maildir("alice")
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "courierpop3dsizelist").write_text("/3 1 77\n")
    drop = MaildirDrop(str(md))
    await drop.open()  # a session holds the maildrop lock
    try:
        r = _import(_config(env), "--from", "courier", "--user", "alice", "--apply")
    finally:
        await drop.close()
    assert r.returncode == 1 and "in use" in r.stdout
    assert not (md / uidlist.UIDLIST).exists()
