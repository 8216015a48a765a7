"""The authentication interface: who a user is, and how a secret is checked.

The POP3 handlers only see `Authenticator`. Password-file formats and hash schemes stay behind it, so SASL
(issue 4) and other user databases plug in without touching the protocol code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class User:
    """An authenticated (or looked-up) account. `home` and ids come from the user database if it has them."""

    name: str
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the user database stores for one account: the scheme and the encoded secret."""

    user: User
    scheme: str  # upper-case Dovecot scheme name without braces, e.g. "PLAIN", "SHA512-CRYPT"
    secret: str

    def plaintext(self) -> str | None:
        """The clear secret when the scheme keeps one (needed by APOP, CRAM-MD5); None otherwise."""
        return self.secret if self.scheme in ("PLAIN", "CLEARTEXT") else None


class Authenticator(Protocol):
    """A user database. Implementations must not block the event loop (hash checks go to a thread)."""

    async def lookup(self, name: str) -> Credentials | None:
        """The stored credentials of `name`, or None when there is no such user."""
        ...

    async def verify(self, name: str, password: str) -> User | None:
        """The user when `password` is right; None for a wrong password *or* an unknown user."""
        ...
