"""The network size of a message read in pieces, and the check that it is what LIST promised.

RFC 1939 §5/§7: LIST announces a size and RETR must send exactly that many octets of the message. A
maildrop's owner can change a message after the size was taken (or write a wrong `,W=` or cache entry),
so a read that finds another size refuses the message for the session, as Dovecot does with "Cached
message size larger/smaller than expected": the client gets `-ERR` (or, mid-stream, a cut connection
without the terminating dot), never a short or padded body.
"""

from __future__ import annotations


def network_size(raw: bytes) -> int:
    """pop3d.pop3.wire.network_size, faster on the usual LF-only message: counting the two-octet CRLF costs
    three times a count of LF, and a memchr for CR finds in a fraction of that that there is none."""
    if not raw:
        return 0
    size = len(raw) + raw.count(b"\n")
    if b"\r" in raw:
        size -= raw.count(b"\r\n")
    return size if raw[-1] == 0x0A else size + 2


class NetworkCount:
    """pop3d.pop3.wire.network_size of the concatenation of the pieces fed, with a CRLF split between two
    pieces counted once."""

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


__all__ = ["NetworkCount", "network_size", "plausible"]
