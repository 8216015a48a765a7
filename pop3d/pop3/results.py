"""What a command handler returns: one small object per reply, telling the session everything it must do.

The session (pop3d.pop3.session) never reads flags back from the handler after a command; the returned
object says it all:

- `Reply(data, close, reason)`: bytes to send now; `close` ends the session after them (QUIT), `reason`
  is the logout line's reason when it does.
- `StartTLS(data)`: send the +OK, discard whatever the client pipelined after it, then run the handshake
  (RFC 2595 §4).
- `Stream(...)`: a big message body, read from storage in chunks and sent with flow control.
- `Challenge(data, mechanism)`: a SASL `+ ` continuation; the next client line is a response for
  `mechanism`, not a command (RFC 5034 §4).
- `Pending(awaitable)`: the reply needs I/O (password check, storage); the session stops reading until
  the awaitable yields one of the results above (never another Pending or a StartTLS).

Why plain slotted classes and not frozen dataclasses: a Reply is built for every pipelined command, and a
frozen dataclass costs about three times as much to construct (docs/DESIGN.md performance rules 1 and 5).
`Final` makes mypy refuse any assignment after construction; frequent constant replies are built once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any, Final

from pop3d import wire

if TYPE_CHECKING:
    from pop3d.auth.sasl import Mechanism


class Reply:
    """A complete reply, sent at once (in the same write as its pipelined neighbours)."""

    __slots__ = ("close", "data", "reason")

    def __init__(self, data: bytes, close: bool = False, reason: str | None = None) -> None:
        self.data: Final = data
        self.close: Final = close
        self.reason: Final = reason

    def __repr__(self) -> str:
        return f"Reply({self.data!r}, close={self.close}, reason={self.reason!r})"


class StartTLS:
    """STLS accepted: `data` (the +OK) goes out, then nothing more is read in clear (RFC 2595 §4)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: Final = data


class Stream:
    """A multi-line reply whose body is streamed from storage: `header` goes out with the first chunk."""

    __slots__ = ("chunks", "encoder", "header", "index", "lines")

    def __init__(
        self, header: bytes, chunks: AsyncIterator[bytes], encoder: wire.Encoder, index: int, lines: int | None
    ) -> None:
        self.header: Final = header
        self.chunks: Final = chunks
        self.encoder: Final = encoder
        self.index: Final = index  # 0-based message index, for the handler's bookkeeping once sent
        self.lines: Final = lines  # None for RETR, the TOP line count otherwise


class Challenge:
    """A SASL continuation line (`data` is the whole `+ base64` line); the exchange goes on with `mechanism`."""

    __slots__ = ("data", "mechanism")

    def __init__(self, data: bytes, mechanism: Mechanism) -> None:
        self.data: Final = data
        self.mechanism: Final = mechanism


#: What a Pending resolves to.
Resolved = Reply | Stream | Challenge


class Pending:
    """A reply that needs I/O first; the session keeps every later pipelined line waiting behind it."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Coroutine[Any, Any, Resolved]) -> None:
        """`awaitable`: a coroutine, which the session runs at once and hands to a Task only if it has to
        wait (pop3d.pop3.eager)."""
        self.awaitable: Final = awaitable


Result = Reply | StartTLS | Stream | Challenge | Pending
