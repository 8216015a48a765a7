"""The administration subcommands, for pop3d.cli's parser."""

from __future__ import annotations

from typing import Any


def add_parsers(sub: Any) -> None:
    """`db`, `user` and `import`."""
    from pop3d.admin import db, migrate, users

    db.add_parsers(sub)
    users.add_parsers(sub)
    migrate.add_parsers(sub)
