"""mbox spools (/var/mail/USER) behind the Maildrop interface, safe beside a running MTA.

Two locks, on purpose (RFC 1939 §4 wants exclusive access for the session, the MTA wants to keep
delivering during it):

* the session lock (`[IN-USE]`, RFC 2449 §8.1.1): locking.MaildropLock on `USER.pop3d-lock` in
  `storage.mbox_index_dir`, held from login to the end of the session. MTAs never see it.
* the spool lock (spool_lock.SpoolLock: dotlock/fcntl/flock as configured), held only while the snapshot
  is read (`mbox_lock_read`) and while deletions are committed (`mbox_lock_write`), each wait bounded by
  `mbox_lock_timeout` and answered with `[SYS/TEMP]` (RFC 3206 §4) when it runs out.

The snapshot is the list of messages present at login (format.scan, made cheap by index.SpoolIndex). The
spool fd stays open for the session; every read re-checks the message's digest, so a spool rewritten
underneath gives `[SYS/TEMP]` instead of the wrong message. At QUIT, the deletions are applied in place by
commit.py (crash-safe, undo journal) keeping everything appended after the snapshot; if the spool was
rewritten rather than appended to during the session, nothing is deleted and the commit answers
`[SYS/TEMP]`. The `seen` set is not written back: an mbox has no flags without rewriting the message
(`Status:` headers), which would change sizes and UIDLs other readers depend on.

The spool's owner can write it and may be able to write beside it, and pop3d may run as root
(pop3d.storage.safefile): the spool is opened without following a link or blocking, must be a regular
file of the owner (the passwd-file uid, else the spool's own owner), else `[SYS/PERM]`; the index and
journal are read the same way, capped in size, and written only through exclusive temporary files
(pop3d.storage.atomic), mode 0600. A message whose size disagrees with the index is unreadable for the
session (MessageUnreadable).

RFC 2449 §6.7 EXPIRE with n > 0 days: a commit records when each retrieved message was first retrieved
(`USER.pop3d-retrieved` beside the index, keyed by UIDL: pop3d.storage.maildir.uidlist's format); the
owner's next open() removes those retrieved at least n days ago with an ordinary journaled commit, then
takes the snapshot again, so the session numbers only what is left.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

from pop3d.auth.base import User
from pop3d.storage.atomic import is_temp_of
from pop3d.storage.base import (
    CHUNK,
    InUse,
    Maildrop,
    MessageGone,
    MessageInfo,
    MessageUnreadable,
    PermanentError,
    RefusedMaildrop,
    Storage,
    StorageError,
    TemporaryError,
)
from pop3d.storage.location import expand, has_fields
from pop3d.storage.locking import MaildropLock
from pop3d.storage.maildir import uidlist
from pop3d.storage.mbox import commit as mbox_commit
from pop3d.storage.mbox import deliver as mbox_deliver
from pop3d.storage.mbox.format import HEAD, Entry, NotMbox, Unquoter, digest, scan, unquote
from pop3d.storage.mbox.index import TAIL, SpoolIndex
from pop3d.storage.mbox.spool_lock import SpoolLock
from pop3d.storage.offload import ThreadHop, no_gc
from pop3d.storage.oserrors import storage_error
from pop3d.storage.safefile import Owner, Refused, open_regular
from pop3d.wire import NetworkCount, network_size

if TYPE_CHECKING:
    from pop3d.config import SpoolLockMethod, StorageSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_JOURNAL = ".pop3d-journal"


class MboxStorage(Storage):
    """Factory of MboxDrop from the `[storage]` settings."""

    task_free = True  # plain file work on the loop or in threads: see Storage.task_free

    def __init__(self, cfg: StorageSettings) -> None:
        self.location = cfg.location
        self.mboxrd = cfg.mbox_dialect == "mboxrd"
        self.read_locks: tuple[SpoolLockMethod, ...] = tuple(cfg.mbox_lock_read)
        self.write_locks: tuple[SpoolLockMethod, ...] = tuple(cfg.mbox_lock_write)
        self.timeout = cfg.mbox_lock_timeout
        self.stale = cfg.mbox_dotlock_stale
        self.index_dir = cfg.mbox_index_dir
        days = cfg.expire_days
        self.expire_days = days if isinstance(days, int) and days > 0 else None  # RFC 2449 §6.7; 0: at QUIT
        self.clock: Callable[[], float] = time.time  # wall-clock seconds, for retrieval times

    def maildrop(self, user: User) -> Maildrop:
        try:
            spool = expand(self.location, user, "spool")
        except PermanentError as exc:
            return RefusedMaildrop(exc)
        base = os.path.join(self.index_dir, user.name) if self.index_dir else spool
        return MboxDrop(spool, base, self, uid=user.uid, gid=user.gid)

    async def deliver(self, user: User, message: bytes) -> None:
        """LMTP (RFC 2033): append under the spool's write locks, never the session lock (mbox.deliver).
        PermanentError only for a user who can never have a spool; every other failure is temporary."""
        spool = expand(self.location, user, "spool")
        await mbox_deliver.deliver(spool, message, mboxrd=self.mboxrd, methods=self.write_locks,
                                   lock_timeout=self.timeout, stale=self.stale, uid=user.uid, gid=user.gid)  # fmt: skip

    async def recover_interrupted(self) -> None:
        """At server start: settle every commit a crash interrupted, so a spool does not stay half-moved
        until its owner's next login.

        Journals are found in `mbox_index_dir` (or in the spool directory when that is "" and the
        location's directory has no `{user}`); a user whose session is open is skipped (its own open did
        it), and so is a `{home}` location (no home without a user lookup: done at that user's login).
        """
        directory = self.index_dir or os.path.dirname(self.location)
        if has_fields(directory):
            return
        try:
            names = await asyncio.to_thread(os.listdir, directory)
        except OSError:
            return
        temps: dict[str, list[str]] = defaultdict(list)  # journals whose writer died before renaming them
        for n in names:
            if n.startswith(".") and _JOURNAL + "." in n:
                user = n[1:].rpartition(_JOURNAL + ".")[0]
                if is_temp_of(n, user + _JOURNAL):
                    temps[user].append(n)
        done = {n.split(_JOURNAL)[0] for n in names if n.endswith((_JOURNAL, _JOURNAL + ".tmp"))}
        for name in sorted(done | temps.keys()):
            drop = self.maildrop(User(name))
            if isinstance(drop, RefusedMaildrop):
                log.warning("interrupted commit for %s left for its next login: %s", name, drop.error)
                continue
            try:
                await drop.open()
                # the session lock is ours: no commit of this user is writing a journal now
                for temp in temps.get(name, ()):
                    await asyncio.to_thread(_unlink_quietly, os.path.join(directory, temp))
            except InUse:
                pass
            except (StorageError, OSError) as exc:
                log.warning("interrupted commit for %s not settled yet: %s", name, exc)
            finally:
                await drop.close()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove an unfinished journal %s: %s", path, exc)


class MboxDrop(Maildrop):
    """One session on one spool. Not thread-safe; every call comes from the session's event loop."""

    def __init__(self, spool: str, base: str, cfg: MboxStorage, *, uid: int | None = None,
                 gid: int | None = None) -> None:  # fmt: skip
        self.spool = spool
        self.cfg = cfg
        self.uid, self.gid = uid, gid
        self.owner = Owner(-1, -1)  # set by open(): see safefile.Owner
        self._broken: dict[int, str] = {}  # message index -> why it is unreadable for this session
        self.messages: list[MessageInfo] = []
        self.index_path = base + ".pop3d-index"
        self.journal = base + _JOURNAL
        self.retrieved_path = base + ".pop3d-retrieved"
        self._session_lock = MaildropLock(base + ".pop3d-lock")
        self._fd: int | None = None
        self._writable = False
        self._entries: list[Entry] = []
        self._snap_size = 0
        self._index: SpoolIndex | None = None
        self._locks: list[SpoolLock] = []
        self._hop = ThreadHop()  # every blocking call of the session; closing the fd waits for it

    def _spool_lock(self, write: bool) -> SpoolLock:
        lock = SpoolLock(self.spool, self.cfg.write_locks if write else self.cfg.read_locks, write=write,
                         timeout=self.cfg.timeout, stale=self.cfg.stale)  # fmt: skip
        self._locks.append(lock)
        return lock

    async def _locked(self, write: bool, func: Callable[[], _T]) -> _T:
        """`func` in a thread while holding the spool's read or write locks (waited for without blocking)."""
        assert self._fd is not None
        lock = self._spool_lock(write)

        def release() -> None:
            lock.release()
            if lock in self._locks:
                self._locks.remove(lock)

        try:
            await lock.acquire(self._fd, self._hop)
            return await self._hop.run(func)
        finally:
            self._hop.after(release)

    # ---- open -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Session lock (InUse if held), finish an interrupted commit, snapshot under the read lock."""
        try:
            journal_left = await self._hop.run(self._open_files)
            if self._fd is None:
                return  # no spool yet: an empty maildrop; nothing is created
            if journal_left:
                if not self._writable:
                    raise PermanentError(f"{self.spool}: interrupted commit, but the spool is not writable")
                await self._locked(True, lambda: mbox_commit.recover(self._fd_or_fail(), self.journal, self.owner))
            await self._locked(False, self._snapshot)
            if self.cfg.expire_days is not None:
                await self._expire(self.cfg.expire_days)
        except BaseException:
            self._abort()
            raise

    def _times(self) -> dict[str, str]:
        return uidlist.load(None, self.owner, f"spool {self.spool}", self.retrieved_path, uidlist.TIMES)

    def _save_times(self, times: dict[str, str]) -> None:
        try:
            uidlist.save(times, None, None, self.retrieved_path, uidlist.TIMES)  # pop3d's file, like the index
        except OSError as exc:  # costs only a late expiry
            log.warning("spool %s: cannot record retrieval times: %s", self.spool, exc)

    async def _expire(self, days: int) -> None:
        """RFC 2449 §6.7 EXPIRE n: remove what was first retrieved at least n days ago, then snapshot again."""
        times = await self._hop.run(self._times)
        if not times:
            return
        cutoff = self.cfg.clock() - days * 86400
        doomed = {i for i, m in enumerate(self.messages) if m.uid in times and int(times[m.uid]) <= cutoff}
        if doomed and self._writable:
            await self._locked(True, lambda: self._commit_sync(doomed))
            log.info("spool %s: EXPIRE %d: %d retrieved message(s) deleted", self.spool, days, len(doomed))
            await self._locked(False, self._snapshot)
        present = {m.uid for m in self.messages}
        left = {uid: t for uid, t in times.items() if uid in present}
        if left != times:
            await self._hop.run(lambda: self._save_times(left))

    def _fd_or_fail(self) -> int:
        if self._fd is None:
            raise TemporaryError("maildrop closed")
        return self._fd

    def _open_files(self) -> bool:
        """Session lock, then the spool's fd (None when there is no spool). Whether a commit journal,
        complete or not, is left by a process that died mid-commit."""
        index_dir = os.path.dirname(self.index_path)
        if self.cfg.index_dir and not os.path.isdir(index_dir):
            # One directory for every user's index, lock and journal (copies of mail): pop3d's alone, 0700.
            # It is not given to any user, who could then tamper with the others' files.
            try:
                os.makedirs(index_dir, 0o700, exist_ok=True)
            except OSError as exc:
                raise storage_error(exc, f"cannot create mbox index directory {index_dir}") from exc
        self._session_lock.acquire()
        # A link as the spool is refused (ELOOP), by policy; O_NONBLOCK: a FIFO there must not block.
        flags = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            try:
                self._fd, st = open_regular(self.spool, flags=os.O_RDWR | flags)
                self._writable = True
            except PermissionError:
                self._fd, st = open_regular(self.spool, flags=os.O_RDONLY | flags)
                log.warning("spool %s is read-only for pop3d: deletions will fail", self.spool)
            self.owner = Owner.of(self.uid, self.gid, st)
            self.owner.check(st, f"spool {self.spool}")
        except FileNotFoundError:
            self._fd = None
            return False
        except OSError as exc:
            if isinstance(exc, Refused) or exc.errno == errno.ELOOP:
                log.error("spool %s refused: %s", self.spool, exc.strerror)
            raise storage_error(exc, f"cannot open spool {self.spool}") from exc
        return os.path.lexists(self.journal) or os.path.lexists(self.journal + ".tmp")

    def _pread(self, offset: int, length: int) -> bytes:
        assert self._fd is not None
        return os.pread(self._fd, length, offset)

    def _tail(self, size: int) -> str:
        start = max(0, size - TAIL)
        return digest(self._pread(start, size - start), size)

    def _snapshot(self) -> None:
        """Under the read lock: reuse, extend or rebuild the index, then fix the session's message list."""
        with no_gc():
            self._snapshot_nogc()

    def _snapshot_nogc(self) -> None:
        assert self._fd is not None
        st = os.fstat(self._fd)
        size = st.st_size
        dialect = "mboxrd" if self.cfg.mboxrd else "mboxo"
        idx = SpoolIndex(self.index_path)
        idx.load(size, self.owner)
        same_file = idx.loaded and (idx.dev, idx.ino, idx.dialect) == (st.st_dev, st.st_ino, dialect)
        try:
            if same_file and size == idx.size and st.st_mtime_ns == idx.mtime_ns and self._tail(size) == idx.tail:
                entries, uids, changed = idx.entries, idx.uids, False
            elif (same_file and size > idx.size and self._tail(idx.size) == idx.tail
                  and (idx.size == 0 or self._pread(idx.size, 5) == b"From ")):  # fmt: skip
                new = scan(self._pread, idx.size, size, self.cfg.mboxrd)
                taken = set(idx.uids)
                entries, uids, changed = idx.entries + new, idx.uids + self._assign(new, idx, taken, {}), True
            else:
                entries = scan(self._pread, 0, size, self.cfg.mboxrd) if size else []
                pool: dict[str, deque[str]] = defaultdict(deque)
                for e, uid in zip(idx.entries, idx.uids, strict=True):
                    pool[e.digest].append(uid)
                if idx.loaded:
                    log.info("spool %s changed outside pop3d; rescanned", self.spool)
                uids, changed = self._assign(entries, idx, set(), pool), True
        except NotMbox as exc:
            raise PermanentError(f"{self.spool} is not an mbox file: {exc}") from exc
        except EOFError as exc:
            raise TemporaryError(f"{self.spool} shrank while being read") from exc
        self._entries, self._snap_size = entries, size
        self.messages = list(map(MessageInfo, (e.size for e in entries), uids, uids))
        idx.entries, idx.uids = entries, uids
        if changed or (idx.dev, idx.ino, idx.size, idx.mtime_ns) != (st.st_dev, st.st_ino, size, st.st_mtime_ns):
            idx.dev, idx.ino, idx.size, idx.mtime_ns, idx.dialect = st.st_dev, st.st_ino, size, st.st_mtime_ns, dialect
            idx.tail = self._tail(size)
            idx.save()
        self._index = idx

    @staticmethod
    def _assign(entries: Sequence[Entry], idx: SpoolIndex, taken: set[str], pool: dict[str, deque[str]]) -> list[str]:
        """UIDLs for newly seen messages: a valid unused `X-UIDL:` (qpopper), else the uid a message with the
        same digest had before an outside rewrite, else a fresh `<uidv>.<n>` (never reused)."""
        out: list[str] = []
        for e in entries:
            uid = e.xuidl if e.xuidl and e.xuidl not in taken else None
            if uid is None:
                olds = pool.get(e.digest)
                while olds:
                    cand = olds.popleft()
                    if cand not in taken:
                        uid = cand
                        break
            if uid is None:
                uid = idx.new_uid()
                while uid in taken:
                    uid = idx.new_uid()
            taken.add(uid)
            out.append(uid)
        return out

    # ---- read -------------------------------------------------------------------------------------------

    def _check(self, index: int, data: bytes) -> None:
        why = self._broken.get(index)
        if why is not None:
            raise MessageUnreadable(why)
        e = self._entries[index]
        if digest(data, e.next - e.start) != e.digest:
            raise MessageGone(f"message {index + 1}: the spool was rewritten by another program")

    def _refuse(self, index: int, size: int) -> NoReturn:
        """The message's size is not the one LIST announced (an index that lies): unreadable for the
        session, logged once, as Dovecot does with a broken cached size."""
        text = (f"spool {self.spool}: message {index + 1} unreadable this session: its size is {size} octets, "
                f"{self.messages[index].size} announced")  # fmt: skip
        self._broken[index] = text
        log.error("%s", text)
        raise MessageUnreadable(text)

    def read_small(self, index: int) -> bytes:
        e = self._entries[index]
        try:
            data = self._pread(e.start, e.next - e.start)
        except OSError as exc:
            raise TemporaryError(f"cannot read spool: {exc.strerror}") from exc
        if len(data) != e.next - e.start:
            raise MessageGone(f"message {index + 1}: the spool was truncated by another program")
        self._check(index, data[:HEAD])
        body = data[e.body - e.start : e.end - e.start]
        body = unquote(body) if self.cfg.mboxrd else body
        if network_size(body) != self.messages[index].size:
            self._refuse(index, network_size(body))
        return body

    async def chunks(self, index: int, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """Stream [body, end) through threads on a dup of the spool fd (a session cut mid-stream closes the
        original; the dup keeps the pread from ever hitting a reused fd number)."""
        e = self._entries[index]
        fd = os.dup(self._fd_or_fail())
        try:
            head = await asyncio.to_thread(os.pread, fd, min(HEAD, e.next - e.start), e.start)
            self._check(index, head)
            unq = Unquoter() if self.cfg.mboxrd else None
            count = NetworkCount()
            pos = e.body
            while pos < e.end:
                try:
                    data = await asyncio.to_thread(os.pread, fd, min(chunk_size, e.end - pos), pos)
                except OSError as exc:
                    raise TemporaryError(f"cannot read spool: {exc.strerror}") from exc
                if not data:
                    raise MessageGone(f"message {index + 1}: the spool was truncated by another program")
                pos += len(data)
                out = unq.feed(data) if unq else data
                if pos >= e.end and unq:
                    out += unq.finish()
                count.feed(out)
                if pos >= e.end and count.size != self.messages[index].size:
                    self._refuse(index, count.size)  # before the last piece: the session cuts the connection
                yield out
        finally:
            os.close(fd)

    # ---- update -----------------------------------------------------------------------------------------

    async def commit(self, deleted: set[int], seen: set[int]) -> None:
        """UPDATE (RFC 1939 §6): remove `deleted` under the write lock, keeping appended mail; all or nothing."""
        if seen and self.cfg.expire_days is not None:
            await self._hop.run(lambda: self._record_retrievals(seen - deleted))
        if not deleted:
            return
        if self._fd is None:
            raise TemporaryError("maildrop closed")
        if not self._writable:
            raise PermanentError(f"spool {self.spool} is not writable by pop3d")
        await self._locked(True, lambda: self._commit_sync(deleted))

    def _record_retrievals(self, seen: set[int]) -> None:
        """The first retrieval time of each message in `seen` (a later one does not postpone its expiry);
        recorded before the deletions, whose UIDLs the next open() forgets with the rest that is gone."""
        times = self._times()
        now = str(max(int(self.cfg.clock()), 0))
        new = dict(times)
        for index in seen:
            new.setdefault(self.messages[index].uid, now)
        if new != times:
            self._save_times(new)

    def _commit_sync(self, deleted: set[int]) -> None:
        fd = self._fd_or_fail()
        mbox_commit.recover(fd, self.journal, self.owner)  # a previous process died mid-commit: settle that first
        st = os.fstat(fd)
        try:
            pst = os.stat(self.spool, follow_symlinks=False)
        except OSError as exc:
            raise TemporaryError(f"spool {self.spool} vanished during the session") from exc
        if (pst.st_dev, pst.st_ino) != (st.st_dev, st.st_ino):
            raise TemporaryError(f"spool {self.spool} was replaced during the session; nothing deleted")
        size, snap = st.st_size, self._snap_size
        entries = self._entries
        first = min(deleted)
        if size < snap or (size > snap and self._pread(snap, 5) != b"From "):
            raise TemporaryError(f"spool {self.spool} was rewritten during the session; nothing deleted")
        for i in range(max(0, first - 1), len(entries)):
            e = entries[i]
            if digest(self._pread(e.start, min(HEAD, e.next - e.start)), e.next - e.start) != e.digest:
                raise TemporaryError(f"spool {self.spool} was rewritten during the session; nothing deleted")
        x = entries[first].start
        keep = [(e.start, e.next) for i, e in enumerate(entries[first:], first) if i not in deleted]
        if size > snap:
            keep.append((snap, size))
        try:
            mbox_commit.rewrite(fd, self.journal, keep, x, size)
        except OSError as exc:
            # an I/O error mid-way (EIO, ENOSPC on a sparse file...): settle it now from the journal, as a
            # restart would; if even that fails, the journal stays and the next start or open settles it
            try:
                outcome = mbox_commit.recover(fd, self.journal, self.owner)
            except (OSError, TemporaryError) as again:
                log.error("spool %s: commit failed (%s) and could not be undone yet (%s)", self.spool, exc, again)
                outcome = None
            if outcome is None or not outcome.startswith("commit had completed"):
                raise TemporaryError(f"commit to {self.spool} failed: {exc.strerror}; nothing deleted") from exc
        with no_gc():
            self._update_index(deleted)

    def _update_index(self, deleted: set[int]) -> None:
        """The kept snapshot messages at their new offsets; the appended tail is scanned at the next login."""
        idx = self._index
        if idx is None:
            return
        shift = 0
        entries: list[Entry] = []
        uids: list[str] = []
        for i, (e, m) in enumerate(zip(self._entries, self.messages, strict=True)):
            if i in deleted:
                shift += e.next - e.start
                continue
            entries.append(Entry(e.start - shift, e.body - shift, e.end - shift, e.next - shift, e.size, e.digest,
                                 None))  # fmt: skip
            uids.append(m.uid)
        st = os.fstat(self._fd_or_fail())
        idx.entries, idx.uids = entries, uids
        idx.size = self._snap_size - shift
        idx.dev, idx.ino, idx.mtime_ns = st.st_dev, st.st_ino, st.st_mtime_ns
        idx.tail = self._tail(idx.size)
        idx.save()

    # ---- end --------------------------------------------------------------------------------------------

    def _abort(self) -> None:
        """Spool locks, fd and session lock released, after any file-work thread still in flight."""

        def cleanup() -> None:
            for lock in self._locks:
                lock.release()
            self._locks.clear()
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            self._session_lock.release()

        self._hop.after(cleanup)

    async def close(self) -> None:
        """Release everything. Idempotent; deletes nothing (a session that did not QUIT changes nothing)."""
        self._abort()
