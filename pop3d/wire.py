"""Pure byte transforms between stored messages and the POP3 wire (RFC 1939 §3).

Stored mail may end lines in LF (Maildir, mbox) or CRLF; the wire always carries CRLF. The advertised size
of a message (LIST, STAT, RETR's +OK) is the number of octets of its *network form*: every line ending CRLF,
stored CRLF not doubled, bare CR kept as it is, and a CRLF added after a last line that had none. Dot-stuffing
(a `.` doubled at the start of a line) is applied on top and does not count in the size.

Everything here works on whole messages or on a stream of chunks with state carried across chunk boundaries
(a CRLF split over two chunks, a `.` starting a chunk that starts a line), and both give the same octets.
"""

from __future__ import annotations

from collections.abc import Iterable

TERMINATOR = b".\r\n"


def network_size(raw: bytes) -> int:
    """Octets of the network form of `raw`, computed without building it.

    Counting the two-octet CRLF costs about three times a count of LF, and one memchr for CR shows in a
    fraction of that that there is none (the usual LF-only message)."""
    if not raw:
        return 0
    size = len(raw) + raw.count(b"\n")
    if b"\r" in raw:
        size -= raw.count(b"\r\n")
    return size if raw[-1] == 0x0A else size + 2


class NetworkCount:
    """`network_size` of the concatenation of the pieces fed, with a CRLF split between two pieces counted
    once: a message read in slices is measured without holding it whole."""

    __slots__ = ("_crlf", "_last", "_lf", "_prev_cr", "_total")

    def __init__(self) -> None:
        self._total = self._lf = self._crlf = 0
        self._prev_cr = False
        self._last = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self._total += len(data)
        self._lf += data.count(b"\n")
        self._crlf += data.count(b"\r\n")
        if self._prev_cr and data[0] == 0x0A:
            self._crlf += 1
        self._prev_cr = data[-1] == 0x0D
        self._last = data[-1]

    @property
    def size(self) -> int:
        if not self._total:
            return 0
        return self._total + self._lf - self._crlf + (0 if self._last == 0x0A else 2)


def plausible(raw_size: int, size: int) -> bool:
    """Whether `raw_size` stored octets can have the network size `size`: CRLF and the final line end add
    at most raw_size + 2 octets, and nothing is ever removed."""
    return raw_size <= size <= 2 * raw_size + 2 if raw_size else size == 0


def to_network(raw: bytes) -> bytes:
    """CRLF-normalise a whole message (no dot-stuffing)."""
    if not raw:
        return b""
    net = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not net.endswith(b"\r\n"):
        net += b"\r\n"
    return net


def unstuff(stuffed: bytes) -> bytes:
    """Inverse of dot-stuffing for a body without its terminator (what a client does, RFC 1939 §3)."""
    if stuffed.startswith(b".."):
        stuffed = stuffed[1:]
    return stuffed.replace(b"\r\n..", b"\r\n.")


class Encoder:
    """Streaming network-form + dot-stuffing encoder for one message body.

    `feed(chunk)` returns wire octets for stored octets; `finish()` returns the tail: a CRLF if the last line
    had none, then the `.` terminator line. `size` counts network-form octets (what LIST advertised), stuffing
    excluded, so a sender can check the promise it made.

    `max_lines` turns it into the TOP cutter (RFC 1939 §7): headers, the blank line, then at most that many
    body lines; `done` says when no further input is wanted.
    """

    __slots__ = ("_bol", "_cr", "_header", "_last2", "_lines_left", "done", "size")

    def __init__(self, max_lines: int | None = None) -> None:
        self._cr = False  # a stored chunk ended in CR whose LF may start the next chunk
        self._bol = True  # next output octet starts a line
        self._last2 = b""  # last two network octets emitted, to find the end of the headers across chunks
        self.size = 0
        self._header = max_lines is not None
        self._lines_left = -1 if max_lines is None else max_lines
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
            if not chunk:
                return b""
        net = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._header or self._lines_left >= 0:
            net = self._cut(net)
        return self._emit(net)

    def _emit(self, net: bytes) -> bytes:
        if not net:
            return b""
        self.size += len(net)
        out = net.replace(b"\r\n.", b"\r\n..")
        if self._bol and net[:1] == b".":
            out = b"." + out
        self._bol = net.endswith(b"\r\n")
        self._last2 = (self._last2 + net[-2:])[-2:]
        return out

    def _cut(self, net: bytes) -> bytes:
        """Keep the header block and at most `_lines_left` body lines of this network-form piece."""
        pos = 0
        if self._header:
            # end of headers: the first empty line, i.e. CRLF at start of message or CRLFCRLF
            if self.size == 0 and net.startswith(b"\r\n"):
                pos = 2
                self._header = False
            else:
                seam = self._last2 + net
                found = seam.find(b"\r\n\r\n")
                if found == -1:
                    return net
                pos = found + 4 - len(self._last2)
                self._header = False
        while self._lines_left > 0:
            nl = net.find(b"\r\n", pos)
            if nl == -1:
                return net
            pos = nl + 2
            self._lines_left -= 1
        self.done = True
        return net[:pos]

    def finish(self) -> bytes:
        """The tail of the body: pending CR, missing final CRLF, then the terminator."""
        tail = b""
        if self._cr and not self.done:
            self._cr = False
            tail = self._emit(b"\r")
        if self.size and not self._bol:
            tail += self._emit(b"\r\n")
        return tail + TERMINATOR


def encode(raw: bytes) -> bytes:
    """Whole-message RETR body: network form, dot-stuffed, terminated."""
    enc = Encoder()
    return enc.feed(raw) + enc.finish()


def encode_chunks(chunks: Iterable[bytes], max_lines: int | None = None) -> bytes:
    """Encode a chunked message in one go (tests and small messages); same octets as `encode`."""
    enc = Encoder(max_lines)
    out = [enc.feed(c) for c in chunks]
    out.append(enc.finish())
    return b"".join(out)


def top(raw: bytes, lines: int) -> bytes:
    """Whole-message TOP body: headers, blank line, `lines` body lines; stuffed and terminated."""
    return encode_chunks([raw], max_lines=lines)


class LineBuffer:
    """Splits a byte stream into lines, enforcing a maximum line length (POP3 commands, poppassd).

    A line longer than `max_line` octets (CRLF included) is dropped as it streams in, so memory stays
    bounded whatever the peer sends; when its end finally arrives, `None` is yielded in its place so the
    caller can answer `-ERR`. Bare LF is accepted as a line end (lenient, as most servers are).
    """

    __slots__ = ("_buf", "_skipping", "max_line")

    def __init__(self, max_line: int) -> None:
        self._buf = b""
        self._skipping = False
        self.max_line = max_line

    @property
    def pending(self) -> int:
        """Octets of an incomplete line held in memory."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | None]:
        """Return complete lines (without line end) found in `data`; `None` marks an over-long line."""
        out: list[bytes | None] = []
        start = 0
        # Only the new bytes are searched for LF: the held part is known to contain none.
        nl = data.find(b"\n")
        while nl != -1:
            piece = data[start:nl]
            if self._skipping:
                self._skipping = False
                self._buf = b""
                out.append(None)
            else:
                line = self._buf + piece if self._buf else piece
                self._buf = b""
                # limit counts CRLF: content may be at most max_line - 2 octets (a bare LF line gets the same)
                content = line[:-1] if line.endswith(b"\r") else line
                out.append(content if len(content) + 2 <= self.max_line else None)
            start = nl + 1
            nl = data.find(b"\n", start)
        rest = data[start:]
        if rest and not self._skipping:
            if len(self._buf) + len(rest) > self.max_line:
                self._buf = b""
                self._skipping = True
            else:
                self._buf += rest
        return out


def headers_ascii(data: bytes) -> bool:
    """Whether the header section of a message (up to its first empty line; all of `data` when none is in
    it) is ASCII: an RFC 6532 message with UTF-8 header fields needs RFC 6856 UTF-8 mode to be sent as is."""
    if data.isascii():  # most messages: no need to find where the headers end
        return True
    if data[:1] == b"\n" or data[:2] == b"\r\n":  # an empty first line: no header section at all
        return True
    end = len(data)
    for blank in (b"\n\n", b"\n\r\n"):
        at = data.find(blank)
        if 0 <= at < end:
            end = at
    return data[:end].isascii()
