"""`pop3d user add | passwd | del | import`: accounts in the PostgreSQL users table.

Secrets are stored as `{SCHEME}secret` strings, exactly as in a passwd-file, so `user import` copies a
passwd-file's entries unchanged (every scheme and SASL mechanism keeps working) and is idempotent: rerun
it after editing the file and the table follows (users absent from the file are left alone).
"""

from __future__ import annotations

import argparse
from typing import Any

from pop3d.admin.common import (
    EXIT_OK,
    AdminError,
    add_config,
    connect,
    database,
    run,
    settings_of,
    users_dsn,
)
from pop3d.admin.prompt import read_password
from pop3d.auth import schemes
from pop3d.auth.hashed import plausible_name
from pop3d.config import ConfigError, Settings

_ADD = """
INSERT INTO users (name, secret) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET secret = EXCLUDED.secret WHERE users.secret IS NULL
RETURNING id
"""
_IMPORT = """
INSERT INTO users (name, secret, uid, gid, home, extra) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (name) DO UPDATE SET secret = EXCLUDED.secret, uid = EXCLUDED.uid, gid = EXCLUDED.gid,
    home = EXCLUDED.home, extra = EXCLUDED.extra
WHERE (users.secret, users.uid, users.gid, users.home, users.extra)
    IS DISTINCT FROM (EXCLUDED.secret, EXCLUDED.uid, EXCLUDED.gid, EXCLUDED.home, EXCLUDED.extra)
RETURNING (xmax = 0) AS inserted
"""


def _name(name: str) -> str:
    if not plausible_name(name) or ":" in name:
        raise ConfigError(f"user name {name!r}: must be non-empty, without ':' or control characters")
    return name


def _secret(args: argparse.Namespace, settings: Settings) -> str:
    scheme = (args.scheme or settings.auth.default_scheme).upper()
    if scheme not in schemes.SCHEMES:
        raise ConfigError(f"--scheme: unknown scheme {args.scheme!r} (choose from {', '.join(schemes.SCHEMES)})")
    password = read_password(args.password_stdin)
    try:
        return schemes.hash_password(scheme, password)
    except ValueError as exc:
        raise ConfigError(f"password refused: {exc} (or choose another --scheme)") from None


def cmd_user_add(args: argparse.Namespace) -> int:
    settings, name = settings_of(args), _name(args.name)
    secret = _secret(args, settings)

    async def main() -> int:
        conn = await connect(users_dsn(settings))
        try:
            if await conn.fetchval(_ADD, name, secret) is None:
                raise AdminError(f"user {name!r} already exists (pop3d user passwd changes a password)")
        finally:
            await conn.close()
        print(f"user {name} added")
        return EXIT_OK

    return run(main)


def cmd_user_passwd(args: argparse.Namespace) -> int:
    from pop3d.auth.postgres import PostgresAuthenticator

    settings, name = settings_of(args), _name(args.name)
    secret = _secret(args, settings)

    async def main() -> int:
        db = database(users_dsn(settings), settings)
        try:
            if not await PostgresAuthenticator(db).set_secret(name, secret):
                raise AdminError(f"no such user {name!r}")
        finally:
            await db.close()
        print(f"password of {name} changed")
        return EXIT_OK

    return run(main)


def cmd_user_del(args: argparse.Namespace) -> int:
    settings, name = settings_of(args), _name(args.name)

    async def main() -> int:
        conn = await connect(users_dsn(settings))
        try:
            status = await conn.execute("DELETE FROM users WHERE name = $1", name)
        finally:
            await conn.close()
        if status.split()[-1] == "0":
            raise AdminError(f"no such user {name!r}")
        print(f"user {name} deleted, with the messages of its maildrop")
        return EXIT_OK

    return run(main)


def cmd_user_import(args: argparse.Namespace) -> int:
    from pop3d.auth.passwd_file import read_entries

    settings = settings_of(args)
    try:
        entries = read_entries(args.passwd_file)
    except OSError as exc:
        raise ConfigError(f"{args.passwd_file}: {exc.strerror}") from None

    async def main() -> int:
        added = changed = 0
        conn = await connect(users_dsn(settings))
        try:
            async with conn.transaction():
                for creds in entries.values():
                    u = creds.user
                    extra = " ".join(f"{k}={v}" if v else k for k, v in u.extra.items())
                    row = await conn.fetchrow(
                        _IMPORT, u.name, f"{{{creds.scheme}}}{creds.secret}", u.uid, u.gid, u.home, extra
                    )
                    if row is not None:
                        added += bool(row["inserted"])
                        changed += not row["inserted"]
        finally:
            await conn.close()
        same = len(entries) - added - changed
        print(f"{len(entries)} users in {args.passwd_file}: {added} added, {changed} changed, {same} unchanged")
        return EXIT_OK

    return run(main)


def add_parsers(sub: Any) -> None:
    u = sub.add_parser("user", help="users in the PostgreSQL users table (auth.driver = postgres)")
    usub = u.add_subparsers(dest="user_command", required=True)

    def with_password(p: Any) -> None:
        p.add_argument("name", help="user name")
        p.add_argument(
            "--scheme", default=None, help="hash scheme (default: auth.default_scheme, ARGON2ID unless configured)"
        )
        p.add_argument("--password-stdin", action="store_true", help="read the password as one line of standard input")
        add_config(p)

    a = usub.add_parser("add", help="add a user (password asked twice, or --password-stdin)")
    with_password(a)
    a.set_defaults(func=cmd_user_add)
    p = usub.add_parser("passwd", help="change a user's password")
    with_password(p)
    p.set_defaults(func=cmd_user_passwd)
    d = usub.add_parser("del", help="delete a user and every message of its maildrop")
    d.add_argument("name", help="user name")
    add_config(d)
    d.set_defaults(func=cmd_user_del)
    i = usub.add_parser("import", help="copy a passwd-file's users into the table (idempotent)")
    i.add_argument("passwd_file", metavar="PASSWD_FILE", help="a Dovecot passwd-file")
    add_config(i)
    i.set_defaults(func=cmd_user_import)
