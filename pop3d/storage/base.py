"""The maildrop interface every storage driver implements (pop3d.storage.maildir, pop3d.storage.mbox).

The seam is Twisted-like (list, read, delete-at-sync) but asynchronous and explicit about locking:

    drop = storage.maildrop(user)       # no I/O yet
    await drop.open()                   # take the exclusive POP3 lock, then snapshot the message list
    drop.messages                       # fixed list for the whole session: numbering never changes
    drop.read_small(i) / drop.chunks(i) # stored octets; pop3d.wire turns them into the network form
    await drop.commit(deleted, seen)    # UPDATE state only (RFC 1939 §6)
    await drop.close()                  # always; releases the lock, deletes nothing by itself

Sizes in `MessageInfo.size` are network-form octets (pop3d.wire.network_size), the value LIST advertises.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import ClassVar

from pop3d.auth.base import User

#: Messages at most this large are read with one direct read on the event loop; larger ones stream
#: through a thread in chunks (docs/DESIGN.md performance rules 2 and 3).
SMALL_MESSAGE = 128 * 1024
CHUNK = 256 * 1024


class StorageError(Exception):
    """The maildrop cannot be used. `code` is the RFC 2449/3206 response code to answer with."""

    code = "SYS/TEMP"


class TemporaryError(StorageError):
    code = "SYS/TEMP"  # RFC 3206 §4: try again later (I/O error, lock timeout, changed underneath)


class PermanentError(StorageError):
    code = "SYS/PERM"  # RFC 3206 §4: will not go away by retrying (bad path, permissions, corrupt)


class InUse(StorageError):
    code = "IN-USE"  # RFC 2449 §8.1.1: another session holds the maildrop lock


class MessageGone(StorageError):
    """One message vanished under the session (deleted or moved by another program)."""

    code = "SYS/TEMP"


class MessageUnreadable(PermanentError):
    """One message is refused for the rest of the session: not a regular file, someone else's file, or
    its size disagrees with the size LIST announced (a `,W=` field, a cache entry, an index)."""


class ReadLater(Exception):
    """`read_small` would do more work on the event loop than the driver allows there (a Maildir message
    renamed by another program, to be found again in a huge directory): the session awaits `read` instead,
    which the driver runs off the loop. Not a failure."""


@dataclass(slots=True)
class MessageInfo:
    """One message of the session snapshot. `key` is the driver's own handle (file name, offset...)."""

    size: int
    uid: str
    key: str


class Maildrop(abc.ABC):
    """One user's maildrop for one session."""

    messages: list[MessageInfo]
    #: called on the event loop when the driver loses the maildrop lock under an open session (a database
    #: connection gone): the session must end, since another may now hold the lock. None: nobody to tell.
    lock_lost_hook: Callable[[], None] | None = None
    #: True for drivers whose small reads wait on the network (a database): the session then awaits `read`
    #: instead of calling `read_small` on the loop
    async_reads: ClassVar[bool] = False

    @abc.abstractmethod
    async def open(self) -> None:
        """Lock exclusively (raise InUse if held elsewhere) and snapshot the messages."""

    @abc.abstractmethod
    def read_small(self, index: int) -> bytes:
        """Stored octets of a message of at most SMALL_MESSAGE network octets, read directly."""

    async def read(self, index: int) -> bytes:
        """Stored octets of a message of at most SMALL_MESSAGE network octets; what the session awaits when
        `async_reads` is set (this default reads directly)."""
        return self.read_small(index)

    @abc.abstractmethod
    def chunks(self, index: int, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """Stored octets of any message, in chunks, without blocking the event loop."""

    @abc.abstractmethod
    async def commit(self, deleted: set[int], seen: set[int]) -> None:
        """UPDATE state: remove `deleted`, mark `seen` as read where the format has flags.

        Raise StorageError if some deletion could not be done; what was done stays done.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the lock. Idempotent; called on every session end, QUIT or not."""


class Storage(abc.ABC):
    """Factory for maildrops; one per server, built from the `[storage]` configuration."""

    #: True when none of its coroutines needs to run as a Task of its own (no asyncio.timeout or wait_for, which
    #: ask for the current task): the session may then run them at once (pop3d.pop3.eager), and most logins
    #: end without ever waiting. False is the safe default; PostgreSQL's drivers qualify by connecting in Tasks.
    task_free: ClassVar[bool] = False

    @abc.abstractmethod
    def maildrop(self, user: User) -> Maildrop:
        """The maildrop of `user`, not opened yet (no I/O). Does not raise: a user who cannot have one
        (a name or home that would leave the location template) gets a RefusedMaildrop, whose open()
        raises the PermanentError, so the login fails with one `[SYS/PERM]` line like any other refusal."""

    async def deliver(self, user: User, message: bytes) -> None:
        """Store one new message for `user` (LMTP, RFC 2033) and return only once it is durable.

        `message` is the exact octets to keep (the driver's own envelope, such as mbox's From_ line, is its
        business). A delivery never waits for an open POP3 session: the message shows in the next one, never
        inside a session's fixed numbering (RFC 1939 §4). Raise TemporaryError when the store cannot take it
        now (the MTA retries: 451 4.3.0) and PermanentError when it never will.
        """
        raise PermanentError(f"{type(self).__name__} cannot deliver")

    async def recover_interrupted(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Settle whatever a crash left half done (mbox: interrupted commits), so it does not wait for the
        owner's next login. The server runs it once, in the background, after it starts listening."""


class RefusedMaildrop(Maildrop):
    """The maildrop of a user who cannot have one: open() raises `error` (a PermanentError)."""

    def __init__(self, error: PermanentError) -> None:
        self.error = error
        self.messages = []

    async def open(self) -> None:
        raise self.error

    def read_small(self, index: int) -> bytes:
        raise self.error

    async def chunks(self, index: int, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        for _ in ():  # an async generator that yields nothing
            yield b""
        raise self.error

    async def commit(self, deleted: set[int], seen: set[int]) -> None:
        raise self.error

    async def close(self) -> None:
        return None
