"""The mbox file format: finding messages, their POP3 sizes, and `>From ` unquoting. Pure; no locking.

Rules (the mbox family as documented in qmail's mbox(5) and RFC 4155):

* A message starts at a separator line, a line beginning with `From ` at the start of the file or after
  an LF. The separator is not part of the message. Writers quote body lines that would look like one
  (`From ` -> `>From `), so every `From ` at the start of a line is a separator.
* One empty line (LF or CRLF) just before the next separator, or at the end of the file, is the writer's
  padding and not part of the message.
* Dialects (`storage.mbox_dialect`): *mboxrd* removes one `>` from every line matching `>+From ` (the
  reversible quoting); *mboxo* delivers lines as stored. LIST sizes are computed on the delivered form, so
  they agree with RETR in both.
* A file that does not start with a separator is not an mbox: `NotMbox`, and nothing is guessed.

`scan` reads a byte range in large blocks through a caller-given `pread`, so a 1 GiB spool costs one
pass with C-level counting and a few Python operations per message, never the whole file in memory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

BLOCK = 4 * 1024 * 1024
HEAD = 32 * 1024  # octets at the start of a message's range that its digest and X-UIDL lookup cover
_QUOTED = re.compile(rb"^>+From ", re.M)
_QUOTED_ONE = re.compile(rb"^>(>*From )", re.M)
_XUIDL = re.compile(rb"^X-UIDL:[ \t]*([\x21-\x7e]{1,70})[ \t]*\r?$", re.M | re.I)
_PREFIX_OF_QUOTED = re.compile(rb">+(?:F(?:r(?:o(?:m)?)?)?)?")


class NotMbox(ValueError):
    """The byte range does not start with a `From ` separator line."""


@dataclass(slots=True)
class Entry:
    """One message: `start` of its separator line, `body`..`end` its content (padding line excluded),
    `next` where the next separator (or the end of the scanned range) begins. `size` is in network octets
    of the delivered (unquoted) form; `digest` identifies the stored range [start, next)."""

    start: int
    body: int
    end: int
    next: int
    size: int
    digest: str
    xuidl: str | None


def digest(head: bytes, length: int) -> str:
    """Identity of a message range from its first HEAD octets and its length (cheap to re-check)."""
    return hashlib.blake2b(head[:HEAD] + length.to_bytes(8, "big"), digest_size=8).hexdigest()


def find_xuidl(head: bytes) -> str | None:
    """The `X-UIDL:` value in the header block of a range that starts with its separator line."""
    if b"IDL:" not in head and b"idl:" not in head:  # cheap pre-check: X-UIDL, x-uidl, X-Uidl
        return None
    m = _XUIDL.search(head)
    if m is None:
        return None
    nl = head.find(b"\n")
    end = len(head)
    for blank in (b"\n\n", b"\n\r\n"):
        i = head.find(blank, nl)
        if 0 <= i < end:
            end = i + 1
    while m is not None and m.start() <= nl:  # on the separator line itself
        m = _XUIDL.search(head, nl + 1)
    return m.group(1).decode("ascii") if m is not None and m.start() < end else None


class _Acc:
    """Counts for the message being scanned, fed segment by segment."""

    __slots__ = ("body", "crlf", "head", "lf", "prev_cr", "quoted", "start", "tail", "total")

    def __init__(self, start: int, body: int, sep_line: bytes) -> None:
        self.start, self.body = start, body
        self.total = self.lf = self.crlf = self.quoted = 0
        self.prev_cr = False
        self.tail = b"\n"  # the separator line's LF precedes the content
        self.head = sep_line

    def feed(self, seg: bytes, bol: bool, mboxrd: bool) -> None:
        self.total += len(seg)
        self.lf += seg.count(b"\n")
        self.crlf += seg.count(b"\r\n") + (1 if self.prev_cr and seg[:1] == b"\n" else 0)
        self.prev_cr = seg[-1:] == b"\r"
        if mboxrd:
            self.quoted += _count_quoted(seg, 0, len(seg)) - (1 if not bol and _QUOTED.match(seg) else 0)
        self.tail = (self.tail + seg[-3:])[-3:]
        if len(self.head) < HEAD:
            self.head += seg[: HEAD - len(self.head)]

    def finish(self, next_: int) -> Entry:
        total, lf, crlf = self.total, self.lf, self.crlf
        tail = self.tail
        if total >= 1 and tail.endswith(b"\n\n"):
            total, lf = total - 1, lf - 1
        elif total >= 2 and tail.endswith(b"\n\r\n"):
            total, lf, crlf = total - 2, lf - 1, crlf - 1
        end = self.body + total
        if total == 0:
            size = 0
        else:
            last_lf = lf > 0 and (total < self.total or tail.endswith(b"\n"))
            size = total - self.quoted + lf - crlf + (0 if last_lf else 2)
        head = self.head
        return Entry(self.start, self.body, end, next_, size, digest(head, next_ - self.start), find_xuidl(head))


def _whole(data: bytes, s: int, t: int, base: int, mboxrd: bool) -> Entry:
    """A message whose separator and content [s, t) lie in one block: the common case, no _Acc object."""
    eol = data.find(b"\n", s, t)
    body = eol + 1
    if eol < 0 or body == t:
        return Entry(base + s, base + t, base + t, base + t, 0, digest(data[s:t], t - s), None)
    total = t - body
    lf = data.count(b"\n", body, t)
    crlf = data.count(b"\r\n", body, t)
    if data[t - 1] == 0x0A and data[t - 2] == 0x0A:  # index t-2 >= eol: the padding line is LF
        total, lf = total - 1, lf - 1
    elif total >= 2 and data.startswith(b"\n\r\n", t - 3):
        total, lf, crlf = total - 2, lf - 1, crlf - 1
    if total == 0:
        size = 0
    else:
        quoted = _count_quoted(data, body, body + total) if mboxrd else 0
        size = total - quoted + lf - crlf + (0 if data[body + total - 1] == 0x0A else 2)
    head = data[s : min(t, s + HEAD)]
    return Entry(base + s, base + body, base + body + total, base + t, size, digest(head, t - s), find_xuidl(head))


def _count_quoted(data: bytes, start: int, end: int) -> int:
    """Lines of data[start:end] (start at a line start) matching `>+From `; bytes.find, no regex pass."""
    n = 0
    p = data.find(b">From ", start, end)
    while p >= 0:
        q = p
        while q > start and data[q - 1] == 0x3E:  # more '>' before it
            q -= 1
        if q == start or data[q - 1] == 0x0A:
            n += 1
        p = data.find(b">From ", p + 6, end)
    return n


def _separators(data: bytes, bol: bool) -> list[int]:
    """Offsets of `From ` at line starts (offset 0 only if the block starts a line); memchr-speed finds."""
    seps = [0] if bol and data.startswith(b"From ") else []
    p = data.find(b"\nFrom ")
    while p >= 0:
        seps.append(p + 1)
        p = data.find(b"\nFrom ", p + 6)
    return seps


def scan(pread: Callable[[int, int], bytes], start: int, stop: int, mboxrd: bool, block: int = BLOCK) -> list[Entry]:
    """Messages in [start, stop) of a file read with `pread(offset, length)`; `start` must be a separator.

    Blocks are cut after their last LF, so a line (and a separator) never spans two blocks unless it is
    longer than a block. Messages inside one block are measured with C-level counts on the block itself;
    only a message that spans blocks is accumulated piecewise (_Acc). Raises NotMbox if the range does not
    start with `From `, EOFError if the file is shorter than `stop`.
    """
    entries: list[Entry] = []
    append = entries.append
    cur: _Acc | None = None
    pos, bol = start, True
    while pos < stop:
        data = pread(pos, min(block, stop - pos))
        if not data:
            raise EOFError(f"file ends at {pos}, expected {stop}")
        if pos + len(data) < stop:
            nl = data.rfind(b"\n")
            if nl >= 0:
                data = data[: nl + 1]
        seps = _separators(data, bol)
        i = 0
        if seps:
            s = seps[0]
            if cur is None:
                if pos + s != start:
                    raise NotMbox(f"no From line at offset {start}")
            else:
                if s > 0:
                    cur.feed(data[:s], bol, mboxrd)
                append(cur.finish(pos + s))
                cur = None
            for k in range(len(seps) - 1):  # every message that ends inside this block
                append(_whole(data, seps[k], seps[k + 1], pos, mboxrd))
            s = seps[-1]
            eol = data.find(b"\n", s)
            if eol < 0:
                if pos + len(data) < stop:
                    raise NotMbox(f"separator line at offset {pos + s} longer than {block} octets")
                eol = len(data) - 1
            cur = _Acc(pos + s, pos + eol + 1, data[s : eol + 1])
            i = eol + 1
        elif cur is None:
            raise NotMbox(f"no From line at offset {start}")
        if i < len(data):
            cur.feed(data[i:], bol or i > 0, mboxrd)
        bol = data.endswith(b"\n")
        pos += len(data)
    if cur is not None:
        append(cur.finish(stop))
    return entries


def unquote(data: bytes) -> bytes:
    """mboxrd: one `>` less on every `>+From ` line of a whole message."""
    return _QUOTED_ONE.sub(rb"\1", data) if b"From " in data else data


class Unquoter:
    """Streaming `unquote`: same output for any chunking. Holds back at most one partial line start."""

    __slots__ = ("_bol", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._bol = True

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data
        bol = self._bol or bool(self._pending)
        self._pending = b""
        nl = buf.rfind(b"\n")
        tail_at = nl + 1
        if (tail_at > 0 or bol) and _PREFIX_OF_QUOTED.fullmatch(buf, tail_at):
            self._pending = buf[tail_at:]  # may still become `>From `: decide when more arrives
            buf = buf[:tail_at]
        if not buf:
            return b""
        if bol:
            out = unquote(buf)
        else:
            first = buf.find(b"\n") + 1  # the rest of a line begun earlier is never a line start
            out = buf if first == 0 else buf[:first] + unquote(buf[first:])
        self._bol = buf.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        out, self._pending = self._pending, b""
        return out
