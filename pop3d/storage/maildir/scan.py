"""The Maildir snapshot taken at login: which messages, in which order, with which sizes and UIDs.

* Messages come from new/ then cur/ (tmp/ holds deliveries in progress and is never listed; dotfiles are
  skipped), ordered by delivery time (the leading integer of a standard name, else the file's mtime), then
  by base name. The list is fixed for the session: message numbers never change (RFC 1939 §5/§6).
* Sizes come from Dovecot's `,W=<n>` name field, else from reading the body once (measure); then they live
  in the size cache (sizecache.py), so a second login reads no body and stats no file: two listdirs, one
  sort, one compare with the cached snapshot.
* Login is the hot path (100,000-message maildrops exist): the per-message work is done by C-level
  map/zip/sort/join and one regex over all names; Python code per message only runs for odd names. With
  old enough, unchanged directory stamps there is not even a listdir (in-process memo, else the keys the
  cache file recorded).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter
from typing import cast

from pop3d.storage.base import MessageInfo, TemporaryError
from pop3d.storage.maildir.info import compact, infos
from pop3d.storage.maildir.names import STANDARD_NAMES, size_field, split_name, time_key, uid_for
from pop3d.storage.maildir.sizecache import SizeCache
from pop3d.storage.offload import no_gc
from pop3d.storage.oserrors import storage_error
from pop3d.storage.safefile import DIR_FLAGS, ForeignOwner, Owner, TooBigForLoop, open_regular, read_upto
from pop3d.wire import NetworkCount, network_size

log = logging.getLogger(__name__)

_MEASURE_CHUNK = 1024 * 1024
_first = itemgetter(0)

# Directory stamps younger than this (seconds) are not trusted to reveal later changes (see stamps).
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


def measure(path: str, chunk_size: int = _MEASURE_CHUNK, *, dir_fd: int | None = None,
            owner: Owner | None = None, loop_cap: int | None = None) -> tuple[int, int]:  # fmt: skip
    """(network size, integer mtime) of a stored message, streaming so a 50 MiB message costs no memory.

    Same result as pop3d.wire.network_size on the whole file. Opened like every message (no link,
    no blocking, a regular file of `owner`: safefile) and read no further than its fstat size, so a FIFO,
    a device or a file that keeps growing cannot stall or exhaust the server; OSError when unusable;
    TooBigForLoop, unread, when it stores more than `loop_cap` octets (a measure on the event loop).
    """
    fd, st = open_regular(path, dir_fd=dir_fd)
    try:
        if owner is not None:
            owner.check(st, path)
        if loop_cap is not None and st.st_size > loop_cap:
            raise TooBigForLoop(path)
        mtime = int(st.st_mtime)
        left = st.st_size
        if left <= chunk_size:
            data = read_upto(fd, left)
            if len(data) != left:
                raise OSError(errno.EIO, "message shrank while measured")
            return network_size(data), mtime
        count = NetworkCount()
        while left:
            data = os.read(fd, min(chunk_size, left))
            if not data:
                raise OSError(errno.EIO, "message shrank while measured")
            count.feed(data)
            left -= len(data)
        return count.size, mtime
    finally:
        os.close(fd)


def stamps(subs: Sequence[os.stat_result]) -> tuple[list[int], bool]:
    """(device, inode, mtime, ctime, size of new/ and cur/) from their lstat taken *before* listing them,
    and whether they can be trusted to reveal any later change.

    Every entry added, removed or renamed sets the directory's mtime and ctime to the current time,
    but that clock is coarse: a change in the same tick as our stat could leave the stamps unchanged.
    So stamps are only trusted when both directories were last changed more than _STAMP_TRUST seconds
    before they were read; any later change then shows as a newer time. (ctime cannot be set back.)
    """
    out: list[int] = []
    newest = 0
    for st in subs:
        out += (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    return out, time.time_ns() - newest > _STAMP_TRUST * 1_000_000_000


def list_names(path: str, root_fd: int, subs: Sequence[os.stat_result]) -> dict[str, str]:
    """name up to its first ":2," -> key, for new/ then cur/, built by C-level map/zip.

    Each directory is opened below the maildrop's root fd without following a link and must still be the
    one whose stamps were taken (`subs`). Listing new/ first means a message moved to cur/ between the
    two listdirs is seen twice (cur/ wins) rather than missed. Dotfiles and `;2,`/`!2,` names are sorted
    out later by the general scan.
    """
    found: dict[str, str] = {}
    for sub, expect in zip(("new", "cur"), subs, strict=True):
        try:
            fd = os.open(sub, DIR_FLAGS, dir_fd=root_fd)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
                    raise TemporaryError(f"maildir {path}: {sub}/ was replaced during the login")
                names = os.listdir(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise storage_error(exc, f"cannot list {path}/{sub}") from exc
        bases = map(_first, map(str.partition, names, repeat(":2,")))
        found.update(zip(bases, map(f"{sub}/".__add__, names), strict=True))
    return found


def snapshot(path: str, root_fd: int, subs: Sequence[os.stat_result], cache: SizeCache,
             owner: Owner | None = None, loop_cap: int | None = None) -> list[MessageInfo]:  # fmt: skip
    """The messages of the maildir at `path`, open as `root_fd` (whose lock the caller holds), and the
    cache brought up to date. `subs`: lstat of new/ and cur/, checked by the caller.

    Runs on every login, so per-message Python work is kept out of the common cases: directories unchanged
    since the last listing (no listdir: the in-process memo, else the cache file's keys), nothing renamed
    (one string compare), or only standard names. No message is opened unless its size is unknown: whether
    it is a regular file of the owner is checked when it is read (drop.py).
    """
    now, trusted = stamps(subs)
    memo = _MEMO.get(path)
    if trusted and memo is not None and memo[0] == now:
        _MEMO.move_to_end(path)
        return list(memo[1])
    _MEMO.pop(path, None)
    with no_gc():  # 100k new objects would trigger repeated collections that free nothing
        cache.load(root_fd, owner, loop_cap=loop_cap)
        cached = cache.snapshot_for(now) if trusted else None
        if cached is not None:
            messages = infos(*cached)
        else:
            scan = _Scan(path, root_fd, cache, owner, loop_cap)
            messages = compact(scan.listing(list_names(path, root_fd, subs)))
            cache.remember(now if trusted else None, [m.key for m in messages])
        cache.flush(root_fd, owner)
    if trusted and len(messages) >= _MEMO_MIN:
        _remember(path, now, messages)
    return messages


class _Scan:
    """One listing of one maildir: where to open the messages whose size is not known yet."""

    __slots__ = ("cache", "loop_left", "owner", "path", "root_fd")

    def __init__(self, path: str, root_fd: int, cache: SizeCache, owner: Owner | None,
                 loop_cap: int | None = None) -> None:  # fmt: skip
        """`loop_cap`: on the event loop, the octets of message bodies this listing may read in all."""
        self.path, self.root_fd, self.cache, self.owner = path, root_fd, cache, owner
        self.loop_left = loop_cap

    def measure(self, key: str) -> tuple[int, int]:
        if self.loop_left is None:
            return measure(key, dir_fd=self.root_fd, owner=self.owner)
        size, mtime = measure(key, dir_fd=self.root_fd, owner=self.owner, loop_cap=self.loop_left)
        self.loop_left -= size  # the network size: never less than what was read
        return size, mtime

    def listing(self, found: dict[str, str]) -> list[MessageInfo]:
        cache = self.cache
        order = sorted(found)
        joined = "/".join(order)
        if joined == cache.order_text:
            # The cached snapshot lists exactly these base names as uids, in this order: so each uid is
            # its base name and plain sorted order was the right (time, name) order. Nothing to compute.
            return list(map(MessageInfo, cache.size_list, order, map(found.__getitem__, order)))
        if STANDARD_NAMES.fullmatch(joined):
            return _scan_standard(self, found, order)
        return _scan_general(self, found)


def _scan_standard(scan: _Scan, found: dict[str, str], order: list[str]) -> list[MessageInfo]:
    """Only standard names (see names.STANDARD_NAMES): uid = base, order = sorted bases; new ones measured."""
    cache, path = scan.cache, scan.path
    old = cache.sizes
    maybe: list[int | None] = list(map(old.get, order))
    if None in maybe:  # first login, or new mail: use `,W=` or read those bodies once
        for i in [i for i, size in enumerate(maybe) if size is None]:
            base = order[i]
            try:
                maybe[i] = size_field(base) if ",W=" in base else None
                if maybe[i] is None:
                    maybe[i] = scan.measure(found[base])[0]
            except FileNotFoundError:
                pass  # vanished between listdir and read: not part of this snapshot
            except ForeignOwner:
                raise  # the maildrop is refused, not just this file
            except OSError as exc:
                log.warning("maildir %s: skipping unreadable %s: %s", path, found[base], exc)
        if None in maybe:
            order = [base for base, size in zip(order, maybe, strict=True) if size is not None]
            maybe = [size for size in maybe if size is not None]
    sizes = cast("list[int]", maybe)  # no None is left
    cache.update(dict(zip(order, sizes, strict=True)), {})
    return list(map(MessageInfo, sizes, order, map(found.__getitem__, order)))


def _scan_general(scan: _Scan, found: dict[str, str]) -> list[MessageInfo]:
    """Any names: dotfiles, `;2,`/`!2,` info, odd characters, times from mtime. Python per message."""
    cache, path = scan.cache, scan.path
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
    for base, key in bases.items():
        uid = uid_for(base)
        # Keys are unique: an mtime key equals a standard one only if its base starts with "." (skipped).
        skey = time_key(base)
        size = old.get(uid)
        if size is None and ",W=" in base:
            size = size_field(base)
        mtime = cache.mtimes.get(uid) if not skey else 0
        if size is None or mtime is None:
            try:
                if size is None:
                    size, mtime = scan.measure(key)
                else:
                    mtime = int(os.stat(key, dir_fd=scan.root_fd, follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                continue  # vanished between listdir and read: not part of this snapshot
            except ForeignOwner:
                raise  # the maildrop is refused, not just this file
            except OSError as exc:
                log.warning("maildir %s: skipping unreadable %s: %s", path, key, exc)
                continue
            if not skey:
                new_mtimes[uid] = mtime
        if not skey:
            skey = f"{max(mtime, 0):020d}{base}"
        rows[skey] = MessageInfo(size, uid, key)
    messages = [rows[k] for k in sorted(rows)]
    cache.update({m.uid: m.size for m in messages}, new_mtimes)  # snapshot order: see snapshot()
    return messages
