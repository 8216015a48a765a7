"""`.pop3d.sizes`, the Maildir size cache: what a login needs to know without reading any message.

Sizes are network octets (pop3d.wire.network_size) because LIST must promise exactly what RETR sends
(RFC 1939 §5, §7). Maildir messages are immutable once delivered (only renamed), so a size never goes stale
and a second login reads no body. The cache is advisory: corrupt means ignored and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial

from pop3d.storage.atomic import replace_text
from pop3d.storage.safefile import Owner, read_capped

log = logging.getLogger(__name__)

SIZE_CACHE = ".pop3d.sizes"
#: Larger than any real cache (about 100 octets a message: 400,000 messages fit), so a bigger file is
#: garbage or an attack (a link to /dev/zero is refused before, a huge sparse file here) and is not read.
MAX_CACHE = 64 * 1024 * 1024
_NOT_IN_UID = bytes(range(0x21)) + b"\x7f"  # RFC 1939 §7: uids are 0x21-0x7E (decode("ascii") refused the rest)


class SizeCache:
    """`.pop3d.sizes`: network sizes (and mtimes where the name carries no time) keyed by uid.

    Six lines: a version header; the uids of the last snapshot, in order, joined by "/" (a uid never
    contains "/" or white space); a JSON list of their sizes; a JSON object uid -> mtime for names without
    a delivery time; the JSON stamps of new/ and cur/ when the snapshot was listed (see scan.stamps; `null`
    when they could not be trusted); the snapshot's keys joined by NUL (no file name contains NUL), or
    empty. With trusted, unchanged stamps a login in any process skips listdir and sort altogether. When
    nothing changed since the last login, the listing joined the same way compares equal to line 2 in one
    memcmp and the sizes come from one json.loads: no per-message Python code.
    Anything that does not parse makes the whole file ignored and rebuilt (it is only a cache). Rewritten
    atomically (pop3d.storage.atomic) and only when its content changed; callers hold the maildrop lock,
    so there is one writer.

    The maildrop's owner can write this file, so it is read like any file of the maildrop (safefile: no
    link, no FIFO, at most MAX_CACHE octets) and nothing in it can make pop3d act outside the maildrop: a
    key (a path pop3d opens, renames and unlinks) is only renamed or unlinked as a name in new/ or cur/
    (drop.py), and a message is only served when it is a regular file of the owner, of the size LIST
    announced; uids are printable ASCII without space (they go on the wire). These checks are per use,
    not per cached entry: a login that trusts the cache stays a handful of C-level passes.
    Files are opened relative to the maildrop's root fd (`dir_fd` of load, flush, discard).
    """

    MAGIC = "pop3d-sizes 4"

    def __init__(self, path: str) -> None:
        self.path = path  # for messages; opened as its base name below the maildrop root's fd
        self.name = os.path.basename(path)
        self.order_text: str | None = None  # line 2 as read, None when there is no usable cache
        self.size_list: list[int] = []
        self.mtimes: dict[str, int] = {}
        self._sizes: dict[str, int] | None = None
        self.stamps: list[int] | None = None  # stamps of the listing the keys come from
        self.keys_text = ""
        self._dirty = False

    def load(self, dir_fd: int, owner: Owner | None = None, *, loop_cap: int | None = None) -> None:
        """Read the cache (TooBigForLoop, unread, if it is larger than `loop_cap`: see safefile.read_capped)."""
        self.order_text, self.size_list, self.mtimes, self._sizes = None, [], {}, {}
        self.stamps, self.keys_text, self._dirty = None, "", False
        try:
            data = read_capped(self.name, MAX_CACHE, dir_fd=dir_fd, owner=owner, loop_cap=loop_cap)
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
            start = len(magic) + 1  # line 2 in `data`: bytes.translate checks every octet fastest
            if (len(data[start : start + len(order_text)].translate(None, _NOT_IN_UID)) != len(order_text)
                    or order_text.startswith("/") or order_text.endswith("/")):  # fmt: skip
                raise ValueError("uids not printable")  # RFC 1939 §7: 0x21-0x7E
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

    def flush(self, dir_fd: int, owner: Owner | None = None) -> None:
        if self._dirty:
            self._dirty = False
            self._write(dir_fd, owner)

    @property
    def sizes(self) -> dict[str, int]:
        """uid -> size, built on demand (not needed when the snapshot did not change)."""
        if self._sizes is None:
            uids = self.order_text.split("/") if self.order_text else []
            self._sizes = dict(zip(uids, self.size_list, strict=True))
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

    def discard(self, uids: list[str], dir_fd: int, owner: Owner | None = None) -> None:
        """Forget deleted messages (commit)."""
        gone = set(uids)
        if gone & self.sizes.keys():
            self.update({uid: size for uid, size in self.sizes.items() if uid not in gone}, {})
        self.flush(dir_fd, owner)  # stored keys need no invalidation: any rename or unlink changes the directory stamps

    def _write(self, dir_fd: int, owner: Owner | None) -> None:
        """A failure (read-only file system, quota) is logged: it only costs a slower next login. Mode
        0600, given to the maildrop's owner like the rest of the maildrop."""
        text = "\n".join(
            (self.MAGIC, self.order_text or "", json.dumps(self.size_list, separators=(",", ":")),
             json.dumps(self.mtimes, separators=(",", ":")), json.dumps(self.stamps, separators=(",", ":")),
             self.keys_text, "")
        )  # fmt: skip
        prepare = None if owner is None else partial(Owner.give, owner)
        replace_text(self.name, text, "size cache", dir_fd=dir_fd, prepare=prepare)
