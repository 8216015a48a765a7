"""Spool locks against other lockers: liblockfile's dotlockfile, POSIX fcntl holders, stale dotlocks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tooling import needs_tool, which

from pop3d.storage.base import PermanentError, TemporaryError
from pop3d.storage.mbox.spool_lock import SpoolLock

DOTLOCKFILE = which("dotlockfile")
needs_dotlockfile = needs_tool("dotlockfile", "liblockfile-bin")

HOLD_FCNTL = """
import fcntl, sys, time
f = open(sys.argv[1], "r+b")
fcntl.lockf(f, fcntl.LOCK_EX if sys.argv[2] == "w" else fcntl.LOCK_SH)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    p = tmp_path / "alice"
    p.write_bytes(b"From a\n\n")
    return p


def lock(spool: Path, methods: list[str], write: bool = True, timeout: float = 0.3, stale: float = 300) -> SpoolLock:
    return SpoolLock(str(spool), methods, write=write, timeout=timeout, stale=stale)  # type: ignore[arg-type]


def fd_of(spool: Path) -> int:
    return os.open(spool, os.O_RDWR)


def test_dotlock_excludes_and_cleans_up(spool: Path) -> None:
    fd1, fd2 = fd_of(spool), fd_of(spool)
    a, b = lock(spool, ["dotlock"]), lock(spool, ["dotlock"])
    assert a.try_acquire(fd1)
    assert Path(f"{spool}.lock").read_text() == f"{os.getpid()}\n"  # our pid is alive: never stale
    assert not b.try_acquire(fd2)
    a.release()
    assert not Path(f"{spool}.lock").exists()
    assert b.try_acquire(fd2)
    b.release()
    assert sorted(p.name for p in spool.parent.iterdir()) == ["alice"]  # no unique temp files left
    os.close(fd1)
    os.close(fd2)


def test_stale_dotlocks(spool: Path) -> None:
    fd = fd_of(spool)
    dot = Path(f"{spool}.lock")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dot.write_text(dead.stdout)  # a pid that no longer exists
    assert lock(spool, ["dotlock"]).try_acquire(fd) is False  # first attempt removes it ...
    assert not dot.exists()
    dot.write_text("")  # no pid, fresh: valid
    assert lock(spool, ["dotlock"], stale=60).try_acquire(fd) is False
    assert dot.exists()
    old = time.time() - 120
    os.utime(dot, (old, old))  # no pid, untouched for longer than `stale`
    lk = lock(spool, ["dotlock"], stale=60)
    assert not lk.try_acquire(fd) and lk.try_acquire(fd)  # removed, then taken
    lk.release()
    os.close(fd)


def test_dotlock_without_directory_rights_is_permanent(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    d = tmp_path / "mail"
    d.mkdir()
    p = d / "alice"
    p.write_bytes(b"")
    d.chmod(0o555)
    try:
        with pytest.raises(PermanentError, match="group mail"):
            lock(p, ["dotlock"]).try_acquire(fd_of(p))
    finally:
        d.chmod(0o755)


def test_fcntl_conflicts_with_posix_locks_of_other_processes(spool: Path) -> None:
    fd = fd_of(spool)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FCNTL, str(spool), "w"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout and holder.stdout.readline() == "locked\n"
        assert not lock(spool, ["fcntl"], write=False).try_acquire(fd)
        assert not lock(spool, ["fcntl"], write=True).try_acquire(fd)
    finally:
        holder.communicate("")
    reader = lock(spool, ["fcntl"], write=False)
    assert reader.try_acquire(fd)
    # a second reader in this process (another description) shares; a writer does not get in
    fd2 = fd_of(spool)
    assert lock(spool, ["fcntl"], write=False).try_acquire(fd2)
    assert not lock(spool, ["fcntl"], write=True).try_acquire(os.open(spool, os.O_RDWR))
    reader.release()
    os.close(fd)
    os.close(fd2)


def test_flock_and_all_or_nothing(spool: Path) -> None:
    fd1, fd2 = fd_of(spool), fd_of(spool)
    a = lock(spool, ["flock"])
    assert a.try_acquire(fd1)
    b = lock(spool, ["dotlock", "flock"])
    assert not b.try_acquire(fd2)
    assert not Path(f"{spool}.lock").exists()  # the dotlock it got first was given back
    a.release()
    assert b.try_acquire(fd2)
    b.release()
    os.close(fd1)
    os.close(fd2)


async def test_acquire_waits_then_times_out(spool: Path) -> None:
    fd1, fd2 = fd_of(spool), fd_of(spool)
    a = lock(spool, ["dotlock", "fcntl"])
    assert a.try_acquire(fd1)
    with pytest.raises(TemporaryError, match="busy"):
        await lock(spool, ["dotlock", "fcntl"], timeout=0.2).acquire(fd2)
    b = lock(spool, ["dotlock", "fcntl"], timeout=10)
    waiter = asyncio.ensure_future(b.acquire(fd2))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    a.release()
    await waiter
    assert b.held
    b.release()
    os.close(fd1)
    os.close(fd2)


@needs_dotlockfile
async def test_interoperates_with_dotlockfile(spool: Path) -> None:
    fd = fd_of(spool)
    dot = f"{spool}.lock"
    holder = subprocess.Popen([DOTLOCKFILE, "-l", "-p", "-r", "0", dot, "sleep", "30"])  # type: ignore[list-item]
    try:
        for _ in range(200):
            if os.path.exists(dot):
                break
            await asyncio.sleep(0.01)
        ours = lock(spool, ["dotlock"], timeout=0.3)
        with pytest.raises(TemporaryError):
            await ours.acquire(fd)
        assert os.path.exists(dot)  # a live holder's lock is never broken
    finally:
        holder.kill()
        holder.wait()
    # dotlockfile was killed: its lock names a dead pid, which both tools treat as stale
    ours = lock(spool, ["dotlock"], timeout=5)
    await ours.acquire(fd)
    r = subprocess.run([DOTLOCKFILE, "-l", "-p", "-r", "0", dot], capture_output=True)  # type: ignore[list-item]
    assert r.returncode != 0  # it honours ours
    ours.release()
    r = subprocess.run([DOTLOCKFILE, "-l", "-r", "0", dot], capture_output=True)  # type: ignore[list-item]
    assert r.returncode == 0
    subprocess.run([DOTLOCKFILE, "-u", dot], check=True)  # type: ignore[list-item]
    os.close(fd)
