"""In-memory stand-ins for everything around a POP3 session, so the session and handlers run without sockets,
files, threads or real time.

- `FakeAuth`: users and passwords, the pop3d.auth.base.Authenticator interface; `gate` holds verify() back.
- `FakeStorage` / `FakeMaildrop`: in-memory maildrops with the pop3d.storage.base interface: one lock per
  user (InUse when taken), commits recorded and applied, errors injectable per operation.
- `FakeTransport`: records every write call separately, pause/resume_reading calls, close/abort, and models
  the write buffer (drain() it to drive pause_writing/resume_writing as asyncio transports do).
- `ClockLoop`: an event loop whose clock only moves when a test calls advance(); settle() runs every
  callback that is ready without ever waiting; start_tls() is a handshake the test finishes by hand.
- `Connection`: a Pop3Session wired to the above; `make_context()` builds the ServerContext.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from pop3d import wire
from pop3d.auth.base import Authenticator, Credentials, User
from pop3d.auth.floors import Floors
from pop3d.config import Settings, load_settings
from pop3d.pop3.context import ServerContext
from pop3d.pop3.protocol import CommandParser
from pop3d.pop3.session import Pop3Session
from pop3d.storage.base import CHUNK, InUse, Maildrop, MessageInfo

USERS = {"alice": "wonderland", "bob": "builder pass"}

_R = TypeVar("_R")


# ---- authentication ---------------------------------------------------------------------------------------


class FakeAuth(Authenticator):
    """`{name: password}` with PLAIN secrets (APOP, decoys and SASL lookups: the interface's defaults).

    While `gate` is set and not open, verify() and lookup() wait."""

    task_free = True  # like the passwd-file: the session runs its steps at once (pop3d.pop3.eager)

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = dict(USERS if users is None else users)
        self.gate: asyncio.Event | None = None
        self.calls: list[tuple[str, str]] = []  # ("verify" | "lookup", name)
        self._floors = Floors(cap=0.0)  # no time floors (pop3d.auth.floors): fake-clock loops never reach them

    async def _wait(self) -> None:
        if self.gate is not None:
            await self.gate.wait()

    async def lookup(self, name: str) -> Credentials | None:
        self.calls.append(("lookup", name))
        await self._wait()
        secret = self.users.get(name)
        return None if secret is None else Credentials(User(name), "PLAIN", secret)

    async def verify(self, name: str, password: str) -> User | None:
        self.calls.append(("verify", name))
        await self._wait()
        return User(name) if self.users.get(name) == password else None


# ---- storage ----------------------------------------------------------------------------------------------


@dataclass
class Commit:
    user: str
    deleted: set[int]
    seen: set[int]


@dataclass
class FakeStorage:
    """Maildrops by user name: lists of stored messages (bytes, LF line ends as on disk).

    `errors` maps an operation ("open", "read", "chunks", "commit") to the exception it raises next.
    While `commit_gate` (`open_gate`) is set and not open, commit() (open()) waits; `opening` counts the
    opens in progress and `most_opening` the most there ever were at once.
    """

    boxes: dict[str, list[bytes]] = field(default_factory=dict)
    #: like every driver of pop3d (pop3d.storage.base.Storage.task_free); set False for one that needs Tasks
    task_free: bool = True
    errors: dict[str, Exception] = field(default_factory=dict)
    locked: set[str] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)
    closes: int = 0
    commit_gate: asyncio.Event | None = None
    open_gate: asyncio.Event | None = None
    opening: int = 0
    most_opening: int = 0

    def maildrop(self, user: User) -> FakeMaildrop:
        return FakeMaildrop(self, user.name)

    def fail(self, operation: str) -> None:
        exc = self.errors.pop(operation, None)
        if exc is not None:
            raise exc


class FakeMaildrop(Maildrop):
    def __init__(self, storage: FakeStorage, user: str) -> None:
        self.storage = storage
        self.user = user
        self.messages = []
        self._locked = False

    async def open(self) -> None:
        s = self.storage
        if s.open_gate is not None:
            s.opening += 1
            s.most_opening = max(s.most_opening, s.opening)
            try:
                await s.open_gate.wait()
            finally:
                s.opening -= 1
        if self.user in s.locked:
            raise InUse(f"{self.user} is locked")
        s.fail("open")
        s.locked.add(self.user)
        self._locked = True
        box = s.boxes.setdefault(self.user, [])
        self.messages = [MessageInfo(wire.network_size(raw), f"uid{i}-{len(raw)}", str(i)) for i, raw in enumerate(box)]

    def _raw(self, index: int) -> bytes:
        return self.storage.boxes[self.user][int(self.messages[index].key)]

    def read_small(self, index: int) -> bytes:
        self.storage.fail("read")
        return self._raw(index)

    async def chunks(self, index: int, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        raw = self._raw(index)
        for start in range(0, len(raw), chunk_size):
            self.storage.fail("chunks")
            yield raw[start : start + chunk_size]

    async def commit(self, deleted: set[int], seen: set[int]) -> None:
        s = self.storage
        if s.commit_gate is not None:
            await s.commit_gate.wait()
        s.commits.append(Commit(self.user, set(deleted), set(seen)))
        s.fail("commit")
        keys = {int(self.messages[i].key) for i in deleted}
        s.boxes[self.user] = [raw for i, raw in enumerate(s.boxes[self.user]) if i not in keys]

    async def close(self) -> None:
        if self._locked:
            self._locked = False
            self.storage.locked.discard(self.user)
            self.storage.closes += 1


# ---- transport --------------------------------------------------------------------------------------------


class FakeTransport:
    """Records what a protocol does to its transport; models the write buffer and its high-water mark.

    By default the peer reads everything at once (the buffer stays empty, as when the socket takes each
    write). With `peer_reading = False`, written bytes stay in the buffer until the test calls drain();
    crossing the high-water mark calls protocol.pause_writing(), draining to the low one resume_writing(),
    as asyncio's transports do. `buffered` may also be set directly.
    """

    def __init__(
        self,
        protocol: asyncio.Protocol,
        loop: asyncio.AbstractEventLoop,
        peer: tuple[str, int] = ("127.0.0.1", 40000),
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.protocol = protocol
        self.loop = loop
        self.extra: dict[str, Any] = {"peername": peer, **(extra or {})}
        self.writes: list[bytes] = []
        self.reading_calls: list[str] = []  # "pause" / "resume", in order
        self.reading = True
        self.closed = False
        self.aborted = False
        self.buffered = 0
        self.peer_reading = True
        self.high = 64 * 1024
        self.low = 16 * 1024
        self.write_paused = False
        self._lost = False

    # what the protocol calls
    def write(self, data: bytes) -> None:
        assert not self.closed and not self.aborted, "write after close"
        self.writes.append(bytes(data))
        if self.peer_reading:
            return
        self.buffered += len(data)
        if not self.write_paused and self.buffered > self.high:
            self.write_paused = True
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high
        self.low = self.high // 4 if low is None else low

    def pause_reading(self) -> None:
        self.reading_calls.append("pause")
        self.reading = False

    def resume_reading(self) -> None:
        self.reading_calls.append("resume")
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        if not self.is_closing():
            self.closed = True
            self._lose(None)

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            self._lose(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    # what the test calls
    def drain(self, octets: int | None = None) -> None:
        """The peer reads `octets` (all by default); may resume the writer."""
        self.buffered = 0 if octets is None else max(0, self.buffered - octets)
        if self.write_paused and self.buffered <= self.low:
            self.write_paused = False
            self.protocol.resume_writing()

    def drop(self) -> None:
        """The peer vanished (RST, network gone)."""
        self.aborted = True
        self._lose(ConnectionResetError("peer reset"))

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def _lose(self, exc: Exception | None) -> None:
        if not self._lost:  # as asyncio does: connection_lost once, from the loop, after the call returns
            self._lost = True
            self.loop.call_soon(self.protocol.connection_lost, exc)


# ---- event loop with a controlled clock ------------------------------------------------------------------


class ClockLoop(asyncio.SelectorEventLoop):
    """time() only moves in advance(); settle() runs what is ready and returns instead of waiting."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 1000.0
        self.handshake: asyncio.Future[Any] | None = None
        self.tls_calls: list[tuple[Any, Any]] = []

    def time(self) -> float:
        return self._now

    def inside(self, fn: Callable[..., _R], *args: Any) -> _R:
        """`fn(*args)` called from inside the running loop, as a transport calls its protocol (the session
        may start work that needs the running loop at once); nothing else is settled."""

        async def call() -> _R:
            return fn(*args)

        return self.run_until_complete(call())

    def settle(self, rounds: int = 200) -> None:
        """Run ready callbacks (and timers due now) until nothing is ready; never sleeps."""
        for _ in range(rounds):
            self.run_until_complete(asyncio.sleep(0))
            if not self._ready:  # type: ignore[attr-defined]
                return
        raise AssertionError("the loop never settled")

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self.settle()

    async def start_tls(
        self,
        transport: Any,
        protocol: Any,
        sslcontext: Any,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> Any:
        """A handshake that lasts until the test calls finish_handshake()."""
        self.tls_calls.append((transport, sslcontext))
        self.handshake = self.create_future()
        return await self.handshake

    def finish_handshake(self, outcome: Any) -> None:
        """`outcome`: the new (TLS) transport, or an exception for a failed handshake."""
        assert self.handshake is not None
        if isinstance(outcome, BaseException):
            self.handshake.set_exception(outcome)
        else:
            self.handshake.set_result(outcome)
        self.settle()


# ---- wiring -----------------------------------------------------------------------------------------------


@dataclass
class FakeTls:
    """What ServerContext.tls offers a session: the SSLContext for STLS (never used by ClockLoop)."""

    context: Any = "ssl-context"


def make_settings(**sections: dict[str, Any]) -> Settings:
    base: dict[str, dict[str, Any]] = {
        "server": {"hostname": "test.invalid"},
        "auth": {"failure_delay": 0},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return load_settings(None, **base)


def make_context(
    fake_auth: FakeAuth | None = None,
    fake_storage: FakeStorage | None = None,
    with_tls: bool = False,
    **sections: dict[str, Any],
) -> ServerContext:
    """A ServerContext over the fakes, built like pop3d.runtime.server.build_context builds the real one.
    `sections` are configuration sections (server=, session=, auth=...), as tests/conftest.py's Env takes."""
    return ServerContext(
        make_settings(**sections),
        fake_auth or FakeAuth(),
        fake_storage or FakeStorage(),
        FakeTls() if with_tls else None,
    )  # type: ignore[arg-type]


class Connection:
    """A Pop3Session on a FakeTransport, driven by the test: send() feeds bytes and settles the loop."""

    def __init__(
        self,
        loop: ClockLoop,
        ctx: ServerContext,
        peer: tuple[str, int] = ("127.0.0.1", 40000),
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.loop = loop
        self.ctx = ctx
        self.storage = cast(FakeStorage, ctx.storage)
        self.auth = cast(FakeAuth, ctx.auth)
        parser = CommandParser.with_extensions(stls=ctx.tls is not None)

        async def create() -> Pop3Session:
            return Pop3Session(ctx, parser)

        self.session = loop.run_until_complete(create())
        self.transport = FakeTransport(self.session, loop, peer, extra)
        loop.inside(self.session.connection_made, self.transport)
        loop.settle()

    @property
    def handler(self) -> Any:
        return self.session.handler

    def send(self, data: bytes) -> None:
        self.loop.inside(self.session.data_received, data)
        self.loop.settle()

    def lines(self, start: int = 0) -> list[bytes]:
        """Everything written (from write call `start` on), split into lines."""
        return b"".join(self.transport.writes[start:]).split(b"\r\n")[:-1]

    def login(self, user: str = "alice", password: str | None = None) -> None:
        self.send(b"USER %s\r\nPASS %s\r\n" % (user.encode(), (password or USERS[user]).encode()))
        assert self.lines()[-1].startswith(b"+OK " + user.encode() + b" has"), self.lines()

    def hang_up(self) -> None:
        self.transport.drop()
        self.loop.settle()


def messages(*bodies: bytes | int) -> list[bytes]:
    """Message bodies; an int n makes a message of n octets with LF line ends."""
    out = []
    for b in bodies:
        if isinstance(b, int):
            line = b"Subject: filler line of a test message, 60 octets long....\n"
            b = (b"From: a@example.org\n\n" + line * (b // len(line) + 1))[: b - 1] + b"\n"
        out.append(b)
    return out


def stored(boxes: dict[str, Iterable[bytes | int]]) -> FakeStorage:
    return FakeStorage({user: messages(*bodies) for user, bodies in boxes.items()})
