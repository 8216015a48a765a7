"""The authentication interface: who a user is, and how a secret is checked.

The POP3 handlers only see `Authenticator`. Password-file formats and hash schemes stay behind it, so SASL
and other user databases plug in without touching the protocol code.

No answer may tell an unknown user from a wrong password, by its text *or its timing* (RFC 1939 §13, RFC 5802
§9): every path that needs stored credentials also runs, for a name that does not exist (or whose entry cannot
serve the mechanism), on a `Decoy` shaped like a real entry, and succeeds only for real credentials. Since
real entries may differ in cost among themselves, failures are also held to a time floor (pop3d.auth.floors).
"""

from __future__ import annotations

import abc
import asyncio
import enum
import hashlib
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Final, TypeVar

from pop3d.auth.floors import Floors, step_name
from pop3d.i18n.saslprep import SASLprepError, saslprep

if TYPE_CHECKING:
    from pop3d.auth.cred_cache import CredCache

T = TypeVar("T")

#: Key for `Authenticator.decoy`'s default: random per process (pop3d.auth.state_secret keeps a stable one).
_PROCESS_KEY: Final[bytes] = os.urandom(32)


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


@dataclass(frozen=True, slots=True)
class Decoy:
    """Stand-in credentials for one name, the same every time for that name (and across restarts when the
    server keeps a secret, pop3d.auth.state_secret).

    `creds` is shaped like a real entry (scheme and cost parameters) for a password nobody knows: code run on
    it costs what it costs on a real entry, but must never let anybody in. `key` is 32 octets derived from
    the server secret and the name, for values a mechanism must derive per user (the SCRAM salt of a user
    whose stored secret cannot do SCRAM, RFC 5802 §9).
    """

    creds: Credentials
    key: bytes


def name_bytes(name: str) -> bytes:
    """A user name as octets for hashing; never raises, whatever the name holds (lone surrogates included)."""
    return name.encode("utf-8", "surrogatepass")


class Lookup(enum.Enum):
    """`verify_entry(known=...)` when the caller has not looked the entry up itself."""

    NOT_DONE = "not done"


class Authenticator(abc.ABC):
    """A user database. Implementations must not block the event loop (hash checks go to a thread).

    Optional hooks have working defaults here, so callers just call them. Implementations hold failed
    checks to `floors` (pop3d.auth.floors); the defaults here do.
    """

    _floors: Floors | None = None
    #: True when none of its coroutines needs to run as a Task of its own (no asyncio.timeout or wait_for, which
    #: ask for the current task): the session may then run them at once (pop3d.pop3.eager), and most logins
    #: end without ever waiting. False is the safe default; PostgreSQL's qualifies by connecting in Tasks.
    task_free: ClassVar[bool] = False

    @property
    def floors(self) -> Floors:
        """This database's time floors, made on first use (so subclasses need not call an `__init__`)."""
        if self._floors is None:
            self._floors = Floors()
        return self._floors

    @abc.abstractmethod
    async def lookup(self, name: str) -> Credentials | None:
        """The stored credentials of `name`, or None when there is no such user (or the name is not one)."""

    @abc.abstractmethod
    async def verify(self, name: str, password: str) -> User | None:
        """The user when `password` is right; None for a wrong password *or* an unknown user, in the same time."""

    async def verify_entry(
        self, name: str, password: str, *, known: Credentials | Lookup | None = Lookup.NOT_DONE
    ) -> tuple[User | None, Credentials | None]:
        """`verify`, plus the stored entry the password was proved right against (None on failure, or when
        that is unsure): what `verify_remembered` may remember. `known`: the entry (None: no such user) the
        caller has just looked up, which a database that checks one entry may use instead of a second lookup.

        This default ignores `known`, reads the entry before and after `verify` and names it only when both
        agree, so an entry rewritten during the check is not remembered; a database that knows the entry it
        checked (passwd-file, PostgreSQL) returns it directly."""
        before = await self.lookup(name)
        user = await self.verify(name, password)
        if user is None or before is None:
            return user, None
        after = await self.lookup(name)
        same = after is not None and (after.scheme, after.secret) == (before.scheme, before.secret)
        return user, before if same else None

    async def verify_remembered(
        self,
        name: str,
        password: str,
        cache: CredCache | None,
        ttl: float,
        on_hit: Callable[[], None] | None = None,
    ) -> User | None:
        """`verify` through the verified-credentials cache (pop3d.auth.cred_cache): USER/PASS, SASL PLAIN and
        LOGIN call this, so every user database gets the cache without knowing of it.

        A password proved right for this very entry (scheme and stored secret) less than `ttl` seconds ago is
        right again, answered on the event loop: one lookup and one HMAC, no hash, no thread. Everything else is
        `verify_entry`, in full; only a success is remembered, so a wrong password always pays the hash, the
        failure floor and (in the handler) the penalty. The lookup, HMAC and probe run for unknown names too,
        so a miss costs the same whether the user exists or not. `cache` None or `ttl` 0: plain `verify`.
        """
        if cache is None or ttl <= 0:
            return await self.verify(name, password)
        creds = await self.lookup(name)
        scheme, secret = (creds.scheme, creds.secret) if creds is not None else ("", "")
        digest = cache.digest(name, password, scheme, secret)
        if cache.fresh(digest, ttl) and creds is not None:
            if on_hit is not None:
                on_hit()
            return creds.user
        user, proved = await self.verify_entry(name, password, known=creds)  # no second lookup (one query)
        if user is not None and proved is not None:
            if (proved.scheme, proved.secret) != (scheme, secret):  # the entry changed since the probe
                digest = cache.digest(name, password, proved.scheme, proved.secret)
            cache.remember(digest)
        return user

    async def set_secret(self, name: str, secret: str) -> bool:
        """Replace the stored secret of `name` by `secret` (a `{SCHEME}...` string, already hashed) so the next
        login on every worker sees it; False when there is no such user. Used by poppassd and `pop3d user
        passwd`. A read-only database keeps this default, which refuses."""
        raise PermissionError(f"{type(self).__name__} cannot change passwords")

    async def user_names(self) -> list[str]:
        """Every user name of the database, sorted (admin tools such as `pop3d uidl import` walk them); a
        database that cannot list its users keeps this default, which refuses."""
        raise PermissionError(f"{type(self).__name__} cannot list its users")

    def reload_soon(self) -> None:  # noqa: B027 - an optional hook: doing nothing is the right default
        """Re-read the user database before the next lookup (SIGHUP), even if it looks unchanged."""

    def decoy(self, name: str) -> Decoy:
        """Stand-in credentials for `name`. Cheap (no hashing); computed for real names too, so both cost alike.

        This default is a {PLAIN} decoy keyed per process; user databases override it to imitate their entries.
        """
        key = hmac.new(_PROCESS_KEY, b"user\0" + name_bytes(name), hashlib.sha256).digest()
        return Decoy(Credentials(User(name=name), "PLAIN", key.hex()), key)

    async def with_credentials(self, name: str, fn: Callable[[Credentials | None, Decoy], T]) -> T:
        """`fn(credentials or None, decoy)` run off the event loop: the SASL `Lookup` step.

        The handler calls `await auth.with_credentials(step.authcid, mech.resume)` where it used to call
        `lookup` and then `mech.resume(creds)`: the mechanism then does the same work for an unknown user (on
        the decoy) as for a real one, and `fn` may hash (SCRAM from {PLAIN} runs PBKDF2). Every answer,
        success or not, is held to the mechanism's floor: the client cannot tell them apart yet, and entries
        of different schemes cost differently here.
        """
        started = time.monotonic()
        creds = await self.lookup(name)
        decoy = self.decoy(name)
        result = await asyncio.to_thread(fn, creds, decoy)
        await self.floors.hold(step_name(fn), started)
        return result

    async def verify_apop(self, name: str, timestamp: str, digest: str) -> User | None:
        """APOP (RFC 1939 §7): the user when `digest` is MD5(timestamp + shared secret) in lower-case hex.

        Only {PLAIN} secrets can answer; an unknown user runs the same steps on its decoy, and fails, no
        sooner than the "apop" floor.
        """
        started = time.monotonic()
        creds = await self.lookup(name)
        user = apop_check(creds, self.decoy(name), timestamp, digest)
        await self.floors.hold("apop", started, failed=user is None)
        return user


def apop_check(creds: Credentials | None, decoy: Decoy, timestamp: str, digest: str) -> User | None:
    """The APOP comparison on `creds`, or on the decoy's credentials when there are none or they keep no
    clear secret (the same work as an unknown user's)."""
    own = creds is not None and creds.plaintext() is not None
    source = creds if creds is not None and own else decoy.creds
    secret = source.plaintext()
    if secret is None:  # a hashed decoy cannot answer APOP either
        return None
    try:
        # RFC 6856 §2.2: the APOP password is SASLprepped "as a stored string" (printable ASCII is unchanged)
        secret = saslprep(secret, stored=True)
    except SASLprepError:
        return None  # a secret SASLprep refuses cannot be what a conforming client hashed
    expected = hashlib.md5((timestamp + secret).encode("utf-8", "surrogateescape")).hexdigest()
    ok = hmac.compare_digest(expected.encode(), digest.lower().encode("utf-8", "surrogatepass"))
    return creds.user if ok and own and creds is not None else None
