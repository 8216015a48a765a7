"""PostgreSQL storage: users, messages and the cluster-wide maildrop lock in one database."""

from pop3d.storage.postgres.database import Database, shared
from pop3d.storage.postgres.drop import PostgresDrop, PostgresStorage

__all__ = ["Database", "PostgresDrop", "PostgresStorage", "shared"]
