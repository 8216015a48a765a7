"""MaildropLock: exclusive within one process and across processes, never blocking, gone with its holder."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pop3d.storage import locking
from pop3d.storage.base import InUse, PermanentError
from pop3d.storage.locking import MaildropLock

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from pop3d.storage.locking import MaildropLock
lock = MaildropLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture(params=["ofd", "flock"])
def mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test with OFD locks (where the platform has them) and with the flock fallback."""
    if request.param == "ofd":
        if not hasattr(fcntl, "F_OFD_SETLK"):
            pytest.skip("no OFD locks on this platform")
        monkeypatch.setattr(locking, "_USE_OFD", True)
    else:
        monkeypatch.setattr(locking, "_USE_OFD", False)
    return str(request.param)


def spawn_holder(path: Path, mechanism: str) -> subprocess.Popen[str]:
    code = (
        HOLDER
        if mechanism == "ofd"
        else HOLDER.replace(
            "from pop3d.storage.locking import MaildropLock",
            "from pop3d.storage import locking\n"
            "locking._USE_OFD = False\n"
            "from pop3d.storage.locking import MaildropLock",
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_fd_in_same_process_is_refused(tmp_path: Path, mechanism: str) -> None:
    path = tmp_path / "lock"
    first, second = MaildropLock(path), MaildropLock(path)
    first.acquire()
    with pytest.raises(InUse):
        second.acquire()
    assert not second.held
    first.release()
    second.acquire()  # free again once released
    assert second.held
    second.release()


def test_release_and_acquire_are_idempotent(tmp_path: Path, mechanism: str) -> None:
    lock = MaildropLock(tmp_path / "lock")
    lock.release()  # never acquired: no error
    lock.acquire()
    lock.acquire()  # already ours: no-op, not InUse
    lock.release()
    lock.release()
    assert not lock.held
    assert (tmp_path / "lock").exists()  # the lock file stays: unlinking it would race with other openers


def test_lock_fd_is_close_on_exec(tmp_path: Path, mechanism: str) -> None:
    lock = MaildropLock(tmp_path / "lock")
    lock.acquire()
    try:
        assert lock._fd is not None
        assert fcntl.fcntl(lock._fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        lock.release()


def test_other_process_holds_then_dies(tmp_path: Path, mechanism: str) -> None:
    path = tmp_path / "lock"
    proc = spawn_holder(path, mechanism)
    try:
        started = time.monotonic()
        with pytest.raises(InUse):
            MaildropLock(path).acquire()
        assert time.monotonic() - started < 1.0  # a non-blocking attempt, not a wait
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    lock = MaildropLock(path)
    lock.acquire()  # kill -9 left no stale lock
    lock.release()


def test_unusable_path_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError):
        MaildropLock(tmp_path / "missing" / "lock").acquire()
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermanentError):
        MaildropLock(tmp_path / "file" / "lock").acquire()


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious")
    (tmp_path / "lock").symlink_to(target)
    with pytest.raises(PermanentError):
        MaildropLock(tmp_path / "lock").acquire()
    assert target.read_text() == "precious"


def test_flock_struct_layout() -> None:
    packed = locking.flock_struct(fcntl.F_WRLCK)
    assert len(packed) % 8 == 0 and len(packed) >= locking._FLOCK.size
    l_type, l_whence, l_start, l_len, l_pid = locking._FLOCK.unpack(packed[: locking._FLOCK.size])
    assert (l_type, l_whence, l_start, l_len, l_pid) == (fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
