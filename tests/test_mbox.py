"""The mbox maildrop on temp files: snapshot, UIDL stability, index reuse, commit rules, crash recovery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pop3d import wire
from pop3d.auth.base import User
from pop3d.config import load_settings
from pop3d.storage import build_storage
from pop3d.storage.base import InUse, MessageGone, PermanentError, TemporaryError
from pop3d.storage.mbox import MboxDrop
from pop3d.storage.mbox import drop as mbox
from pop3d.storage.mbox.format import scan

ROOT = Path(__file__).resolve().parent.parent


def msg(n: int, extra: bytes = b"", body: bytes = b"") -> bytes:
    return (b"From sender@example.org Thu Nov 26 10:00:%02d 2026\nMessage-ID: <%d@test>\n%s\n%s\n\n"
            % (n % 60, n, extra, body or b"body %d\n>From quoted\n" % n))  # fmt: skip


def storage(tmp_path: Path, **kw: Any):  # type: ignore[no-untyped-def]
    cfg = {"driver": "mbox", "location": str(tmp_path / "mail" / "{user}"), "mbox_index_dir": str(tmp_path / "idx"),
           "mbox_lock_timeout": 1.0, **kw}  # fmt: skip
    return build_storage(load_settings(None, storage=cfg).storage)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    (tmp_path / "mail").mkdir()
    return tmp_path / "mail" / "alice"


async def opened(tmp_path: Path, **kw: Any) -> MboxDrop:
    drop = storage(tmp_path, **kw).maildrop(User("alice"))
    await drop.open()
    return drop


def ids(data: bytes) -> list[int]:
    """Message-ID numbers in a spool, in order."""
    out = []
    for e in scan(lambda o, n: data[o : o + n], 0, len(data), True):
        head = data[e.body : e.end]
        out.append(int(head.split(b"<", 1)[1].split(b"@", 1)[0]))
    return out


async def test_missing_spool_is_empty_and_not_created(tmp_path: Path, spool: Path) -> None:
    drop = await opened(tmp_path)
    assert drop.messages == []
    await drop.commit(set(), set())
    await drop.close()
    assert not spool.exists()


@pytest.mark.parametrize("dialect", ["mboxrd", "mboxo"])
async def test_sizes_agree_with_reads(tmp_path: Path, spool: Path, dialect: str) -> None:
    big = b"".join(b">From line %d\nFrom? no\n" % i for i in range(20000))  # > SMALL_MESSAGE: streamed
    spool.write_bytes(msg(1) + msg(2, body=big) + msg(3, body=b"no final newline"))
    drop = await opened(tmp_path, mbox_dialect=dialect)
    for i, info in enumerate(drop.messages):
        small = drop.read_small(i)
        streamed = b"".join([c async for c in drop.chunks(i, 1000)])
        assert small == streamed
        assert wire.network_size(small) == info.size
        if i < 2:
            quoted = b"\n>From quoted\n" if i == 0 else b"\n>From line 7\n"
            assert (quoted in small) == (dialect == "mboxo")
            assert (quoted[:1] + quoted[2:] in small) == (dialect == "mboxrd")
    await drop.close()


async def test_in_use_is_separate_from_spool_lock(tmp_path: Path, spool: Path) -> None:
    spool.write_bytes(msg(1))
    a = await opened(tmp_path)
    with pytest.raises(InUse):
        await opened(tmp_path)
    # the spool itself is not locked during the session: an MTA can deliver
    dot = Path(f"{spool}.lock")
    fd = os.open(dot, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    dot.unlink()
    await a.close()
    b = await opened(tmp_path)
    await b.close()


async def test_uidl_stable_unique_and_xuidl(tmp_path: Path, spool: Path) -> None:
    same = msg(7)
    spool.write_bytes(msg(1) + same + same + msg(2, b"X-UIDL: qpop-abc\n") + msg(3, b"X-UIDL: qpop-abc\n") + msg(4))
    drop = await opened(tmp_path)
    uids = [m.uid for m in drop.messages]
    assert len(set(uids)) == 6  # identical messages and a repeated X-UIDL still get distinct ids
    assert uids[3] == "qpop-abc" and uids[4] != "qpop-abc"
    assert all(0 < len(u) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in u) for u in uids)  # RFC 1939 §7
    await drop.commit({0, 1}, set())
    await drop.close()
    drop = await opened(tmp_path)  # a new storage object: as after a restart
    assert [m.uid for m in drop.messages] == uids[2:]
    await drop.close()
    # deleting the index loses the remembered ids: the new ones must not collide with the old ones
    for p in (tmp_path / "idx").iterdir():
        if p.name.endswith("index"):
            p.unlink()
    drop = await opened(tmp_path)
    fresh = [m.uid for m in drop.messages]
    assert fresh[1] == "qpop-abc" and not set(fresh) - {"qpop-abc"} & set(uids)
    await drop.close()


async def test_index_reuse_and_append_scan(tmp_path: Path, spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool.write_bytes(msg(1) + msg(2))
    calls: list[tuple[int, int]] = []
    real = mbox.scan

    def spy(pread: Any, start: int, stop: int, mboxrd: bool, block: int = 1 << 22) -> Any:
        calls.append((start, stop))
        return real(pread, start, stop, mboxrd, block)

    monkeypatch.setattr(mbox, "scan", spy)
    d = await opened(tmp_path)
    first = [m.uid for m in d.messages]
    await d.close()
    assert calls == [(0, spool.stat().st_size)]
    calls.clear()
    d = await opened(tmp_path)  # unchanged: no scan at all
    assert [m.uid for m in d.messages] == first and calls == []
    await d.close()
    old = spool.stat().st_size
    with open(spool, "ab") as f:
        f.write(msg(3))
    d = await opened(tmp_path)  # appended: only the new part is read
    assert calls == [(old, spool.stat().st_size)]
    assert [m.uid for m in d.messages][:2] == first and len(d.messages) == 3
    await d.close()


async def test_outside_rewrite_between_sessions_keeps_uids(tmp_path: Path, spool: Path) -> None:
    spool.write_bytes(msg(1) + msg(2) + msg(3))
    d = await opened(tmp_path)
    uids = [m.uid for m in d.messages]
    await d.close()
    tmp = spool.with_name("alice.new")  # a mail reader deleting message 2 by writing a new file
    tmp.write_bytes(msg(1) + msg(3))
    os.replace(tmp, spool)
    d = await opened(tmp_path)
    assert [m.uid for m in d.messages] == [uids[0], uids[2]]
    await d.close()


async def test_commit_keeps_appended_mail_owner_and_mode(tmp_path: Path, spool: Path) -> None:
    spool.write_bytes(b"".join(msg(i) for i in range(1, 6)))
    spool.chmod(0o660)
    ino = spool.stat().st_ino
    d = await opened(tmp_path)
    with open(spool, "ab") as f:  # delivered during the session
        f.write(msg(6))
    await d.commit({0, 2}, {1})
    await d.close()
    st = spool.stat()
    assert (st.st_ino, st.st_mode & 0o7777) == (ino, 0o660)
    assert ids(spool.read_bytes()) == [2, 4, 5, 6]
    assert not any(p.name.endswith("journal") for p in (tmp_path / "idx").iterdir())
    d = await opened(tmp_path)
    assert len(d.messages) == 4
    assert [d.read_small(i).split(b"\n")[0] for i in range(4)] == [b"Message-ID: <%d@test>" % n for n in (2, 4, 5, 6)]
    await d.close()


@pytest.mark.parametrize("how", ["in place", "replaced", "truncated"])
async def test_rewritten_during_session_refuses(tmp_path: Path, spool: Path, how: str) -> None:
    original = msg(1) + msg(2) + msg(3)
    spool.write_bytes(original)
    d = await opened(tmp_path)
    changed = msg(1) + msg(3) + msg(9)  # message 2 deleted by someone else, then one delivered
    if how == "in place":
        with open(spool, "r+b") as f:
            f.write(changed)
            f.truncate()
    elif how == "replaced":
        tmp = spool.with_name("x")
        tmp.write_bytes(original + msg(4))
        os.replace(tmp, spool)
        changed = original + msg(4)
    else:
        changed = msg(1)
        spool.write_bytes(changed)
    with pytest.raises(TemporaryError) as err:
        await d.commit({0}, set())
    assert err.value.code == "SYS/TEMP"
    if how == "in place":
        with pytest.raises(MessageGone):
            d.read_small(1)  # never the wrong message
    await d.close()
    assert spool.read_bytes() == changed


async def test_not_an_mbox_and_symlink(tmp_path: Path, spool: Path) -> None:
    spool.write_bytes(b"Subject: hello\n\nnot an mbox\n")
    with pytest.raises(PermanentError, match="not an mbox"):
        await opened(tmp_path)
    spool.unlink()
    (tmp_path / "target").write_bytes(msg(1))
    spool.symlink_to(tmp_path / "target")
    with pytest.raises(PermanentError, match="symbolic link"):
        await opened(tmp_path)
    # a failed open leaves no lock behind
    spool.unlink()
    d = await opened(tmp_path)
    await d.close()


CRASHER = """
import asyncio, os, signal, sys
sys.path.insert(0, {root!r})
from pop3d.storage.mbox import commit as mbox_commit
from pop3d.auth.base import User
from pop3d.config import load_settings
from pop3d.storage import build_storage
phase, count = sys.argv[1], [0]
def checkpoint(p):
    if p == phase:
        count[0] += 1
        if p != "moving" or count[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
mbox_commit._checkpoint = checkpoint
async def main():
    root = sys.argv[2]
    cfg = {{"driver": "mbox", "location": root + "/mail/{{user}}", "mbox_index_dir": root + "/idx"}}
    d = build_storage(load_settings(None, storage=cfg).storage).maildrop(User("alice"))
    await d.open()
    await d.commit({{1, 3}}, set())
asyncio.run(main())
"""


@pytest.mark.parametrize("phase,committed", [("journal", False), ("moving", False), ("moved", False),
                                             ("truncated", True)])  # fmt: skip
async def test_kill_during_commit_recovers(tmp_path: Path, spool: Path, phase: str, committed: bool) -> None:
    spool.write_bytes(b"".join(msg(i, body=b"x" * 5000 + b"\n") for i in range(1, 7)))
    script = CRASHER.format(root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script, phase, str(tmp_path)], cwd=ROOT, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()
    with open(spool, "ab") as f:  # the MTA delivers before pop3d comes back
        f.write(msg(7))
    d = await opened(tmp_path)
    await d.close()
    expected = [1, 3, 5, 6, 7] if committed else [1, 2, 3, 4, 5, 6, 7]
    assert ids(spool.read_bytes()) == expected
    assert [p.name for p in (tmp_path / "idx").iterdir() if "journal" in p.name] == []


async def test_index_beside_the_spool(tmp_path: Path, spool: Path) -> None:
    spool.write_bytes(msg(1))
    d = await opened(tmp_path, mbox_index_dir="")
    assert len(d.messages) == 1
    await d.close()
    assert sorted(p.name for p in spool.parent.iterdir()) == ["alice", "alice.pop3d-index", "alice.pop3d-lock"]
    assert not (tmp_path / "idx").exists()


def test_mbox_settings_validated() -> None:
    from pop3d.config import ConfigError

    s = load_settings(None, storage={"driver": "mbox", "location": "/var/mail/{user}"})
    assert (s.storage.mbox_dialect, s.storage.mbox_lock_read, s.storage.mbox_lock_write) == (
        "mboxrd",
        ["fcntl"],
        ["dotlock", "fcntl"],
    )
    for bad in ({"mbox_dialect": "mboxcl2"}, {"mbox_lock_write": ["dotlock", "dotlock"]},
                {"mbox_lock_read": ["lockf"]}, {"mbox_lock_timeout": -1}):  # fmt: skip
        with pytest.raises(ConfigError, match=r"storage\.mbox_"):
            load_settings(None, storage={"driver": "mbox", "location": "/var/mail/{user}", **bad})


async def test_server_start_settles_interrupted_commits(tmp_path: Path, spool: Path) -> None:
    spool.write_bytes(b"".join(msg(i, body=b"x" * 5000 + b"\n") for i in range(1, 7)))
    r = subprocess.run([sys.executable, "-c", CRASHER.format(root=str(ROOT)), "moving", str(tmp_path)], cwd=ROOT,
                       capture_output=True)  # fmt: skip
    assert r.returncode == -9, r.stderr.decode()
    assert any("journal" in p.name for p in (tmp_path / "idx").iterdir())
    busy = await opened(tmp_path, mbox_index_dir=str(tmp_path / "other"))  # an unrelated open session
    await storage(tmp_path).recover_interrupted()  # no login of alice needed
    await busy.close()
    assert ids(spool.read_bytes()) == [1, 2, 3, 4, 5, 6]
    assert not any("journal" in p.name for p in (tmp_path / "idx").iterdir())
    settled = {p.name: p.read_bytes() for p in [spool, *(tmp_path / "idx").iterdir()]}
    await storage(tmp_path).recover_interrupted()  # nothing is left to settle: nothing changes
    assert {p.name: p.read_bytes() for p in [spool, *(tmp_path / "idx").iterdir()]} == settled


async def test_journal_failure_deletes_nothing(tmp_path: Path, spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = msg(1) + msg(2) + msg(3)
    spool.write_bytes(original)
    d = await opened(tmp_path)
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(TemporaryError, match="nothing deleted"):
        await d.commit({0}, set())
    await d.close()
    assert spool.read_bytes() == original
    assert [p.name for p in (tmp_path / "idx").iterdir() if "journal" in p.name] == []


async def test_io_error_while_moving_is_undone_at_once(
    tmp_path: Path, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pop3d.storage.mbox import commit as mbox_commit

    original = b"".join(msg(i) for i in range(1, 6))
    spool.write_bytes(original)
    d = await opened(tmp_path)
    calls = [0]

    def failing(phase: str) -> None:
        if phase == "moving":
            calls[0] += 1
            if calls[0] == 2:  # one kept range already moved down: the spool is half-moved
                raise OSError(5, "Input/output error")

    monkeypatch.setattr(mbox_commit, "_checkpoint", failing)
    with pytest.raises(TemporaryError, match="nothing deleted"):
        await d.commit({0, 2}, set())
    await d.close()
    assert spool.read_bytes() == original
    assert [p.name for p in (tmp_path / "idx").iterdir() if "journal" in p.name] == []
