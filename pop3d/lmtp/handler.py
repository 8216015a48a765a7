"""The aiosmtpd hooks of pop3d's LMTP server: who may receive (RCPT) and where the message goes (DATA).

* RCPT TO (RFC 5321 §4.1.1.3): the recipient names a user (recipient.py) looked up in the user database;
  unknown -> `550 5.1.1`, database unreadable -> `451 4.3.0` (the MTA retries), past
  `lmtp.max_recipients` -> `452 4.5.3` (RFC 5321 §4.5.3.1.8: the MTA sends the rest in another transaction).
* DATA (RFC 2033 §4.2): one reply per accepted recipient, in RCPT order, each given only once the store
  said the message is durable: `250 2.0.0`; a store that cannot take it now -> `451 4.3.0`; one that never
  will -> `554 5.3.0`. aiosmtpd sends the one string DATA's hook returns, so the replies are joined with
  CRLF, each a complete reply line. Deliveries to the recipients run concurrently; nothing waits for a
  POP3 session (Storage.deliver).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable

from aiosmtpd.smtp import SMTP, Envelope, Session

from pop3d.auth.base import Authenticator, User
from pop3d.config import LmtpSettings
from pop3d.lmtp.recipient import user_name
from pop3d.lmtp.trace import trace_header
from pop3d.storage.base import PermanentError, Storage

log = logging.getLogger("pop3d.lmtp")


class Transaction(Envelope):
    """aiosmtpd's envelope plus the user each accepted recipient names (same order as `rcpt_tos`)."""

    def __init__(self) -> None:
        super().__init__()
        self.users: list[User] = []


class DeliveryHandler:
    """The hooks, shared by every connection of one worker. Settings, user database and storage are read
    through getters at each use, so a SIGHUP that replaces them (pop3d.runtime.reload) is seen at once."""

    def __init__(self, settings: Callable[[], LmtpSettings], auth: Callable[[], Authenticator],
                 storage: Callable[[], Storage], hostname: Callable[[], str]) -> None:  # fmt: skip
        self.settings, self.auth, self.storage, self.hostname = settings, auth, storage, hostname

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:  # fmt: skip
        assert isinstance(envelope, Transaction)
        cfg = self.settings()
        if len(envelope.rcpt_tos) >= cfg.max_recipients:
            return "452 4.5.3 Too many recipients"
        name = user_name(address, cfg.recipient, cfg.recipient_delimiter)
        if name is None:
            return f"550 5.1.1 <{address}>: no such user"
        try:
            creds = await self.auth().lookup(name)
        except Exception as exc:  # an unreadable passwd-file, a database down: not the recipient's fault
            log.error("lmtp: cannot look up %r: %s", name, exc)
            return f"451 4.3.0 <{address}>: user database unavailable, try again later"
        if creds is None:
            log.info("lmtp: unknown recipient %r", address)
            return f"550 5.1.1 <{address}>: no such user"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.users.append(creds.user)
        return f"250 2.1.5 <{address}> OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, Transaction)
        content = envelope.original_content or b""
        sender = envelope.mail_from or "<>"
        ident = secrets.token_hex(6)
        replies = await asyncio.gather(
            *(
                self._deliver(session, sender, address, user, content, ident)
                for address, user in zip(envelope.rcpt_tos, envelope.users, strict=True)
            )
        )
        return "\r\n".join(replies)  # RFC 2033 §4.2: one reply line per accepted recipient

    async def _deliver(self, session: Session, sender: str, address: str, user: User, content: bytes,
                       ident: str) -> str:  # fmt: skip
        message = content
        if self.settings().trace_headers:
            peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
            head = trace_header(sender, address, session.host_name or "", peer, self.hostname(), ident)
            message = head + content
        try:
            await self.storage().deliver(user, message)
        except PermanentError as exc:
            log.error("lmtp: id=%s refused for %s: %s", ident, user.name, exc)
            return f"554 5.3.0 <{address}>: mailbox refuses the message"
        except Exception as exc:  # TemporaryError, and anything unforeseen: the MTA keeps the message
            log.warning("lmtp: id=%s deferred for %s: %s", ident, user.name, exc)
            return f"451 4.3.0 <{address}>: mailbox unavailable, try again later"
        log.info("lmtp: id=%s delivered to %s from=<%s> size=%d", ident, user.name, sender.strip("<>"), len(message))
        return f"250 2.0.0 <{address}> delivered as {ident}"

    async def handle_exception(self, error: Exception) -> str:
        """A bug in a hook: a temporary failure, so the MTA keeps the message (aiosmtpd's default says 500)."""
        log.error("lmtp: internal error: %r", error)
        return "451 4.3.0 Internal error, try again later"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
