"""One poppassd connection: an asyncio.Protocol around the sans-IO core (pop3d.poppassd.protocol).

The same defences as a POP3 login, from the same shared state: the connection limits admit it before the
greeting and may evict it while it lasts (it never counts as logged in); the old password is checked by the
user database's `verify` (decoys for unknown users, time floors); the brute-force penalty per address delays
every answer to `pass` while the address is under penalty, records each failure before waiting, and is
cleared only after a success has waited (pop3d.auth.penalty); a connection is closed after
`auth.max_failures_per_connection` wrong passwords or `session.max_bad_commands` bad lines in a row. The
whole conversation must end within `poppassd.timeout` seconds of connect, whatever the client sends.

One command is handled at a time: while a password is checked or changed, reading pauses and later lines
wait. Nothing the client sends is logged; the audit line (`password_change`) names the user, the address and
the outcome, never a password.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from pop3d.auth import policy, schemes
from pop3d.net.limits import Refused
from pop3d.ops import logfmt
from pop3d.poppassd import protocol as p

if TYPE_CHECKING:
    from pop3d.auth.base import Authenticator
    from pop3d.auth.penalty import Penalty
    from pop3d.config import Settings
    from pop3d.net.limits import ConnectionLimits

log = logging.getLogger("pop3d.poppassd")


class Host(Protocol):
    """What a session needs of its server (pop3d.pop3.context.ServerContext has all of it): read at each
    use, so a SIGHUP reload applies to running sessions as it does for POP3."""

    @property
    def settings(self) -> Settings: ...
    @property
    def auth(self) -> Authenticator: ...
    @property
    def penalty(self) -> Penalty: ...
    @property
    def limits(self) -> ConnectionLimits: ...
    @property
    def sessions(self) -> set[Any]: ...


class PoppassdSession(asyncio.Protocol):
    """One poppassd connection (implicit TLS: the transport is encrypted before the greeting)."""

    def __init__(self, host: Host, peer: str | None = None) -> None:
        """`peer`: the client address when a PROXY-protocol proxy told us, else the socket's peer."""
        self.host = host
        self.peer = peer or "-"
        self._given_peer = peer
        self.transport: Any = None
        self._loop = asyncio.get_running_loop()
        self._lines = p.LineBuffer(p.max_line(host.settings.auth.max_password_length))
        self._queue: collections.deque[bytes | None] = collections.deque()
        self._step = p.Step.USER
        self._name = ""
        self._old = ""
        self._bad = 0  # bad lines in a row
        self._refused = 0  # new passwords the policy refused
        self._failures = 0
        self._busy = False
        self._closing = False
        self._closed = False
        self._limit_key: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.changed = False  # for the end line: whether this connection changed a password

    # -- transport callbacks ---------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self._given_peer is None:
            peername = transport.get_extra_info("peername")
            self.peer = peername[0] if isinstance(peername, tuple) else str(peername)
        try:
            self._limit_key = self.host.limits.admit(self, self.peer)
        except Refused as exc:
            log.info("poppassd connection refused rip=%s: %s", self.peer, exc)
            self._closed = True
            transport.write(p.err(f"{str(exc).capitalize()}, try again later."))
            transport.close()
            return
        self.host.sessions.add(self)
        self._timer = self._loop.call_later(self.host.settings.poppassd.timeout, self._on_timeout)
        transport.write(p.greeting(self.host.settings.server.hostname))

    def data_received(self, data: bytes) -> None:
        if self._closed or self._closing:
            return
        self._queue.extend(self._lines.feed(data))
        if not self._busy:
            self._run()

    def eof_received(self) -> bool:
        return False  # TLS cannot stay half-open; lines already queued are dropped with the connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.host.limits.release(self, self._limit_key)
        self.host.sessions.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a password check; a change already under way finishes (see _change)
        self._queue.clear()
        self._old = ""

    # -- limits and shutdown (pop3d.net.limits.Evictable, the server's LiveSession) --------------------------

    def evict(self) -> None:
        self._close(p.err("Too many connections, try again later."))

    def shutdown(self) -> None:
        self._close(p.SHUTDOWN)

    def _on_timeout(self) -> None:
        self._timer = None
        log.info("poppassd timeout rip=%s user=%s", self.peer, logfmt.text_value(self._name or None))
        self._close(p.TIMEOUT)

    def _close(self, last: bytes | None = None) -> None:
        if self._closed or self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a peer that stopped reading cannot hold the close up
            return
        if last is not None:
            self.transport.write(last)
        self.transport.close()

    # -- the dialogue ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        """Answer queued lines in order until one needs to wait (a password check or change)."""
        out: list[bytes] = []
        while self._queue and not self._closing:
            event = p.parse(self._queue.popleft(), self._step)
            if isinstance(event, p.Bad):
                out.append(event.reply)
                self._bad += 1
                if self._bad >= self.host.settings.session.max_bad_commands:
                    out.append(p.TOO_MANY_BAD)
                    self._closing = True
                continue
            self._bad = 0
            if event.verb == "quit":
                out.append(p.BYE)
                self._closing = True
            elif event.verb == "user":
                self._name = event.arg
                self._step = p.Step.PASS
                out.append(p.SEND_PASS)
            else:
                self._suspend(out, self._check(event.arg) if event.verb == "pass" else self._change(event.arg))
                return
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and not self._closed and not self.transport.is_closing():
            self.transport.write(b"".join(out))
        if self._closing and not self._closed:
            self.transport.close()

    def _suspend(self, out: list[bytes], work: Any) -> None:
        self._flush(out)
        self._busy = True
        self.transport.pause_reading()
        self._task = self._loop.create_task(self._complete(work))

    async def _complete(self, work: Any) -> None:
        try:
            answer: bytes = await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("poppassd internal error rip=%s user=%s", self.peer, logfmt.text_value(self._name))
            answer, self._closing = p.NOT_CHANGED, True
        self._busy = False
        self._task = None
        if self._closed or self.transport.is_closing():
            return
        self.transport.write(answer)
        if self._closing:
            self.transport.close()
            return
        self.transport.resume_reading()
        self._run()

    async def _check(self, password: str) -> bytes:
        """`pass OLD`: the old password, checked as a POP3 login checks one (verify, floors, penalty)."""
        host, name = self.host, self._name
        user = await host.auth.verify(name, password)
        if user is None:
            self._step = p.Step.USER  # a new `user` is needed, as after a failed POP3 PASS
            wait = host.penalty.fail(self.peer, time.monotonic())  # recorded before the wait
            self._failures += 1
            self._audit("bad_password", name, delay=round(wait, 3))
            if wait > 0:
                await asyncio.sleep(wait)
            if self._failures >= host.settings.auth.max_failures_per_connection:
                self._closing = True
                return p.BAD_PASSWORD + p.TOO_MANY_FAILURES
            return p.BAD_PASSWORD
        wait = host.penalty.delay(self.peer, time.monotonic())  # a right password waits as a wrong one would
        if wait > 0:
            await asyncio.sleep(wait)
        host.penalty.succeed(self.peer)
        self._name, self._old = user.name, password
        self._step = p.Step.NEWPASS
        return p.SEND_NEWPASS

    async def _change(self, new: str) -> bytes:
        """`newpass NEW`: the policy, then the hash (off the loop), then the user database's set_secret."""
        host, name, old = self.host, self._name, self._old
        a = host.settings.auth
        why = policy.refusal(a.password_policy, name, old, new, a.max_password_length)
        if why is not None:
            self._audit("refused", name, reason=why)
            self._refused += 1  # the client may try another, as many times as it may send bad commands
            if self._refused >= host.settings.session.max_bad_commands:
                self._closing = True
                return p.err(why) + p.TOO_MANY_BAD
            return p.err(why)
        self._step = p.Step.USER
        self._old = ""
        # shielded: a hang-up must not leave the file half-changed, nor a changed password unlogged
        return await asyncio.shield(self._store(name, new, a.default_scheme))

    async def _store(self, name: str, new: str, scheme: str) -> bytes:
        try:
            secret = await asyncio.to_thread(schemes.hash_password, scheme, new)
            changed = await self.host.auth.set_secret(name, secret)
        except PermissionError as exc:
            self._audit("error", name, reason=str(exc))
            self._closing = True
            return p.err("Password changes are not available here.")
        except (OSError, ValueError) as exc:  # an unwritable file, an unknown scheme
            log.error("poppassd: cannot change the password of %s: %s", logfmt.text_value(name), exc)
            self._audit("error", name, reason=type(exc).__name__)
            self._closing = True
            return p.NOT_CHANGED
        if not changed:  # the entry vanished between the check and the change
            self._audit("error", name, reason="no such user any more")
            self._closing = True
            return p.NOT_CHANGED
        self.changed = True
        self._audit("changed", name, scheme=scheme)
        return p.CHANGED

    def _audit(self, result: str, name: str, **fields: object) -> None:
        """The `password_change` event: user, client address, outcome; never a password."""
        values: dict[str, object] = {"user": name, "rip": self.peer, "result": result, **fields}
        logfmt.event(log, logging.INFO, "password_change", "poppassd password change", values)
