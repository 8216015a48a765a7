"""POP3 command handlers: one method per verb, collected into a dispatch table (aiosmtpd-style).

A handler gets a parsed, state-legal `Command` (pop3d.pop3.protocol did the grammar) and returns either the reply
bytes at once, a `Stream` (a big message body to send with flow control), or a coroutine resolving to one of
those (password checks, storage I/O). Fast verbs stay synchronous so pipelined STAT/LIST/UIDL/DELE bursts
need no Task at all. The handler owns the POP3 session semantics: state, the deleted set, LAST, counters.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Union

from pop3d import wire
from pop3d.auth import sasl
from pop3d.auth.base import User
from pop3d.pop3.context import ServerContext
from pop3d.pop3.protocol import CRLF, MAX_SASL_LINE, Command, State, err, multiline, ok
from pop3d.storage.base import SMALL_MESSAGE, InUse, Maildrop, MessageInfo, StorageError

log = logging.getLogger("pop3d.pop3.session")


@dataclass(slots=True)
class Stream:
    """A multi-line reply whose body is streamed from storage: `header` goes out once the first chunk is in."""

    header: bytes
    chunks: AsyncIterator[bytes]
    encoder: wire.Encoder
    index: int
    lines: int | None  # None for RETR, the TOP line count otherwise


Result = Union[bytes, Stream]
Reply = Union[Result, Awaitable[Result]]

AUTH_FAILED = err("authentication failed", "AUTH")  # RFC 3206 §4; same line for unknown user and bad password
#: Dovecot's wording; RFC 3206 §4 [AUTH]: the client should not retry the same way
PLAINTEXT_REFUSED = err("plaintext authentication disallowed on non-secure connections (use STLS or port 995)",
                        "AUTH")


class Counters:
    """Dovecot-like logout counters (top=n/bytes, retr=n/bytes, del=n/total)."""

    __slots__ = ("top", "top_bytes", "retr", "retr_bytes", "dele")

    def __init__(self) -> None:
        self.top = self.top_bytes = self.retr = self.retr_bytes = self.dele = 0


class Pop3Handler:
    """Per-connection POP3 semantics. The session (pop3d.pop3.session) feeds it commands in order."""

    __slots__ = (
        "ctx", "peer", "state", "timestamp", "user_name", "user", "drop", "messages",
        "deleted", "retrieved", "last", "counters", "closing", "end_reason",
        "secure", "tls", "external_identity", "sasl", "starttls",
    )

    def __init__(self, ctx: ServerContext, peer: str) -> None:
        self.ctx = ctx
        self.peer = peer
        self.state = State.AUTHORIZATION
        self.timestamp = ctx.apop_timestamp()
        self.user_name: str | None = None  # from USER, waiting for PASS
        self.user: User | None = None
        self.drop: Maildrop | None = None
        self.messages: list[MessageInfo] = []  # the session snapshot; numbering never changes (RFC 1939 §5)
        self.deleted: set[int] = set()
        self.retrieved: set[int] = set()
        self.last = 0  # RFC 1460 LAST: highest message number touched by RETR/TOP
        self.counters = Counters()
        self.closing = False  # the session closes the connection after sending this reply
        self.end_reason = "disconnected"
        self.secure = ctx.is_secure_network(peer)  # cleartext passwords allowed (TLS sets it too)
        self.tls = False
        self.external_identity: str | None = None  # login name from a verified TLS client certificate
        self.sasl: sasl.Mechanism | None = None  # set while a SASL exchange waits for the client's next line
        self.starttls = False  # set by STLS: the session starts the handshake after sending the +OK

    def tls_established(self, identity: str | None) -> None:
        """The connection is now encrypted (STLS done or an implicit-TLS listener)."""
        self.tls = self.secure = True
        self.external_identity = identity
        self.starttls = False

    @property
    def plaintext_ok(self) -> bool:
        """Cleartext passwords (USER/PASS, PLAIN, LOGIN) allowed here? Like Dovecot's disable_plaintext_auth."""
        return self.secure or not self.ctx.settings.auth.disable_plaintext_auth

    def mechanisms(self) -> list[str]:
        """The SASL mechanisms usable on this connection right now, in CAPA order."""
        configured = self.ctx.settings.auth.mechanisms
        usable = []
        for name in sasl.KNOWN:
            if name not in configured:
                continue
            if name in sasl.PLAINTEXT and not self.plaintext_ok:
                continue
            if name == "EXTERNAL" and self.external_identity is None:
                continue
            usable.append(name)
        return usable

    # -- session plumbing ------------------------------------------------------------------------

    def greeting(self) -> bytes:
        """RFC 1939 §4 greeting with the APOP timestamp (§7)."""
        return ok(f"pop3d ready {self.timestamp}")

    def dispatch(self, cmd: Command) -> Reply:
        return DISPATCH[cmd.verb](self, cmd)

    async def abort(self) -> None:
        """The connection ended without QUIT (drop, timeout, shutdown): release, delete nothing (RFC 1939 §6)."""
        if self.drop is not None:
            drop, self.drop = self.drop, None
            await drop.close()

    def summary(self) -> str:
        """The logout line's counters."""
        c = self.counters
        size = sum(m.size for m in self.messages)
        return (
            f"top={c.top}/{c.top_bytes}, retr={c.retr}/{c.retr_bytes}, "
            f"del={c.dele}/{len(self.messages)}, size={size}"
        )

    # -- AUTHORIZATION ---------------------------------------------------------------------------

    def do_USER(self, cmd: Command) -> Reply:
        if not self.plaintext_ok:
            return PLAINTEXT_REFUSED
        # RFC 1939 §7: we never say whether the mailbox exists (no user enumeration)
        self.user_name = cmd.args[0]
        return ok("send PASS")

    def do_PASS(self, cmd: Command) -> Reply:
        if not self.plaintext_ok:
            return PLAINTEXT_REFUSED
        if self.user_name is None:
            return err("USER first")
        name, self.user_name = self.user_name, None  # RFC 1939 §7: a failed PASS needs a new USER
        return self._pass(name, cmd.args[0])

    async def _pass(self, name: str, password: str) -> Result:
        user = await self.ctx.auth.verify(name, password)
        return await self._login(user, name)

    def do_APOP(self, cmd: Command) -> Reply:
        return self._apop(cmd.args[0], cmd.args[1].lower())

    async def _apop(self, name: str, digest: str) -> Result:
        creds = await self.ctx.auth.lookup(name)
        secret = creds.plaintext() if creds else None
        user = None
        if creds is not None and secret is not None:
            # RFC 1939 §7: MD5 of the greeting's timestamp followed by the shared secret
            expected = hashlib.md5((self.timestamp + secret).encode("utf-8")).hexdigest()
            if hmac.compare_digest(expected, digest):
                user = creds.user
        return await self._login(user, name)

    async def _login(self, user: User | None, name: str) -> Result:
        """Common tail of every successful or failed authentication: delay, LOGIN-DELAY, lock, snapshot."""
        ctx = self.ctx
        if user is None:
            return await self._failed(name)
        ctx.penalty.succeed(self.peer)
        delay = ctx.settings.session.login_delay
        now = time.time()  # wall clock: worker processes compare it through file mtimes (pop3d.auth.login_delay)
        if ctx.login_delays.too_soon(user.name, delay, now):
            # RFC 2449 §8.1.2
            ctx.metrics.login("login_delay")
            return err(f"wait {delay} seconds between logins", "LOGIN-DELAY")
        drop = ctx.storage.maildrop(user)
        try:
            await drop.open()
        except InUse:
            await drop.close()
            log.info("maildrop in use user=%s rip=%s", user.name, self.peer)
            ctx.metrics.login("in_use")
            ctx.metrics.lock_conflict()
            return err("maildrop already locked by another session", "IN-USE")  # RFC 2449 §8.1.1
        except StorageError as exc:
            await drop.close()
            log.warning("maildrop unavailable user=%s rip=%s: %s", user.name, self.peer, exc)
            ctx.metrics.login("unavailable")
            ctx.metrics.storage_error("open")
            return err("maildrop cannot be opened", exc.code)  # RFC 3206 §4 SYS/TEMP or SYS/PERM
        except OSError as exc:
            await drop.close()
            log.warning("maildrop unavailable user=%s rip=%s: %s", user.name, self.peer, exc)
            ctx.metrics.login("unavailable")
            ctx.metrics.storage_error("open")
            return err("maildrop cannot be opened", "SYS/TEMP")
        ctx.login_delays.record(user.name, delay, now)
        ctx.metrics.login("ok")
        self.user, self.drop, self.messages, self.state = user, drop, drop.messages, State.TRANSACTION
        log.info("login user=%s rip=%s messages=%d", user.name, self.peer, len(drop.messages))
        count, size = self._totals()
        return ok(f"{user.name} has {count} message{'s' if count != 1 else ''} ({size} octets)")

    async def _failed(self, name: str | None, why: str = "") -> Result:
        """A failed authentication: the per-address penalty (pop3d.auth.penalty) delays only this session."""
        wait = self.ctx.penalty.fail(self.peer, time.monotonic())
        self.ctx.metrics.login("failed")
        log.info("auth failed user=%r rip=%s%s delay=%.1fs", name, self.peer, f" ({why})" if why else "", wait)
        if wait > 0:
            await asyncio.sleep(wait)
        return AUTH_FAILED

    # -- STLS (RFC 2595) and AUTH (RFC 5034) ------------------------------------------------------

    def do_STLS(self, cmd: Command) -> Reply:
        if self.tls:
            return err("already using TLS")  # RFC 2595 §4: STLS once, never after a TLS layer is up
        if self.ctx.tls is None:
            return err("TLS is not configured")
        self.user_name = None  # RFC 2595 §4: nothing from before the handshake carries over
        self.starttls = True
        return ok("Begin TLS negotiation")

    def do_AUTH(self, cmd: Command) -> Reply:
        usable = self.mechanisms()
        if not cmd.args:
            return multiline(ok("SASL mechanisms follow"), usable)  # pre-RFC 5034 clients (Outlook) ask this way
        name = cmd.args[0].upper()
        if name not in usable:
            if name in sasl.PLAINTEXT and name in self.ctx.settings.auth.mechanisms:
                return PLAINTEXT_REFUSED
            if name == "EXTERNAL" and name in self.ctx.settings.auth.mechanisms:
                return err("EXTERNAL needs a verified TLS client certificate", "AUTH")
            return err(f"unsupported authentication mechanism {name}", "AUTH")
        initial: bytes | None = None
        if len(cmd.args) == 2:  # RFC 5034 §4: "=" is an empty initial response
            initial = b"" if cmd.args[1] == "=" else self._b64(cmd.args[1].encode("ascii"))
            if initial is None:
                return err("initial response is not valid base64", "AUTH")
        mech = sasl.create(name, hostname=self.ctx.hostname, external_identity=self.external_identity)
        return self._sasl_advance(mech, mech.start(initial))

    @staticmethod
    def _b64(data: bytes) -> bytes | None:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None

    def sasl_line(self, line: bytes | None) -> Reply:
        """The client's answer to a `+ ` challenge (the session routes it here instead of the parser)."""
        mech, self.sasl = self.sasl, None
        assert mech is not None
        if line is None:
            return err(f"SASL response too long (limit {MAX_SASL_LINE} octets)", "AUTH")
        line = line.strip()
        if line == b"*":  # RFC 5034 §4: the client cancels; -ERR, and the session goes on
            return err("authentication cancelled", "AUTH")
        data = self._b64(line)
        if data is None:
            return err("SASL response is not valid base64", "AUTH")  # RFC 5034 §4: reject, exchange over
        return self._sasl_advance(mech, mech.step(data))

    def _sasl_advance(self, mech: sasl.Mechanism, step: sasl.Step) -> Reply:
        if isinstance(step, sasl.Challenge):
            self.sasl = mech
            return b"+ " + base64.b64encode(step.data) + CRLF  # RFC 5034 §4 continuation
        return self._sasl_async(mech, step)

    async def _sasl_async(self, mech: sasl.Mechanism, step: sasl.Step) -> Result:
        while True:
            if isinstance(step, sasl.Lookup):
                creds = await self.ctx.auth.lookup(step.authcid)
                step = await asyncio.to_thread(mech.resume, creds)  # SCRAM from {PLAIN} runs PBKDF2
            elif isinstance(step, sasl.CheckPassword):
                user = await self.ctx.auth.verify(step.authcid, step.password)
                return await self._login(user, step.authcid)
            elif isinstance(step, sasl.Success):
                return await self._login(step.user, step.user.name)
            elif isinstance(step, sasl.Failure):
                return await self._failed(step.authcid, f"{mech.name}: {step.reason}")
            else:
                self.sasl = mech
                return b"+ " + base64.b64encode(step.data) + CRLF

    def do_RPOP(self, cmd: Command) -> Reply:
        return err("RPOP is not offered: trust by source port is unsafe; use PASS, APOP or AUTH")

    def do_CAPA(self, cmd: Command) -> Reply:
        """RFC 2449 §5-6: the capability list, the same in both states ("capabilities available in the
        AUTHORIZATION state MUST be announced in both states", §5; USER and SASL: "both / no", §6.3, §6.4;
        STLS likewise, RFC 2595 §4). What it contains depends on the connection: USER and PLAIN/LOGIN only
        where cleartext is allowed, STLS only until TLS is on, SASL exactly what this connection accepts."""
        s = self.ctx.settings.session
        caps = ["TOP", "UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE",
                f"EXPIRE {s.expire}", f"LOGIN-DELAY {s.login_delay}"]
        if self.plaintext_ok:
            caps.insert(1, "USER")
        mechs = self.mechanisms()
        if mechs:
            caps.append("SASL " + " ".join(mechs))
        if self.ctx.tls is not None and not self.tls:
            caps.append("STLS")
        if s.show_implementation:
            caps.append(f"IMPLEMENTATION {self.ctx.implementation}")
        return multiline(ok("Capability list follows"), caps)

    def do_QUIT(self, cmd: Command) -> Reply:
        self.closing = True
        self.end_reason = "QUIT"
        if self.state is State.AUTHORIZATION:
            return ok("pop3d signing off")
        self.state = State.UPDATE  # RFC 1939 §6
        return self._update()

    async def _update(self) -> Result:
        drop = self.drop
        assert drop is not None
        deleted = set(self.deleted)
        if self.ctx.settings.session.expire == "0":
            deleted |= self.retrieved  # RFC 2449 §6.7 EXPIRE 0: retrieved mail is not kept on the server
        try:
            await drop.commit(deleted, self.retrieved - deleted)
        except StorageError as exc:
            log.warning("commit failed user=%s: %s", self.user.name if self.user else "?", exc)
            self.ctx.metrics.storage_error("commit")
            self.end_reason = "QUIT, commit failed"
            return err("some deleted messages were not removed", exc.code)
        finally:
            self.drop = None
            await drop.close()
        self.counters.dele = len(deleted)
        left = len(self.messages) - len(deleted)
        return ok(f"pop3d signing off ({left} message{'s' if left != 1 else ''} left)")

    # -- TRANSACTION -----------------------------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        msgs = self.messages
        deleted = self.deleted
        size = sum(m.size for i, m in enumerate(msgs) if i not in deleted) if deleted else sum(m.size for m in msgs)
        return len(msgs) - len(deleted), size

    def _index(self, arg: str) -> int | bytes:
        """Message number → 0-based index, or the -ERR reply (RFC 1939 §5: deleted messages are invisible)."""
        n = int(arg)
        if n > len(self.messages):
            return err(f"no such message, only {len(self.messages)} in maildrop")
        if n - 1 in self.deleted:
            return err(f"message {n} already deleted")
        return n - 1

    def do_STAT(self, cmd: Command) -> Reply:
        count, size = self._totals()
        return ok(f"{count} {size}")

    def do_LIST(self, cmd: Command) -> Reply:
        if cmd.args:
            i = self._index(cmd.args[0])
            return i if isinstance(i, bytes) else ok(f"{i + 1} {self.messages[i].size}")
        count, size = self._totals()
        lines = [f"{i + 1} {m.size}" for i, m in enumerate(self.messages) if i not in self.deleted]
        return multiline(ok(f"{count} messages ({size} octets)"), lines)

    def do_UIDL(self, cmd: Command) -> Reply:
        if cmd.args:
            i = self._index(cmd.args[0])
            return i if isinstance(i, bytes) else ok(f"{i + 1} {self.messages[i].uid}")
        lines = [f"{i + 1} {m.uid}" for i, m in enumerate(self.messages) if i not in self.deleted]
        return multiline(ok("unique-id listing follows"), lines)

    def do_DELE(self, cmd: Command) -> Reply:
        i = self._index(cmd.args[0])
        if isinstance(i, bytes):
            return i
        self.deleted.add(i)
        return ok(f"message {i + 1} deleted")

    def do_NOOP(self, cmd: Command) -> Reply:
        return ok()

    def do_RSET(self, cmd: Command) -> Reply:
        self.deleted.clear()
        self.last = 0  # RFC 1460: RSET also resets the highest message accessed
        count, size = self._totals()
        return ok(f"maildrop has {count} message{'s' if count != 1 else ''} ({size} octets)")

    def do_LAST(self, cmd: Command) -> Reply:
        return ok(str(self.last))

    def do_RETR(self, cmd: Command) -> Reply:
        i = self._index(cmd.args[0])
        if isinstance(i, bytes):
            return i
        return self._send(i, None)

    def do_TOP(self, cmd: Command) -> Reply:
        i = self._index(cmd.args[0])
        if isinstance(i, bytes):
            return i
        return self._send(i, int(cmd.args[1]))

    def _send(self, i: int, lines: int | None) -> Reply:
        """RETR (lines None) or TOP: small messages in one read and one reply, big ones streamed."""
        drop = self.drop
        assert drop is not None
        info = drop.messages[i]
        header = ok(f"{info.size} octets") if lines is None else ok("top of message follows")
        if info.size > SMALL_MESSAGE:
            return Stream(header, drop.chunks(i), wire.Encoder(lines), i, lines)
        try:
            raw = drop.read_small(i)
        except (StorageError, OSError) as exc:
            log.warning("read failed user=%s msg=%d: %s", self.user.name if self.user else "?", i + 1, exc)
            self.ctx.metrics.storage_error("read")
            return err(f"message {i + 1} cannot be read now", "SYS/TEMP")
        body = wire.encode(raw) if lines is None else wire.top(raw, lines)
        self.note_sent(i, lines, len(body))
        return header + body

    def note_sent(self, i: int, lines: int | None, octets: int) -> None:
        """Bookkeeping once a body went out: LAST, the Seen set, the logout counters."""
        self.last = max(self.last, i + 1)
        c = self.counters
        if lines is None:
            self.retrieved.add(i)
            c.retr += 1
            c.retr_bytes += octets
        else:
            c.top += 1
            c.top_bytes += octets


DISPATCH: dict[str, Callable[[Pop3Handler, Command], Reply]] = {
    name[3:]: getattr(Pop3Handler, name) for name in dir(Pop3Handler) if name.startswith("do_")
}
