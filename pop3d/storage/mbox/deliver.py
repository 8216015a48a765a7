"""Delivery into an mbox spool, as an MTA's local delivery writes it (qmail's mbox(5), RFC 4155).

* Under the spool's write locks (`storage.mbox_lock_write`: dotlock, fcntl, flock as configured), the very
  locks MTAs and mail readers honour, waited for up to `storage.mbox_lock_timeout` without blocking the
  loop. Not the POP3 session lock (drop.py): a delivery never waits for a session to end, and the session
  keeps its snapshot; the appended message shows at the next login (index.py scans only the new tail).
* Appended as `From SENDER DATE` (the envelope sender from a leading `Return-Path:`, else MAILER-DAEMON;
  asctime's date), the message with body lines that would read as a separator quoted per
  `storage.mbox_dialect` (mboxrd: one more `>` on every `>*From ` line, which the reader takes off again;
  mboxo: `From ` -> `>From `, read back as it stands), a final LF if it had none, and the padding blank line.
  A spool whose last message lacks its padding line gets one first, so the new separator starts a line.
* Written with O_APPEND, then fsynced; a failure part-way truncates the spool back to its length before,
  so no half message is left for readers. Only after the fsync does delivery return.
* The spool is opened without following a link or blocking, must be a regular file of the owner
  (safefile.Owner), and is created 0600 (the user's) when missing; a non-empty file that is not an mbox is
  not written to. Every failure is temporary (pop3d.storage.delivery): the MTA keeps the message.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from pop3d.storage.delivery import stored_form, temporary, write_all
from pop3d.storage.mbox.spool_lock import SpoolLock
from pop3d.storage.offload import ThreadHop
from pop3d.storage.safefile import Owner, Refused, open_regular

if TYPE_CHECKING:
    from pop3d.config import SpoolLockMethod

log = logging.getLogger(__name__)

_OPEN = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_RETURN_PATH = re.compile(rb"\AReturn-Path:[ \t]*<([^>\r\n]*)>", re.I)
_SENDER_JUNK = re.compile(r"[^\x21-\x7e]")
_MBOXRD = re.compile(rb"^(>*From )", re.M)
_MBOXO = re.compile(rb"^From ", re.M)


def envelope_sender(message: bytes) -> str:
    """The sender for the separator line: a leading `Return-Path: <addr>`'s address, else MAILER-DAEMON (the
    null sender of a bounce, too). Nothing outside 0x21-0x7E survives: the line stays one word."""
    m = _RETURN_PATH.match(message)
    sender = m.group(1).decode("ascii", "replace") if m else ""
    return _SENDER_JUNK.sub("_", sender) or "MAILER-DAEMON"


def quote(data: bytes, mboxrd: bool) -> bytes:
    """Body lines that would read as separators, quoted for the dialect (see the module docstring)."""
    if b"From " not in data:
        return data
    return _MBOXRD.sub(rb">\1", data) if mboxrd else _MBOXO.sub(b">From ", data)


def entry(message: bytes, mboxrd: bool, now: float | None = None) -> bytes:
    """The octets appended for `message`: separator line, quoted LF message, final LF, padding line."""
    data = quote(stored_form(message), mboxrd)
    when = time.asctime(time.localtime(now))
    end = b"\n" if not data or data.endswith(b"\n") else b"\n\n"
    return b"From %s %s\n%s%s" % (envelope_sender(message).encode("ascii"), when.encode("ascii"), data, end)


def _open_spool(spool: str, uid: int | None, gid: int | None) -> int:
    """The spool's fd for appending, created 0600 and given to the user when missing; checked as a login does."""
    created = False
    try:
        fd, st = open_regular(spool, flags=_OPEN)
    except FileNotFoundError:
        fd = os.open(spool, _OPEN | os.O_CREAT | os.O_EXCL, 0o600)  # EEXIST: a race; the MTA retries
        st = os.fstat(fd)
        created = True
    try:
        owner = Owner.of(uid, gid, st)
        if created:
            owner.give(fd)
            st = os.fstat(fd)
        owner.check(st, f"spool {spool}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _append(fd: int, spool: str, record: bytes) -> None:
    """Under the write locks: padding if the last message lacks it, the record, fsync; undone on failure."""
    size = os.fstat(fd).st_size
    prefix = b""
    if size:
        if os.pread(fd, 5, 0) != b"From ":
            raise Refused(f"{spool} is not an mbox file")
        tail = os.pread(fd, 3, max(0, size - 3))
        if not (tail.endswith(b"\n\n") or tail.endswith(b"\n\r\n")):
            prefix = b"\n" if tail.endswith(b"\n") else b"\n\n"
    try:
        write_all(fd, prefix + record)
        os.fsync(fd)
    except BaseException:
        try:
            os.ftruncate(fd, size)  # no half message for readers
            os.fsync(fd)
        except OSError as exc:
            log.error("spool %s: a failed delivery could not be undone: %s", spool, exc)
        raise


async def deliver(spool: str, message: bytes, *, mboxrd: bool, methods: Sequence[SpoolLockMethod], lock_timeout: float,
                  stale: float, uid: int | None = None, gid: int | None = None) -> None:  # fmt: skip
    """Append `message` to `spool` under its write locks and return once it is on disk. TemporaryError else."""
    record = entry(message, mboxrd)
    hop = ThreadHop()
    try:
        fd = await hop.run(partial(_open_spool, spool, uid, gid))
    except Exception as exc:
        log.error("spool %s: delivery failed: %s", spool, exc)
        raise temporary(exc, f"spool {spool}") from exc
    lock = SpoolLock(spool, methods, write=True, timeout=lock_timeout, stale=stale)
    try:
        await lock.acquire(fd, hop)
        await hop.run(partial(_append, fd, spool, record))
    except Exception as exc:
        log.error("spool %s: delivery failed: %s", spool, exc)
        raise temporary(exc, f"spool {spool}") from exc
    finally:

        def done() -> None:
            lock.release()
            os.close(fd)

        hop.after(done)
