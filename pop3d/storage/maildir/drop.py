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
* The maildir's owner can write into it, and pop3d may run as root (pop3d.storage.safefile): the root and
  new/ cur/ tmp/ are opened or lstat'ed without following links and must be directories of the owner
  (else `[SYS/PERM]` at login); a message is opened without following a link or blocking, must be a
  regular file of the owner, is read no further than its size, and must have the size LIST announced:
  otherwise it is unreadable for the session (MessageUnreadable, `-ERR`). Deletions and renames at
  commit go through directory fds checked to be the ones seen at login. A maildir pop3d creates is the
  passwd-file user's, mode 0700.
* UIDLs imported from another server (`.pop3d.uidlist`, uidlist.py) replace pop3d's own at open(); the
  own uid stays the key of everything pop3d records (size cache, retrieval times).
* RFC 2449 §6.7 EXPIRE with n > 0 days: a commit records when each retrieved message was first retrieved
  (`.pop3d.retrieved`); the owner's next open() deletes those retrieved at least n days ago before the
  snapshot is handed out, so message numbers are fixed and consistent from the first command. pop3d's
  own record rather than the `S` flag and the file's ctime: `S` is also set by an IMAP client reading the
  message (not a POP3 retrieval) and is not set at all with mark_seen off, and ctime moves with any
  rename, chmod or restore from backup; the record only holds what a POP3 session really did. A session
  that does not QUIT records nothing (like its deletions, RFC 1939 §6): the message is retrieved again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import NoReturn, TypeVar

from pop3d.auth.base import User
from pop3d.storage.base import (
    CHUNK,
    Maildrop,
    MessageGone,
    MessageInfo,
    MessageUnreadable,
    PermanentError,
    ReadLater,
    RefusedMaildrop,
    Storage,
    StorageError,
    TemporaryError,
)
from pop3d.storage.delivery import temporary
from pop3d.storage.location import expand, has_fields
from pop3d.storage.locking import MaildropLock
from pop3d.storage.maildir import scan, uidlist
from pop3d.storage.maildir.deliver import deliver_into
from pop3d.storage.maildir.names import split_name, with_seen
from pop3d.storage.maildir.sizecache import SIZE_CACHE, SizeCache
from pop3d.storage.offload import ThreadHop
from pop3d.storage.oserrors import storage_error
from pop3d.storage.safefile import (
    DIR_FLAGS,
    READ_FLAGS,
    Owner,
    Refused,
    TooBigForLoop,
    check_dir,
    open_regular,
    read_upto,
)
from pop3d.wire import NetworkCount, network_size, plausible

log = logging.getLogger(__name__)

_T = TypeVar("_T")

LOCK_FILE = ".pop3d.lock"
_TYPE, _REGULAR = stat.S_IFMT(0o177777), stat.S_IFREG
_SUBDIRS = ("cur", "new", "tmp")  # the order _open_root lstats them in
_ID_AT = {"": 0, "cur": 2, "new": 4}  # where each directory's (device, inode) is in MaildirDrop._ids
#: Directory sizes (st_size of new/ plus cur/) up to which open() locks and lists on the loop: on ext4 two
#: blocks for cur/ and one for new/, about 150 messages; the two empty directories of a new user are 8 KiB.
INLINE_LISTING = 16 * 1024
#: What such an open may read on the loop: each of the size cache and the UIDL map, and the bodies it
#: measures in all (a poll of a known maildrop reads a few KiB; a first login of ten 4 KiB messages, 40 KiB).
INLINE_READ = 256 * 1024
#: Renames (messages flagged seen) up to which a commit (QUIT) without deletions runs on the loop.
INLINE_CHANGES = 32


def _subdir_fd(fds: dict[str, int], sub: str, name: str) -> int:
    """The fd of new/ or cur/ for a key's directory part; a key from a tampered cache that names any other
    place is refused (EPERM) rather than followed."""
    if (sub == "new" or sub == "cur") and "/" not in name:
        return fds[sub]
    raise Refused(f"key {sub}/{name} is not in new/ or cur/")


def _anchor_template(location: str) -> str:
    """The template of MaildirStorage.anchor_for, worked out once rather than at every login."""
    location = location.rstrip("/") or "/"
    parts = location.split("/")
    k = next((i for i, part in enumerate(parts) if "{user}" in part), len(parts))
    anchor = "/".join(parts[: min(k, len(parts) - 1)])
    if not anchor:
        anchor = "/" if location.startswith("/") else "."
    return anchor


def _needs_seen(key: str) -> bool:
    """Whether marking the message of `key` seen renames it (it is in new/, or has no S flag yet)."""
    sub, _, name = key.partition("/")
    return sub != "cur" or "S" not in split_name(name)[2]


#: what `_own` is without imported UIDLs: one shared, never-written dict instead of an empty one per session
_NO_IMPORTS: dict[str, str] = {}


class MaildirStorage(Storage):
    """Factory of MaildirDrop for a location template such as `{home}/Maildir` or `/srv/mail/{user}`.

    `mark_seen`: on commit, retrieved messages get the Maildir `S` flag (and move from new/ to cur/), so
    IMAP clients sharing the maildir see them as read.
    """

    task_free = True  # plain file work on the loop or in threads: see Storage.task_free

    def __init__(self, location: str, mark_seen: bool = True, expire_days: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        """`expire_days`: RFC 2449 §6.7 EXPIRE n > 0 (None: never, or 0, which the session applies at
        QUIT); `clock`: wall-clock seconds, for retrieval times."""
        if not has_fields(location):
            raise ValueError("maildir location must contain {user} or {home}")
        self.location = location
        self._anchor = _anchor_template(location)
        self.mark_seen = mark_seen
        self.expire_days = expire_days if expire_days else None
        self.clock = clock

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
        return expand(self._anchor, user, "maildir")

    def maildrop(self, user: User) -> Maildrop:
        try:
            path, anchor = self.path_for(user), self.anchor_for(user)
        except PermanentError as exc:
            return RefusedMaildrop(exc)
        return MaildirDrop(path, mark_seen=self.mark_seen, anchor=anchor, uid=user.uid, gid=user.gid,
                           expire_days=self.expire_days, clock=self.clock)  # fmt: skip

    async def deliver(self, user: User, message: bytes) -> None:
        """LMTP (RFC 2033): tmp/ then new/, fsynced, without the session lock (pop3d.storage.maildir.deliver).
        PermanentError only for a user who can never have a maildir; every other failure is temporary."""
        drop = MaildirDrop(self.path_for(user), anchor=self.anchor_for(user), uid=user.uid, gid=user.gid)
        await asyncio.to_thread(drop.deliver_sync, message)


class MaildirDrop(Maildrop):
    """One session on one maildir. Not thread-safe; every call comes from the session's event loop."""

    def __init__(self, path: str, mark_seen: bool = True, anchor: str | None = None, *,
                 uid: int | None = None, gid: int | None = None, expire_days: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        """`anchor`: existing directory under which missing directories down to `path` may be created
        (default: the maildir's parent); see MaildirStorage.anchor_for. `uid`/`gid`: the passwd-file
        user's, who must own the maildir (safefile.Owner) and gets what pop3d creates in it."""
        self.path = path
        self.mark_seen = mark_seen
        #: None once open() is done: only open() (and deliver_sync) may create the maildir, and a held session
        #: need not keep the string
        self.anchor: str | None = os.path.dirname(path) if anchor is None else anchor
        self.uid, self.gid = uid, gid
        self.expire_days, self.clock = (expire_days if expire_days else None), clock
        self.messages: list[MessageInfo] = []
        self._own: dict[str, str] = _NO_IMPORTS  # imported UIDL -> pop3d's own uid (uidlist.apply)
        self.owner = Owner(-1, -1)  # set by open()
        #: (device, inode) of the root, cur/ and new/ seen at open(), in one flat tuple (an idle session keeps
        #: it: a dict of three pairs cost three times as much)
        self._ids: tuple[int, ...] = ()
        self._broken: dict[int, str] | None = None  # message index -> why it is unreadable for this session
        self._lock = MaildropLock(path, LOCK_FILE)
        self._hop = ThreadHop()

    def _size_cache(self) -> SizeCache:
        """The size cache, made for each use (open, commit) and dropped after: an idle session keeps only its
        snapshot, not the cache or its path."""
        return SizeCache(os.path.join(self.path, SIZE_CACHE))

    # ---- open -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the maildir if needed, lock it (InUse if held) and snapshot it.

        The root and new/ cur/ tmp/ are opened and checked on the loop (a few non-blocking system calls);
        their sizes then say how long the listing is. A small maildrop (at most INLINE_LISTING octets of
        new/ and cur/, no EXPIRE to apply) is locked and listed on the loop too: that is a dozen system
        calls, and the two thread switches around them cost more (half the CPU time of a poll, measured;
        docs/DESIGN.md performance rule 2). A larger one is locked and listed in a worker thread, and so is
        a small one whose listing would read more than INLINE_READ octets (a size cache, a UIDL map or
        bodies to measure, which its owner may have made huge): the loop gives up before reading it
        (TooBigForLoop, the lock released) and a thread does the whole open again.
        """
        root_fd, subs = self._open_root()
        if self.expire_days is None and subs[0].st_size + subs[1].st_size <= INLINE_LISTING:
            try:
                self._open_locked(root_fd, subs, INLINE_READ)
                self.anchor = None
                return
            except TooBigForLoop:
                root_fd, subs = self._open_root()
        await self._in_thread(partial(self._open_locked, root_fd, subs))
        self.anchor = None

    async def _in_thread(self, func: Callable[[], _T]) -> _T:
        """Blocking file work off the loop. If the session is cancelled meanwhile (client gone), the thread
        cannot be stopped: once it ends, make sure it did not leave the lock held."""
        return await self._hop.run(func, on_cancel=self._lock.release)

    def _open_locked(self, root_fd: int, subs: list[os.stat_result], loop_cap: int | None = None) -> None:
        """Lock and snapshot the maildrop whose root `_open_root` opened; `root_fd` is closed in the end.
        `loop_cap` (on the loop): TooBigForLoop, lock released, rather than read more than that."""
        try:
            self._lock.acquire(dir_fd=root_fd, owner=self.owner)
            try:
                messages = scan.snapshot(self.path, root_fd, subs, self._size_cache(), self.owner, loop_cap)
                if self.expire_days is not None:
                    messages = self._expire(messages, root_fd)
                where = f"maildir {self.path}"
                imported = uidlist.load(root_fd, self.owner, where, loop_cap=loop_cap)
                self._own = uidlist.apply(messages, imported, where) or _NO_IMPORTS
                self.messages = messages
            except Refused as exc:  # someone else's file among the messages: the maildrop is refused
                self._lock.release()
                raise self._refused(exc, f"maildir {self.path}") from exc
            except BaseException:
                self._lock.release()
                raise
        finally:
            os.close(root_fd)

    def _open_root(self) -> tuple[int, list[os.stat_result]]:
        """The maildir root's fd and the lstat of new/ and cur/, created if missing; PermanentError for a
        link, a non-directory or a directory of someone else (safefile.Owner) anywhere among them."""
        for attempt in range(2):
            try:
                fd = os.open(self.path, DIR_FLAGS)
            except FileNotFoundError:
                if attempt:
                    raise PermanentError(f"maildir {self.path} vanished while created") from None
                self._create()
                continue
            except OSError as exc:
                raise self._refused(exc, f"cannot open maildir {self.path}") from exc
            try:
                st = os.fstat(fd)
                self.owner = owner = Owner.of(self.uid, self.gid, st)
                owner.check_ours(st, f"maildir {self.path}")
                subs: list[os.stat_result] = []
                for sub in _SUBDIRS:
                    sst = os.stat(sub, dir_fd=fd, follow_symlinks=False)
                    check_dir(sst, f"{self.path}/{sub}")
                    owner.check_ours(sst, f"{self.path}/{sub}")
                    subs.append(sst)
            except FileNotFoundError:
                os.close(fd)
                if attempt:
                    raise PermanentError(f"maildir {self.path}: a subdirectory vanished while created") from None
                self._create()
                continue
            except OSError as exc:
                os.close(fd)
                raise self._refused(exc, f"cannot open maildir {self.path}") from exc
            except BaseException:
                os.close(fd)
                raise
            self._ids = (st.st_dev, st.st_ino, subs[0].st_dev, subs[0].st_ino, subs[1].st_dev, subs[1].st_ino)
            return fd, [subs[1], subs[0]]  # new/, cur/: the order of scan.stamps
        raise AssertionError("unreachable")  # pragma: no cover

    def own_uid(self, info: MessageInfo) -> str:
        """pop3d's own uid of a message (its base name, names.uid_for), whatever UIDL it is served under."""
        return self._own.get(info.uid, info.uid)

    def _expire(self, messages: list[MessageInfo], root_fd: int) -> list[MessageInfo]:
        """RFC 2449 §6.7 EXPIRE n: delete what was first retrieved at least n days ago; the rest stays in
        the snapshot. Retrieval times of messages gone by any means are forgotten."""
        assert self.expire_days is not None
        times = uidlist.load(root_fd, self.owner, f"maildir {self.path}", uidlist.RETRIEVED, uidlist.TIMES)
        if not times:
            return messages
        cutoff = self.clock() - self.expire_days * 86400
        doomed = [m for m in messages if int(times.get(m.uid, "-1")) >= 0 and int(times[m.uid]) <= cutoff]
        kept = messages
        if doomed:
            fds = self._dir_fds()
            try:
                gone = set(self._unlink(fds, doomed))
                cache = self._size_cache()
                cache.load(root_fd, self.owner)
                cache.discard([m.uid for m in doomed if m.uid in gone], root_fd, self.owner)
            finally:
                for fd in fds.values():
                    os.close(fd)
            kept = [m for m in messages if m.uid not in gone]
            log.info("maildir %s: EXPIRE %d: %d retrieved message(s) deleted", self.path, self.expire_days, len(gone))
        present = {m.uid for m in kept}
        left = {uid: t for uid, t in times.items() if uid in present}
        if left != times:
            self._save_times(left, root_fd)
        return kept

    def _save_times(self, times: dict[str, str], root_fd: int) -> None:
        try:
            uidlist.save(times, root_fd, self.owner, uidlist.RETRIEVED, uidlist.TIMES)
        except OSError as exc:  # costs only a late expiry
            log.warning("maildir %s: cannot record retrieval times: %s", self.path, exc)

    def _unlink(self, fds: dict[str, int], infos: list[MessageInfo]) -> list[str]:
        """Unlink each message (looked up again if renamed meanwhile); the own uids of those now gone."""
        gone: list[str] = []
        for info in infos:
            for attempt in range(2):
                sub, _, name = info.key.partition("/")
                try:
                    os.unlink(name, dir_fd=_subdir_fd(fds, sub, name))
                except FileNotFoundError:
                    if attempt == 0 and self._moved(info):
                        continue
                except OSError as exc:
                    log.error("maildir %s: cannot delete %s: %s", self.path, info.key, exc)
                    break
                gone.append(self.own_uid(info))  # deleted now, or already gone: either way it is deleted
                break
        return gone

    def _refused(self, exc: OSError, what: str) -> StorageError:
        """The StorageError for `exc`; a link or someone else's file is also logged: it is either an attack
        or a maildrop to repair."""
        error = storage_error(exc, what)
        if isinstance(exc, Refused) or exc.errno == errno.ELOOP:
            log.error("maildir %s refused: %s", self.path, exc.strerror if exc.errno == errno.ELOOP else exc)
        return error

    def _create(self) -> None:
        """Create a missing maildir (a new user with no mail yet is normal) below the anchor, one directory
        at a time relative to its parent's fd, never through a link; each is mode 0700 and the passwd-file
        user's (when pop3d runs as root and the user has a uid), like the maildir an MDA would make."""
        root, anchor = self.path, self.anchor
        if anchor is None:  # the session's maildir vanished after open(): not recreated under its feet
            raise TemporaryError(f"maildir {root} vanished during the session")
        rel = os.path.relpath(root, anchor)
        if rel == ".." or rel.startswith("../"):
            raise PermanentError(f"maildir {root} is outside {anchor}")
        parts = [*(rel.split("/") if rel != "." else []), _SUBDIRS]
        maker = Owner(self.uid, -1 if self.gid is None else self.gid) if self.uid is not None else None
        try:
            fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # configured: may be a link
        except (FileNotFoundError, NotADirectoryError):
            raise PermanentError(f"maildir cannot be created: {anchor} is not a directory") from None
        except OSError as exc:
            raise storage_error(exc, f"cannot create maildir {root}") from exc
        try:
            for part in parts:
                names = part if isinstance(part, tuple) else (part,)
                for name in names:
                    child = self._make_dir(fd, name, maker)
                    if isinstance(part, tuple):
                        os.close(child)
                    else:
                        os.close(fd)
                        fd = child
        except OSError as exc:
            raise self._refused(exc, f"cannot create maildir {root}") from exc
        finally:
            os.close(fd)

    @staticmethod
    def _make_dir(parent: int, name: str, maker: Owner | None) -> int:
        """fd of directory `name` in `parent`, made 0700 (and given to `maker`) if missing."""
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            created = True
        except FileExistsError:
            created = False
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        if created and maker is not None:
            try:
                maker.give(fd)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def deliver_sync(self, message: bytes) -> str:
        """Store a new message (MaildirStorage.deliver) in the maildir, created if missing; its key."""
        try:
            root_fd, _ = self._open_root()
        except Exception as exc:
            raise temporary(exc, f"maildir {self.path}") from exc
        try:
            return deliver_into(root_fd, self.owner, self.path, message)
        finally:
            os.close(root_fd)

    # ---- reading ----------------------------------------------------------------------------------------

    def _relocate(self, key: str, on_loop: bool = False) -> str | None:
        """Where the message of `key` is now, if another program renamed it (flags, new/ -> cur/).

        A few likely names are tried with one lstat each; only then are the directories listed (rare: a
        message renamed to unusual flags during the session). On the loop (`on_loop`), only listings of at
        most INLINE_LISTING octets, as open() does; else TooBigForLoop, and the caller redoes it in a thread.
        """
        base, sep, flags = split_name(key.partition("/")[2])
        for guess in (with_seen(base, sep, flags), f"cur/{base}{sep or ':'}2,{flags}", f"new/{base}", f"cur/{base}"):
            if guess != key and os.path.lexists(os.path.join(self.path, guess)):
                return guess
        if on_loop:
            try:
                listing = sum(os.stat(os.path.join(self.path, sub)).st_size for sub in ("cur", "new"))
            except OSError:
                listing = 0  # the listing below says what is wrong
            if listing > INLINE_LISTING:
                raise TooBigForLoop(f"maildir {self.path}: listings of {listing} octets")
        for sub in ("cur", "new"):
            try:
                names = os.listdir(os.path.join(self.path, sub))
            except OSError:
                continue
            for name in names:
                if name[0] != "." and split_name(name)[0] == base:
                    return f"{sub}/{name}"
        return None

    def _moved(self, info: MessageInfo, on_loop: bool = False) -> bool:
        key = self._relocate(info.key, on_loop)
        if key is None:
            return False
        info.key = key
        return True

    def _open_message(self, index: int, on_loop: bool = False) -> tuple[int, os.stat_result]:
        """fd and fstat of message `index`: a regular file of the owner, opened without following a link or
        blocking, whose stored size can have the announced network size; else MessageUnreadable.
        `on_loop`: TooBigForLoop rather than list a large directory to find a renamed message."""
        why = self._broken.get(index) if self._broken is not None else None
        if why is not None:
            raise MessageUnreadable(why)
        info = self.messages[index]
        for attempt in range(2):
            try:
                fd, st = open_regular(f"{self.path}/{info.key}")
            except FileNotFoundError:
                if attempt or not self._moved(info, on_loop):
                    break
                continue
            except OSError as exc:
                if isinstance(exc, Refused) or exc.errno == errno.ELOOP:
                    self._refuse(index, exc.strerror or str(exc))
                raise TemporaryError(f"cannot read message: {exc.strerror}") from exc
            try:
                self.owner.check(st, "the file")
                if not plausible(st.st_size, info.size):
                    self._refuse(index, f"{st.st_size} stored octets cannot make the {info.size} announced")
            except OSError as exc:
                os.close(fd)
                self._refuse(index, exc.strerror or str(exc))
            except BaseException:
                os.close(fd)
                raise
            return fd, st
        raise MessageGone(f"message {index + 1} was removed by another program")

    def _refuse(self, index: int, why: str) -> NoReturn:
        """Mark message `index` unreadable for the session, log it once (Dovecot logs a broken size once as
        an error too), and raise MessageUnreadable."""
        key = self.messages[index].key
        text = f"maildir {self.path}: message {index + 1} ({key}) unreadable this session: {why}"
        if self._broken is None:
            self._broken = {}
        self._broken[index] = text
        log.error("%s", text)
        raise MessageUnreadable(text)

    def read_small(self, index: int) -> bytes:
        """One direct open+read on the loop (docs/DESIGN.md performance rule 2); messages up to SMALL_MESSAGE.
        ReadLater when finding the message again would list a large directory: `read` does it in a thread."""
        try:
            return self._read(index, on_loop=True)
        except TooBigForLoop:
            raise ReadLater(f"message {index + 1}: renamed meanwhile, in a large directory") from None

    async def read(self, index: int) -> bytes:
        """`read_small` in a worker thread (after ReadLater)."""
        return await self._hop.run(partial(self._read, index))

    def _read(self, index: int, on_loop: bool = False) -> bytes:
        """The usual case is inlined (open, fstat, one read, close: the syscalls of a plain open().readall()
        minus one read); anything unusual goes through _open_message, which decides and explains."""
        info = self.messages[index]
        try:
            fd = os.open(self.path + "/" + info.key, READ_FLAGS)
        except OSError:
            fd, st = self._open_message(index, on_loop)
        else:
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            broken = self._broken is not None and index in self._broken
            if (st.st_mode & _TYPE != _REGULAR or st.st_uid != self.owner.uid or broken
                    or not plausible(st.st_size, info.size)):  # fmt: skip
                os.close(fd)
                fd, st = self._open_message(index, on_loop)
        try:
            data = os.read(fd, st.st_size)
            if len(data) < st.st_size:
                data += read_upto(fd, st.st_size - len(data))
        except OSError as exc:
            raise TemporaryError(f"cannot read message: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if len(data) != st.st_size or network_size(data) != info.size:
            self._refuse(index, f"its size changed: {network_size(data)} octets, {info.size} announced")
        return data

    async def chunks(self, index: int, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """Stream a message of any size through a thread, no further than its size at open (an open fd
        survives later renames). The size is checked as it goes: a mismatch is raised before the last
        chunk is given out, so the session cuts the connection rather than end a wrong body."""
        fd, st = await asyncio.to_thread(self._open_message, index)
        hop = ThreadHop()  # a read in flight when the session is cut must finish before the fd is closed
        try:
            expected = self.messages[index].size
            count = NetworkCount()
            left = st.st_size
            while left:
                try:
                    data = await hop.run(partial(os.read, fd, min(chunk_size, left)))
                except OSError as exc:
                    raise TemporaryError(f"cannot read message: {exc.strerror}") from exc
                if not data:
                    self._refuse(index, "it shrank while being read")
                left -= len(data)
                count.feed(data)
                if not left and count.size != expected:
                    self._refuse(index, f"its size changed: {count.size} octets, {expected} announced")
                yield data
        finally:
            hop.after(partial(os.close, fd))

    # ---- update -----------------------------------------------------------------------------------------

    async def commit(self, deleted: set[int], seen: set[int]) -> None:
        """UPDATE state (RFC 1939 §6): unlink `deleted`, flag `seen` as read; raise if a deletion failed.

        Nothing to change on disk (a poll, or a download of messages already flagged): no file work at all.
        Only renames to flag messages seen, at most INLINE_CHANGES, are made on the loop, as open() does for a
        small maildrop. Deletions go to a worker thread: they rewrite the size cache, which the maildrop's
        owner may have made huge; so do more renames and an EXPIRE record."""
        marks = sum(1 for i in seen - deleted if _needs_seen(self.messages[i].key)) if self.mark_seen else 0
        if deleted or (self.expire_days is not None and seen) or marks > INLINE_CHANGES:
            failed = await self._in_thread(lambda: self._commit_sync(deleted, seen))
            if failed:
                raise TemporaryError(f"{failed} message(s) could not be deleted")
        elif marks:
            try:
                self._commit_sync(deleted, seen, on_loop=True)  # renames only: no deletion to fail
            except TooBigForLoop:  # a message renamed meanwhile, in a large directory: the rest in a thread
                await self._in_thread(lambda: self._commit_sync(deleted, seen))

    def _dir_fds(self) -> dict[str, int]:
        """fds of the root, new/ and cur/, opened without following links and checked to be the directories
        seen at open(): a maildir swapped for a link to another one during the session is not touched."""
        fds: dict[str, int] = {}
        try:
            fds[""] = os.open(self.path, DIR_FLAGS)
            for sub in ("new", "cur"):
                fds[sub] = os.open(sub, DIR_FLAGS, dir_fd=fds[""])
            for sub, fd in fds.items():
                st = os.fstat(fd)
                at = _ID_AT[sub]
                if (st.st_dev, st.st_ino) != self._ids[at : at + 2]:
                    raise Refused(f"{self.path}/{sub} was replaced during the session")
        except OSError as exc:
            for fd in fds.values():
                os.close(fd)
            log.error("maildir %s: nothing changed at commit: %s", self.path, exc)
            raise storage_error(exc, f"maildir {self.path} cannot be updated") from exc
        return fds

    def _commit_sync(self, deleted: set[int], seen: set[int], on_loop: bool = False) -> int:
        fds = self._dir_fds()
        try:
            return self._update(fds, deleted, seen, on_loop)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _update(self, fds: dict[str, int], deleted: set[int], seen: set[int], on_loop: bool = False) -> int:
        infos = [self.messages[index] for index in sorted(deleted)]
        gone = self._unlink(fds, infos)
        failed = len(infos) - len(gone)
        if self.expire_days is not None and (seen or gone):
            self._record_retrievals(fds[""], seen - deleted, gone)
        if self.mark_seen:
            for index in sorted(seen - deleted):
                self._mark_seen(fds, self.messages[index], on_loop)
        if gone:
            cache = self._size_cache()
            cache.load(fds[""], self.owner)  # we hold the lock: nobody else wrote it since open()
            cache.discard(gone, fds[""], self.owner)
        return failed

    def _record_retrievals(self, root_fd: int, seen: set[int], gone: list[str]) -> None:
        """The first retrieval time of each message in `seen` (a later one does not postpone its expiry)."""
        times = uidlist.load(root_fd, self.owner, f"maildir {self.path}", uidlist.RETRIEVED, uidlist.TIMES)
        now = str(max(int(self.clock()), 0))
        new = dict(times)
        for index in seen:
            new.setdefault(self.own_uid(self.messages[index]), now)
        for uid in gone:
            new.pop(uid, None)
        if new != times:
            self._save_times(new, root_fd)

    def _mark_seen(self, fds: dict[str, int], info: MessageInfo, on_loop: bool = False) -> None:
        """new/NAME -> cur/NAME:2,S, or add S to a cur/ name's flags (kept sorted, as Maildir requires)."""
        for attempt in range(2):
            sub, _, name = info.key.partition("/")
            base, sep, flags = split_name(name)
            if "S" in flags and sub == "cur":
                return
            target = with_seen(base, sep, flags)
            try:
                os.rename(name, target.partition("/")[2], src_dir_fd=_subdir_fd(fds, sub, name), dst_dir_fd=fds["cur"])
            except FileNotFoundError:
                if attempt == 0 and self._moved(info, on_loop):
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
