"""Storage drivers behind the Maildrop interface (pop3d.storage.base)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pop3d.config import StorageSettings
    from pop3d.storage.base import Storage


def build_storage(cfg: StorageSettings) -> Storage:
    """The driver named by `storage.driver`."""
    if cfg.driver == "maildir":
        from pop3d.storage.maildir import MaildirStorage

        days = cfg.expire_days if isinstance(cfg.expire_days, int) and cfg.expire_days > 0 else None
        return MaildirStorage(cfg.location, mark_seen=cfg.mark_seen, expire_days=days)
    if cfg.driver == "mbox":
        from pop3d.storage.mbox import MboxStorage

        return MboxStorage(cfg)
    if cfg.driver == "postgres":
        from pop3d.storage.postgres import PostgresStorage, shared

        return PostgresStorage(shared(cfg.dsn, cfg.pool_size), mark_seen=cfg.mark_seen)
    raise ValueError(f"storage.driver: unknown driver {cfg.driver!r}")  # pragma: no cover - config validates
