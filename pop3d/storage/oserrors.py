"""OSError -> StorageError: one table for every driver, so the same failure gets the same response code.

RFC 3206 §4: SYS/PERM when retrying will not cure the problem (rights, a missing or wrong kind of path, a
symbolic link refused by O_NOFOLLOW, a read-only file system, a name the file system cannot hold); SYS/TEMP
for everything else (I/O errors, a full disk or quota, out of descriptors). RFC 2449 §8.1.1: IN-USE when a
non-blocking lock attempt finds the lock held.
"""

from __future__ import annotations

import errno

from pop3d.storage.base import InUse, PermanentError, StorageError, TemporaryError

PERMANENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EROFS,
    errno.ENAMETOOLONG,
})  # fmt: skip

#: What fcntl(F_SETLK/F_OFD_SETLK) and flock(LOCK_NB) answer when another holder has the lock. EACCES is
#: among them (POSIX lets fcntl use it), so a lock call's error is read with this table first.
BUSY_ERRNOS = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})


def storage_error(exc: OSError, what: str) -> StorageError:
    """The StorageError for a failed file operation described by `what` ("cannot open spool /var/mail/bob")."""
    cls = PermanentError if exc.errno in PERMANENT_ERRNOS else TemporaryError
    return cls(f"{what}: {exc.strerror or exc}")


def is_busy(exc: OSError) -> bool:
    """Whether a failed non-blocking lock call means "held by someone else"."""
    return exc.errno in BUSY_ERRNOS


def lock_error(exc: OSError, what: str) -> StorageError:
    """The StorageError for a failed non-blocking lock call: InUse when held elsewhere."""
    if is_busy(exc):
        return InUse("maildrop is locked by another session")
    return storage_error(exc, what)
