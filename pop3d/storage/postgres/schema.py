"""Versioned, idempotent schema migrations (migrations/NNN_name.sql), applied by `pop3d db init`.

Each file runs once, in its own transaction together with the row that records it in `pop3d_schema`; a
transaction-scoped advisory lock makes two concurrent `db init` runs take turns. Only ordinary DDL on
tables the connecting role owns: no superuser, no extension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

#: advisory lock key (a single int8) serialising migrations: ASCII "pop3d-db"
_MIGRATION_LOCK: Final[int] = 0x706F703364646200
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with this version of pop3d, in order."""
    found: list[Migration] = []
    for entry in resources.files("pop3d.storage.postgres").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m[1]), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    if [mig.version for mig in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("migration files are not numbered 001, 002, ... without gaps")
    return found


LATEST: Final[int] = len(migrations())


async def current_version(conn: Any) -> int:
    """The schema version of the database `conn` is connected to (0: never initialised)."""
    exists = await conn.fetchval("SELECT to_regclass('pop3d_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM pop3d_schema"))


async def upgrade(conn: Any) -> list[str]:
    """Apply the missing migrations; the names of those applied (empty: already up to date)."""
    applied: list[str] = []
    for mig in migrations():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS pop3d_schema ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await conn.fetchval("SELECT 1 FROM pop3d_schema WHERE version = $1", mig.version)
            if done:
                continue
            await conn.execute(mig.sql)
            await conn.execute("INSERT INTO pop3d_schema (version, name) VALUES ($1, $2)", mig.version, mig.name)
            applied.append(mig.name)
    return applied
