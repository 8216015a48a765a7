"""Local attacks through the maildrop: a user can write in their own Maildir (and the mbox spool directory),
and pop3d runs as root here, as these tests do. Symlinks, FIFOs, /dev/zero, lying sizes, files of other
users, predictable temporary names, and the modes and owners of what pop3d creates.

Every user has a uid in the passwd-file and owns their maildrop tree, as in a real installation. Each attack
succeeded against the server before its fix.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attackkit import MIB, Line, Pop3dProcess
from conftest import USERS, Env

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pop3d serves other uids' maildrops as root"),
]

UIDS = {"alice": 10001, "bob": 10002}
SECRET = b"root:$6$SECRET-HASH-THAT-MUST-NOT-LEAK:19000:0:99999:7:::\n"
BOB_PRIVATE = b"From: bank@example.org\nSubject: bob only\n\nBOB-PRIVATE-CONTENT\n"
ALICE_OWN = b"From: a@example.org\nSubject: alice's own\n\nALICE-OWN-CONTENT\n"


def write_passwd(env: Env, users: dict[str, int], location_home: bool = False) -> None:
    """`name:{PLAIN}pw:uid:gid::home::` lines; passwords from conftest.USERS, else `pw-<name>`."""
    lines = [f"{u}:{{PLAIN}}{USERS.get(u, 'pw-' + u)}:{uid}:{uid}::{env.mail / u}::\n" for u, uid in users.items()]
    env.passwd.write_text("".join(lines))


def password(user: str) -> str:
    return USERS.get(user, "pw-" + user)


def make_maildir(env: Env, user: str) -> Path:
    md = env.maildir(user)
    for d in ("tmp", "new", "cur"):
        (md / d).mkdir(parents=True, exist_ok=True)
    return md


def put(md: Path, name: str, body: bytes, sub: str = "cur") -> Path:
    p = md / sub / name
    p.write_bytes(body)
    return p


def own(path: Path, uid: int) -> None:
    """chown a tree (symlinks themselves, not their targets) to uid:uid, as the user's own files are."""
    os.lchown(path, uid, uid)
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), uid, uid)


def own_all(env: Env, users: dict[str, int]) -> None:
    for u, uid in users.items():
        if (env.mail / u).exists() or (env.mail / u).is_symlink():
            own(env.mail / u, uid)


def login(port: int, user: str, timeout: float = 10) -> tuple[Line, bytes]:
    c = Line(port)
    assert c.cmd(b"USER " + user.encode()).startswith(b"+OK")
    return c, c.cmd(b"PASS " + password(user).encode(), timeout=timeout)


def retrieve_all(c: Line) -> list[tuple[bytes, bytes]]:
    """(RETR status line, body) for every message in the maildrop."""
    stat_line = c.cmd(b"STAT")
    assert stat_line.startswith(b"+OK"), stat_line
    out = []
    for n in range(1, int(stat_line.split()[1]) + 1):
        line = c.cmd(b"RETR %d" % n)
        body = b"\n".join(c.multi()) if line.startswith(b"+OK") else b""
        out.append((line, body))
    return out


# -- symlinks ------------------------------------------------------------------------------------------------


def test_symlink_to_private_file_is_not_served(env: Env, start_server: Any) -> None:
    """Attack: `ln -s /etc/shadow Maildir/cur/1.M1.host:2,S` (here a root-owned 0600 file of the test), then
    RETR it through pop3d, which runs as root.

    Required: RETR never returns the link's target; the user's own mail stays readable (or the login is
    refused with [SYS/PERM]).
    """
    write_passwd(env, UIDS)
    shadow = env.root / "shadow"
    shadow.write_bytes(SECRET)
    shadow.chmod(0o600)
    md = make_maildir(env, "alice")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    os.symlink(shadow, md / "cur" / "1600000001.M1P1.host:2,S")
    own_all(env, UIDS)
    assert (md / "cur" / "1600000001.M1P1.host:2,S").read_bytes() == SECRET  # the trap is armed
    srv = start_server()
    c, reply = login(srv.port, "alice")
    if reply.startswith(b"-ERR"):
        assert b"[SYS/PERM]" in reply, reply
        return
    got = retrieve_all(c)
    c.cmd(b"QUIT")
    assert not any(b"SECRET-HASH" in body for _, body in got), "RETR served the target of a symlink"
    assert any(b"ALICE-OWN-CONTENT" in body for _, body in got), got


def test_symlink_to_another_users_message(env: Env, start_server: Any) -> None:
    """Attack: alice links bob's message into her own maildrop, then RETRs and DELEs it.

    Required: bob's message is neither readable nor deletable through alice's session.
    """
    write_passwd(env, UIDS)
    bob = make_maildir(env, "bob")
    bobs = put(bob, "1600000005.M5P1.host:2,S", BOB_PRIVATE)
    md = make_maildir(env, "alice")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    os.symlink(bobs, md / "cur" / "1600000001.M1P1.host:2,S")
    own_all(env, UIDS)
    srv = start_server()
    c, reply = login(srv.port, "alice")
    if reply.startswith(b"-ERR"):
        assert b"[SYS/PERM]" in reply, reply
    else:
        got = retrieve_all(c)
        for n in range(1, len(got) + 1):
            c.cmd(b"DELE %d" % n)
        assert c.cmd(b"QUIT").startswith(b"+OK")
        assert not any(b"BOB-PRIVATE" in body for _, body in got), "alice read bob's message through a link"
    assert bobs.read_bytes() == BOB_PRIVATE, "bob's message was deleted through alice's session"


def test_maildir_symlink_to_another_users_maildir(env: Env, start_server: Any) -> None:
    """Attack: alice replaces her Maildir by `ln -s ../bob/Maildir`, logs in, reads and deletes everything.

    Required: bob's mail is neither readable nor deletable through alice's login.
    """
    write_passwd(env, UIDS)
    bob = make_maildir(env, "bob")
    bobs = put(bob, "1600000005.M5P1.host:2,S", BOB_PRIVATE)
    (env.mail / "alice").mkdir()
    os.symlink(bob, env.maildir("alice"))
    own_all(env, UIDS)
    srv = start_server()
    c, reply = login(srv.port, "alice")
    if reply.startswith(b"-ERR"):
        assert b"[SYS/PERM]" in reply, reply
    else:
        got = retrieve_all(c)
        for n in range(1, len(got) + 1):
            c.cmd(b"DELE %d" % n)
        assert c.cmd(b"QUIT").startswith(b"+OK")
        assert not any(b"BOB-PRIVATE" in body for _, body in got), "alice read bob's maildir through a link"
    assert bobs.exists(), "bob's message was deleted through alice's session"


# -- files of another owner -------------------------------------------------------------------------------------


def test_message_owned_by_another_uid_is_refused(env: Env, start_server: Any) -> None:
    """Attack: a file of another user appears in alice's maildrop (here a hard link to bob's message, which
    the test can make as root).

    Required: a maildrop file owned by another uid than the maildrop owner (the passwd-file uid) is refused
    with `-ERR [SYS/PERM]` (at login or when that message is retrieved), never served.
    """
    write_passwd(env, UIDS)
    bob = make_maildir(env, "bob")
    bobs = put(bob, "1600000005.M5P1.host:2,S", BOB_PRIVATE)
    md = make_maildir(env, "alice")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    own_all(env, UIDS)
    os.link(bobs, md / "cur" / "1600000001.M1P1.host:2,S")  # keeps bob's uid
    srv = start_server()
    c, reply = login(srv.port, "alice")
    if reply.startswith(b"-ERR"):
        assert b"[SYS/PERM]" in reply, reply
        return
    got = retrieve_all(c)
    c.cmd(b"QUIT")
    assert not any(b"BOB-PRIVATE" in body for _, body in got), "a file owned by bob was served to alice"
    assert any(line.startswith(b"-ERR [SYS/PERM]") for line, _ in got), f"no [SYS/PERM] refusal: {got}"


def test_maildir_directory_owned_by_another_uid_is_refused(env: Env, start_server: Any) -> None:
    """Attack: alice's Maildir/cur belongs to another uid (a directory planted or moved there).

    Required: login answers `-ERR [SYS/PERM]`.
    """
    write_passwd(env, UIDS)
    md = make_maildir(env, "alice")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    own_all(env, UIDS)
    os.lchown(md / "cur", UIDS["bob"], UIDS["bob"])
    srv = start_server()
    c, reply = login(srv.port, "alice")
    c.close()
    assert reply.startswith(b"-ERR [SYS/PERM]"), reply


# -- lying sizes -------------------------------------------------------------------------------------------------


def read_retr(c: Line, n: int) -> tuple[bytes, bytes | None]:
    """(status line, body or None when the connection was cut before the terminating '.')."""
    line = c.cmd(b"RETR %d" % n)
    if not line.startswith(b"+OK"):
        return line, None
    try:
        return line, b"\r\n".join(c.multi(timeout=10))
    except (ConnectionError, OSError):
        return line, None


@pytest.mark.parametrize("actual", [500, 300_000], ids=["small", "streamed"])
def test_size_field_that_lies_makes_the_message_unreadable(env: Env, start_server: Any, actual: int) -> None:
    """Attack: deliver a message whose Dovecot `,W=` size disagrees with its content, so LIST and RETR
    disagree (clients that trust LIST truncate or wait forever).

    Required: that message is unreadable for the session (`-ERR`, or the connection cut before the end for
    a body already streaming), never a short or padded body; the other messages are served normally.
    """
    write_passwd(env, UIDS)
    md = make_maildir(env, "alice")
    claimed = 10 if actual < 1000 else 200_000
    put(md, f"1600000001.M1P1.host,S={claimed},W={claimed}:2,S", b"Subject: liar\n\n" + b"L" * actual)
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    own_all(env, UIDS)
    srv = start_server()
    c, reply = login(srv.port, "alice")
    assert reply.startswith(b"+OK"), reply
    assert c.cmd(b"LIST 1") == b"+OK 1 %d" % claimed
    line, body = read_retr(c, 1)
    if body is None and line.startswith(b"+OK"):
        return  # cut before the end: the client knows it got nothing
    assert line.startswith(b"-ERR"), f"RETR answered {line!r} with a {len(body or b'')}-octet body"
    line2, body2 = read_retr(c, 2)
    assert line2.startswith(b"+OK") and body2 is not None and b"ALICE-OWN-CONTENT" in body2
    c.cmd(b"QUIT")


@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_cached_size_that_disagrees_makes_the_message_unreadable(env: Env, start_server: Any, change: str) -> None:
    """Attack: let pop3d cache a message's size, then rewrite the file in place (the user owns it) so the
    cached size lies.

    Required: RETR of that message answers `-ERR` for the session, never a short or padded body.
    """
    write_passwd(env, UIDS)
    md = make_maildir(env, "alice")
    msg = put(md, "1600000001.M1P1.host:2,S", b"Subject: x\n\n" + b"M" * 1000 + b"\n")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    own_all(env, UIDS)
    srv = start_server()
    c, reply = login(srv.port, "alice")
    assert reply.startswith(b"+OK"), reply
    size = int(c.cmd(b"LIST 1").split()[2])
    assert c.cmd(b"QUIT").startswith(b"+OK")
    srv.wait_idle()
    with open(msg, "r+b") as f:  # in place: same name, same inode, directory untouched
        f.truncate(0)
        f.write(b"Subject: x\n\n" + (b"M" * 5000 if change == "longer" else b"M" * 10) + b"\n")
    c, reply = login(srv.port, "alice")
    assert reply.startswith(b"+OK"), reply
    assert c.cmd(b"LIST 1") == b"+OK 1 %d" % size  # the stale size is what LIST promises
    line, body = read_retr(c, 1)
    assert line.startswith(b"-ERR"), f"RETR answered {line!r} with a {len(body or b'')}-octet body, LIST said {size}"
    c.cmd(b"QUIT")


# -- FIFOs, devices, /dev/zero (a subprocess: these wedge or bloat the server process) -------------------------


@pytest.fixture
def maildrop_server(env: Env) -> Iterator[Any]:
    started: list[Pop3dProcess] = []

    def start(memory_cap: int = 512 * MIB) -> Pop3dProcess:
        sections: dict[str, dict[str, Any]] = {
            "auth": {"passwd_file": str(env.passwd), "failure_delay": 0},
            "storage": {"location": str(env.mail / "{user}" / "Maildir")},
        }
        p = Pop3dProcess(env.root, sections, memory_cap=memory_cap)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.kill()


def served_meanwhile(port: int, user: str = "bob") -> None:
    c = Line(port, timeout=5)
    assert c.greeting.startswith(b"+OK")
    assert c.login(user, password(user)).startswith(b"+OK")
    assert c.cmd(b"STAT").startswith(b"+OK")
    c.cmd(b"QUIT")
    c.close()


def test_fifo_message_does_not_wedge_logins(env: Env, maildrop_server: Any) -> None:
    """Attack: `mkfifo Maildir/cur/1.M1.host:2,S`; at login pop3d opens it to measure it and blocks for ever
    (holding the maildrop lock and a thread); eight users doing it take every file-work thread.

    Required: each login is answered (the FIFO is skipped or refused) within 5 s, and another client is
    greeted and served meanwhile.
    """
    attackers = {f"evil{i}": 10100 + i for i in range(8)}
    write_passwd(env, {**UIDS, **attackers})
    for u in attackers:
        md = make_maildir(env, u)
        os.mkfifo(md / "cur" / "1600000001.M1P1.host:2,S")
    make_maildir(env, "bob")
    own_all(env, {**UIDS, **attackers})
    srv = maildrop_server()
    clients = []
    for u in attackers:
        c = Line(srv.port)
        c.cmd(b"USER " + u.encode())
        c.send(b"PASS " + password(u).encode() + b"\r\n")
        clients.append(c)
    time.sleep(0.5)
    served_meanwhile(srv.port)
    for c in clients:
        reply = c.line(timeout=5)
        assert reply.startswith((b"+OK", b"-ERR")), reply
        c.close()


def test_fifo_with_size_field_does_not_freeze_the_server(env: Env, maildrop_server: Any) -> None:
    """Attack: a FIFO named `...,W=100:2,S` is listed without being opened; RETR then opens it on the event
    loop, which blocks every connection of the process.

    Required: another client is greeted and served meanwhile, and the RETR is answered `-ERR` in time.
    """
    write_passwd(env, UIDS)
    md = make_maildir(env, "alice")
    os.mkfifo(md / "cur" / "1600000001.M1P1.host,S=100,W=100:2,S")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    make_maildir(env, "bob")
    own_all(env, UIDS)
    srv = maildrop_server()
    c, reply = login(srv.port, "alice")
    assert reply.startswith(b"+OK"), reply
    c.send(b"RETR 1\r\n")
    time.sleep(0.5)
    try:
        served_meanwhile(srv.port)
    except (TimeoutError, ConnectionError) as exc:
        raise AssertionError(f"server frozen by a FIFO: {exc!r}") from None
    assert c.line(timeout=5).startswith(b"-ERR")
    c.close()


def link_dev_zero(env: Env, name: str) -> None:
    write_passwd(env, UIDS)
    md = make_maildir(env, "alice")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    os.symlink("/dev/zero", md / "cur" / name)
    make_maildir(env, "bob")
    own_all(env, UIDS)


def test_dev_zero_with_size_field_does_not_grow_memory(env: Env, maildrop_server: Any) -> None:
    """Attack: `ln -s /dev/zero Maildir/cur/1.M1.host,W=100:2,S`; the size comes from the name, and RETR
    reads the "message" to its end, which never comes.

    Required: the server's memory grows by less than 16 MiB, RETR of it answers `-ERR` (or it is not
    listed), and others are served.
    """
    link_dev_zero(env, "1600000001.M1P1.host,S=100,W=100:2,S")
    srv = maildrop_server(memory_cap=256 * MIB)
    c, reply = login(srv.port, "alice")
    assert reply.startswith(b"+OK"), reply
    srv.reset_memory_baseline()
    try:
        first = c.cmd(b"RETR 1", timeout=5)
    except (TimeoutError, ConnectionError) as exc:
        first = repr(exc).encode()
    growth = srv.peak_growth()
    assert growth < 16 * MIB, f"server memory grew by {growth / MIB:.0f} MiB"
    assert first.startswith(b"-ERR"), first
    served_meanwhile(srv.port)
    c.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_dev_zero_without_size_does_not_spin_or_keep_the_lock(env: Env, maildrop_server: Any) -> None:
    """Attack: `ln -s /dev/zero Maildir/cur/1.M1.host:2,S`; login measures the "message" by reading it to its
    end, spinning a CPU for ever with the maildrop locked, so even later logins get [IN-USE].

    Required: the login is answered within 5 s; once the session ended the server stops burning CPU and a
    new login of the same user is not `[IN-USE]`.
    """
    link_dev_zero(env, "1600000001.M1P1.host:2,S")
    srv = maildrop_server()
    c, reply = login(srv.port, "alice", timeout=5)
    c.close()
    assert reply.startswith((b"+OK", b"-ERR")), reply
    time.sleep(0.5)
    cpu0 = cpu_seconds(srv.pid)
    time.sleep(1.0)
    spent = cpu_seconds(srv.pid) - cpu0
    assert spent < 0.5, f"the server burnt {spent:.2f} s of CPU in 1 s after the session ended"
    c, reply = login(srv.port, "alice")
    c.close()
    assert b"[IN-USE]" not in reply, reply


def test_size_cache_linked_to_dev_zero_does_not_exhaust_memory(env: Env, maildrop_server: Any) -> None:
    """Attack: `ln -s /dev/zero Maildir/.pop3d.sizes`; every login reads the cache file to its end.

    Required: the login is answered (the cache ignored) and server memory grows by less than 16 MiB.
    """
    write_passwd(env, UIDS)
    md = make_maildir(env, "alice")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    os.symlink("/dev/zero", md / ".pop3d.sizes")
    make_maildir(env, "bob")
    own_all(env, UIDS)
    srv = maildrop_server(memory_cap=256 * MIB)
    warm = Line(srv.port)
    assert warm.login("bob", password("bob")).startswith(b"+OK")
    warm.cmd(b"QUIT")
    time.sleep(0.2)
    srv.reset_memory_baseline()
    try:
        _, reply = login(srv.port, "alice", timeout=5)
    except (TimeoutError, ConnectionError, AssertionError) as exc:
        reply = repr(exc).encode()
    growth = srv.peak_growth()
    assert growth < 16 * MIB, f"server memory grew by {growth / MIB:.0f} MiB at one login"
    assert reply.startswith((b"+OK", b"-ERR")), reply


# -- predictable temporary files -------------------------------------------------------------------------------------


def plant(links: list[Path], target: Path) -> None:
    for link in links:
        os.symlink(target, link)


def victim(env: Env) -> Path:
    v = env.root / "victim"
    v.write_bytes(b"precious content owned by someone else\n")
    return v


def pids_around(pid: int) -> list[int]:
    return sorted({pid, *range(max(2, pid - 20), pid + 21)})


def test_size_cache_temporary_file_does_not_follow_symlinks(env: Env, start_server: Any) -> None:
    """Attack: plant `Maildir/.pop3d.sizes.<pid>.tmp -> victim` for the server's pid (and its neighbours),
    then log in so the cache is rewritten: pop3d, as root, overwrites the victim.

    Required: the victim is unchanged after a login and QUIT that write the cache.
    """
    write_passwd(env, UIDS)
    md = make_maildir(env, "alice")
    put(md, "1600000002.M2P1.host:2,S", ALICE_OWN)
    own_all(env, UIDS)
    target = victim(env)
    before = target.read_bytes()
    plant([md / f".pop3d.sizes.{p}.tmp" for p in pids_around(os.getpid())], target)  # in-process server
    srv = start_server()
    c, reply = login(srv.port, "alice")
    assert reply.startswith(b"+OK"), reply
    assert c.cmd(b"QUIT").startswith(b"+OK")
    srv.wait_idle()
    assert target.read_bytes() == before, "pop3d overwrote the target of a planted temporary-file symlink"
    cache = md / ".pop3d.sizes"
    assert cache.is_file() and not cache.is_symlink(), "the login wrote no size cache (nothing was tested)"


def mbox_sections(env: Env) -> dict[str, Any]:
    return {"driver": "mbox", "location": str(env.mail / "{user}"), "mbox_index_dir": ""}


MBOX = b"".join(
    b"From m%d@example.org Thu Nov 26 10:00:00 2026\nSubject: %d\n\nbody %d\n\n" % (i, i, i) for i in range(3)
)


def test_mbox_index_temporary_file_does_not_follow_symlinks(env: Env, start_server: Any) -> None:
    """Attack: in the spool directory (writable by users), plant `alice.pop3d-index.<pid>.tmp -> victim`;
    the first login writes the index and overwrites the victim.

    Required: the victim is unchanged.
    """
    write_passwd(env, UIDS)
    (env.mail / "alice").write_bytes(MBOX)
    os.lchown(env.mail / "alice", UIDS["alice"], UIDS["alice"])
    target = victim(env)
    before = target.read_bytes()
    plant([env.mail / f"alice.pop3d-index.{p}.tmp" for p in pids_around(os.getpid())], target)
    srv = start_server(storage=mbox_sections(env))
    c, reply = login(srv.port, "alice")
    assert reply.startswith(b"+OK"), reply
    assert c.cmd(b"QUIT").startswith(b"+OK")
    srv.wait_idle()
    assert target.read_bytes() == before, "pop3d overwrote the target of a planted index temporary symlink"
    index = env.mail / "alice.pop3d-index"
    assert index.is_file() and not index.is_symlink(), "the login wrote no index (nothing was tested)"


#: re-plants a symlink as soon as it disappears, until killed: races pop3d's "remove stale .tmp, then create"
RACER = r"""
import os, sys
link, target = sys.argv[1], sys.argv[2]
while True:
    try:
        os.symlink(target, link)
    except FileExistsError:
        pass
"""


def test_mbox_journal_temporary_file_does_not_follow_symlinks(env: Env, start_server: Any) -> None:
    """Attack: keep `alice.pop3d-journal.tmp -> victim` planted in the spool directory (re-planted at once
    whenever pop3d removes it as stale), then DELE and QUIT: the commit writes its undo journal through the
    link into the victim. Up to five commits are tried.

    Required: the victim is unchanged, and the spool is either committed or left intact.
    """
    write_passwd(env, UIDS)
    spool = env.mail / "alice"
    body = b"".join(
        b"From m%d@example.org Thu Nov 26 10:00:00 2026\nSubject: %d\n\nbody %d\n\n" % (i, i, i) for i in range(12)
    )
    spool.write_bytes(body)
    os.lchown(spool, UIDS["alice"], UIDS["alice"])
    target = victim(env)
    before = target.read_bytes()
    srv = start_server(storage=mbox_sections(env))
    link = env.mail / "alice.pop3d-journal.tmp"
    racer = subprocess.Popen([sys.executable, "-c", RACER, str(link), str(target)])
    try:
        end = time.monotonic() + 10
        while not link.is_symlink() and time.monotonic() < end:
            time.sleep(0.01)
        assert link.is_symlink(), "the racer never planted its link"
        for _ in range(5):
            c, reply = login(srv.port, "alice")
            assert reply.startswith(b"+OK"), reply
            assert c.cmd(b"DELE 1").startswith(b"+OK")
            c.cmd(b"QUIT")
            c.close()
            srv.wait_idle()
            if target.read_bytes() != before:
                break
    finally:
        racer.kill()
        racer.wait()
    assert target.read_bytes() == before, "pop3d overwrote the target of a planted journal temporary symlink"
    left = spool.read_bytes()
    assert left and body.endswith(left) and left.startswith(b"From m"), "the spool was damaged"


# -- modes and owners of what pop3d creates ----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_mbox_index_and_journal_are_private(env: Env, maildrop_server: Any) -> None:
    """Attack: read another user's mbox index and undo journal (the journal holds a copy of deleted mail)
    from the shared spool directory.

    Required: pop3d creates both 0600 (0640 at most), whatever its umask (here the usual 022).
    """
    write_passwd(env, UIDS)
    spool = env.mail / "alice"
    big = b"".join(
        b"From m%d@example.org Thu Nov 26 10:00:00 2026\nSubject: %d\n\n" % (i, i) + b"B" * 999_000 + b"\n\n"
        for i in range(1, 25)
    )
    spool.write_bytes(MBOX[: MBOX.index(b"From m1")] + big)  # ~24 MB to move down after deleting message 1
    os.lchown(spool, UIDS["alice"], UIDS["alice"])
    old = os.umask(0o022)  # the usual umask, inherited by the server
    try:
        srv = Pop3dProcess(
            env.root, {"auth": {"passwd_file": str(env.passwd), "failure_delay": 0}, "storage": mbox_sections(env)}
        ).start()
    finally:
        os.umask(old)
    try:
        c, reply = login(srv.port, "alice")
        assert reply.startswith(b"+OK"), reply
        index = env.mail / "alice.pop3d-index"
        assert index.exists(), "no index written at login"
        seen: dict[str, int] = {}
        stop = threading.Event()

        def watch() -> None:  # the journal only lives during the commit
            names = [env.mail / "alice.pop3d-journal", env.mail / "alice.pop3d-journal.tmp"]
            while not stop.is_set():
                for p in names:
                    with contextlib.suppress(FileNotFoundError):
                        seen.setdefault(p.name, mode(p))

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        assert c.cmd(b"DELE 1").startswith(b"+OK")
        assert c.cmd(b"QUIT", timeout=20).startswith(b"+OK")
        stop.set()
        t.join()
    finally:
        srv.kill()
    assert seen, "the commit journal was never seen (the test could not observe it)"
    problems = {name: oct(m) for name, m in [("alice.pop3d-index", mode(index)), *seen.items()] if m & ~0o640}
    assert not problems, f"created with modes beyond 0640: {problems}"


def test_new_maildir_gets_the_users_uid_and_gid(env: Env, start_server: Any) -> None:
    """Attack surface: pop3d (root) creates a missing Maildir; owned by root the user cannot manage it, and
    later deliveries as the user fail or go elsewhere.

    Required: every directory pop3d creates for the maildrop gets the passwd-file uid/gid (12345 here).
    """
    write_passwd(env, {"carol": 12345})
    srv = start_server()
    c, reply = login(srv.port, "carol")
    assert reply.startswith(b"+OK"), reply
    c.cmd(b"QUIT")
    srv.wait_idle()
    md = env.maildir("carol")
    created = [env.mail / "carol", md, md / "cur", md / "new", md / "tmp"]
    wrong = {
        str(p): (os.stat(p).st_uid, os.stat(p).st_gid)
        for p in created
        if (os.stat(p).st_uid, os.stat(p).st_gid) != (12345, 12345)
    }
    assert not wrong, f"created with the wrong owner: {wrong}"
