"""Crash-safe removal of messages from an mbox spool, in place, with an undo journal.

Why in place and not "write a new file and rename it over": MTAs open the spool by path and then wait for
its fcntl lock (Postfix with `mailbox_delivery_lock = fcntl`, procmail, mail readers). After a rename, such
a writer would get the lock on the *old*, unlinked inode and append a message nobody will ever read. In
place, the inode, its owner, group and mode (0660 user:mail) never change.

The commit, under the spool's write lock (every step is fsynced before the next):

1. the journal `USER.pop3d-journal` is written: a JSON header (device, inode, `x` the first changed
   offset, `old_size`, `new_end`) and a copy of the old bytes [x, old_size); written to an exclusive
   temporary file (pop3d.storage.atomic: mode 0600, it is a copy of mail) and renamed, so it exists only
   when complete;
2. the kept messages (and whatever the MTA appended after the session's snapshot) are moved down to `x`;
3. the spool is truncated to `new_end`; 4. the journal is removed.

Recovery (`recover`, under the write lock, at server start via MboxStorage.recover_interrupted and at every
open of the spool): no journal means nothing to do.
With one, the spool was old (before 2), half-moved (during 2) or new (after 3), plus anything an MTA
appended since the crash. Before the truncation the file never got shorter than `old_size`, and its bytes
[new_end, old_size) were still the old ones; so: size < old_size, or those bytes differ from the journal's,
means the truncation happened (the commit is complete, appended mail sits after new_end); otherwise the old
bytes are written back at x (mail appended after old_size is untouched). Either way the spool is the old or
the new content plus every appended message, never truncated or doubled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence

from pop3d.storage.atomic import create_temp, install
from pop3d.storage.base import TemporaryError
from pop3d.storage.safefile import Owner, open_regular

log = logging.getLogger(__name__)

MAGIC = "pop3d-mbox-journal 1"
BLOCK = 4 * 1024 * 1024
_MAX_HEADER = 4096  # the JSON header line is ~150 octets; a longer first line is not a journal


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _checkpoint(phase: str) -> None:
    """No-op hook between commit steps; crash tests replace it to kill the process at a given step."""


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(fd: int, src: int, length: int, dst: int) -> None:
    """Move `length` octets from `src` to `dst <= src` inside one file, block by block (safe when overlapping
    because every block is read before anything at or after it is written)."""
    if src == dst:
        return
    done = 0
    while done < length:
        data = os.pread(fd, min(BLOCK, length - done), src + done)
        if not data:
            raise TemporaryError("spool shorter than expected during commit")
        os.pwrite(fd, data, dst + done)
        done += len(data)


def rewrite(fd: int, journal: str, keep: Sequence[tuple[int, int]], x: int, old_size: int) -> int:
    """Replace [x, old_size) of the spool by the ranges `keep` (ascending, within [x, old_size)), crash-safely.

    Returns the new size. Raises OSError/TemporaryError before step 2 with the spool untouched.
    """
    st = os.fstat(fd)
    new_end = x + sum(b - a for a, b in keep)
    header = {"magic": MAGIC, "dev": st.st_dev, "ino": st.st_ino, "x": x, "old_size": old_size, "new_end": new_end}
    jfd, tmp = create_temp(journal)
    try:
        try:
            _write_all(jfd, json.dumps(header).encode() + b"\n")
            pos = x
            while pos < old_size:
                data = os.pread(fd, min(BLOCK, old_size - pos), pos)
                if not data:
                    raise TemporaryError("spool shorter than expected during commit")
                _write_all(jfd, data)
                pos += len(data)
        except BaseException:
            os.close(jfd)
            raise
        install(jfd, tmp, journal, durable=True)
    except BaseException:  # e.g. ENOSPC: the spool is untouched; do not leave a large partial journal
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(journal)
    _checkpoint("journal")
    dst = x
    for a, b in keep:
        _copy(fd, a, b - a, dst)
        dst += b - a
        _checkpoint("moving")
    os.fsync(fd)
    _checkpoint("moved")
    os.ftruncate(fd, new_end)
    os.fsync(fd)
    _checkpoint("truncated")
    os.unlink(journal)
    _fsync_dir(journal)
    return new_end


def recover(fd: int, journal: str, owner: Owner | None = None) -> str | None:
    """Finish or undo an interrupted rewrite of the spool open as `fd`. Returns what was done, or None.

    The journal is read like any file beside a maildrop (pop3d.storage.safefile: no link, no FIFO, pop3d's
    or `owner`'s); one that is not, or does not parse, is left in place and the spool is not touched.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal + ".tmp")  # an incomplete journal of an older pop3d: the spool was not touched yet
    try:
        jfd, jst = open_regular(journal)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("mbox journal %s refused (%s); left in place, spool not changed", journal, exc.strerror)
        raise TemporaryError("unusable commit journal") from exc
    with open(jfd, "rb") as j:
        try:
            if owner is not None:
                owner.check_ours(jst, journal)
            first = os.pread(jfd, _MAX_HEADER, 0)
            nl = first.find(b"\n")
            if nl < 0:
                raise ValueError("no header line")
            header = json.loads(first[:nl])
            if header.get("magic") != MAGIC:
                raise ValueError("not a pop3d journal")
            x, old_size, new_end = int(header["x"]), int(header["old_size"]), int(header["new_end"])
            data_at = nl + 1
            if not 0 <= x <= new_end <= old_size or jst.st_size != data_at + old_size - x:
                raise ValueError("journal length does not match its header")
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.error("mbox journal %s unreadable (%s); left in place, spool not changed", journal, exc)
            raise TemporaryError("unreadable commit journal") from exc
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (header["dev"], header["ino"]):
            outcome = "journal belongs to a replaced spool; discarded"
        elif st.st_size < old_size:
            outcome = "commit had completed"
        else:
            j.seek(data_at + (new_end - x))
            pos, same = new_end, True
            while pos < old_size and same:
                n = min(BLOCK, old_size - pos)
                same = j.read(n) == os.pread(fd, n, pos)
                pos += n
            if not same:
                outcome = "commit had completed (mail appended since)"
            else:
                j.seek(data_at)
                pos = x
                while pos < old_size:
                    data = j.read(min(BLOCK, old_size - pos))
                    if not data:
                        raise TemporaryError("commit journal truncated")
                    os.pwrite(fd, data, pos)
                    pos += len(data)
                os.fsync(fd)
                outcome = "interrupted commit undone"
    os.unlink(journal)
    _fsync_dir(journal)
    log.warning("mbox journal %s: %s", journal, outcome)
    return outcome
