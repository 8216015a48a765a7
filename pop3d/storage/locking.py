"""Exclusive, non-blocking advisory locks for maildrops (RFC 1939 §4, RFC 2449 §8.1.1 `[IN-USE]`).

RFC 1939 §4 wants the maildrop locked exclusively from a successful login until the end of the session.
pop3d can run several worker processes (one per core, docs/DESIGN.md performance rule 4) *and* many sessions
inside one process, so the lock must exclude:

* another session of the same process (a second file descriptor on the lock file), and
* a session of another worker process,

and it must vanish when its holder dies, so a `kill -9` leaves no stale lock behind.

Why Linux open-file-description (OFD) locks, `fcntl(F_OFD_SETLK)`:

* classic POSIX record locks (`F_SETLK`) belong to the *process*: a second fd in the same process "gets"
  the lock again, and closing *any* fd on the file silently drops it. Useless inside one server process.
* OFD locks belong to the open file description, so two `open()`s in one process conflict exactly like two
  processes do; the kernel drops the lock when the last fd of that description is closed, including at
  process death. They are byte-range locks, the kind NFS carries to the server.
* `flock(LOCK_EX | LOCK_NB)` has the same per-description semantics on local file systems; it is the
  fallback where `F_OFD_SETLK` does not exist (non-Linux, kernel < 3.15). The two kinds do not see each
  other on Linux, which is fine: every pop3d process runs this same code and picks the same kind.

Only a non-blocking attempt is ever made, so a held lock answers `[IN-USE]` at once and never blocks the
event loop. The lock file itself is left in place on release: unlinking it would race with a process that
has just opened it and would then lock an orphaned inode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct

from pop3d.storage.oserrors import lock_error, storage_error
from pop3d.storage.safefile import Owner, open_regular

# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; } with native
# alignment and a 64-bit off_t (CPython is built with large-file support), padded to the alignment of
# off_t. fcntl(2) copies the buffer into the kernel; trailing zero padding is harmless.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = -(-_FLOCK.size // struct.calcsize("@q")) * struct.calcsize("@q")

#: Whether to try OFD locks at all; tests turn this off to exercise the flock fallback.
_USE_OFD: bool = hasattr(fcntl, "F_OFD_SETLK")


def flock_struct(lock_type: int) -> bytes:
    """A whole-file struct flock (start 0, length 0 = to EOF and beyond); l_pid must be 0 for OFD locks."""
    packed = _FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0)
    return packed + b"\0" * (_FLOCK_SIZE - len(packed))


class MaildropLock:
    """An exclusive advisory lock on `path`, held from `acquire()` until `release()` or process death.

    `acquire` raises InUse when anyone else holds it (another process or another MaildropLock of this
    process), and PermanentError or TemporaryError when the lock file cannot be opened or locked
    (pop3d.storage.oserrors). Both methods only make non-blocking system calls.
    """

    __slots__ = ("_dir", "_fd", "_name")

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """The lock file `path`, or with `name` the file `name` in the directory `path` (the directory's own
        string is kept, and the joined path made only for an error message: an idle session holds one less
        string)."""
        self._dir: str | None = os.fspath(path) if name is not None else None
        self._name: str = name if name is not None else os.fspath(path)
        self._fd: int | None = None

    @property
    def path(self) -> str:
        return self._name if self._dir is None else os.path.join(self._dir, self._name)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, dir_fd: int | None = None, owner: Owner | None = None) -> None:
        """Take the lock or fail at once. Acquiring a lock this object already holds is a no-op.

        With `dir_fd`, the lock file is the base name of `path` inside that open directory (a maildrop
        root opened without following links). With `owner`, the lock file must be the owner's or pop3d's
        own, and one pop3d creates is given to the owner.
        """
        if self._fd is not None:
            return
        name = os.path.basename(self._name) if dir_fd is not None else self.path
        try:
            fd = self._open(name, dir_fd, owner)
        except OSError as exc:
            raise storage_error(exc, f"cannot open lock file {self.path}") from exc
        try:
            self._lock_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _open(self, name: str, dir_fd: int | None, owner: Owner | None) -> int:
        """The lock file's fd: a regular file (O_NONBLOCK: a FIFO in its place must not block the open),
        never through a symbolic link (ELOOP, by policy); O_CLOEXEC: a spawned child must not keep the lock."""
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        for _ in range(3):
            try:
                fd, st = open_regular(name, dir_fd=dir_fd, flags=flags)
            except FileNotFoundError:
                try:
                    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
                except FileExistsError:
                    continue  # created meanwhile by another session: open that one
                try:
                    if owner is not None:
                        owner.give(fd)
                except BaseException:
                    os.close(fd)
                    raise
                return fd
            if owner is not None:
                try:
                    owner.check_ours(st, self.path)
                except BaseException:
                    os.close(fd)
                    raise
            return fd
        raise FileNotFoundError(errno.ENOENT, "lock file keeps vanishing", self.path)

    def _lock_fd(self, fd: int) -> None:
        global _USE_OFD
        if _USE_OFD:
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock_struct(fcntl.F_WRLCK))
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise lock_error(exc, f"cannot lock {self.path}") from exc
                _USE_OFD = False  # constant known to Python but not to this kernel: use flock from now on
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise lock_error(exc, f"cannot lock {self.path}") from exc

    def release(self) -> None:
        """Drop the lock (closing our only fd on the description releases it). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # Last resort if a session forgot close(): the kernel would release it with the fd anyway.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
