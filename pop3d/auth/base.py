"""The authentication interface: who a user is, and how a secret is checked.

The POP3 handlers only see `Authenticator`. Password-file formats and hash schemes stay behind it, so SASL
and other user databases plug in without touching the protocol code.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


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


class Authenticator(abc.ABC):
    """A user database. Implementations must not block the event loop (hash checks go to a thread).

    Optional hooks have no-op defaults here, so callers just call them.
    """

    @abc.abstractmethod
    async def lookup(self, name: str) -> Credentials | None:
        """The stored credentials of `name`, or None when there is no such user."""

    @abc.abstractmethod
    async def verify(self, name: str, password: str) -> User | None:
        """The user when `password` is right; None for a wrong password *or* an unknown user."""

    def reload_soon(self) -> None:  # noqa: B027 - an optional hook: doing nothing is the right default
        """Re-read the user database before the next lookup (SIGHUP), even if it looks unchanged."""
