"""POP3 command handlers: one method per verb, collected into a dispatch table (aiosmtpd-style).

A handler gets a parsed, state-legal `Command` (pop3d.pop3.protocol did the grammar) and returns one result
object (pop3d.pop3.results) that tells the session everything: a `Reply` to send now (perhaps the last one),
`StartTLS`, a `Stream` (a big message body to send with flow control), a SASL `Challenge`, or `Pending`
(password checks, storage I/O) resolving to one of those. Fast verbs stay synchronous so pipelined
STAT/LIST/UIDL/DELE bursts need no Task at all. The handler owns the POP3 session semantics: the state (moved
only through pop3d.pop3.state's table), the deleted set, LAST, counters.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Callable

from pop3d import wire
from pop3d.auth import sasl
from pop3d.auth.base import User
from pop3d.i18n.saslprep import SASLprepError, saslprep
from pop3d.ops import logfmt
from pop3d.pop3 import catalog
from pop3d.pop3.context import ServerContext
from pop3d.pop3.protocol import CRLF, Command, err, multiline, ok
from pop3d.pop3.results import Challenge, Pending, Reply, Resolved, Result, Stream
from pop3d.pop3.state import SessionEvent, State, next_state
from pop3d.storage.base import SMALL_MESSAGE, InUse, Maildrop, MessageInfo, ReadLater, StorageError

log = logging.getLogger("pop3d.pop3.session")
#: no message numbers: what `deleted` and `retrieved` are until the first one (never mutated)
NONE: frozenset[int] = frozenset()

# Constant replies are built once per language (pop3d.pop3.catalog): a pipelined burst pays no formatting, and
# every human-readable text comes from the session's catalog (`self.texts`, switched by UTF8 and LANG).
OK = Reply(ok())


class Counters:
    """Dovecot-like logout counters (top=n/bytes, retr=n/bytes, del=n/total)."""

    __slots__ = ("dele", "retr", "retr_bytes", "top", "top_bytes")

    def __init__(self) -> None:
        self.top = self.top_bytes = self.retr = self.retr_bytes = self.dele = 0


class Pop3Handler:
    """Per-connection POP3 semantics. The session (pop3d.pop3.session) feeds it commands in order."""

    __slots__ = (
        "auth_failures",
        "born",
        "counters",
        "ctx",
        "deleted",
        "drop",
        "end_reason",
        "external_identity",
        "last",
        "local",
        "mech",
        "messages",
        "on_lock_lost",
        "peer",
        "retrieved",
        "secure",
        "sid",
        "state",
        "texts",
        "timestamp",
        "tls",
        "tried",
        "user",
        "user_name",
        "utf8",
    )

    def __init__(self, ctx: ServerContext, peer: str, local: str = "-") -> None:
        """`peer`: the client's address; `local`: the address it connected to, "host:port" (for the log)."""
        self.ctx = ctx
        self.peer = peer
        self.local = local
        self.sid = ctx.session_id()  # on every log line about this session
        self.born = time.monotonic()
        self.mech: str | None = None  # the last authentication method tried: USER, APOP or a SASL name
        self.tried: str | None = None  # the last user name an authentication named
        self.state = State.AUTHORIZATION
        self.timestamp = ctx.apop_timestamp()
        self.user_name: str | None = None  # from USER, waiting for PASS
        self.user: User | None = None
        self.drop: Maildrop | None = None
        self.messages: list[MessageInfo] = []  # the session snapshot; numbering never changes (RFC 1939 §5)
        # the shared empty NONE until the first DELE / RETR: an idle session holds no empty sets (216 B each)
        self.deleted: set[int] | frozenset[int] = NONE
        self.retrieved: set[int] | frozenset[int] = NONE
        self.last = 0  # RFC 1460 LAST: highest message number touched by RETR/TOP
        self.counters = Counters()
        self.auth_failures = 0  # failed authentications on this connection (auth.max_failures_per_connection)
        #: the logout line's reason (ServerContext.log_session_end); written by the session as it ends, never
        #: read back by it: what ends a session is said by a `Reply(close=True)` or is the session's own doing
        self.end_reason = "disconnected"
        self.secure = ctx.is_secure_network(peer)  # cleartext passwords allowed (TLS sets it too)
        self.tls = False
        self.external_identity: str | None = None  # login name from a verified TLS client certificate
        #: what to call if the storage loses the maildrop lock while this session holds it (the session sets it)
        self.on_lock_lost: Callable[[], None] | None = None
        self.utf8 = False  # RFC 6856 §2: UTF-8 mode (the UTF8 command)
        #: the replies' language: server.language, folded to ASCII until UTF8 or LANG (RFC 6856 §2.1, §3.2)
        self.texts = catalog.texts(ctx.settings.server.language)

    def tls_established(self, identity: str | None) -> None:
        """The connection is now encrypted (STLS done or an implicit-TLS listener)."""
        self.tls = self.secure = True
        self.external_identity = identity

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
        return ok(self.texts.greeting(self.timestamp))

    def dispatch(self, cmd: Command) -> Result:
        return DISPATCH[cmd.verb](self, cmd)

    async def abort(self) -> None:
        """The session is over: release the maildrop. Without a QUIT it never entered UPDATE, so this
        deletes nothing (RFC 1939 §6); after QUIT the commit already ran and released it."""
        try:
            if self.drop is not None:
                drop, self.drop = self.drop, None
                await drop.close()
        finally:
            self.state = next_state(self.state, SessionEvent.DISCONNECT)

    def log_fields(self) -> dict[str, object]:
        """What every event line about this session carries after its own fields (pop3d.ops.logfmt.event)."""
        return {
            "session": self.sid,
            "lip": self.local,
            "tls": self.tls,
            "mech": self.mech,
            "duration": round(time.monotonic() - self.born, 3),
        }

    def _event(self, level: int, name: str, text: str, **fields: object) -> None:
        """A login, auth failure or lock refusal: `text`, then `fields`, then the session's own fields."""
        logfmt.event(log, level, name, text, {**fields, **self.log_fields()})

    # -- AUTHORIZATION ---------------------------------------------------------------------------

    # RFC 6856 §2.2: CAPA says "UTF8 USER", so a client MAY send UTF-8 in USER, PASS and APOP, "before issuing
    # the UTF8 command" too; the server SHOULD apply SASLprep to the USER and PASS arguments and MUST to the APOP
    # user name (all as query strings), and MUST reject a name or password with a prohibited character.

    def do_USER(self, cmd: Command) -> Result:
        self.mech, self.tried = "USER", cmd.args[0]
        if not self.plaintext_ok:
            return self.texts.plaintext_refused
        try:
            name = saslprep(cmd.args[0])
        except SASLprepError:
            self.user_name = None
            return self.texts.bad_user_name
        # RFC 1939 §7: we never say whether the mailbox exists (no user enumeration)
        self.user_name = self.tried = name
        return self.texts.send_pass

    def do_PASS(self, cmd: Command) -> Result:
        self.mech = "USER"
        if not self.plaintext_ok:
            return self.texts.plaintext_refused
        if self.user_name is None:
            return self.texts.user_first
        name, self.user_name = self.user_name, None  # RFC 1939 §7: a failed PASS needs a new USER
        try:
            password = saslprep(cmd.args[0])
        except SASLprepError:
            # refused like a wrong password (same line, same penalty): the reply tells nothing more
            return Pending(self._failed(name, "password refused by SASLprep"))
        return Pending(self._pass(name, password))

    async def _pass(self, name: str, password: str) -> Resolved:
        user = await self.ctx.verify_password(name, password)
        return await self._login(user, name)

    def do_APOP(self, cmd: Command) -> Result:
        self.mech, self.tried = "APOP", cmd.args[0]
        try:
            name = saslprep(cmd.args[0])
        except SASLprepError:
            return self.texts.bad_user_name
        self.tried = name
        return Pending(self._apop(name, cmd.args[1].lower()))

    async def _apop(self, name: str, digest: str) -> Resolved:
        # RFC 1939 §7: MD5 of the greeting's timestamp followed by the shared secret; an unknown user runs the
        # same steps on a decoy (pop3d.auth.base.Authenticator.verify_apop), so timing says nothing
        user = await self.ctx.auth.verify_apop(name, self.timestamp, digest)
        return await self._login(user, name)

    async def _login(self, user: User | None, name: str) -> Reply:
        """Common tail of every successful or failed authentication: delay, LOGIN-DELAY, lock, snapshot."""
        ctx = self.ctx
        self.tried = name
        if user is None:
            return await self._failed(name)
        # Dovecot's auth penalty: while this address is under penalty, a right password waits as long as a wrong
        # one would, or an attacker takes a quick answer as "right" and hangs up on slow ones. Cleared only after
        # the wait, so hanging up keeps the penalty (it is keyed by address, not by connection).
        wait = ctx.penalty.delay(self.peer, time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)
        ctx.penalty.succeed(self.peer)
        delay = ctx.settings.session.login_delay
        now = time.time()  # wall clock: worker processes compare it through file mtimes (pop3d.auth.login_delay)
        if ctx.login_delays.too_soon(user.name, delay, now):
            # RFC 2449 §8.1.2
            ctx.metrics.login("login_delay")
            return Reply(err(self.texts.login_delay(delay), "LOGIN-DELAY"))
        # never raises (pop3d.storage.base.Storage.maildrop): an unusable name or home fails in open() below
        drop = ctx.storage.maildrop(user)
        try:
            async with ctx.open_gate():
                await drop.open()
        except InUse:
            await drop.close()
            self._event(logging.INFO, "in_use", "maildrop in use", user=user.name, rip=self.peer)
            ctx.metrics.login("in_use")
            ctx.metrics.lock_conflict()
            return self.texts.in_use  # RFC 2449 §8.1.1
        except StorageError as exc:
            await drop.close()
            log.warning("maildrop unavailable user=%s rip=%s session=%s: %s", user.name, self.peer, self.sid, exc)
            ctx.metrics.login("unavailable")
            ctx.metrics.storage_error("open")
            return Reply(err(self.texts.open_failed, exc.code))  # RFC 3206 §4 SYS/TEMP or SYS/PERM
        except OSError as exc:
            await drop.close()
            log.warning("maildrop unavailable user=%s rip=%s session=%s: %s", user.name, self.peer, self.sid, exc)
            ctx.metrics.login("unavailable")
            ctx.metrics.storage_error("open")
            return Reply(err(self.texts.open_failed, "SYS/TEMP"))
        ctx.login_delays.record(user.name, delay, now)
        ctx.metrics.login("ok")
        self.state = next_state(self.state, SessionEvent.LOGIN_OK)
        self.user, self.drop, self.messages = user, drop, drop.messages
        self.timestamp = ""  # RFC 1939 §7: only APOP, before login, uses it; a held session need not keep it
        drop.lock_lost_hook = self.on_lock_lost
        count, size = self._totals()
        self._event(logging.INFO, "login", "login", user=user.name, rip=self.peer, messages=count, size=size)
        # RFC 6856 §2.1: no UTF-8 to a client outside UTF-8 mode, not even its own name echoed back
        name = user.name if self.utf8 or user.name.isascii() else user.name.encode("ascii", "replace").decode()
        return Reply(ok(self.texts.logged_in(count, name, size)))

    async def _failed(self, name: str | None, why: str = "") -> Reply:
        """A failed authentication: the per-address penalty (pop3d.auth.penalty) delays only this session."""
        wait = self.ctx.penalty.fail(self.peer, time.monotonic())
        self.ctx.metrics.login("failed")
        self.auth_failures += 1
        if name is not None:
            self.tried = name
        # the text keeps its long-standing shape (repr of the name: nothing from the wire can break the line)
        text = f"auth failed user={name!r} rip={self.peer}{f' ({why})' if why else ''} delay={wait:.1f}s"
        shown = {"failures": self.auth_failures, **self.log_fields()}
        fields = {"user": name, "rip": self.peer, "reason": why or None, "delay": round(wait, 3), **shown}
        logfmt.event(log, logging.INFO, "auth_failed", text, fields, shown)
        if wait > 0:
            await asyncio.sleep(wait)
        # As Dovecot's login processes do after a few failed attempts: the guesser must reconnect, and meet the
        # connection limits and the (address-wide, still running) penalty again.
        if self.auth_failures >= self.ctx.settings.auth.max_failures_per_connection:
            return self.texts.too_many_failures
        return self.texts.auth_failed

    # -- STLS (RFC 2595) and AUTH (RFC 5034) ------------------------------------------------------

    def do_STLS(self, cmd: Command) -> Result:
        if self.tls:
            return self.texts.already_tls  # RFC 2595 §4: STLS once, never after a TLS layer is up
        if self.ctx.tls is None:
            return self.texts.no_tls
        if self.utf8:
            return self.texts.stls_after_utf8  # RFC 6856 §2.1: servers MAY refuse STLS after UTF8
        self.user_name = None  # RFC 2595 §4: nothing from before the handshake carries over
        return self.texts.begin_tls

    # -- RFC 6856: UTF8 and LANG ----------------------------------------------------------------

    def do_UTF8(self, cmd: Command) -> Result:
        """§2.1: UTF-8 mode on (AUTHORIZATION only, the parser sees to it). Messages are sent as stored either
        way; what changes here is that reply texts may now be UTF-8 (the ASCII fold is no longer needed). It
        changes nothing for AUTH: §2.2, UTF-8 in AUTH "is governed by" RFC 5034, which is UTF-8 already."""
        self.utf8 = True
        self.texts = catalog.texts(self.texts.language, utf8=True)
        return self.texts.utf8_on

    def do_LANG(self, cmd: Command) -> Result:
        """§3.2: without argument, the languages we have, one "tag name" line each (the name in the language
        itself, UTF-8); with a language range, switch and answer "+OK <tag> <text>" in the new language, or
        -ERR in the current one and keep it. "*" is the administrator's choice, server.language."""
        if not cmd.args:
            lines = [f"{t.language} {t.name}" for t in catalog.TEXTS.values() if t.utf8]
            return Reply(multiline(self.texts.lang_list, lines))
        wanted = cmd.args[0]
        found = catalog.texts(self.ctx.settings.server.language, utf8=True) if wanted == "*" else catalog.match(wanted)
        if found is None:
            return Reply(err(self.texts.lang_unknown(wanted)))  # the parser let only RFC 4647 characters through
        self.texts = found
        return found.lang_changed

    def do_AUTH(self, cmd: Command) -> Result:
        usable = self.mechanisms()
        if not cmd.args:
            return Reply(multiline(self.texts.sasl_list, usable))  # pre-RFC 5034 clients (Outlook) ask so
        name = cmd.args[0].upper()
        self.mech = name
        if name not in usable:
            if name in sasl.PLAINTEXT and name in self.ctx.settings.auth.mechanisms:
                return self.texts.plaintext_refused
            if name == "EXTERNAL" and name in self.ctx.settings.auth.mechanisms:
                return self.texts.external_needs_cert
            return Reply(err(self.texts.unsupported_mechanism(name), "AUTH"))
        initial: bytes | None = None
        if len(cmd.args) == 2:  # RFC 5034 §4: "=" is an empty initial response
            initial = b"" if cmd.args[1] == "=" else self._b64(cmd.args[1].encode("ascii"))
            if initial is None:
                return self.texts.initial_not_base64
        mech = sasl.create(name, hostname=self.ctx.hostname, external_identity=self.external_identity)
        return self._sasl_advance(mech, mech.start(initial))

    @staticmethod
    def _b64(data: bytes) -> bytes | None:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None

    def sasl_line(self, mech: sasl.Mechanism, line: bytes | None) -> Result:
        """The client's answer to the `Challenge` of `mech` (the session routes it here, not to the parser)."""
        if line is None:
            return self.texts.sasl_too_long
        line = line.strip()
        if line == b"*":  # RFC 5034 §4: the client cancels; -ERR, and the session goes on
            return self.texts.sasl_cancelled
        data = self._b64(line)
        if data is None:
            return self.texts.sasl_not_base64  # RFC 5034 §4: reject, the exchange is over
        return self._sasl_advance(mech, mech.step(data))

    def _sasl_advance(self, mech: sasl.Mechanism, step: sasl.Step) -> Result:
        if isinstance(step, sasl.Challenge):
            return self._challenge(mech, step.data)
        return Pending(self._sasl_async(mech, step))

    @staticmethod
    def _challenge(mech: sasl.Mechanism, data: bytes) -> Challenge:
        return Challenge(b"+ " + base64.b64encode(data) + CRLF, mech)  # RFC 5034 §4 continuation

    async def _sasl_async(self, mech: sasl.Mechanism, step: sasl.Step) -> Resolved:
        while True:
            if isinstance(step, sasl.Lookup):
                self.tried = step.authcid
                # off the loop (SCRAM from {PLAIN} runs PBKDF2); an unknown user runs the same steps on a decoy
                step = await self.ctx.auth.with_credentials(step.authcid, mech.resume)
            elif isinstance(step, sasl.CheckPassword):
                user = await self.ctx.verify_password(step.authcid, step.password)
                return await self._login(user, step.authcid)
            elif isinstance(step, sasl.Success):
                return await self._login(step.user, step.user.name)
            elif isinstance(step, sasl.Failure):
                return await self._failed(step.authcid, f"{mech.name}: {step.reason}")
            else:
                return self._challenge(mech, step.data)

    def do_RPOP(self, cmd: Command) -> Result:
        self.mech = "RPOP"
        return self.texts.rpop_refused

    def do_CAPA(self, cmd: Command) -> Result:
        """RFC 2449 §5-6: the capability list, the same in both states ("capabilities available in the
        AUTHORIZATION state MUST be announced in both states", §5; USER and SASL: "both / no", §6.3, §6.4;
        STLS likewise, RFC 2595 §4). What it contains depends on the connection: USER and PLAIN/LOGIN only
        where cleartext is allowed, STLS only until TLS is on, SASL exactly what this connection accepts."""
        s = self.ctx.settings.session
        expire = self.ctx.settings.storage.expire_days  # RFC 2449 §6.7: NEVER or days; the driver expires
        caps = [
            "TOP",
            "UIDL",
            "PIPELINING",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            f"EXPIRE {str(expire).upper()}",
            f"LOGIN-DELAY {s.login_delay}",
        ]
        if self.plaintext_ok:
            caps.insert(1, "USER")
        mechs = self.mechanisms()
        if mechs:
            caps.append("SASL " + " ".join(mechs))
        if self.ctx.tls is not None and not self.tls:
            caps.append("STLS")
        if s.show_implementation:
            caps.append(f"IMPLEMENTATION {self.ctx.implementation}")
        # RFC 6856 §2.2, §3.1: "both / no", like the rest; USER: UTF-8 names and passwords (SASLprep'd) accepted
        caps += ("UTF8 USER", "LANG")
        return Reply(multiline(self.texts.capa_list, caps))

    def do_QUIT(self, cmd: Command) -> Result:
        before = self.state
        self.state = next_state(before, SessionEvent.QUIT)  # TRANSACTION: UPDATE (RFC 1939 §6)
        if before is State.AUTHORIZATION:
            return self.texts.signing_off
        return Pending(self._update())

    async def _update(self) -> Reply:
        try:
            return await self._commit()
        finally:
            self.state = next_state(self.state, SessionEvent.COMMITTED)

    async def _commit(self) -> Reply:
        drop = self.drop
        assert drop is not None
        deleted = set(self.deleted)
        if self.ctx.settings.storage.expire_days == 0:
            deleted |= self.retrieved  # RFC 2449 §6.7 EXPIRE 0: retrieved mail is not kept on the server
        try:
            await drop.commit(deleted, set(self.retrieved - deleted))
        except StorageError as exc:
            log.warning("commit failed user=%s session=%s: %s", self.user.name if self.user else "?", self.sid, exc)
            self.ctx.metrics.storage_error("commit")
            return Reply(err(self.texts.commit_failed, exc.code), close=True, reason="QUIT, commit failed")
        finally:
            self.drop = None
            await drop.close()
        self.counters.dele = len(deleted)
        left = len(self.messages) - len(deleted)
        return Reply(ok(self.texts.signed_off(left)), close=True, reason="QUIT")

    # -- TRANSACTION -----------------------------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        msgs = self.messages
        deleted = self.deleted
        size = sum(m.size for i, m in enumerate(msgs) if i not in deleted) if deleted else sum(m.size for m in msgs)
        return len(msgs) - len(deleted), size

    def _index(self, arg: str) -> int | Reply:
        """Message number → 0-based index, or the -ERR reply (RFC 1939 §5: deleted messages are invisible)."""
        n = int(arg)
        if n > len(self.messages):
            return Reply(err(self.texts.no_such_message(len(self.messages))))
        if n - 1 in self.deleted:
            return Reply(err(self.texts.already_deleted(n)))
        return n - 1

    def do_STAT(self, cmd: Command) -> Result:
        count, size = self._totals()
        return Reply(ok(f"{count} {size}"))

    def do_LIST(self, cmd: Command) -> Result:
        if cmd.args:
            i = self._index(cmd.args[0])
            return i if isinstance(i, Reply) else Reply(ok(f"{i + 1} {self.messages[i].size}"))
        count, size = self._totals()
        lines = [f"{i + 1} {m.size}" for i, m in enumerate(self.messages) if i not in self.deleted]
        return Reply(multiline(ok(self.texts.listing(count, size)), lines))

    def do_UIDL(self, cmd: Command) -> Result:
        if cmd.args:
            i = self._index(cmd.args[0])
            return i if isinstance(i, Reply) else Reply(ok(f"{i + 1} {self.messages[i].uid}"))
        lines = [f"{i + 1} {m.uid}" for i, m in enumerate(self.messages) if i not in self.deleted]
        return Reply(multiline(self.texts.uidl_list, lines))

    def do_DELE(self, cmd: Command) -> Result:
        i = self._index(cmd.args[0])
        if isinstance(i, Reply):
            return i
        deleted = self.deleted
        if not isinstance(deleted, set):
            deleted = self.deleted = set()
        deleted.add(i)
        return Reply(ok(self.texts.deleted(i + 1)))

    def do_NOOP(self, cmd: Command) -> Result:
        return OK

    def do_RSET(self, cmd: Command) -> Result:
        self.deleted = NONE
        self.last = 0  # RFC 1460: RSET also resets the highest message accessed
        count, size = self._totals()
        return Reply(ok(self.texts.rset_done(count, size)))

    def do_LAST(self, cmd: Command) -> Result:
        return Reply(ok(str(self.last)))

    def do_RETR(self, cmd: Command) -> Result:
        i = self._index(cmd.args[0])
        if isinstance(i, Reply):
            return i
        return self._send(i, None)

    def do_TOP(self, cmd: Command) -> Result:
        i = self._index(cmd.args[0])
        if isinstance(i, Reply):
            return i
        return self._send(i, int(cmd.args[1]))

    def _send(self, i: int, lines: int | None) -> Reply | Stream | Pending:
        """RETR (lines None) or TOP: small messages in one read and one reply, big ones streamed.

        RFC 6856 §2.1: outside UTF-8 mode, "character strings outside the ASCII repertoire MUST NOT be sent
        to the client as is"; a message whose header section is not ASCII (RFC 6532 UTF-8 headers) is
        refused with -ERR [UTF8] (§5), which the client may retry after UTF8. 8-bit bodies under ASCII
        headers (8BITMIME) are sent as stored, as POP3 always did."""
        drop = self.drop
        assert drop is not None
        info = drop.messages[i]
        header = ok(self.texts.octets(info.size)) if lines is None else self.texts.top_follows
        if info.size > SMALL_MESSAGE:
            if self.utf8:
                return Stream(header, drop.chunks(i), wire.Encoder(lines), i, lines)
            return Pending(self._stream_ascii_only(drop, i, lines, header))
        if drop.async_reads:
            return Pending(self._send_read(drop, i, lines, header))
        try:
            raw = drop.read_small(i)
        except (StorageError, OSError) as exc:
            return self._read_failed(i, exc)
        except ReadLater:  # too much for the loop this time (a message renamed meanwhile): off the loop
            return Pending(self._send_read(drop, i, lines, header))
        return self._small(raw, i, lines, header)

    async def _send_read(self, drop: Maildrop, i: int, lines: int | None, header: bytes) -> Reply:
        """`_send` for a driver that reads over the network (a database): the read is awaited."""
        try:
            raw = await drop.read(i)
        except (StorageError, OSError) as exc:
            return self._read_failed(i, exc)
        return self._small(raw, i, lines, header)

    def _small(self, raw: bytes, i: int, lines: int | None, header: bytes) -> Reply:
        if not self.utf8 and not wire.headers_ascii(raw):
            return Reply(err(self.texts.needs_utf8(i + 1), "UTF8"))
        body = wire.encode(raw) if lines is None else wire.top(raw, lines)
        self.note_sent(i, lines, len(body))
        return Reply(header + body)

    async def _stream_ascii_only(self, drop: Maildrop, i: int, lines: int | None, header: bytes) -> Reply | Stream:
        """A big message outside UTF-8 mode: its first chunk (CHUNK octets, where the header section is) is
        read before the +OK, so a message with UTF-8 headers can still be refused."""
        chunks = drop.chunks(i)
        try:
            first = await anext(chunks, b"")
        except (StorageError, OSError) as exc:
            await chunks.aclose()  # type: ignore[attr-defined]
            return self._read_failed(i, exc)
        if not wire.headers_ascii(first):
            await chunks.aclose()  # type: ignore[attr-defined]
            return Reply(err(self.texts.needs_utf8(i + 1), "UTF8"))
        return Stream(header, _after(first, chunks), wire.Encoder(lines), i, lines)

    def _read_failed(self, i: int, exc: StorageError | OSError) -> Reply:
        user = self.user.name if self.user else "?"
        log.warning("read failed user=%s msg=%d session=%s: %s", user, i + 1, self.sid, exc)
        self.ctx.metrics.storage_error("read")
        # RFC 3206 §4: SYS/PERM for a message refused for the session (pop3d.storage.base.MessageUnreadable)
        code = exc.code if isinstance(exc, StorageError) else "SYS/TEMP"
        return Reply(err(self.texts.read_failed(i + 1), code))

    def note_sent(self, i: int, lines: int | None, octets: int) -> None:
        """Bookkeeping once a body went out: LAST, the Seen set, the logout counters."""
        self.last = max(self.last, i + 1)
        c = self.counters
        if lines is None:
            retrieved = self.retrieved
            if not isinstance(retrieved, set):
                retrieved = self.retrieved = set()
            retrieved.add(i)
            c.retr += 1
            c.retr_bytes += octets
        else:
            c.top += 1
            c.top_bytes += octets


DISPATCH: dict[str, Callable[[Pop3Handler, Command], Result]] = {
    name[3:]: getattr(Pop3Handler, name) for name in dir(Pop3Handler) if name.startswith("do_")
}


async def _after(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`first`, then what `rest` yields (a stream whose first chunk was already read)."""
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
