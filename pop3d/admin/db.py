"""`pop3d db init`: create or upgrade the schema, as the ordinary role that owns the database."""

from __future__ import annotations

import argparse
from typing import Any

from pop3d.admin.common import EXIT_OK, add_config, connect, run, settings_of, storage_dsn
from pop3d.storage.postgres import schema


def cmd_db_init(args: argparse.Namespace) -> int:
    settings = settings_of(args)

    async def main() -> int:
        conn = await connect(storage_dsn(settings))
        try:
            applied = await schema.upgrade(conn)
            version = await schema.current_version(conn)
        finally:
            await conn.close()
        if applied:
            print(f"schema upgraded to version {version}: applied {', '.join(applied)}")
        else:
            print(f"schema up to date (version {version})")
        return EXIT_OK

    return run(main)


def add_parsers(sub: Any) -> None:
    d = sub.add_parser("db", help="PostgreSQL store: create or upgrade the schema")
    dsub = d.add_subparsers(dest="db_command", required=True)
    i = dsub.add_parser(
        "init",
        help="create or upgrade the schema (idempotent) in storage.dsn",
        description="Apply the schema migrations this pop3d ships that the database lacks. Safe to rerun; "
        "needs no superuser, only a role that owns the database (or its public schema).",
    )
    add_config(i)
    i.set_defaults(func=cmd_db_init)
