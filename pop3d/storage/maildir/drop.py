"""Maildir storage (https://cr.yp.to/proto/maildir.html) behind the Maildrop interface.

Rules this file keeps, and why:

* One exclusive lock per maildrop (`.pop3d.lock` in the maildir, see pop3d.storage.locking), taken before the scan:
  RFC 1939 §4 gives the session exclusive access from login to the end of the session.
* The snapshot (scan.py) is fixed at open(): message numbers never change during a session (RFC 1939 §5/§6).
  UIDs and sizes follow names.py and sizecache.py.
* Deletions and the "seen" flag are applied only in commit(), i.e. in the UPDATE state (RFC 1939 §6); a
  session that ends any other way changes nothing.
* Another program (an IMAP server) may rename a message to change its flags while we hold the snapshot;
  a missing file is looked up again by base name before it is declared gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import aiofiles

from pop3d.auth.base import User
from pop3d.storage.base import CHUNK, Maildrop, MessageGone, MessageInfo, PermanentError, Storage, TemporaryError
from pop3d.storage.location import expand, has_fields
from pop3d.storage.locking import MaildropLock
from pop3d.storage.maildir import scan
from pop3d.storage.maildir.names import split_name, with_seen
from pop3d.storage.maildir.sizecache import SIZE_CACHE, SizeCache
from pop3d.storage.offload import ThreadHop
from pop3d.storage.oserrors import storage_error

log = logging.getLogger(__name__)

_T = TypeVar("_T")

LOCK_FILE = ".pop3d.lock"
_SUBDIRS = ("cur", "new", "tmp")


class MaildirStorage(Storage):
    """Factory of MaildirDrop for a location template such as `{home}/Maildir` or `/srv/mail/{user}`.

    `mark_seen`: on commit, retrieved messages get the Maildir `S` flag (and move from new/ to cur/), so
    IMAP clients sharing the maildir see them as read.
    """

    def __init__(self, location: str, mark_seen: bool = True) -> None:
        if not has_fields(location):
            raise ValueError("maildir location must contain {user} or {home}")
        self.location = location
        self.mark_seen = mark_seen

    def path_for(self, user: User) -> str:
        """The maildir path of `user`; PermanentError for a name or home that could escape the template."""
        return expand(self.location, user, "maildir")

    def anchor_for(self, user: User) -> str:
        """The directory that must already exist for `user`'s maildir to be created under it.

        It is the template up to the first component naming `{user}` (e.g. `/srv/mail` for
        `/srv/mail/{user}/Maildir`, so a new user needs no per-user directory made in advance), and at most
        the maildir's parent (the home for `{home}/Maildir`). A missing anchor means a missing mount or
        home: a configuration problem, hence PermanentError rather than silently creating it.
        """
        location = self.location.rstrip("/") or "/"
        parts = location.split("/")
        k = next((i for i, part in enumerate(parts) if "{user}" in part), len(parts))
        anchor = "/".join(parts[: min(k, len(parts) - 1)])
        if not anchor:
            anchor = "/" if location.startswith("/") else "."
        return expand(anchor, user, "maildir")

    def maildrop(self, user: User) -> MaildirDrop:
        return MaildirDrop(self.path_for(user), mark_seen=self.mark_seen, anchor=self.anchor_for(user))


class MaildirDrop(Maildrop):
    """One session on one maildir. Not thread-safe; every call comes from the session's event loop."""

    def __init__(self, path: str, mark_seen: bool = True, anchor: str | None = None) -> None:
        """`anchor`: existing directory under which missing directories down to `path` may be created
        (default: the maildir's parent); see MaildirStorage.anchor_for."""
        self.path = path
        self.mark_seen = mark_seen
        self.anchor = os.path.dirname(path) if anchor is None else anchor
        self.messages: list[MessageInfo] = []
        self._lock = MaildropLock(os.path.join(path, LOCK_FILE))
        self._cache = SizeCache(os.path.join(path, SIZE_CACHE))
        self._hop = ThreadHop()

    # ---- open -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the maildir if needed, lock it (InUse if held) and snapshot it, all in a worker thread."""
        await self._in_thread(self._open_sync)

    async def _in_thread(self, func: Callable[[], _T]) -> _T:
        """Blocking file work off the loop. If the session is cancelled meanwhile (client gone), the thread
        cannot be stopped: once it ends, make sure it did not leave the lock held."""
        return await self._hop.run(func, on_cancel=self._lock.release)

    def _open_sync(self) -> None:
        self._ensure_maildir()
        self._lock.acquire()
        try:
            self.messages = scan.snapshot(self.path, self._cache)
        except BaseException:
            self._lock.release()
            raise
        finally:
            self._cache.forget()  # an idle session keeps only its snapshot; commit() reloads the cache

    def _ensure_maildir(self) -> None:
        """Create a missing maildir (a new user with no mail yet is normal), mode 0700, below the anchor."""
        root = self.path
        try:
            if all(os.path.isdir(os.path.join(root, sub)) for sub in _SUBDIRS):
                return
            if not os.path.isdir(self.anchor):
                raise PermanentError(f"maildir cannot be created: {self.anchor} is not a directory")
            rel = os.path.relpath(root, self.anchor)
            if rel == ".." or rel.startswith("../"):
                raise PermanentError(f"maildir {root} is outside {self.anchor}")
            dirs: list[str] = []
            path = self.anchor
            for part in rel.split("/") if rel != "." else []:
                path = os.path.join(path, part)
                dirs.append(path)
            dirs += [os.path.join(root, sub) for sub in _SUBDIRS]
            for d in dirs:
                try:
                    os.mkdir(d, 0o700)
                except FileExistsError:
                    if not os.path.isdir(d):
                        raise PermanentError(f"{d} is not a directory") from None
        except OSError as exc:
            raise storage_error(exc, f"cannot create maildir {root}") from exc

    # ---- reading ----------------------------------------------------------------------------------------

    def _relocate(self, key: str) -> str | None:
        """Where the message of `key` is now, if another program renamed it (flags, new/ -> cur/).

        A few likely names are tried with one stat each; only then are the directories listed (rare: a
        message renamed to unusual flags during the session), which for read_small happens on the loop.
        """
        base, sep, flags = split_name(key.partition("/")[2])
        for guess in (with_seen(base, sep, flags), f"cur/{base}{sep or ':'}2,{flags}", f"new/{base}", f"cur/{base}"):
            if guess != key and os.path.exists(os.path.join(self.path, guess)):
                return guess
        for sub in ("cur", "new"):
            try:
                names = os.listdir(os.path.join(self.path, sub))
            except OSError:
                continue
            for name in names:
                if name[0] != "." and split_name(name)[0] == base:
                    return f"{sub}/{name}"
        return None

    def read_small(self, index: int) -> bytes:
        """One direct open+read on the loop (docs/DESIGN.md performance rule 2); messages up to SMALL_MESSAGE."""
        info = self.messages[index]
        for attempt in range(2):
            try:
                with open(os.path.join(self.path, info.key), "rb", buffering=0) as f:
                    return f.readall()
            except FileNotFoundError:
                if attempt or not self._moved(info):
                    break
            except OSError as exc:
                raise TemporaryError(f"cannot read message: {exc.strerror}") from exc
        raise MessageGone(f"message {index + 1} was removed by another program")

    def _moved(self, info: MessageInfo) -> bool:
        key = self._relocate(info.key)
        if key is None:
            return False
        info.key = key
        return True

    async def chunks(self, index: int, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """Stream a message of any size through aiofiles' thread; an open fd survives later renames."""
        info = self.messages[index]
        for attempt in range(2):
            try:
                f = await aiofiles.open(os.path.join(self.path, info.key), "rb")
                break
            except FileNotFoundError:
                if attempt or not await asyncio.to_thread(self._moved, info):
                    raise MessageGone(f"message {index + 1} was removed by another program") from None
            except OSError as exc:
                raise TemporaryError(f"cannot read message: {exc.strerror}") from exc
        try:
            while True:
                try:
                    data = await f.read(chunk_size)
                except OSError as exc:
                    raise TemporaryError(f"cannot read message: {exc.strerror}") from exc
                if not data:
                    return
                yield data
        finally:
            await f.close()

    # ---- update -----------------------------------------------------------------------------------------

    async def commit(self, deleted: set[int], seen: set[int]) -> None:
        """UPDATE state (RFC 1939 §6): unlink `deleted`, flag `seen` as read; raise if a deletion failed."""
        if not deleted and not (seen and self.mark_seen):
            return  # nothing to change on disk: no thread hop (a poll session ends here)
        failed = await self._in_thread(lambda: self._commit_sync(deleted, seen))
        if failed:
            raise TemporaryError(f"{failed} message(s) could not be deleted")

    def _commit_sync(self, deleted: set[int], seen: set[int]) -> int:
        failed = 0
        gone: list[str] = []
        for index in sorted(deleted):
            info = self.messages[index]
            for attempt in range(2):
                try:
                    os.unlink(os.path.join(self.path, info.key))
                except FileNotFoundError:
                    if attempt == 0 and self._moved(info):
                        continue
                except OSError as exc:
                    log.error("maildir %s: cannot delete %s: %s", self.path, info.key, exc)
                    failed += 1
                    break
                gone.append(info.uid)  # deleted now, or already gone: either way it is deleted
                break
        if self.mark_seen:
            for index in sorted(seen - deleted):
                self._mark_seen(self.messages[index])
        if gone:
            self._cache.load()  # we hold the lock: nobody else wrote it since open()
            self._cache.discard(gone)
            self._cache.forget()
        return failed

    def _mark_seen(self, info: MessageInfo) -> None:
        """new/NAME -> cur/NAME:2,S, or add S to a cur/ name's flags (kept sorted, as Maildir requires)."""
        for attempt in range(2):
            sub, _, name = info.key.partition("/")
            base, sep, flags = split_name(name)
            if "S" in flags and sub == "cur":
                return
            target = with_seen(base, sep, flags)
            try:
                os.rename(os.path.join(self.path, info.key), os.path.join(self.path, target))
            except FileNotFoundError:
                if attempt == 0 and self._moved(info):
                    continue
                log.warning("maildir %s: cannot mark %s seen: it is gone", self.path, info.key)
                return
            except OSError as exc:
                log.warning("maildir %s: cannot mark %s seen: %s", self.path, info.key, exc)
                return
            info.key = target
            return

    async def close(self) -> None:
        """Release the lock, after any file work still in flight. Idempotent; deletes nothing (a session
        that did not QUIT changes nothing)."""
        self._hop.after(self._lock.release)
