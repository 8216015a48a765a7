"""The asyncio.Protocol adapter: bytes in, bytes out, timers, flow control.

Why a Protocol and not streams: no Task per idle connection and no drain() per line (docs/DESIGN.md
performance rules 1 and 5).

The handler (pop3d.pop3.handlers) answers each command with one result object (pop3d.pop3.results); the
session acts on that object alone and never polls the handler for flags afterwards. Why the session ends
when it ends on its own (autologout, too many bad commands, TLS failure, shutdown) is session state.
Pipelining (RFC 2449 §6.6): every complete line in a segment is queued; lines are parsed one at a time *when
their turn comes* (an earlier PASS may change the state), synchronous replies are batched into one write,
and while an async handler runs, reading pauses and the rest of the queue waits, so replies stay in order.
Big bodies stream in slices and wait on pause_writing/resume_writing, so a reader that does not read holds
at most about `server.write_buffer` plus one slice in memory.

Flow control of pipelined replies: a client may pipeline thousands of commands and never read the answers.
A batch of synchronous replies stops once it has filled the room left under `server.write_buffer` (the
unsent output is read once per batch); while the transport has paused us (pause_writing), reading stops and
queued lines wait, and resume_writing goes on where the batch stopped. Before login the room is only
`session.max_unsent_before_login`, and a client that leaves more than that unread is disconnected (a login
exchange is a few hundred octets; Dovecot's login processes do the same with a few KiB).

Deadlines: before login, a fixed one from connect (`session.timeout_authorization`), whatever the client
sends meanwhile, so a byte now and then cannot keep a login open (slowloris); once logged in, the RFC 1939
§3 autologout after `session.timeout` of inactivity.

Connection limits (pop3d.net.limits) are checked in connection_made, before the greeting, with the client's
address (from the PROXY header when a proxy told us); a refused client hears `-ERR [SYS/TEMP]` and is closed.

SASL (RFC 5034): after a `Challenge`, the next queued line is the client's response and goes to
`handler.sasl_line` with the challenge's mechanism, not to the command parser; routing happens when the
line's turn comes, so pipelined order holds. The line buffer admits MAX_SASL_LINE octets for that; the parser still
refuses commands over 255 octets.

STLS (RFC 2595): the handshake runs on the same transport with loop.start_tls (asyncio and uvloop), with the
SSLContext current at that moment (SIGHUP swaps it, see pop3d.net.tls). Implicit-TLS listeners hand us a
transport that is already encrypted. Whatever the client sent after STLS and before the handshake is
discarded unread, never executed (the STARTTLS command-injection class of bugs, CVE-2011-0411 and kin); the
line buffer starts empty under TLS.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from time import perf_counter
from typing import TYPE_CHECKING, Any

from pop3d.net.limits import Refused
from pop3d.net.tls import peer_identity
from pop3d.pop3 import catalog
from pop3d.pop3.context import ServerContext
from pop3d.pop3.eager import Rest, first_step
from pop3d.pop3.handlers import Pop3Handler
from pop3d.pop3.protocol import MAX_SASL_LINE, CommandParser, LineBuffer, Rejected, err
from pop3d.pop3.results import Challenge, Pending, Reply, Resolved, StartTLS, Stream
from pop3d.pop3.state import State
from pop3d.storage.base import StorageError

if TYPE_CHECKING:
    from pop3d.auth.sasl import Mechanism

log = logging.getLogger("pop3d.pop3.session")

_PARSER = CommandParser()
# the English lines (the session's own come from its handler's catalog texts, pop3d.pop3.catalog)
INTERNAL_ERROR = catalog.texts("en").internal_error
TOO_MANY_BAD = catalog.texts("en").too_many_bad


class Pop3Session(asyncio.Protocol):
    """One POP3 connection."""

    __slots__ = (
        "_bad",
        "_born",
        "_busy",
        "_closed",
        "_closing",
        "_deadlines",
        "_deaf",
        "_end_reason",
        "_eof",
        "_held",
        "_last_active",
        "_limit_key",
        "_lines",
        "_loop",
        "_peer",
        "_queue",
        "_resume",
        "_sasl",
        "_sent",
        "_t0",
        "_task",
        "_tls",
        "_verb",
        "_write_paused",
        "ctx",
        "handler",
        "parser",
        "transport",
    )

    def __init__(self, ctx: ServerContext, parser: CommandParser = _PARSER, peer: str | None = None) -> None:
        """`peer`: the client address when a proxy told us (pop3d.net.proxy_gate), else the socket's peer."""
        self.ctx = ctx
        self._peer = peer
        self._sent = 0  # octets written, for the metrics (added once at session end)
        self._verb = ""  # the command an async reply belongs to, and when it started (metrics)
        self._t0 = 0.0
        self.parser = parser
        self._deaf = False  # input is discarded unread: between STLS and the end of its handshake, or refused
        self.transport: Any = None
        self.handler: Pop3Handler | None = None
        self._lines = LineBuffer(MAX_SASL_LINE)
        # pipelined lines waiting for an async reply; created on demand (an empty deque is ~600 bytes and
        # per-connection memory of idle sessions is what lets one worker hold thousands)
        self._queue: collections.deque[bytes | None] | None = None
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._write_paused = False  # the transport asked us to stop producing (pause_writing)
        self._held = False  # reading paused by us until the transport drains (resume_writing)
        self._resume: asyncio.Future[None] | None = None
        self._last_active = 0.0
        self._born = 0.0  # loop time of connection_made: the login deadline counts from it
        self._limit_key: str | None = None  # what the connection limits counted us under (see release)
        self._bad = 0
        self._closed = False
        self._eof = False
        self._closing = False  # the last reply is queued: close once it is written
        self._end_reason: str | None = None  # why the session ends, for the logout line (None: disconnected)
        self._sasl: Mechanism | None = None  # a SASL exchange waits for the client's next line
        self._tls = False
        self._loop = asyncio.get_running_loop()
        self._deadlines = ctx.deadlines(self._loop)  # login timeout and autologout (pop3d.pop3.deadlines)

    # -- transport callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        rip = self._peer or (peer[0] if isinstance(peer, tuple) else str(peer))
        try:
            self._limit_key = self.ctx.limits.admit(self, rip)
        except Refused as exc:
            self._refuse(rip, str(exc))
            return
        transport.set_write_buffer_limits(high=self.ctx.settings.server.write_buffer)
        self.handler = Pop3Handler(self.ctx, rip, _address(transport.get_extra_info("sockname")))
        self.handler.on_lock_lost = self._lock_lost
        self.ctx.sessions.add(self)
        self._last_active = self._born = self._loop.time()
        self._arm_timer()
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # an implicit-TLS listener: the handshake is already done (RFC 8314 §3.3)
            self._tls = True
            self.handler.tls_established(peer_identity(ssl_object, self.ctx.settings.tls.client_identity))
        greeting = self.handler.greeting()
        self._sent += len(greeting)
        self.ctx.metrics.session_opened()
        transport.write(greeting)

    def _refuse(self, rip: str, why: str) -> None:
        """Over a connection limit: one -ERR line and close; nothing of a session starts (no handler, timer,
        metrics or log line), so connection_lost has nothing to undo."""
        log.info("connection refused rip=%s: %s", rip, why)
        self._closed = self._deaf = True
        # before any handler: in server.language, ASCII (RFC 6856 §2.1); RFC 3206 §4 [SYS/TEMP]
        self.transport.write(catalog.texts(self.ctx.settings.server.language).refused(why))
        self.transport.close()

    def evict(self) -> None:
        """The connection limits close this unauthenticated session to admit a newer one (pop3d.net.limits)."""
        if self._end_reason is None:
            self._end_reason = "evicted: too many connections"
        self._close(self._texts().too_many_connections)

    def data_received(self, data: bytes) -> None:
        self._last_active = self._loop.time()
        if self._deaf:
            return  # plaintext after STLS, before the handshake: discarded, never executed (RFC 2595 §4)
        lines = self._lines.feed(data)
        if lines:
            if self._queue is None:
                self._queue = collections.deque(lines)
            else:
                self._queue.extend(lines)
            if not self._busy:
                self._run()

    def eof_received(self) -> bool:
        # A scripted client (`printf ... | nc`) may half-close right after its last command: answer every
        # queued line first (QUIT included, so its deletions are committed), then close.
        self._eof = True
        if self._closed:
            return False
        if not self._busy:
            self._run()
        # TLS transports cannot stay half-open (asyncio/uvloop would only log a warning): they close anyway
        return not self._tls

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_active = self._loop.time()  # the peer is reading: not idle
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        if self._held:  # pipelined lines wait for this: answer them, read again
            self._held = False
            if not self._closed and not self.transport.is_closing():
                self.transport.resume_reading()
                self._run()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return  # a failed handshake may report the loss twice
        self._closed = True
        self.ctx.limits.release(self, self._limit_key)
        self._deadlines.disarm(self)
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        handler = self.handler
        assert handler is not None
        if self._task is not None and not self._task.done():
            if handler.state is not State.UPDATE:  # never interrupt a commit half-way
                self._task.cancel()
            self._task.add_done_callback(lambda _t: self._end())
        else:
            self._end()

    def _end(self) -> None:
        """Release the maildrop and log the end: at once when nothing has to wait, else in a Task. The Task
        is kept in `_task`: asyncio holds Tasks only weakly, and the session is held (in ctx.sessions) until
        that Task ends, so a release waiting on a future nobody else holds is not garbage-collected."""
        if not self.ctx.eager:
            self._task = self._loop.create_task(self._finish())
            return
        try:
            step = first_step(self._finish())
        except Exception:
            log.exception("internal error ending session user=%s", self._user())
            return
        if isinstance(step, Rest):
            self._task = self._loop.create_task(step.finish())

    # -- command processing ----------------------------------------------------------------------

    def _run(self) -> None:
        """Answer queued lines in order until one needs to wait or the write buffer is full.

        One transport.write per batch (docs/DESIGN.md performance rule 1). Bound on memory: a batch starts
        only while the transport has not paused us, and stops adding replies once they fill `room`, the
        configured limit minus the output still unsent (read once per batch). So the unsent output never
        exceeds the limit plus one synchronous reply: at most a 128 KiB message (storage.base.SMALL_MESSAGE,
        bigger ones are streamed) or one LIST/UIDL listing. Counting by lines would bound nothing: one read
        of 256 KiB carries 30,000 "RETR 1" lines, gigabytes of replies; the byte count costs a subtraction
        per line and no system call.
        """
        handler = self.handler
        assert handler is not None
        transport = self.transport
        queue = self._queue
        while queue and not self._closing and not self._closed:
            if self._write_paused:  # the peer is not reading: queued lines wait for resume_writing
                self._hold()
                return
            unsent = transport.get_write_buffer_size()
            if handler.state is State.AUTHORIZATION:
                cap = self.ctx.settings.session.max_unsent_before_login
                if unsent > cap:
                    self._overflow(unsent)
                    return
                room = cap - unsent
            else:
                room = self.ctx.settings.server.write_buffer - unsent
            if not self._batch(handler, queue, room):
                return  # an async reply or STLS took over
        if not queue:
            self._queue = None
        if self._closing or (self._eof and not queue):
            transport.close()

    def _batch(self, handler: Pop3Handler, queue: collections.deque[bytes | None], room: int) -> bool:
        """One batch of `_run`: at least one line, then more while the replies fit in `room` octets.
        False when the batch ended in an async reply or STLS (the session goes on elsewhere)."""
        out: list[bytes] = []
        max_bad = self.ctx.settings.session.max_bad_commands
        metrics = self.ctx.metrics if self.ctx.metrics.enabled else None
        while queue and not self._closing:
            if room <= 0 and out:  # full; but a batch answers at least one line, so _run always advances
                break
            line = queue.popleft()
            mech = self._sasl
            if mech is not None:  # RFC 5034 §4: a response inside an exchange, not a command
                self._sasl = None
                try:
                    result = handler.sasl_line(mech, line)
                except Exception:
                    log.exception("internal error in SASL exchange rip=%s session=%s", handler.peer, handler.sid)
                    result = Reply(handler.texts.internal_error)
            else:
                event = self.parser.parse(line, handler.state)
                if isinstance(event, Rejected):
                    reply = handler.texts.rejection(event)
                    out.append(reply)
                    room -= len(reply)
                    self._bad += 1
                    if self._bad >= max_bad:
                        out.append(handler.texts.too_many_bad)
                        self._closing = True
                        self._end_reason = "too many bad commands"
                    continue
                self._bad = 0
                t0 = perf_counter() if metrics is not None else 0.0
                try:
                    result = handler.dispatch(event)
                except Exception:
                    log.exception("internal error in session user=%s session=%s", self._user(), handler.sid)
                    result = Reply(handler.texts.internal_error)
                if metrics is not None:
                    if isinstance(result, (Pending, Stream)):
                        self._verb, self._t0 = event.verb, t0  # timed when the reply is complete
                    else:
                        metrics.command(event.verb, perf_counter() - t0)
            if type(result) is Pending and self.ctx.eager:  # PASS, QUIT: often done at once (pop3d.pop3.eager)
                settled = self._settle(handler, result, out)
                if settled is None:
                    return False  # it waits: `_complete` goes on once it is done
                result = settled
            if type(result) is Reply:  # the fast path: most pipelined commands end here
                data = result.data
                out.append(data)
                room -= len(data)
                if result.close:
                    self._ending(result)
            elif type(result) is Challenge:
                out.append(result.data)
                room -= len(result.data)
                self._sasl = result.mechanism
            elif type(result) is StartTLS:  # send the +OK, drop everything pipelined after it, handshake
                out.append(result.data)
                self._write(b"".join(out))
                self._start_tls()
                return False
            else:
                assert isinstance(result, (Pending, Stream))
                self._suspend(out, result, handler.state)
                return False
        if out:
            self._write(b"".join(out) if len(out) > 1 else out[0])
        return True

    def _hold(self) -> None:
        """Stop reading until the transport drains (resume_writing picks the queue up again)."""
        if not self._held:
            self._held = True
            self.transport.pause_reading()

    def _overflow(self, unsent: int) -> None:
        """Before login, a client that does not read what it asked for is cut (it may be flooding us)."""
        handler = self.handler
        log.info(
            "unread output over session.max_unsent_before_login rip=%s unsent=%d session=%s",
            handler.peer if handler is not None else "-",
            unsent,
            handler.sid if handler is not None else "-",
        )
        self._end_reason = "output not read before login"
        self.transport.abort()

    def _ending(self, reply: Reply) -> None:
        """A reply that ends the session (QUIT): nothing after it is answered."""
        self._closing = True
        self._end_reason = reply.reason

    def _settle(self, handler: Pop3Handler, pending: Pending, out: list[bytes]) -> Resolved | None:
        """Run `pending` now: its reply if it ended without waiting, else None once it is handed to a Task
        (the batch so far written, reading paused: `_suspend`)."""
        before = handler.state
        self._busy = True  # nothing may start another batch while it runs
        try:
            step = first_step(pending.awaitable)
        except Exception as exc:
            step = self._failed_reply(handler, exc)
        finally:
            self._busy = False
        if isinstance(step, Rest):
            self._suspend(out, step, before)
            return None
        self._timed()
        if handler.state is not before and not self._closed:
            self._state_changed(before)
        return step

    def _failed_reply(self, handler: Pop3Handler, exc: Exception) -> Reply:
        """The reply to an async step that raised, logged as what it is."""
        if isinstance(exc, ConnectionError):  # a user database that cannot be reached (PostgreSQL down)
            log.warning("user database unavailable user=%s session=%s: %s", self._user(), handler.sid, exc)
        else:
            log.error("internal error in session user=%s session=%s", self._user(), handler.sid, exc_info=exc)
        return Reply(handler.texts.internal_error)

    def _timed(self) -> None:
        """The command metric of an async reply, now that it is complete."""
        if self._verb:
            self.ctx.metrics.command(self._verb, perf_counter() - self._t0)
            self._verb = ""

    def _state_changed(self, before: State) -> None:
        if before is State.AUTHORIZATION:
            self.ctx.limits.logged_in(self)  # never evicted from now on
        self._arm_timer()  # login trades the login deadline for the idle autologout

    def _suspend(self, out: list[bytes], result: Pending | Rest[Resolved] | Stream, before: State) -> None:
        """An async reply: flush the batch so far, stop reading, go on in `_complete` once it is done."""
        if out:
            self._write(b"".join(out))
        self._busy = True
        self.transport.pause_reading()
        self._task = self._loop.create_task(self._complete(result, before))

    async def _complete(self, result: Pending | Rest[Resolved] | Stream, before: State) -> None:
        """`before`: the state when the command came (a login or QUIT changes it while it runs)."""
        handler = self.handler
        assert handler is not None
        try:
            resolved: Resolved
            if isinstance(result, Rest):
                resolved = await result.finish()
            elif isinstance(result, Pending):
                resolved = await result.awaitable
            else:
                resolved = result
            if isinstance(resolved, Stream):
                await self._stream(resolved)
            elif isinstance(resolved, Challenge):
                self._write(resolved.data)
                self._sasl = resolved.mechanism
            else:
                if resolved.close:
                    self._ending(resolved)
                self._write(resolved.data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._write(self._failed_reply(handler, exc).data)
        self._timed()
        self._busy = False
        self._task = None  # a finished Task kept per idle session would cost ~600 bytes
        if self._closed or self.transport.is_closing():
            return
        if handler.state is not before:
            self._state_changed(before)
        if self._write_paused:  # the reply filled the buffer: reading stays paused until it drains
            self._held = True
            return
        self.transport.resume_reading()
        self._run()

    def _start_tls(self) -> None:
        tls = self.ctx.tls
        assert tls is not None
        self._deaf = True
        if self._queue is not None:
            self._queue.clear()
        self._lines = LineBuffer(MAX_SASL_LINE)
        self._busy = True
        self.transport.pause_reading()
        self._task = self._loop.create_task(self._handshake(tls.context))

    async def _handshake(self, context: ssl.SSLContext) -> None:
        handler = self.handler
        assert handler is not None
        raw = self.transport
        try:
            tls_transport = await self._loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.ctx.settings.tls.handshake_timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("TLS handshake failed rip=%s session=%s: %s", handler.peer, handler.sid, exc)
            self.ctx.metrics.tls_handshake(False)
            self._end_reason = "TLS handshake failed"
            raw.abort()
            self._task = None  # this task is ending: connection_lost must not wait for it
            self.connection_lost(exc)
            return
        if tls_transport is None or self._closed:
            return
        self.transport = tls_transport
        tls_transport.set_write_buffer_limits(high=self.ctx.settings.server.write_buffer)
        identity = peer_identity(tls_transport.get_extra_info("ssl_object"), self.ctx.settings.tls.client_identity)
        self._tls = True
        self.ctx.metrics.tls_handshake(True)
        handler.tls_established(identity)
        self._deaf = False
        self._busy = False
        self._last_active = self._loop.time()
        self._run()

    def _write(self, data: bytes) -> None:
        if not self._closed and not self.transport.is_closing():
            self._sent += len(data)
            self.transport.write(data)

    def _close(self, reply: bytes) -> None:
        """Send a last line and close; a peer that stopped reading cannot hold the close up."""
        if self._closed or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.write(reply)
            self.transport.close()

    async def _stream(self, s: Stream) -> None:
        """Send a big body slice by slice, waiting whenever the transport asks us to pause."""
        handler = self.handler
        assert handler is not None
        chunks = s.chunks
        try:
            first = await anext(chunks, b"")
        except (StorageError, OSError) as exc:
            log.warning("read failed user=%s msg=%d session=%s: %s", self._user(), s.index + 1, handler.sid, exc)
            self.ctx.metrics.storage_error("read")
            code = exc.code if isinstance(exc, StorageError) else "SYS/TEMP"  # RFC 3206 §4
            self._write(err(handler.texts.read_failed(s.index + 1), code))
            return
        enc = s.encoder
        sent = 0
        try:
            data = s.header + enc.feed(first)
            while True:
                if self._closed or self.transport.is_closing():
                    return
                self.transport.write(data)
                sent += len(data)
                self._sent += len(data)
                if self._write_paused:
                    self._resume = self._loop.create_future()
                    await self._resume
                    self._resume = None
                if enc.done:
                    break
                chunk = await anext(chunks, None)
                if chunk is None:
                    break
                data = enc.feed(chunk)
        except (StorageError, OSError) as exc:
            # the +OK is out; the only honest thing left is to cut the connection (the client sees no '.')
            log.warning(
                "read failed mid-message user=%s msg=%d session=%s: %s", self._user(), s.index + 1, handler.sid, exc
            )
            self.ctx.metrics.storage_error("read")
            self.transport.abort()
            return
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        tail = enc.finish()
        self._write(tail)
        handler.note_sent(s.index, s.lines, sent + len(tail) - len(s.header))

    # -- timers and the end ----------------------------------------------------------------------

    def _arm_timer(self) -> None:
        handler = self.handler
        assert handler is not None
        s = self.ctx.settings.session
        if handler.state is State.AUTHORIZATION:
            due = self._born + s.timeout_authorization  # fixed from connect: activity does not move it
        else:
            due = self._last_active + s.timeout
        # one deadline per connection, re-armed lazily when it comes (nothing to do per line)
        self._deadlines.arm(self, due)

    def _on_timer(self) -> None:
        if self._closed:
            return
        handler = self.handler
        assert handler is not None
        s = self.ctx.settings.session  # read now: a reload may have changed the limits
        now = self._loop.time()
        if handler.state is State.AUTHORIZATION:
            if now < self._born + s.timeout_authorization:
                self._arm_timer()
                return
            self._end_reason = "login timeout"
            self._close(handler.texts.login_timeout)
            return
        if now - self._last_active < s.timeout or (self._busy and handler.state is State.UPDATE):
            self._arm_timer()
            return
        # RFC 1939 §3: autologout; the session does not enter UPDATE, nothing is deleted
        self._end_reason = "autologout"
        self._close(handler.texts.autologout)

    def _lock_lost(self) -> None:
        """The storage lost our maildrop lock (its database connection died): another session may hold it
        now, so this one ends at once with -ERR [SYS/TEMP], changing nothing (RFC 1939 §6: no UPDATE). A
        QUIT already committing finds out by itself and answers for it."""
        handler = self.handler
        if self._closed or handler is None or handler.state is not State.TRANSACTION:
            return
        self._end_reason = "maildrop lock lost"
        self._close(handler.texts.lock_lost)

    async def _finish(self) -> None:
        handler = self.handler
        assert handler is not None
        try:
            try:
                await handler.abort()
            except Exception:
                log.exception("releasing maildrop failed user=%s session=%s", self._user(), handler.sid)
            c = handler.counters
            self.ctx.metrics.session_closed(self._sent, self._loop.time() - self._born, c.retr, c.dele)
            handler.end_reason = self._end_reason or "disconnected"
            self.ctx.log_session_end(handler)
        finally:  # last: whoever waits for the sessions to end (a drain, a test) also sees their end counted
            self.ctx.sessions.discard(self)

    def _texts(self) -> catalog.Texts:
        """The session's reply language (server.language when no handler exists yet)."""
        h = self.handler
        return h.texts if h is not None else catalog.texts(self.ctx.settings.server.language)

    def _user(self) -> str:
        h = self.handler
        return h.user.name if h is not None and h.user is not None else "-"

    def shutdown(self) -> None:
        """Server stopping and the grace period is over: cut the session (deletes nothing)."""
        if not self._closed:
            if self._end_reason is None:
                self._end_reason = "server shutdown"
            self._close(self._texts().shutting_down)


def _address(sockname: object) -> str:
    """A socket address for the log: "host:port", "[v6]:port", or "-" (a UNIX socket in tests)."""
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "-"
