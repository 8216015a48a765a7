"""What every user database of `{SCHEME}secret` strings shares: password checks in a small hash pool,
decoys imitating its entries for unknown users (pop3d.auth.decoys) and time floors calibrated on them
(pop3d.auth.floors). The passwd-file and the PostgreSQL users table differ only in where entries come from.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Final, TypeVar

from pop3d.auth import floors, sasl, schemes
from pop3d.auth.base import Authenticator, Credentials, Decoy, Lookup, User
from pop3d.auth.decoys import Decoys

__all__ = ["DEFAULT_MAX_PASSWORD_LENGTH", "MAX_NAME_OCTETS", "HashedSecrets", "plausible_name"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Schemes cheap enough to check on the event loop; everything else goes to the hash pool.
_INLINE_SCHEMES: Final[frozenset[str]] = frozenset({"PLAIN", "CLEARTEXT"})
#: Longer passwords fail like wrong ones without being hashed (SHA-crypt's cost grows with the length).
DEFAULT_MAX_PASSWORD_LENGTH: Final[int] = 1024
#: Longer names are no user names (RFC 5321 §4.5.3.1.3 allows 256 octets for a whole address path).
MAX_NAME_OCTETS: Final[int] = 255


def plausible_name(name: str) -> bool:
    """False for what cannot be a user name: empty, over MAX_NAME_OCTETS, not UTF-8 (lone surrogates from
    undecodable input), control characters. Such names are unknown users, never errors.

    '/' and '..' are fine here (`john..doe` is a real name): whether a name can be a maildrop path is the
    storage's question (pop3d.storage.location), which answers -ERR [SYS/PERM] at login."""
    if not name or len(name) > MAX_NAME_OCTETS:
        return False
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return len(raw) <= MAX_NAME_OCTETS and not any(b < 0x20 or b == 0x7F for b in raw)


def _too_long(password: str, limit: int) -> bool:
    return len(password) > limit or len(password.encode("utf-8", "surrogatepass")) > limit


# --- hash pool ---------------------------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """One small process-wide pool: bounds CPU and memory (Argon2 takes 64 MiB per check) under a login flood."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="pop3d-hash")
        return _pool


class HashedSecrets(Authenticator):
    """An Authenticator over stored `{SCHEME}secret` entries; subclasses provide `lookup` and call `_learn`
    with the entries in force whenever they change (off the event loop: it hashes a little)."""

    #: how log lines name this database ("passwd-file /etc/pop3d/passwd")
    source = "user database"

    def __init__(
        self,
        *,
        executor: Executor | None = None,
        secret: bytes | None = None,
        max_password_length: int = DEFAULT_MAX_PASSWORD_LENGTH,
    ) -> None:
        """`executor`: where slow hash checks run; default is a small process-wide pool. `secret`: the server
        secret decoys derive from (pop3d.auth.state_secret); None: random, for this object only.
        `max_password_length`: octets; longer passwords fail unhashed."""
        self._executor = executor
        self._max_password_length = max_password_length
        self._decoys = Decoys(secret if secret is not None else os.urandom(32))
        self._costs: dict[tuple[str, str, str], float] = {}  # calibrations kept across reloads (`_learn`)

    def decoy(self, name: str) -> Decoy:
        """Stand-in credentials imitating this database's entries (pop3d.auth.decoys); cheap, never raises."""
        return self._decoys.for_name(name)

    async def verify(self, name: str, password: str) -> User | None:
        """The user when `password` is right; None otherwise, in the same time whether or not `name` exists.

        An unknown user's password is checked against its decoy, a hash of the same shape as a real entry,
        by the same code; then every failure waits out the "verify" floor, the cost of the dearest entry, as
        entries of different schemes cost differently. Passwords over `max_password_length` octets fail
        unhashed, for everybody.
        """
        return (await self.verify_entry(name, password))[0]

    async def verify_entry(
        self, name: str, password: str, *, known: Credentials | Lookup | None = Lookup.NOT_DONE
    ) -> tuple[User | None, Credentials | None]:
        """`verify`, plus the very entry the password was checked against (for the credentials cache): `known`
        when the caller passes the entry it has just looked up, else looked up here."""
        started = time.monotonic()
        user, creds = await self._verify(name, password, known)
        await self.floors.hold("verify", started, failed=user is None)
        return user, creds

    async def _verify(
        self, name: str, password: str, known: Credentials | Lookup | None
    ) -> tuple[User | None, Credentials | None]:
        creds = await self.lookup(name) if known is Lookup.NOT_DONE else known
        # the decoy's few HMACs only for unknown names: a failure waits out the "verify" floor anyway (the
        # dearest entry's cost), which hides that difference, and a success is not worth hiding
        source = creds if creds is not None else self._decoys.for_name(name).creds
        if _too_long(password, self._max_password_length):
            return None, None
        if source.scheme in _INLINE_SCHEMES:
            ok = self._check(source, password)
        else:
            ok = await self._in_pool(self._check, source, password)
        return (creds.user, creds) if ok and creds is not None else (None, None)

    async def with_credentials(self, name: str, fn: Callable[[Credentials | None, Decoy], T]) -> T:
        """`Authenticator.with_credentials`, run in the hash pool (SCRAM from {PLAIN} runs PBKDF2), every
        answer held to the mechanism's floor."""
        started = time.monotonic()
        creds = await self.lookup(name)
        result = await self._in_pool(fn, creds, self._decoys.for_name(name))
        await self.floors.hold(floors.step_name(fn), started)
        return result

    def _learn(self, table: dict[str, Credentials]) -> None:
        """Put `table`'s shapes in force: decoys to imitate them, and floors from timing one decoy of each
        (runs where the table is loaded, off the event loop: a few hashes of each shape)."""
        self._decoys.update(table.values())
        samples = self._decoys.samples()
        costs: dict[tuple[str, str, str], float] = {}  # (step, scheme, decoy secret) -> seconds

        def timed(step: str, decoy: Decoy, fn: Callable[[], object]) -> float:
            key = (step, decoy.creds.scheme, decoy.creds.secret)  # decoys of a shape stay the same across loads
            costs[key] = self._costs.get(key) or floors.cost(fn)
            return costs[key]

        wrong = "not the password"  # a typical length: SHA-crypt's cost grows with it
        self.floors.calibrate(
            "verify",
            max(
                (
                    timed(
                        "verify", d, functools.partial(schemes.REGISTRY.verify, d.creds.scheme, d.creds.secret, wrong)
                    )
                    for d in samples
                ),
                default=0.0,
            ),
        )
        for mech in sasl.LOOKUP_MECHANISMS:
            self.floors.calibrate(
                mech,
                max((timed(mech, d, functools.partial(sasl.rehearse_lookup, mech, d)) for d in samples), default=0.0),
            )
        self._costs = costs

    def _check(self, creds: Credentials, password: str) -> bool:
        try:
            return schemes.verify(creds.scheme, creds.secret, password)
        except schemes.UnknownScheme:
            log.error(
                "%s: user %r has unknown password scheme {%s}; login refused",
                self.source,
                creds.user.name,
                creds.scheme,
            )
            return False

    async def _in_pool(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor or _hash_pool(), functools.partial(fn, *args))
