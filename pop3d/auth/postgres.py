"""A user database in PostgreSQL: the `users` table holds the same `{SCHEME}secret` strings a passwd-file
does, so every scheme and SASL mechanism works unchanged (pop3d.auth.hashed does the checking).

Each lookup is one indexed query on the worker's pool (shared with the postgres storage driver when the
DSNs agree), so a change made by `pop3d user passwd` or poppassd on any node counts at the next login
everywhere. Decoys and time floors imitate a sample of the table's entries, refreshed every
`RELEARN_INTERVAL` seconds in the background (the sample is hashed off the event loop).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final, Protocol

from pop3d.auth import schemes
from pop3d.auth.base import Credentials, User
from pop3d.auth.hashed import DEFAULT_MAX_PASSWORD_LENGTH, HashedSecrets, plausible_name

__all__ = ["PostgresAuthenticator", "Queries", "UserDatabaseUnavailable"]

log = logging.getLogger(__name__)

#: seconds between refreshes of the sample decoys and floors are learnt from
RELEARN_INTERVAL: Final[float] = 300.0
#: entries sampled for decoy shapes and floors (their schemes and cost parameters, weighted by count)
SAMPLE: Final[int] = 2000

_LOOKUP = "SELECT name, secret, uid, gid, home, extra FROM users WHERE name = $1 AND secret IS NOT NULL"
_SAMPLE = "SELECT name, secret FROM users WHERE secret IS NOT NULL LIMIT $1"
_SET = "UPDATE users SET secret = $2 WHERE name = $1"


class Queries(Protocol):
    """What this module needs of a database handle (pop3d.storage.postgres.Database provides it)."""

    async def fetchrow(self, query: str, *args: object) -> Any: ...
    async def fetch(self, query: str, *args: object) -> list[Any]: ...
    async def execute(self, query: str, *args: object) -> str: ...


class UserDatabaseUnavailable(ConnectionError):
    """The users table cannot be read now (the session answers -ERR [SYS/TEMP])."""


def _extra(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for token in text.split():
        key, _, value = token.partition("=")
        if key:
            out[key] = value
    return out


def credentials(row: Any) -> Credentials:
    """Credentials from a users row (name, secret, and optionally uid, gid, home, extra); a secret without
    `{SCHEME}` is CRYPT, as in a passwd-file."""
    scheme, secret = schemes.split_scheme(row["secret"])
    user = User(
        name=row["name"],
        uid=row.get("uid"),
        gid=row.get("gid"),
        home=row.get("home") or None,
        extra=_extra(row.get("extra") or ""),
    )
    return Credentials(user=user, scheme=scheme, secret=secret)


class PostgresAuthenticator(HashedSecrets):
    """`Authenticator` over the `users` table."""

    task_free = True  # connections are made in Tasks of their own (pop3d.storage.postgres.database._connect)

    def __init__(
        self, db: Queries, *, secret: bytes | None = None, max_password_length: int = DEFAULT_MAX_PASSWORD_LENGTH
    ) -> None:
        """No I/O here: the first lookup connects (in the worker, after the fork)."""
        super().__init__(secret=secret, max_password_length=max_password_length)
        self.source = "postgres users table"
        self._db = db
        self._learnt_at = float("-inf")
        self._learning: asyncio.Task[None] | None = None

    async def lookup(self, name: str) -> Credentials | None:
        self._relearn_soon()
        if not plausible_name(name):
            return None
        try:
            row = await self._db.fetchrow(_LOOKUP, name)
        except Exception as exc:  # asyncpg's errors, OSError, timeouts: all mean "not now"
            raise UserDatabaseUnavailable(f"users table: {type(exc).__name__}: {exc}") from exc
        return None if row is None else credentials(row)

    def _relearn_soon(self) -> None:
        """Refresh the decoy shapes in the background when the sample is old (never delays this lookup)."""
        now = time.monotonic()
        if now - self._learnt_at < RELEARN_INTERVAL or self._learning is not None:
            return
        self._learnt_at = now
        self._learning = asyncio.get_running_loop().create_task(self._relearn())

    async def _relearn(self) -> None:
        try:
            rows = await self._db.fetch(_SAMPLE, SAMPLE)
            table: dict[str, Credentials] = {}
            for row in rows:
                try:
                    creds = credentials(row)
                except ValueError:
                    continue
                table[creds.user.name] = creds
            await asyncio.to_thread(self._learn, table)
        except Exception as exc:
            self._learnt_at = float("-inf")  # try again at the next lookup
            log.warning("postgres users table: cannot sample entries for decoys: %s", exc)
        finally:
            self._learning = None

    async def set_secret(self, name: str, secret: str) -> bool:
        """Replace `name`'s `{SCHEME}secret`; every node sees it at the next login."""
        try:
            status = await self._db.execute(_SET, name, secret)
        except Exception as exc:
            raise UserDatabaseUnavailable(f"users table: {type(exc).__name__}: {exc}") from exc
        return status.split()[-1] != "0"

    def reload_soon(self) -> None:
        """SIGHUP: learn the decoy shapes again at the next lookup."""
        self._learnt_at = float("-inf")
