"""Maildir storage (https://cr.yp.to/proto/maildir.html) behind the Maildrop interface.

Rules this file keeps, and why:

* One exclusive lock per maildrop (`.pop3d.lock` in the maildir, see locking.py), taken before the scan:
  RFC 1939 §4 gives the session exclusive access from login to the end of the session.
* The snapshot is fixed at open(): message numbers never change during a session (RFC 1939 §5/§6).
  Messages come from new/ then cur/ (tmp/ holds deliveries in progress and is never listed; dotfiles are
  skipped), ordered by delivery time (the leading integer of a standard name, else the file's mtime), then
  by base name.
* UIDL (RFC 1939 §7): the uid is the message's unique *base name* (the name before the `:2,` info, also
  `;2,` / `!2,`), so flag changes and the new/ -> cur/ move never change it. Names that are not 1-70 octets
  of 0x21-0x7E are %XX-escaped (`%` itself too, so escaping stays injective); if still too long the uid is
  `%H` + sha1 hex of the name, which no escaped name can equal (`H` is not a hex digit).
* Sizes are network octets (pop3d.pop3.wire.network_size) because LIST must promise exactly what RETR sends
  (RFC 1939 §5, §7). They come from Dovecot's `,W=<n>` name field, else from reading the body once; then
  they live in `.pop3d.sizes` keyed by uid. Maildir messages are immutable once delivered (only renamed),
  so such a size never goes stale and a second login reads no body and stats no file: two listdirs, one
  sort, one compare with the cached snapshot. The cache is advisory: corrupt means ignored and rebuilt.
* Login is the hot path (100,000-message maildrops exist): the per-message work is done by C-level
  map/zip/sort/join and one regex over all names; Python code per message only runs for odd names.
* Deletions and the "seen" flag are applied only in commit(), i.e. in the UPDATE state (RFC 1939 §6); a
  session that ends any other way changes nothing.
* Another program (an IMAP server) may rename a message to change its flags while we hold the snapshot;
  a missing file is looked up again by base name before it is declared gone.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from itertools import repeat
from operator import itemgetter
from typing import AsyncIterator, Callable, TypeVar, cast

import aiofiles

from pop3d.auth.base import User
from pop3d.storage.atomic import replace_text
from pop3d.storage.base import (
    CHUNK,
    Maildrop,
    MessageGone,
    MessageInfo,
    PermanentError,
    StorageError,
    TemporaryError,
)
from pop3d.storage.locking import MaildropLock
from pop3d.pop3.wire import network_size

log = logging.getLogger(__name__)

_T = TypeVar("_T")

LOCK_FILE = ".pop3d.lock"
SIZE_CACHE = ".pop3d.sizes"
_SUBDIRS = ("cur", "new", "tmp")
_MAX_UID = 70  # RFC 1939 §7: 1 to 70 characters in 0x21-0x7E
_MEASURE_CHUNK = 1024 * 1024
_TEMPLATE_FIELD = re.compile(r"\{(user|home)\}")
_ZEROS = ["0" * (20 - n) for n in range(21)]
_first = itemgetter(0)

# Every base name of the maildrop, joined by "/", is a standard name with a 10-digit time (2001 to 2286),
# at most 70 characters, of 0x21-0x7E without "%" (our uid escape), "!" and ";" (other info separators)
# and "/": then the uid is the base name itself and plain string order is (time, name) order.
_NAME = r"[0-9]{10}\.[\x22-\x24\x26-\x2e\x30-\x3a\x3c-\x7e]{0,59}"
_STANDARD_NAMES = re.compile(f"{_NAME}(?:/{_NAME})*")

# Directory stamps younger than this (seconds) are not trusted to reveal later changes (see _stamps).
_STAMP_TRUST = 2.0
# In-process memo of big snapshots: path -> (stamps, messages). A worker answers the next login of a
# 100,000-message maildrop with two stat() calls and a list copy. Bounded by total messages kept; small
# maildrops are cheap to scan and are not kept (10,000 idle users must not grow the worker).
_MEMO: OrderedDict[str, tuple[list[int], list[MessageInfo]]] = OrderedDict()
_MEMO_MIN = 2_000
_MEMO_MAX_MESSAGES = 400_000


def _remember(path: str, stamps: list[int] | None, messages: list[MessageInfo]) -> None:
    """Keep a snapshot for the next login; MessageInfo objects are shared between successive sessions,
    which is safe because a session only changes a key to where the file really is (and any rename
    changes the directory stamps, which invalidates the entry)."""
    if stamps is None or len(messages) > _MEMO_MAX_MESSAGES:
        return
    _MEMO[path] = (stamps, list(messages))
    total = sum(len(m) for _, m in _MEMO.values())
    while total > _MEMO_MAX_MESSAGES:
        _, (_, dropped) = _MEMO.popitem(last=False)
        total -= len(dropped)


# OSErrors that retrying will not cure (RFC 3206 SYS/PERM); anything else is SYS/TEMP.
_PERMANENT = (PermissionError, NotADirectoryError, FileNotFoundError, IsADirectoryError)


def _storage_error(exc: OSError, what: str) -> StorageError:
    cls = PermanentError if isinstance(exc, _PERMANENT) else TemporaryError
    return cls(f"{what}: {exc.strerror or exc}")


def split_name(name: str) -> tuple[str, str, str]:
    """(base, separator, flags) of a Maildir file name; separator and flags are "" when it has no info.

    The info starts at the first `:2,` (base names cannot contain ':'), else at `;2,` or `!2,`, which
    some systems use where ':' is not allowed in file names.
    """
    i = name.find(":2,")
    if i < 0:
        found = [j for j in (name.find(";2,"), name.find("!2,")) if j >= 0]
        if not found:
            return name, "", ""
        i = min(found)
    return name[:i], name[i], name[i + 3 :]


def uid_for(base: str) -> str:
    """The UIDL of a base name: itself when already a valid uid, else an injective escape or a digest."""
    if len(base) <= _MAX_UID and base.isascii() and base.isprintable() and " " not in base and "%" not in base:
        return base  # every standard Maildir name
    raw = os.fsencode(base)  # undoes surrogateescape, so undecodable names are escaped byte for byte
    escaped = "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)
    if 0 < len(escaped) <= _MAX_UID:
        return escaped
    return "%H" + hashlib.sha1(raw).hexdigest()


def _size_field(base: str) -> int | None:
    """Dovecot's `,W=<n>` (size with CRLF line ends) from the base name, or None."""
    i = base.find(",W=")
    if i < 0:
        return None
    j = base.find(",", i + 3)
    digits = base[i + 3 :] if j < 0 else base[i + 3 : j]
    return int(digits) if digits.isdigit() and digits.isascii() else None


def measure(path: str, chunk_size: int = _MEASURE_CHUNK) -> tuple[int, int]:
    """(network size, integer mtime) of a stored message, streaming so a 50 MiB message costs no memory.

    Same result as pop3d.pop3.wire.network_size on the whole file, with CRLF split across chunks accounted for.
    """
    with open(path, "rb", buffering=0) as f:
        mtime = int(os.fstat(f.fileno()).st_mtime)
        data = f.read(chunk_size)
        if len(data) < chunk_size:
            return network_size(data), mtime
        total = lf = crlf = 0
        prev_cr = False
        last = b""
        while data:
            total += len(data)
            lf += data.count(b"\n")
            crlf += data.count(b"\r\n")
            if prev_cr and data[0] == 0x0A:
                crlf += 1
            prev_cr = data[-1] == 0x0D
            last = data[-1:]
            data = f.read(chunk_size)
    return total + lf - crlf + (0 if last == b"\n" else 2), mtime


class SizeCache:
    """`.pop3d.sizes`: network sizes (and mtimes where the name carries no time) keyed by uid.

    Six lines: a version header; the uids of the last snapshot, in order, joined by "/" (a uid never
    contains "/" or white space); a JSON list of their sizes; a JSON object uid -> mtime for names without
    a delivery time; the JSON stamps of new/ and cur/ when the snapshot was listed (see _stamps; `null`
    when they could not be trusted); the snapshot's keys joined by NUL (no file name contains NUL), or
    empty. With trusted, unchanged stamps a login in any process skips listdir and sort altogether. When nothing changed since the last login, the listing joined the same way compares
    equal to line 2 in one memcmp and the sizes come from one json.loads: no per-message Python code.
    Anything that does not parse makes the whole file ignored and rebuilt (it is only a cache). Rewritten
    atomically (temporary file + os.replace) and only when its content changed; callers hold the maildrop
    lock, so there is one writer.
    """

    MAGIC = "pop3d-sizes 4"

    def __init__(self, path: str) -> None:
        self.path = path
        self.order_text: str | None = None  # line 2 as read, None when there is no usable cache
        self.size_list: list[int] = []
        self.mtimes: dict[str, int] = {}
        self._sizes: dict[str, int] | None = None
        self.stamps: list[int] | None = None  # stamps of the listing the keys come from
        self.keys_text = ""
        self._dirty = False

    def load(self) -> None:
        self.order_text, self.size_list, self.mtimes, self._sizes = None, [], {}, {}
        self.stamps, self.keys_text, self._dirty = None, "", False
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("size cache %s ignored: %s", self.path, exc)
            return
        try:
            magic, order_text, size_text, mtime_text, stamp_text, keys_text, end = data.decode("ascii").split("\n")
            if magic != self.MAGIC or end:
                raise ValueError("unknown version or truncated")
            sizes = json.loads(size_text)
            mtimes = json.loads(mtime_text)
            if type(sizes) is not list or type(mtimes) is not dict:
                raise ValueError("bad types")
            count = order_text.count("/") + 1 if order_text else 0
            if len(sizes) != count or not set(map(type, sizes)) <= {int} or (sizes and min(sizes) < 0):
                raise ValueError("sizes do not match uids")
            if not set(map(type, mtimes.values())) <= {int}:
                raise ValueError("bad mtimes")
            stamps = json.loads(stamp_text)
            if stamps is not None and (type(stamps) is not list or not set(map(type, stamps)) <= {int}):
                raise ValueError("bad stamps")
            if keys_text and keys_text.count("\0") + 1 != count:
                raise ValueError("keys do not match uids")
        except (ValueError, RecursionError) as exc:  # Unicode/JSONDecodeError are ValueErrors
            log.warning("size cache %s is corrupt (%s), rebuilding it", self.path, exc)
            return
        self.order_text, self.size_list, self.mtimes, self._sizes = order_text, sizes, mtimes, None
        self.stamps, self.keys_text = (stamps, keys_text) if stamps is not None and keys_text else (None, "")

    def forget(self) -> None:
        """Drop the in-memory copy (it can be big); load() brings it back."""
        self.order_text, self.size_list, self.mtimes, self._sizes = None, [], {}, None
        self.stamps, self.keys_text, self._dirty = None, "", False

    def snapshot_for(self, stamps: list[int]) -> tuple[list[int], list[str], list[str]] | None:
        """(sizes, uids, keys) of the cached listing if it was taken with exactly these trusted stamps."""
        if self.stamps != stamps or not self.keys_text or self.order_text is None:
            return None
        return self.size_list, self.order_text.split("/"), self.keys_text.split("\0")

    def remember(self, stamps: list[int] | None, keys: list[str]) -> None:
        """Record the listing's stamps and keys (trusted stamps only); written by the next flush()."""
        keys_text = "\0".join(keys) if stamps is not None and keys and all(map(str.isascii, keys)) else ""
        if keys_text and "\n" in keys_text:
            keys_text = ""
        stamps = stamps if keys_text else None
        if (stamps, keys_text) != (self.stamps, self.keys_text):
            self.stamps, self.keys_text, self._dirty = stamps, keys_text, True

    def flush(self) -> None:
        if self._dirty:
            self._dirty = False
            self._write()

    @property
    def sizes(self) -> dict[str, int]:
        """uid -> size, built on demand (not needed when the snapshot did not change)."""
        if self._sizes is None:
            uids = self.order_text.split("/") if self.order_text else []
            self._sizes = dict(zip(uids, self.size_list))
        return self._sizes

    def update(self, kept: dict[str, int], new_mtimes: dict[str, int]) -> None:
        """Store exactly `kept` (uid -> size in snapshot order; vanished messages are dropped) if changed."""
        mtimes = {uid: m for uid, m in {**self.mtimes, **new_mtimes}.items() if uid in kept}
        order_text = "/".join(kept)
        sizes = list(kept.values())
        if order_text == self.order_text and sizes == self.size_list and mtimes == self.mtimes:
            return
        self.order_text, self.size_list, self.mtimes, self._sizes = order_text, sizes, mtimes, kept
        self.stamps, self.keys_text, self._dirty = None, "", True  # keys of another listing: forget them

    def discard(self, uids: list[str]) -> None:
        """Forget deleted messages (commit)."""
        gone = set(uids)
        if gone & self.sizes.keys():
            self.update({uid: size for uid, size in self.sizes.items() if uid not in gone}, {})
        self.flush()  # stored keys need no invalidation: any rename or unlink changes the directory stamps

    def _write(self) -> None:
        """A failure (read-only file system, quota) is logged: it only costs a slower next login."""
        text = "\n".join(
            (self.MAGIC, self.order_text or "", json.dumps(self.size_list, separators=(",", ":")),
             json.dumps(self.mtimes, separators=(",", ":")), json.dumps(self.stamps, separators=(",", ":")),
             self.keys_text, "")
        )  # fmt: skip
        replace_text(str(self.path), text, "size cache")


class MaildirStorage:
    """Factory of MaildirDrop for a location template such as `{home}/Maildir` or `/srv/mail/{user}`.

    `mark_seen`: on commit, retrieved messages get the Maildir `S` flag (and move from new/ to cur/), so
    IMAP clients sharing the maildir see them as read.
    """

    def __init__(self, location: str, mark_seen: bool = True) -> None:
        if not _TEMPLATE_FIELD.search(location):
            raise ValueError("maildir location must contain {user} or {home}")
        self.location = location
        self.mark_seen = mark_seen

    def path_for(self, user: User) -> str:
        """The maildir path of `user`; PermanentError for a name or home that could escape the template."""
        return self._expand(self.location, user)

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
        return self._expand(anchor, user)

    def _expand(self, template: str, user: User) -> str:
        name = user.name
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise PermanentError("user name not usable as a maildir path")
        home = user.home
        if "{home}" in template and (not home or "\0" in home):
            raise PermanentError("user has no home directory for the maildir location")

        def field(m: re.Match[str]) -> str:  # one pass, so a "{home}" inside a user name stays literal
            return name if m.group(1) == "user" else home or ""

        return _TEMPLATE_FIELD.sub(field, template)

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

    # ---- open -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the maildir if needed, lock it (InUse if held) and snapshot it, all in a worker thread."""
        await self._in_thread(self._open_sync)

    async def _in_thread(self, func: Callable[[], _T]) -> _T:
        """Run blocking file work off the loop. If the session is cancelled meanwhile (client gone), the
        thread cannot be stopped: once it ends, make sure it did not leave the lock held."""
        fut = asyncio.ensure_future(asyncio.to_thread(func))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda f: (f.cancelled() or f.exception(), self._lock.release()))
            raise

    def _open_sync(self) -> None:
        self._ensure_maildir()
        self._lock.acquire()
        try:
            self.messages = self._scan()
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
            raise _storage_error(exc, f"cannot create maildir {root}") from exc

    def _list(self) -> dict[str, str]:
        """name up to its first ":2," -> key, for new/ then cur/, built by C-level map/zip.

        Listing new/ first means a message moved to cur/ between the two listdirs is seen twice (cur/ wins)
        rather than missed. Dotfiles and `;2,`/`!2,` names are sorted out later by the general scan.
        """
        found: dict[str, str] = {}
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(self.path, sub))
            except OSError as exc:
                raise _storage_error(exc, f"cannot list {self.path}/{sub}") from exc
            found.update(zip(map(_first, map(str.partition, names, repeat(":2,"))), map(f"{sub}/".__add__, names)))
        return found

    def _stamps(self) -> tuple[list[int] | None, bool]:
        """(device, inode, mtime, ctime, size of new/ and cur/), taken *before* listing them, and whether
        they can be trusted to reveal any later change.

        Every entry added, removed or renamed sets the directory's mtime and ctime to the current time,
        but that clock is coarse: a change in the same tick as our stat could leave the stamps unchanged.
        So stamps are only trusted when both directories were last changed more than _STAMP_TRUST seconds
        before they were read; any later change then shows as a newer time. (ctime cannot be set back.)
        """
        out: list[int] = []
        newest = 0
        for sub in ("new", "cur"):
            try:
                st = os.stat(os.path.join(self.path, sub))
            except OSError:
                return None, False
            out += (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        return out, time.time_ns() - newest > _STAMP_TRUST * 1_000_000_000

    def _scan(self) -> list[MessageInfo]:
        """The snapshot; runs on every login, so per-message Python work is kept out of the common cases:
        directories unchanged since the last listing (no listdir: the in-process memo, else the cache
        file's keys), nothing renamed (one string compare), or only standard names."""
        stamps, trusted = self._stamps()
        key = self.path
        memo = _MEMO.get(key)
        if trusted and memo is not None and memo[0] == stamps:
            _MEMO.move_to_end(key)
            return list(memo[1])
        _MEMO.pop(key, None)
        cache = self._cache
        gc_was_enabled = gc.isenabled()
        # 100k new objects would trigger repeated collections that free nothing. Process-wide, but it only
        # postpones collection for the few milliseconds of the scan, and the previous state is restored.
        gc.disable()
        try:
            cache.load()
            cached = cache.snapshot_for(stamps) if trusted and stamps is not None else None
            if cached is not None:
                messages = list(map(MessageInfo, *cached))
            else:
                messages = self._scan_listing(cache)
                cache.remember(stamps if trusted else None, [m.key for m in messages])
            cache.flush()
        finally:
            if gc_was_enabled:
                gc.enable()
        if trusted and len(messages) >= _MEMO_MIN:
            _remember(key, stamps, messages)
        return messages

    def _scan_listing(self, cache: SizeCache) -> list[MessageInfo]:
        found = self._list()
        order = sorted(found)
        joined = "/".join(order)
        if joined == cache.order_text:
            # The cached snapshot lists exactly these base names as uids, in this order: so each uid is
            # its base name and plain sorted order was the right (time, name) order. Nothing to compute.
            return list(map(MessageInfo, cache.size_list, order, map(found.__getitem__, order)))
        if _STANDARD_NAMES.fullmatch(joined):
            return self._scan_standard(found, order)
        return self._scan_general(found)

    def _scan_standard(self, found: dict[str, str], order: list[str]) -> list[MessageInfo]:
        """Only standard names (see _STANDARD_NAMES): uid = base, order = sorted bases; new ones measured."""
        old = self._cache.sizes
        maybe: list[int | None] = list(map(old.get, order))
        if None in maybe:  # first login, or new mail: use `,W=` or read those bodies once
            root = self.path + "/"
            for i in [i for i, size in enumerate(maybe) if size is None]:
                base = order[i]
                try:
                    maybe[i] = _size_field(base) if ",W=" in base else None
                    if maybe[i] is None:
                        maybe[i] = measure(root + found[base])[0]
                except FileNotFoundError:
                    pass  # vanished between listdir and read: not part of this snapshot
                except OSError as exc:
                    log.warning("maildir %s: skipping unreadable %s: %s", self.path, found[base], exc)
            if None in maybe:
                order = [base for base, size in zip(order, maybe) if size is not None]
                maybe = [size for size in maybe if size is not None]
        sizes = cast("list[int]", maybe)  # no None is left
        self._cache.update(dict(zip(order, sizes)), {})
        return list(map(MessageInfo, sizes, order, map(found.__getitem__, order)))

    def _scan_general(self, found: dict[str, str]) -> list[MessageInfo]:
        """Any names: dotfiles, `;2,`/`!2,` info, odd characters, times from mtime. Python per message."""
        cache = self._cache
        old = cache.sizes
        new_mtimes: dict[str, int] = {}
        rows: dict[str, MessageInfo] = {}  # sort key -> message
        bases: dict[str, str] = {}
        for base, key in found.items():
            if base[:1] == ".":
                continue
            if ";2," in base or "!2," in base:
                base = split_name(base)[0]
            bases[base] = key  # later (cur/) entries win over new/ ones
        root = self.path + "/"
        for base, key in bases.items():
            uid = uid_for(base)
            # Sort key: delivery time zero-padded to 20 digits, then the base name, so that one string
            # comparison orders by (time, name). A standard name already starts with its time. Keys are
            # unique: an mtime key equals a standard one only if its base starts with "." (skipped above).
            dot = base.find(".")
            head = base[:dot]
            skey = _ZEROS[dot] + base if 0 < dot <= 20 and head.isdigit() and head.isascii() else ""
            size = old.get(uid)
            if size is None and ",W=" in base:
                size = _size_field(base)
            mtime = cache.mtimes.get(uid) if not skey else 0
            if size is None or mtime is None:
                try:
                    if size is None:
                        size, mtime = measure(root + key)
                    else:
                        mtime = int(os.stat(root + key).st_mtime)
                except FileNotFoundError:
                    continue  # vanished between listdir and read: not part of this snapshot
                except OSError as exc:
                    log.warning("maildir %s: skipping unreadable %s: %s", self.path, key, exc)
                    continue
                if not skey:
                    new_mtimes[uid] = mtime
            if not skey:
                skey = f"{max(mtime, 0):020d}{base}"
            rows[skey] = MessageInfo(size, uid, key)
        messages = [rows[k] for k in sorted(rows)]
        cache.update({m.uid: m.size for m in messages}, new_mtimes)  # snapshot order: see _scan
        return messages

    # ---- reading ----------------------------------------------------------------------------------------

    def _relocate(self, key: str) -> str | None:
        """Where the message of `key` is now, if another program renamed it (flags, new/ -> cur/).

        A few likely names are tried with one stat each; only then are the directories listed (rare: a
        message renamed to unusual flags during the session), which for read_small happens on the loop.
        """
        base, sep, flags = split_name(key.partition("/")[2])
        sep = sep or ":"
        guess_flags = "".join(sorted(set(flags) | {"S"}))
        for guess in (f"cur/{base}{sep}2,{guess_flags}", f"cur/{base}{sep}2,{flags}", f"new/{base}", f"cur/{base}"):
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
        """One direct open+read on the loop (performance rule 2); for messages up to SMALL_MESSAGE."""
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
            new_flags = "".join(sorted(set(flags) | {"S"}))
            target = f"cur/{base}{sep or ':'}2,{new_flags}"
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
        """Release the lock. Idempotent; deletes nothing (a session that did not QUIT changes nothing)."""
        self._lock.release()
