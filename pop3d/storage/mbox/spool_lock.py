"""Locks on an mbox spool that MTAs and mail readers honour (dotlock, fcntl, flock), like Dovecot's
`mbox_read_locks` / `mbox_write_locks`.

This is *not* the POP3 session lock (`[IN-USE]`, locking.MaildropLock on a separate file): a spool lock is
held only while pop3d reads its snapshot or commits, so the MTA keeps delivering during a session.

* dotlock: `SPOOL.lock`, made NFS-safely: a uniquely named file is created in the spool's directory and
  hard-linked to the lock name; the lock is ours iff the unique file then has two links (link(2)'s return
  value is unreliable over NFS). It holds our pid, as liblockfile's `dotlockfile -p` writes it. An existing
  dotlock is stale, and removed, when it names a pid that does not exist on this host, or names none and
  is older than `stale` seconds (liblockfile's rule). Creating it needs write access to the spool
  directory: on Debian /var/mail is root:mail 2775, so pop3d needs group mail.
* fcntl: an open-file-description lock (F_OFD_SETLK) on the spool itself. On Linux it conflicts with the
  classic POSIX locks MTAs take (Postfix, Exim, procmail), and unlike those it is not dropped when some
  other fd of this process on the same file is closed.
* flock: flock(2) on the spool (BSD-style readers; independent of fcntl locks on Linux).

Every attempt is non-blocking; waiting is done by the caller (`acquire`) with asyncio.sleep, so a held
lock never blocks the event loop. Locks are taken in the configured order and all-or-nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from pop3d.storage.base import TemporaryError
from pop3d.storage.locking import flock_struct
from pop3d.storage.offload import ThreadHop
from pop3d.storage.oserrors import is_busy, storage_error
from pop3d.storage.safefile import open_regular

if TYPE_CHECKING:
    from pop3d.config import SpoolLockMethod as Method

log = logging.getLogger(__name__)

_OFD = hasattr(fcntl, "F_OFD_SETLK")


class Busy(Exception):
    """Someone else holds one of the locks (internal: the caller retries or times out)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True


class SpoolLock:
    """The configured locks on one spool, taken with the spool's open fd (`fd`)."""

    def __init__(self, spool: str, methods: Sequence[Method], *, write: bool, timeout: float, stale: float) -> None:
        self.spool = spool
        self.methods = tuple(methods)
        self.write = write
        self.timeout = timeout
        self.stale = stale
        self.dotlock_path = spool + ".lock"
        self._held: list[Method] = []
        self._dotlock_ino: int | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return bool(self._held)

    # ---- one non-blocking attempt ------------------------------------------------------------------------

    def try_acquire(self, fd: int) -> bool:
        """Take every configured lock now, or none (False when one is busy). Blocking-free syscalls only."""
        if self._held:
            return True
        self._fd = fd
        try:
            for method in self.methods:
                getattr(self, f"_lock_{method}")(fd)
                self._held.append(method)
        except Busy:
            self.release()
            return False
        except BaseException:
            self.release()
            raise
        return True

    def _lock_fcntl(self, fd: int) -> None:
        if _OFD:
            kind = fcntl.F_WRLCK if self.write else fcntl.F_RDLCK
            self._try(lambda: fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock_struct(kind)), "fcntl-lock")
        else:  # pragma: no cover - non-Linux
            self._try(lambda: fcntl.lockf(fd, self._flags()), "fcntl-lock")

    def _lock_flock(self, fd: int) -> None:
        self._try(lambda: fcntl.flock(fd, self._flags()), "flock")

    def _flags(self) -> int:
        return (fcntl.LOCK_EX if self.write else fcntl.LOCK_SH) | fcntl.LOCK_NB

    def _try(self, call: Callable[[], object], verb: str) -> None:
        """One non-blocking lock call: Busy when someone else holds the lock."""
        try:
            call()
        except OSError as exc:
            if is_busy(exc):
                raise Busy from exc
            raise storage_error(exc, f"cannot {verb} {self.spool}") from exc

    def _lock_dotlock(self, fd: int) -> None:
        lock = self.dotlock_path
        directory, base = os.path.split(lock)
        unique = os.path.join(directory, f".{base}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            tfd = os.open(unique, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            hint = f"pop3d needs write access to {directory or '.'}, usually group mail"
            raise storage_error(exc, f"cannot create dotlock {lock} ({hint})") from exc
        try:
            try:
                os.write(tfd, f"{os.getpid()}\n".encode())
            finally:
                os.close(tfd)
            try:
                os.link(unique, lock)
            except FileExistsError:
                pass
            except OSError as exc:
                raise storage_error(exc, f"cannot create dotlock {lock}") from exc
            st = os.stat(unique)  # NFS: link() may fail after succeeding; the link count tells the truth
            if st.st_nlink == 2:
                self._dotlock_ino = st.st_ino
                return
        finally:
            with contextlib.suppress(OSError):
                os.unlink(unique)
        self._remove_if_stale(lock)
        raise Busy

    def _remove_if_stale(self, lock: str) -> None:
        """liblockfile's rule: stale if it names a dead pid, or names none and was not touched for `stale` s."""
        try:  # no link followed, no blocking on a FIFO planted there: such a "lock" just stays busy
            fd, st = open_regular(lock)
            try:
                content = os.read(fd, 64)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return  # released meanwhile: the next attempt may get it
        except OSError:
            return
        text = content.strip()
        pid = int(text) if text.isdigit() else 0
        if pid > 0:
            if _pid_alive(pid):
                return
            why = f"its pid {pid} is dead"
        elif time.time() - st.st_mtime > self.stale:
            why = f"untouched for {time.time() - st.st_mtime:.0f} s"
        else:
            return
        try:  # only the file we judged: another process may have replaced it in the meantime
            if os.stat(lock).st_ino == st.st_ino:
                os.unlink(lock)
                log.warning("removed stale dotlock %s: %s", lock, why)
        except OSError:
            pass

    # ---- release -----------------------------------------------------------------------------------------

    def release(self) -> None:
        """Drop what is held, in reverse order. Idempotent; never raises for a lock already gone."""
        held, self._held = self._held, []
        fd = self._fd
        for method in reversed(held):
            try:
                if method == "fcntl" and fd is not None:
                    if _OFD:
                        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock_struct(fcntl.F_UNLCK))
                    else:  # pragma: no cover
                        fcntl.lockf(fd, fcntl.LOCK_UN)
                elif method == "flock" and fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                elif method == "dotlock":
                    self._release_dotlock()
            except OSError as exc:
                log.warning("cannot release %s lock on %s: %s", method, self.spool, exc)

    def _release_dotlock(self) -> None:
        ino, self._dotlock_ino = self._dotlock_ino, None
        try:
            if ino is not None and os.stat(self.dotlock_path).st_ino == ino:
                os.unlink(self.dotlock_path)
            else:
                log.warning("dotlock %s was replaced by someone else while held", self.dotlock_path)
        except FileNotFoundError:
            log.warning("dotlock %s was removed by someone else while held", self.dotlock_path)

    # ---- waiting -----------------------------------------------------------------------------------------

    async def acquire(self, fd: int, hop: ThreadHop | None = None) -> None:
        """Poll until every lock is held; TemporaryError (SYS/TEMP) after `timeout` seconds.

        Each attempt runs in a thread (dotlocks may live on NFS) of `hop`, the owner's, so that the owner
        can defer closing `fd` past an attempt in flight. If the waiting session is cancelled, the attempt
        still finishes, and whatever it got is released.
        """
        hop = hop or ThreadHop()
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while True:
            if await hop.run(partial(self.try_acquire, fd), on_cancel=self.release):
                return
            if time.monotonic() >= deadline:
                kind = "write" if self.write else "read"
                methods = " ".join(self.methods)
                raise TemporaryError(f"{self.spool}: {kind} lock ({methods}) busy for {self.timeout:g} s")
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)
