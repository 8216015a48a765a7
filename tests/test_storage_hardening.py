"""A hostile maildrop: its owner plants links, FIFOs, devices, huge or lying caches and temp-file traps, and
pop3d (running as root here) must never read, write, block on or allocate for anything that owner could
not reach. Every attack goes through the driver API (open, messages, read_small, chunks, commit)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pop3d.auth.base import User
from pop3d.config import load_settings
from pop3d.storage import build_storage
from pop3d.storage.base import Maildrop, MessageUnreadable, PermanentError, StorageError
from pop3d.storage.maildir import MaildirDrop, MaildirStorage
from pop3d.storage.maildir import scan as scan_mod
from pop3d.storage.mbox import commit as mbox_commit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ownership attacks need root to chown")

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = 41001, 41002  # uids no real account has
SECRET = b"root:$6$secret-hash:19000:0:99999:7:::\n"
_T = TypeVar("_T")


@pytest.fixture(autouse=True)
def clean_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_mod, "_MEMO", OrderedDict())


def own(path: Path, uid: int = ALICE) -> Path:
    os.chown(path, uid, uid, follow_symlinks=False)
    return path


def maildir(path: Path, uid: int = ALICE) -> Path:
    """An existing maildir of `uid`, as an MDA running as that user makes it."""
    path.mkdir(parents=True, mode=0o700)
    own(path, uid)
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(mode=0o700)
        own(path / sub, uid)
    return path


def deliver(md: Path, name: str, data: bytes, sub: str = "cur", uid: int = ALICE) -> Path:
    path = md / sub / name
    path.write_bytes(data)
    return own(path, uid)


def secret(tmp_path: Path) -> Path:
    """A root-only file standing in for /etc/shadow."""
    path = tmp_path / "shadow"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def drop_of(md: Path, uid: int | None = ALICE) -> MaildirDrop:
    return MaildirDrop(str(md), uid=uid, gid=uid)


async def opened(md: Path, uid: int | None = ALICE) -> MaildirDrop:
    drop = drop_of(md, uid)
    await drop.open()
    return drop


async def body(drop: Maildrop, index: int) -> bytes:
    """What a RETR would get: both read paths must agree and raise StorageError for a refused message."""
    small: bytes | StorageError
    try:
        small = drop.read_small(index)
    except StorageError as exc:
        small = exc
    try:
        streamed = b"".join([c async for c in drop.chunks(index)])
    except StorageError:
        assert isinstance(small, StorageError), "read_small served what chunks refused"
        raise
    assert not isinstance(small, StorageError), f"chunks served what read_small refused: {small}"
    assert small == streamed
    return streamed


async def bounded(func: Callable[[], _T], fifos: list[Path], timeout: float = 5.0) -> _T:
    """`func()` in a thread; if it blocks (a FIFO opened for reading waits for a writer), unblock it by
    opening the FIFOs ourselves, then fail: a regression costs seconds, not a hung test run."""
    task = asyncio.ensure_future(asyncio.to_thread(func))
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        for fifo in fifos:
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            os.close(fd)
        await asyncio.wait({task}, timeout=timeout)
        pytest.fail("blocked on a FIFO")
    return task.result()


def isolated(code: str, timeout: float = 20.0) -> str:
    """Run `code` in a child limited to 1 GiB of memory and `timeout` seconds; its last stdout line, or
    "TIMEOUT"/"MEMORY" for an attack that spins or allocates without end (a regression cannot take the
    test process with it)."""
    prelude = textwrap.dedent("""
        import asyncio, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from pop3d.storage.maildir import MaildirDrop
    """)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    try:
        out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                             timeout=timeout, cwd=ROOT, env=env, text=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "TIMEOUT"
    if "MemoryError" in out.stderr:
        return "MEMORY"
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else f"rc={out.returncode} {out.stderr[-300:]}"


# ---- symbolic links ----------------------------------------------------------------------------------


async def test_symlinked_message_to_a_root_file_is_never_read(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    shadow = secret(tmp_path)
    os.symlink(shadow, md / "cur" / "1700000000.M1.host:2,S")  # size unknown: measured at login
    os.symlink(shadow, md / "cur" / f"1700000001.M2.host,S={len(SECRET)},W={len(SECRET) + 1}:2,S")
    drop = await opened(md)
    try:
        assert [m.key for m in drop.messages] == [f"cur/1700000001.M2.host,S={len(SECRET)},W={len(SECRET) + 1}:2,S"]
        with pytest.raises(MessageUnreadable):
            await body(drop, 0)
    finally:
        await drop.close()


async def test_hard_link_to_another_users_message_is_refused(tmp_path: Path) -> None:
    bob = maildir(tmp_path / "bob", BOB)
    theirs = deliver(bob, "1700000000.M1.host:2,S", b"Subject: bob's\n\nprivate\n", uid=BOB)
    alice = maildir(tmp_path / "alice")
    os.link(theirs, alice / "cur" / "1700000000.M1.host:2,S")  # same file system, root made the link
    # measured at login (no size in its name): someone else's file refuses the whole maildrop, SYS/PERM
    with pytest.raises(PermanentError, match="owned by uid"):
        await opened(alice)
    (alice / "cur" / "1700000000.M1.host:2,S").unlink()
    os.symlink(theirs, alice / "cur" / "1700000001.M2.host,W=24:2,S")
    drop = await opened(alice)
    try:
        assert len(drop.messages) == 1  # a size from the name: listed, refused when read (no link followed)
        with pytest.raises(MessageUnreadable):
            await body(drop, 0)
    finally:
        await drop.close()
    # sizes already cached (here: the ,W= field) are no way around it
    (alice / "cur" / "1700000001.M2.host,W=24:2,S").unlink()
    os.link(theirs, alice / "cur" / "1700000002.M3.host,W=24:2,S")
    drop = await opened(alice)
    try:
        with pytest.raises(MessageUnreadable):
            await body(drop, 0)
        await drop.commit({0}, set())
    finally:
        await drop.close()
    assert theirs.read_bytes() == b"Subject: bob's\n\nprivate\n"


@pytest.mark.parametrize("link", ["root", "cur", "new"])
async def test_symlinked_maildir_or_subdir_is_refused(tmp_path: Path, link: str) -> None:
    bob = maildir(tmp_path / "bob", BOB)
    deliver(bob, "1700000000.M1.host:2,S", b"bob's mail\n", uid=BOB)
    deliver(bob, "1700000001.M2.host", b"bob's new mail\n", "new", uid=BOB)
    if link == "root":
        os.symlink(bob, tmp_path / "alice")
    else:
        alice = maildir(tmp_path / "alice")
        os.rmdir(alice / link)
        os.symlink(bob / link, alice / link)
    drop = drop_of(tmp_path / "alice", uid=None)  # even with no passwd uid to compare with
    with pytest.raises(PermanentError):
        await drop.open()
    await drop.close()
    assert sorted(os.listdir(bob / "cur")) == ["1700000000.M1.host:2,S"]
    assert not (bob / ".pop3d.lock").exists() and not (bob / ".pop3d.sizes").exists()


async def test_maildir_swapped_for_a_link_during_the_session_is_not_touched(tmp_path: Path) -> None:
    bob = maildir(tmp_path / "bob", BOB)
    alice = maildir(tmp_path / "alice")
    name = "1700000000.M1.host:2,S"
    deliver(alice, name, b"alice's\n")
    deliver(bob, name, b"bob's\n", uid=BOB)
    drop = await opened(alice)
    try:
        os.rename(alice, tmp_path / "alice.old")
        os.symlink(bob, alice)
        with pytest.raises(StorageError):
            await drop.commit({0}, set())
    finally:
        await drop.close()
    assert (bob / "cur" / name).read_bytes() == b"bob's\n"


# ---- FIFOs and devices -------------------------------------------------------------------------------


async def test_fifo_message_neither_blocks_nor_is_served(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"fine\n")
    fifos = [md / "cur" / "1700000001.M2.host:2,S", md / "new" / "1700000002.M3.host,S=5,W=6"]
    for fifo in fifos:
        os.mkfifo(fifo)
        own(fifo)
    drop = drop_of(md)
    # open() of this small maildrop runs on the loop (no thread hop): a blocking open() of the FIFO would
    # freeze every session of the worker. Run on a loop of its own in a thread so a regression unblocks.
    await bounded(lambda: asyncio.run(drop.open()), fifos)
    try:
        assert [m.key for m in drop.messages] == ["cur/1700000000.M1.host:2,S", "new/1700000002.M3.host,S=5,W=6"]
        with pytest.raises(MessageUnreadable):
            await bounded(lambda: drop.read_small(1), fifos)
        with pytest.raises(MessageUnreadable):
            await body(drop, 1)
        assert await body(drop, 0) == b"fine\n"
    finally:
        await drop.close()


def test_dev_zero_with_a_size_in_its_name_is_not_read(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    os.symlink("/dev/zero", md / "cur" / "1700000000.M1.host,S=9,W=100000:2,S")
    out = isolated(f"""
        async def main():
            drop = MaildirDrop({str(md)!r}, uid={ALICE}, gid={ALICE})
            await drop.open()
            try:
                data = drop.read_small(0)
                print("READ", len(data))
            except Exception as exc:
                print("REFUSED", type(exc).__name__)
            await drop.close()
        asyncio.run(main())
    """)
    assert out == "REFUSED MessageUnreadable"


def test_dev_zero_without_a_size_neither_spins_nor_locks_the_maildrop(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    os.symlink("/dev/zero", md / "cur" / "1700000000.M1.host:2,S")
    out = isolated(f"""
        async def main():
            for _ in range(2):  # the second open would find [IN-USE] if the first one's thread still ran
                drop = MaildirDrop({str(md)!r}, uid={ALICE}, gid={ALICE})
                await asyncio.wait_for(drop.open(), 8)
                await drop.close()
            print("OPENED", len(drop.messages))
        asyncio.run(main())
    """)
    assert out == "OPENED 0"


def test_size_cache_linked_to_dev_zero_is_ignored(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"x\n")
    os.symlink("/dev/zero", md / ".pop3d.sizes")
    out = isolated(f"""
        async def main():
            drop = MaildirDrop({str(md)!r}, uid={ALICE}, gid={ALICE})
            await asyncio.wait_for(drop.open(), 8)
            print("OPENED", [m.size for m in drop.messages])
            await drop.close()
        asyncio.run(main())
    """)
    assert out == "OPENED [3]"
    assert stat.S_ISREG((md / ".pop3d.sizes").lstat().st_mode)  # the link itself was replaced by the rename
    assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)


def test_huge_size_cache_is_not_loaded(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"x\n")
    cache = md / ".pop3d.sizes"
    with open(cache, "wb") as f:
        f.truncate(1 << 40)  # sparse: a terabyte of zeros that costs no disk
    own(cache)
    out = isolated(f"""
        async def main():
            drop = MaildirDrop({str(md)!r}, uid={ALICE}, gid={ALICE})
            await asyncio.wait_for(drop.open(), 8)
            print("OPENED", [m.size for m in drop.messages])
            await drop.close()
        asyncio.run(main())
    """)
    assert out == "OPENED [3]"
    assert cache.stat().st_size < 4096  # rebuilt


# ---- lying sizes and growing files -------------------------------------------------------------------


async def test_size_that_disagrees_makes_the_message_unreadable_for_the_session(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host,S=5,W=999:2,S", b"short")  # 999 announced, 7 octets in network form
    deliver(md, "1700000001.M2.host:2,S", b"grows\n")
    drop = await opened(md)
    try:
        assert [m.size for m in drop.messages] == [999, 7]
        caplog.clear()
        for _ in range(2):
            with pytest.raises(MessageUnreadable):
                drop.read_small(0)
        with pytest.raises(MessageUnreadable):
            await body(drop, 0)
        assert len([r for r in caplog.records if r.name.startswith("pop3d.storage")]) == 1  # logged once
        with open(md / "cur" / "1700000001.M2.host:2,S", "ab") as f:
            f.write(b"appended after LIST\n")
        with pytest.raises(MessageUnreadable):
            await body(drop, 1)
    finally:
        await drop.close()


async def test_streamed_message_that_grows_is_cut_before_its_end(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"line\n" * 100_000)
    drop = await opened(md)
    try:
        with open(md / "cur" / "1700000000.M1.host:2,S", "r+b") as f:
            f.write(b"li\n\n")  # same length, other network size: only the end can tell
        got: list[bytes] = []
        with pytest.raises(MessageUnreadable):
            async for chunk in drop.chunks(0, 64 * 1024):
                got.append(chunk)
        assert sum(map(len, got)) < 500_000  # the last piece never went out
    finally:
        await drop.close()


async def test_cache_keys_cannot_leave_the_maildir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache naming `cur/../../victim` as a key must not make a commit unlink outside the maildir."""
    real = time.time_ns  # stamps old enough to trust: the cached keys are used
    monkeypatch.setattr("pop3d.storage.maildir.scan.time.time_ns", lambda: real() + 60 * 10**9)
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"x\n")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")
    drop = await opened(md)
    await drop.close()
    lines = (md / ".pop3d.sizes").read_text().split("\n")
    assert lines[5] == "cur/1700000000.M1.host:2,S"
    lines[5] = "cur/../../victim"
    (md / ".pop3d.sizes").write_text("\n".join(lines))
    drop = await opened(md)
    try:
        with pytest.raises(MessageUnreadable):  # root's file, not alice's
            await body(drop, 0)
        with pytest.raises(StorageError):  # only names inside new/ and cur/ are ever unlinked
            await drop.commit({0}, {0})
    finally:
        await drop.close()
    assert victim.read_bytes() == b"keep me\n"


async def test_cache_uids_must_be_printable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.time_ns  # stamps old enough to trust: the cached listing is used
    monkeypatch.setattr("pop3d.storage.maildir.scan.time.time_ns", lambda: real() + 60 * 10**9)
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"x\n")
    await (await opened(md)).close()
    lines = (md / ".pop3d.sizes").read_text().split("\n")
    lines[1] = "1700000000.M1.host\r+OK injected"
    (md / ".pop3d.sizes").write_text("\n".join(lines))
    drop = await opened(md)
    await drop.close()
    assert [m.uid for m in drop.messages] == ["1700000000.M1.host"]


# ---- what the event loop reads ----------------------------------------------------------------------
# A small maildrop is opened on the loop (drop.INLINE_LISTING): its owner must not be able to make that open
# read a huge body, size cache or UIDL map there, which would stall every session of the worker.


@pytest.fixture
def on_loop(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which way each open went: "loop" (no thread hop) or "thread"."""
    from pop3d.storage.offload import ThreadHop

    ways: list[str] = []
    real_open, real_run = MaildirDrop.open, ThreadHop.run

    async def counted_open(self: MaildirDrop) -> None:
        ways.append("loop")
        await real_open(self)

    async def counted_run(self: ThreadHop, func: Any, **kw: Any) -> Any:
        ways[-1] = "thread"
        return await real_run(self, func, **kw)

    monkeypatch.setattr(MaildirDrop, "open", counted_open)
    monkeypatch.setattr(ThreadHop, "run", counted_run)
    return ways


async def test_a_huge_body_to_measure_is_measured_in_a_thread(tmp_path: Path, on_loop: list[str]) -> None:
    from pop3d.storage.maildir import drop as drop_mod

    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"small\n")
    deliver(md, "1700000001.M2.host:2,S", b"x" * (drop_mod.INLINE_READ + 1))  # no size in its name
    drop = await opened(md)
    try:
        assert on_loop == ["thread"]
        assert [m.size for m in drop.messages] == [7, drop_mod.INLINE_READ + 3]
    finally:
        await drop.close()
    again = await opened(md)  # sizes known now: the next login reads no body and stays on the loop
    await again.close()
    assert on_loop == ["thread", "loop"]


@pytest.mark.parametrize("planted", [".pop3d.sizes", ".pop3d.uidlist"])
async def test_a_huge_cache_or_uidl_map_is_read_in_a_thread(tmp_path: Path, on_loop: list[str], planted: str) -> None:
    from pop3d.storage.maildir import drop as drop_mod

    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"small\n")
    path = md / planted
    path.write_bytes(b"#" * (drop_mod.INLINE_READ + 1))
    own(path)
    drop = await opened(md)
    try:
        assert on_loop == ["thread"] and [m.size for m in drop.messages] == [7]  # read there, found broken
    finally:
        await drop.close()


# ---- predictable temporary files ---------------------------------------------------------------------


async def test_planted_temp_link_does_not_make_root_overwrite_a_file(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"x\n")
    victim = tmp_path / "passwd"
    victim.write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    os.symlink(victim, md / f".pop3d.sizes.{os.getpid()}.tmp")
    drop = await opened(md)
    await drop.close()
    assert victim.read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    cache = md / ".pop3d.sizes"
    st = cache.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o600 and st.st_uid == ALICE
    assert [p.name for p in md.iterdir() if p.name.endswith(".tmp")] == [f".pop3d.sizes.{os.getpid()}.tmp"]


def mbox_storage(tmp_path: Path, index_dir: str | None = None, location: str | None = None) -> Any:
    cfg = {"driver": "mbox", "location": location or str(tmp_path / "mail" / "{user}"),
           "mbox_index_dir": str(tmp_path / "idx") if index_dir is None else index_dir,
           "mbox_lock_timeout": 1.0, "mbox_lock_write": ["fcntl"]}  # fmt: skip
    return build_storage(load_settings(None, storage=cfg).storage)


def spool_for(tmp_path: Path, count: int = 3, uid: int = ALICE) -> Path:
    (tmp_path / "mail").mkdir(exist_ok=True)
    spool = tmp_path / "mail" / "alice"
    spool.write_bytes(b"".join(b"From a@b Thu Nov 26 10:00:00 2026\nSubject: %d\n\nbody %d\n\n" % (i, i)
                               for i in range(count)))  # fmt: skip
    spool.chmod(0o660)
    return own(spool, uid)


async def test_mbox_index_and_journal_temp_links_are_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = spool_for(tmp_path)
    (tmp_path / "idx").mkdir()
    victims = [tmp_path / "v1", tmp_path / "v2"]
    for v in victims:
        v.write_bytes(b"precious\n")
    os.symlink(victims[0], tmp_path / "idx" / f"alice.pop3d-index.{os.getpid()}.tmp")
    os.symlink(victims[1], tmp_path / "idx" / "alice.pop3d-journal.tmp")
    modes: dict[str, int] = {}
    real = mbox_commit._checkpoint

    def spy(phase: str) -> None:
        if phase == "journal":
            modes["journal"] = os.lstat(tmp_path / "idx" / "alice.pop3d-journal").st_mode & 0o777
        real(phase)

    monkeypatch.setattr(mbox_commit, "_checkpoint", spy)
    drop = mbox_storage(tmp_path).maildrop(User("alice", uid=ALICE, gid=ALICE))
    await drop.open()
    try:
        await drop.commit({0}, set())
    finally:
        await drop.close()
    assert [v.read_bytes() for v in victims] == [b"precious\n", b"precious\n"]
    assert modes == {"journal": 0o600}
    assert (tmp_path / "idx" / "alice.pop3d-index").stat().st_mode & 0o777 == 0o600
    assert spool.read_bytes().count(b"From ") == 2


async def test_mbox_index_dir_is_created_0700(tmp_path: Path) -> None:
    spool_for(tmp_path)
    drop = mbox_storage(tmp_path, str(tmp_path / "lib" / "idx")).maildrop(User("alice", uid=ALICE, gid=ALICE))
    await drop.open()
    await drop.close()
    assert (tmp_path / "lib" / "idx").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("planted", ["index", "journal"])
async def test_mbox_files_linked_to_dev_zero_are_refused(tmp_path: Path, planted: str) -> None:
    spool_for(tmp_path)
    (tmp_path / "idx").mkdir()
    os.symlink("/dev/zero", tmp_path / "idx" / f"alice.pop3d-{planted}")
    drop = mbox_storage(tmp_path).maildrop(User("alice", uid=ALICE, gid=ALICE))
    try:
        if planted == "index":  # ignored and rebuilt
            await asyncio.wait_for(drop.open(), 8)
            assert len(drop.messages) == 3
        else:  # an interrupted commit that cannot be read: the spool is left alone
            with pytest.raises(StorageError):
                await asyncio.wait_for(drop.open(), 8)
    finally:
        await drop.close()


async def test_mbox_spool_fifo_or_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    fifo = tmp_path / "mail" / "alice"
    os.mkfifo(fifo)
    storage = mbox_storage(tmp_path)
    drop = storage.maildrop(User("alice"))
    with pytest.raises(PermanentError):
        await asyncio.wait_for(drop.open(), 8)
    await drop.close()
    fifo.unlink()
    os.symlink(secret(tmp_path), fifo)
    drop = storage.maildrop(User("alice"))
    with pytest.raises(PermanentError):
        await drop.open()
    await drop.close()


async def test_mbox_index_that_lies_about_a_size(tmp_path: Path) -> None:
    spool_for(tmp_path)
    storage = mbox_storage(tmp_path)
    drop = storage.maildrop(User("alice", uid=ALICE, gid=ALICE))
    await drop.open()
    await drop.close()
    index = tmp_path / "idx" / "alice.pop3d-index"
    lines = index.read_text().split("\n")
    lines[5] = " ".join(["999"] * 3)  # the sizes column
    index.write_text("\n".join(lines))
    drop = storage.maildrop(User("alice", uid=ALICE, gid=ALICE))
    await drop.open()
    try:
        assert [m.size for m in drop.messages] == [999] * 3
        with pytest.raises(MessageUnreadable):
            await body(drop, 0)
    finally:
        await drop.close()


# ---- ownership and modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("whose", ["root", "cur", "tmp"])
async def test_maildir_owned_by_someone_else_is_refused(
    tmp_path: Path, whose: str, caplog: pytest.LogCaptureFixture
) -> None:
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"x\n")
    own(md if whose == "root" else md / whose, BOB)
    caplog.clear()
    drop = drop_of(md)
    with pytest.raises(PermanentError) as err:
        await drop.open()
    await drop.close()
    assert err.value.code == "SYS/PERM"
    assert [r.levelname for r in caplog.records if r.name.startswith("pop3d.storage")] == ["ERROR"]
    assert not (md / ".pop3d.lock").exists()


async def test_without_a_passwd_uid_the_maildir_owner_is_the_reference(tmp_path: Path) -> None:
    md = maildir(tmp_path / "Maildir")
    deliver(md, "1700000000.M1.host:2,S", b"mine\n")
    deliver(md, "1700000001.M2.host,W=9:2,S", b"theirs\n", uid=BOB)
    drop = await opened(md, uid=None)
    try:
        assert await body(drop, 0) == b"mine\n"
        with pytest.raises(MessageUnreadable):
            await body(drop, 1)
    finally:
        await drop.close()


async def test_mbox_spool_of_someone_else_is_refused(tmp_path: Path) -> None:
    spool_for(tmp_path, uid=BOB)
    drop = mbox_storage(tmp_path).maildrop(User("alice", uid=ALICE, gid=ALICE))
    with pytest.raises(PermanentError):
        await drop.open()
    await drop.close()


async def test_new_maildir_belongs_to_the_passwd_user(tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    storage = MaildirStorage(str(tmp_path / "mail" / "{user}" / "Maildir"))
    drop = storage.maildrop(User("alice", uid=ALICE, gid=ALICE + 7))
    await drop.open()
    await drop.close()
    for d in ("alice", "alice/Maildir", "alice/Maildir/cur", "alice/Maildir/new", "alice/Maildir/tmp"):
        st = (tmp_path / "mail" / d).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (ALICE, ALICE + 7, 0o700), d
    lock = (tmp_path / "mail" / "alice" / "Maildir" / ".pop3d.lock").stat()
    assert (lock.st_uid, lock.st_mode & 0o777) == (ALICE, 0o600)


async def test_maildir_is_not_created_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "home" / "Maildir")
    drop = MaildirStorage("{home}/Maildir").maildrop(User("alice", uid=ALICE, gid=ALICE, home=str(tmp_path / "home")))
    with pytest.raises(PermanentError):
        await drop.open()
    await drop.close()
    assert list(elsewhere.iterdir()) == []


# ---- hostile names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "home"), [("..", "/h"), ("a/b", "/h"), ("x\r\ny", "/h"), ("bob", "relative/h")])
async def test_hostile_names_are_a_permanent_error_at_open(tmp_path: Path, name: str, home: str) -> None:
    user = User(name, home=home)
    for storage in (MaildirStorage("{home}/{user}"), mbox_storage(tmp_path, location="{home}/{user}")):
        drop = storage.maildrop(user)  # never raises: the handler only expects StorageError from open()
        with pytest.raises(PermanentError) as err:
            await drop.open()
        await drop.close()
        assert err.value.code == "SYS/PERM"


async def test_unfinished_journal_temp_is_removed_at_start(tmp_path: Path) -> None:
    spool_for(tmp_path)
    (tmp_path / "idx").mkdir()
    temp = tmp_path / "idx" / ".alice.pop3d-journal.0123456789abcdef.tmp"  # a writer died before the rename
    temp.write_bytes(b"partial copy of mail")
    other = tmp_path / "idx" / ".alice.pop3d-journal.not-ours.tmp"
    other.write_bytes(b"x")
    await mbox_storage(tmp_path).recover_interrupted()
    assert not temp.exists() and other.exists()
