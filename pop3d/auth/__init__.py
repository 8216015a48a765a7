"""User databases behind the Authenticator interface (pop3d.auth.base), password schemes, SASL, penalties."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pop3d.auth.base import Authenticator
    from pop3d.auth.generation import Generation
    from pop3d.auth.postgres import Queries
    from pop3d.config import AuthSettings


def build_auth(
    cfg: AuthSettings,
    secret: bytes | None = None,
    database: Queries | None = None,
    generation: Generation | None = None,
) -> Authenticator:
    """The user database the `[auth]` section names: a Dovecot-style passwd-file, or (`auth.driver =
    "postgres"`) the users table through `database`, the worker's handle on auth.dsn (made by the caller,
    which may share it with the storage driver: pop3d.storage.postgres.shared).

    `secret`: the server secret (`pop3d.auth.state_secret.load_or_create(settings.server.state_dir)`, read
    once per start before workers fork, and passed again on reload) from which decoys for unknown users are
    derived; None: a random one, so decoys change with every call. `generation`: the workers' shared count of
    password changes (pop3d.auth.generation), so a change made by one is in force on all at the next login.
    OSError (naming the path) when the file cannot be read: at start-up that is fatal, on reload it is refused.
    """
    if cfg.driver == "postgres":
        if database is None:
            raise ValueError("auth.driver = postgres needs a database handle")
        from pop3d.auth.postgres import PostgresAuthenticator

        return PostgresAuthenticator(database, secret=secret, max_password_length=cfg.max_password_length)
    from pop3d.auth.passwd_file import PasswdFileAuthenticator

    return PasswdFileAuthenticator(
        cfg.passwd_file, secret=secret, max_password_length=cfg.max_password_length, generation=generation
    )
