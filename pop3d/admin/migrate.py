"""`pop3d import --from maildir|mbox LOCATION_TEMPLATE [--user NAME]`: copy maildrops into PostgreSQL.

Each maildrop is opened through its own driver (taking its lock, as a POP3 session would), so the octets and
the UIDL copied are exactly those pop3d served from it: clients that leave mail on the server see the same
UIDLs afterwards and download nothing again. A message whose UIDL the user already has in PostgreSQL is
skipped, so a rerun after new deliveries copies only the new ones. The source is never changed.
"""

from __future__ import annotations

import argparse
from typing import Any

from pop3d.admin.common import EXIT_OK, AdminError, add_config, database, run, settings_of, storage_dsn
from pop3d.auth.base import User
from pop3d.config import ConfigError, Settings
from pop3d.storage.base import Storage, StorageError
from pop3d.storage.postgres.database import Database
from pop3d.storage.postgres.drop import user_id
from pop3d.wire import network_size

_KNOWN = "SELECT uid FROM messages WHERE user_id = $1"
_INSERT = """
INSERT INTO messages (user_id, uid, size, body) VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, uid) DO NOTHING
"""


def _source(settings: Settings, driver: str, location: str) -> Storage:
    if "{user}" not in location and "{home}" not in location:
        raise ConfigError(f"{location}: the location template must contain {{user}} or {{home}}")
    if driver == "maildir":
        from pop3d.storage.maildir import MaildirStorage

        return MaildirStorage(location, mark_seen=False)
    from pop3d.storage.mbox import MboxStorage

    return MboxStorage(settings.storage.model_copy(update={"driver": "mbox", "location": location}))


async def _users(settings: Settings, db: Database, only: str | None) -> list[User]:
    """`--user`, else every user of the configured user database (with its home and ids, for templates)."""
    if settings.auth.driver == "postgres":
        rows = await db.fetch("SELECT name, uid, gid, home FROM users ORDER BY name")
        users = [User(r["name"], r["uid"], r["gid"], r["home"]) for r in rows]
    else:
        from pop3d.auth.passwd_file import read_entries

        try:
            users = [c.user for c in read_entries(settings.auth.passwd_file).values()]
        except OSError as exc:
            raise ConfigError(f"auth.passwd_file: cannot read {settings.auth.passwd_file}: {exc.strerror}") from None
    if only is None:
        return users
    return [u for u in users if u.name == only] or [User(only)]


async def import_user(source: Storage, db: Database, user: User) -> tuple[int, int]:
    """(copied, already there) for one user's maildrop."""
    drop = source.maildrop(user)
    await drop.open()
    try:
        uid = await user_id(db, user.name)
        known = {r["uid"] for r in await db.fetch(_KNOWN, uid)}
        copied = 0
        for index, info in enumerate(drop.messages):
            if info.uid in known:
                continue
            body = b"".join([chunk async for chunk in drop.chunks(index)])
            if network_size(body) != info.size:
                raise AdminError(f"{user.name}: message {index + 1} changed while it was copied")
            await db.execute(_INSERT, uid, info.uid, info.size, body)
            copied += 1
        return copied, len(drop.messages) - copied
    finally:
        await drop.close()


def cmd_import(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    source = _source(settings, args.source, args.location)

    async def main() -> int:
        db = database(storage_dsn(settings), settings)
        failed = 0
        try:
            for user in await _users(settings, db, args.user):
                try:
                    copied, skipped = await import_user(source, db, user)
                except StorageError as exc:
                    print(f"{user.name}: not imported: {exc}")
                    failed += 1
                    continue
                print(f"{user.name}: {copied} message(s) copied, {skipped} already there")
        finally:
            await db.close()
        if failed:
            raise AdminError(f"{failed} maildrop(s) could not be imported (see above); rerun to retry")
        return EXIT_OK

    return run(main)


def add_parsers(sub: Any) -> None:
    i = sub.add_parser(
        "import",
        help="copy Maildir or mbox maildrops into the PostgreSQL store, UIDLs kept (idempotent)",
        description="Copy every message of each user's maildrop into storage.dsn, keeping its octets and the "
        "UIDL pop3d served for it. Messages already copied are skipped, so it is safe to rerun.",
    )
    i.add_argument("--from", dest="source", required=True, choices=("maildir", "mbox"), help="the old driver")
    i.add_argument("location", metavar="LOCATION_TEMPLATE", help="the old storage.location, e.g. {home}/Maildir")
    i.add_argument("--user", help="only this user (default: every user of the configured user database)")
    add_config(i)
    i.set_defaults(func=cmd_import)
