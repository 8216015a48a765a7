"""RFC 2449 §6.5 LOGIN-DELAY: when did this user last log in?

One process keeps a dict. Worker processes (`server.workers` > 1) must agree, or a client would simply land
on the other worker: the supervisor then makes one directory before it forks (pop3d.runtime.shared), and
the time of a user's last login is the mtime of one empty file per user there (a stat per login, no locking
needed: two logins of one user cannot both pass the maildrop lock anyway). The directory is
`server.state_dir/login-delay`, so the history survives a restart (mtimes are wall-clock times); `prune`
drops what no delay can need any more, at start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from typing import Protocol

log = logging.getLogger(__name__)


class LoginDelayStore(Protocol):
    """Where the last login per user is kept; `now` and the recorded times are wall-clock seconds."""

    def too_soon(self, user: str, delay: int, now: float) -> bool:
        """True when `user` logged in less than `delay` seconds before `now` (never when `delay` is 0)."""
        ...

    def record(self, user: str, delay: int, now: float) -> None:
        """Remember a successful login of `user` at `now` (nothing when `delay` is 0)."""
        ...


class LoginDelays:
    """Last successful login per user, in this process. `now` is wall-clock seconds (time.time())."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def too_soon(self, user: str, delay: int, now: float) -> bool:
        last = self._last.get(user)
        return delay > 0 and last is not None and now - last < delay

    def record(self, user: str, delay: int, now: float) -> None:
        if delay <= 0:
            return
        self._last[user] = now
        if len(self._last) > 4096:  # forget logins older than the delay so the table stays small
            self._last = {u: t for u, t in self._last.items() if now - t < delay}


class SharedLoginDelays:
    """The same, shared by the processes that were handed `directory`."""

    __slots__ = ("directory",)

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, user: str) -> str:
        # any user name maps to a safe, fixed-length file name
        return os.path.join(self.directory, hashlib.sha256(user.encode("utf-8", "surrogateescape")).hexdigest())

    def too_soon(self, user: str, delay: int, now: float) -> bool:
        if delay <= 0:
            return False
        try:
            last = os.stat(self._path(user), follow_symlinks=False).st_mtime
        except OSError:
            return False  # never logged in (or the directory is gone: fail open, the maildrop lock still holds)
        return now - last < delay

    def record(self, user: str, delay: int, now: float) -> None:
        if delay <= 0:
            return
        path = self._path(user)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
            try:
                os.utime(fd, (now, now))
            finally:
                os.close(fd)
        except OSError:
            pass  # best effort: a missing record only lets the next login in early

    def prune(self, keep: float, now: float) -> int:
        """Remove the records older than `keep` seconds (no delay up to `keep` needs them) and anything that
        is not a record pop3d writes (another name, not a regular file); returns how many were removed."""
        removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            log.warning("login-delay directory %s unreadable: %s", self.directory, exc)
            return 0
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path, follow_symlinks=False)
                ours = len(name) == 64 and all(c in "0123456789abcdef" for c in name) and stat.S_ISREG(st.st_mode)
                if ours and now - st.st_mtime < keep:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue  # never recurse into something pop3d did not make
                os.unlink(path)
                removed += 1
            except OSError:
                continue
        return removed
