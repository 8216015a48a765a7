"""`USER.pop3d-index`: what pop3d knows about a spool between sessions: message offsets, sizes, UIDLs.

Why it exists: an mbox has no per-message names, so UIDLs (RFC 1939 §7: stable across sessions, never
reused) must be remembered somewhere unless the messages carry `X-UIDL:` headers; and sizes must not cost a
re-read of an unchanged 1 GiB spool at every login. The spool is identified by device, inode, the scanned
length, its mtime and a digest of its last 4 KiB: equal means unchanged (no read at all); longer with the
same tail digest means appended (only the new part is scanned); anything else means rewritten by someone
else, and the spool is rescanned with the UIDLs carried over by message digest.

Format: a version line, one JSON line of metadata, then one line per column (starts, bodies, ends, sizes,
digests, uids), space-separated, so loading 100,000 messages is a handful of C-level splits and maps.
Written to an exclusive temporary file, fsynced and renamed over (pop3d.storage.atomic, mode 0600): a crash
leaves the old or the new index. Read like any file beside a maildrop (pop3d.storage.safefile: no link, no
FIFO, pop3d's or the owner's, at most MAX_INDEX octets); nothing in it is trusted further than the spool
allows: offsets are only ever pread from the spool fd, sizes are checked when a message is read. A damaged
index is ignored; the cost is a full scan and, if it cannot be matched, new UIDLs for that spool (clients
then download the messages once more, never lose them), because `uidv` is fresh for every new index.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from itertools import repeat

from pop3d.storage.atomic import replace_text
from pop3d.storage.mbox.format import Entry
from pop3d.storage.safefile import Owner, read_capped

log = logging.getLogger(__name__)

MAGIC = "pop3d-mbox-index 1"
TAIL = 4096


def max_index(spool_size: int) -> int:
    """A cap on the index of a spool of `spool_size` octets: a message takes at least ~30 octets of spool
    and at most ~130 of index, so a larger file is garbage (a huge sparse file) and is not read."""
    return 16 * 1024 * 1024 + 8 * spool_size


@dataclass
class SpoolIndex:
    path: str
    dev: int = -1
    ino: int = -1
    size: int = 0
    mtime_ns: int = -1
    tail: str = ""
    dialect: str = ""
    uidv: str = field(default_factory=lambda: f"{int(time.time()):x}{secrets.token_hex(2)}")
    next_uid: int = 1
    entries: list[Entry] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    loaded: bool = False

    def load(self, spool_size: int, owner: Owner | None = None) -> None:
        """Read the file; `loaded` stays False (and the defaults are kept) if it is missing or damaged."""
        try:
            text = read_capped(self.path, max_index(spool_size), owner=owner).decode("ascii")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("mbox index %s ignored: %s", self.path, exc)
            return
        try:
            magic, meta_text, starts_t, bodies_t, ends_t, sizes_t, digests_t, uids_t, end = text.split("\n")
            if magic != MAGIC or end:
                raise ValueError("unknown version or truncated")
            meta = json.loads(meta_text)
            starts = list(map(int, starts_t.split()))
            bodies = list(map(int, bodies_t.split()))
            ends = list(map(int, ends_t.split()))
            sizes = list(map(int, sizes_t.split()))
            digests = digests_t.split()
            uids = uids_t.split()
            n = len(starts)
            if not (len(bodies) == len(ends) == len(sizes) == len(digests) == len(uids) == n):
                raise ValueError("columns differ in length")
            if len(set(uids)) != n:
                raise ValueError("duplicate uids")
            size = int(meta["size"])
            nexts = [*starts[1:], size]
            if n and (starts[0] != 0 or any(a > b for a, b in zip(starts, nexts, strict=True))):
                raise ValueError("offsets out of order")
            self.dev, self.ino, self.size = int(meta["dev"]), int(meta["ino"]), size
            self.mtime_ns, self.tail, self.dialect = int(meta["mtime_ns"]), str(meta["tail"]), str(meta["dialect"])
            self.uidv, self.next_uid = str(meta["uidv"]), int(meta["next_uid"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("mbox index %s is damaged (%s), rebuilding it", self.path, exc)
            return
        self.entries = list(map(Entry, starts, bodies, ends, nexts, sizes, digests, repeat(None)))
        self.uids = uids
        self.loaded = True

    def new_uid(self) -> str:
        uid = f"{self.uidv}.{self.next_uid}"
        self.next_uid += 1
        return uid

    def save(self) -> None:
        """Atomic replace. A failure is logged: the next login is slower and may renumber UIDLs."""
        es = self.entries
        meta = {"dev": self.dev, "ino": self.ino, "size": self.size, "mtime_ns": self.mtime_ns, "tail": self.tail,
                "dialect": self.dialect, "uidv": self.uidv, "next_uid": self.next_uid}  # fmt: skip
        text = "\n".join((
            MAGIC, json.dumps(meta, separators=(",", ":")),
            " ".join(str(e.start) for e in es), " ".join(str(e.body) for e in es),
            " ".join(str(e.end) for e in es), " ".join(str(e.size) for e in es),
            " ".join(e.digest for e in es), " ".join(self.uids), "",
        ))  # fmt: skip
        replace_text(self.path, text, "mbox index", durable=True)
