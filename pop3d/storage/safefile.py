"""Files inside a maildrop its owner can write, opened by a server that may run as root.

The owner can put anything under the names pop3d uses: a symbolic link to another user's mail or to
/etc/shadow, a FIFO (an open() that blocks the event loop), a file that grows while it is read, a huge
cache. So every file is opened without following a symbolic link (O_NOFOLLOW) and without blocking
(O_NONBLOCK), must then be a regular file by fstat, is read no further than the size fstat gave, and is
refused when owned by anyone but the maildrop's owner (Owner). Refusals are `Refused`, an OSError with
EPERM, so the one table in pop3d.storage.oserrors makes them `[SYS/PERM]` (RFC 3206 §4).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

#: A file read from the maildrop: no symbolic link, no blocking open on a FIFO or device.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: A directory of the maildrop: no symbolic link to someone else's directory.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(OSError):
    """A maildrop file pop3d will not touch: not a regular file (or directory), or someone else's."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EPERM, what)


class TooBigForLoop(Exception):
    """A file larger than the event loop may read (`loop_cap`): the caller does the whole job in a thread.
    The maildrop's owner chooses what is in it, so what the loop reads must stay bounded whatever is there."""


class ForeignOwner(Refused):
    """Someone else's file inside the maildrop: the whole maildrop is refused (`[SYS/PERM]` at login), not
    just the file, since somebody with rights over it put it there (a hard link, a chown)."""


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose maildrop this is: `uid` must own every message; `gid` is given to what pop3d creates.

    The uid is the passwd-file's when it has one. Without one, Dovecot refuses the login ("User is missing
    UID (see mail_uid setting)") unless `mail_uid` names the uid to run as; pop3d has no such setting, so
    the owner of the maildrop's root (the Maildir directory, the mbox spool) stands in for it: the result
    is Dovecot's with `mail_uid` set to that owner.
    """

    uid: int
    gid: int

    @classmethod
    def of(cls, uid: int | None, gid: int | None, root: os.stat_result) -> Owner:
        return cls(root.st_uid if uid is None else uid, root.st_gid if gid is None else gid)

    def check(self, st: os.stat_result, what: str) -> None:
        """Message files and spools: the owner's and nobody else's (a hard link to another user's file, or
        to a root-owned one, is refused: only the owner's own files are served)."""
        if st.st_uid != self.uid:
            raise ForeignOwner(f"{what} is owned by uid {st.st_uid}, not by the maildrop owner {self.uid}")

    def check_ours(self, st: os.stat_result, what: str) -> None:
        """Directories and pop3d's own files (lock, cache): the owner's, or pop3d's own uid. Earlier pop3d
        versions created them as root, and a user cannot make a file or directory owned by root."""
        if st.st_uid != self.uid and st.st_uid != os.geteuid():
            raise ForeignOwner(f"{what} is owned by uid {st.st_uid}, not by the maildrop owner {self.uid}")

    def give(self, fd: int) -> None:
        """Make a file or directory pop3d has just created the owner's (only root can, and only root needs
        to: any other pop3d uid creates files as itself, and that uid is the one that reads them)."""
        if os.geteuid() == 0 and self.uid != 0:
            os.fchown(fd, self.uid, self.gid)


def open_regular(name: str, *, dir_fd: int | None = None, flags: int = READ_FLAGS) -> tuple[int, os.stat_result]:
    """(fd, fstat) of the regular file `name`; ELOOP for a symbolic link, Refused for anything else."""
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def check_dir(st: os.stat_result, what: str) -> None:
    """A directory of the maildrop, seen by lstat or fstat: a symbolic link or anything else is refused."""
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{what} is not a directory")


def read_upto(fd: int, size: int) -> bytes:
    """At most `size` octets from `fd`'s current offset: fewer only at end of file. Never reads past
    `size`, so a file that grows meanwhile costs nothing more."""
    data = os.read(fd, size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.read(fd, size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_capped(name: str, cap: int, *, dir_fd: int | None = None, owner: Owner | None = None,
                loop_cap: int | None = None) -> bytes:  # fmt: skip
    """The whole of the small regular file `name` (a cache, an index). OSError when it is missing, not a
    regular file, someone else's, or larger than `cap`: it is then never read at all. TooBigForLoop when it
    is larger than `loop_cap` (read on the event loop): not read either."""
    fd, st = open_regular(name, dir_fd=dir_fd)
    try:
        if owner is not None:
            owner.check_ours(st, name)
        if st.st_size > cap:
            raise Refused(f"{name} is larger than {cap} octets")
        if loop_cap is not None and st.st_size > loop_cap:
            raise TooBigForLoop(name)
        return read_upto(fd, st.st_size)
    finally:
        os.close(fd)
