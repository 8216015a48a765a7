"""What the administration commands share: the configuration, one connection, errors as one line."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from pop3d.config import Settings, add_config_option, load_settings
from pop3d.storage.postgres.database import DB_ERRORS, Database, connect_kwargs

EXIT_OK = 0
EXIT_FAILURE = 1


class AdminError(Exception):
    """The command ran and failed (exit 1): no such user, the database refused, ..."""


def add_config(parser: Any) -> None:
    add_config_option(parser)


def settings_of(args: Any) -> Settings:
    return load_settings(args.config)


def storage_dsn(settings: Settings) -> str:
    return settings.storage.dsn


def users_dsn(settings: Settings) -> str:
    """Where the users table is: auth.dsn, else storage.dsn."""
    return settings.auth.dsn or settings.storage.dsn


async def connect(dsn: str) -> Any:
    return await asyncpg.connect(**connect_kwargs(dsn))


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main` on a fresh loop; a database failure is one line on stderr and exit 1."""
    try:
        return asyncio.run(main())
    except AdminError as exc:
        print(f"pop3d: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except DB_ERRORS as exc:
        print(f"pop3d: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def database(dsn: str, settings: Settings) -> Database:
    return Database(dsn, min(settings.storage.pool_size, 4))
