"""PostgreSQL storage behind the Maildrop interface (see pop3d.storage.postgres.database for connections).

* Lock (RFC 1939 §4): a session advisory lock keyed by the user's id, on the worker's lock connection, taken
  before the snapshot. It lives as long as that connection: if the connection dies the lock is gone, so
  the maildrop refuses everything from then on (`lock_lost`) and the session ends -ERR [SYS/TEMP] at its
  next read or at QUIT, committing nothing.
* Snapshot (RFC 1939 §5): the user's message ids, UIDLs and sizes in id (delivery) order at open();
  messages delivered later show in the next session, never in this one's numbering.
* UPDATE (RFC 1939 §6): deletions and the seen flags in one statement (so one transaction) at QUIT, which
  changes nothing unless the lock connection still holds our lock (a lock lost to a partition and taken by
  another node must not see us delete under it); a session that ends any other way changes nothing.
* Reads go through the pool (`async_reads`): a body up to SMALL_MESSAGE in one query, bigger ones in
  CHUNK slices with substring(), so no body is held whole and one session never holds a connection while
  its client is slow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import ClassVar

import asyncpg

from pop3d.auth.base import User
from pop3d.storage.base import (
    CHUNK,
    SMALL_MESSAGE,
    InUse,
    Maildrop,
    MessageGone,
    MessageInfo,
    MessageUnreadable,
    PermanentError,
    Storage,
    StorageError,
    TemporaryError,
)
from pop3d.storage.postgres.database import DB_ERRORS, LOCK_SPACE, Database, NoUserRow
from pop3d.wire import NetworkCount, network_size

log = logging.getLogger(__name__)

#: octets and messages one `read` fetches ahead of the one asked for (small messages only)
READ_AHEAD = 256 * 1024
READ_AHEAD_COUNT = 64
#: seconds read-ahead bodies are kept for the reads that follow
AHEAD_TTL = 2.0
#: the UIDL of a message delivered here: its row id, which a sequence never hands out twice
UID_PREFIX = "pg."

_FIND_USER = "SELECT id FROM users WHERE name = $1"
_USER_ID = """
WITH ins AS (INSERT INTO users (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id)
SELECT id FROM ins UNION ALL SELECT id FROM users WHERE name = $1 LIMIT 1
"""
#: `done`: retrieving the message again changes nothing (already retrieved, and seen if we mark it so)
_SNAPSHOT = """
SELECT id, uid, size, retrieved_at IS NOT NULL AND (seen OR NOT $2) AS done FROM messages
WHERE user_id = $1 ORDER BY id
"""
_BODIES = "SELECT id, body FROM messages WHERE user_id = $1 AND id = ANY($2::bigint[])"
_LENGTH = "SELECT octet_length(body) FROM messages WHERE id = $1 AND user_id = $2"
_SLICE = "SELECT substring(body FROM $3 FOR $4) FROM messages WHERE id = $1 AND user_id = $2"
#: UPDATE state in one statement, so one round trip and atomic without BEGIN/COMMIT: `held` reads pg_locks
#: once (MATERIALIZED) and both changes happen only if the lock connection ($1) still holds the maildrop
#: lock of user $3; the result says whether it did. Changes race nothing they could undo: a row
#: deleted twice is deleted once, and a deleted row cannot be flagged.
_COMMIT = """
WITH held AS MATERIALIZED (
  SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1
    AND classid = $2::int::oid AND objid = $3::int::oid AND objsubid = 2
), gone AS (
  DELETE FROM messages WHERE user_id = $4 AND id = ANY($5::bigint[]) AND EXISTS (SELECT 1 FROM held)
), flagged AS (
  UPDATE messages SET seen = seen OR $7, retrieved_at = coalesce(retrieved_at, now())
  WHERE user_id = $4 AND id = ANY($6::bigint[]) AND EXISTS (SELECT 1 FROM held)
    AND (retrieved_at IS NULL OR (NOT seen AND $7))
)
SELECT EXISTS (SELECT 1 FROM held)
"""
_DELIVER = """
WITH n AS (SELECT nextval(pg_get_serial_sequence('messages', 'id')) AS id)
INSERT INTO messages (id, user_id, uid, size, body) SELECT n.id, $1, $2 || n.id, $3, $4 FROM n RETURNING uid
"""


def db_error(exc: BaseException, what: str) -> StorageError:
    """The StorageError for a database failure: a missing schema is the operator's to fix (PERM), the rest
    (connection lost, timeout, failover) goes away by retrying (TEMP)."""
    if isinstance(exc, asyncpg.UndefinedTableError):
        return PermanentError(f"{what}: the database has no pop3d schema (run `pop3d db init`)")
    return TemporaryError(f"{what}: {type(exc).__name__}: {exc}")


async def user_id(db: Database, name: str) -> int:
    """The users row of `name`, made (without a secret) if missing: a maildrop may belong to a user of
    another user database. A plain SELECT first: the user is there at almost every delivery (a login finds
    the id with its lock and comes here only when there is no row), and the INSERT ... ON CONFLICT that makes
    a missing one costs the database a speculative insertion each time."""
    found = await db.fetchval(_FIND_USER, name)
    if found is not None:
        return int(found)
    for _ in range(3):  # a concurrent insert of the same name makes both halves of the query miss once
        found = await db.fetchval(_USER_ID, name)
        if found is not None:
            return int(found)
    raise TemporaryError(f"cannot find or create user {name!r}")


class PostgresStorage(Storage):
    """Maildrops in PostgreSQL, one `Database` (pool and lock connection) per worker."""

    #: connections are made in Tasks of their own (database._connect) and statements need none: a RETR served
    #: from what was read ahead, for one, replies at once (pop3d.pop3.eager)
    task_free = True

    def __init__(self, db: Database, mark_seen: bool = True) -> None:
        self.db = db
        self.mark_seen = mark_seen

    def maildrop(self, user: User) -> Maildrop:
        return PostgresDrop(self.db, user.name, mark_seen=self.mark_seen)

    async def deliver(self, user: User, message: bytes) -> None:
        """One INSERT in its own transaction: durable once it returns (the commit waits for the WAL flush
        under PostgreSQL's default synchronous_commit). Takes no lock, so it never waits for a session."""
        try:
            uid = await user_id(self.db, user.name)
            await self.db.fetchval(_DELIVER, uid, UID_PREFIX, network_size(message), message)
        except StorageError:
            raise
        except DB_ERRORS as exc:
            raise db_error(exc, f"delivery to {user.name}") from exc


class PostgresDrop(Maildrop):
    """One session's maildrop. Every call comes from the session's event loop."""

    async_reads: ClassVar[bool] = True

    def __init__(self, db: Database, name: str, mark_seen: bool = True) -> None:
        self.db = db
        self.name = name
        self.mark_seen = mark_seen
        self.messages: list[MessageInfo] = []
        self._user_id: int | None = None
        self._lock_pid: int | None = None  # the lock connection's backend, while we hold the lock
        self._lost = False
        self._done = b""  # per message: 1 when its retrieval flags are already set (nothing to write)
        self._ahead: dict[int, bytes] | None = None  # message index -> body read ahead (`read`), not sent yet
        self._ahead_timer: asyncio.TimerHandle | None = None  # forgets `_ahead` AHEAD_TTL after the read

    def lock_lost(self) -> None:
        """The lock connection died: the lock is gone, so nothing more may be read or committed."""
        self._lost = True
        self._lock_pid = None
        hook = self.lock_lost_hook
        if hook is not None:  # called from the connection's termination callback: the hook runs on its own turn
            asyncio.get_running_loop().call_soon(hook)

    def _check(self) -> int:
        if self._lost or self._user_id is None:
            raise TemporaryError(f"maildrop of {self.name}: the database connection holding its lock was lost")
        return self._user_id

    async def open(self) -> None:
        try:
            try:
                got = await self.db.try_lock(self.name, self)
            except NoUserRow:  # first login of a user from another user database: make the row, then lock
                await user_id(self.db, self.name)
                got = await self.db.try_lock(self.name, self)
            if got is None:
                raise InUse(f"maildrop of {self.name} is locked")
            self._user_id, self._lock_pid = got
            uid = got[0]
            rows = await self.db.fetch(_SNAPSHOT, uid, self.mark_seen)
        except StorageError:
            await self.close()
            raise
        except DB_ERRORS as exc:
            await self.close()
            raise db_error(exc, f"maildrop of {self.name}") from exc
        except BaseException:
            await self.close()
            raise
        self.messages = [MessageInfo(int(r["size"]), r["uid"], str(r["id"])) for r in rows]
        self._done = bytes(r["done"] for r in rows)

    def read_small(self, index: int) -> bytes:
        raise TemporaryError("the postgres driver reads asynchronously (Maildrop.read)")

    async def read(self, index: int) -> bytes:
        """The stored octets of a small message. A client that downloads reads them in order, so the query
        that fetches this one also fetches the small messages after it, up to READ_AHEAD octets: one round
        trip for ten 4 KiB messages instead of ten. What is read ahead is kept until it is sent, for
        AHEAD_TTL seconds at most, so an idle session holds no body."""
        uid = self._check()
        info = self.messages[index]
        ahead = self._ahead
        body = ahead.pop(index, None) if ahead is not None else None
        if body is None:
            wanted = self._read_ahead(index)
            try:
                rows = await self.db.fetch(_BODIES, uid, [int(self.messages[i].key) for i in wanted])
            except DB_ERRORS as exc:
                raise db_error(exc, f"message {index + 1} of {self.name}") from exc
            by_key = {int(r["id"]): bytes(r["body"]) for r in rows}
            body = by_key.get(int(info.key))
            rest = {i: by_key[k] for i in wanted[1:] if (k := int(self.messages[i].key)) in by_key}
            self._keep_ahead(rest)
        self._check()
        if body is None:
            raise MessageGone(f"message {index + 1} was removed")
        if network_size(body) != info.size:
            raise MessageUnreadable(f"message {index + 1} of {self.name}: its size is not the {info.size} announced")
        return body

    def _keep_ahead(self, bodies: dict[int, bytes]) -> None:
        """Hold `bodies` for the reads that follow, for AHEAD_TTL seconds at most: a downloading client asks
        for them within milliseconds, and a client that read one message and went idle must not keep up to
        READ_AHEAD octets for as long as its session lasts."""
        self._forget_ahead()
        if bodies:
            self._ahead = bodies
            self._ahead_timer = asyncio.get_running_loop().call_later(AHEAD_TTL, self._forget_ahead)

    def _forget_ahead(self) -> None:
        self._ahead = None
        if self._ahead_timer is not None:
            self._ahead_timer.cancel()
            self._ahead_timer = None

    def _read_ahead(self, index: int) -> list[int]:
        """`index`, then the next messages up to SMALL_MESSAGE each, READ_AHEAD octets in all."""
        wanted, total = [index], self.messages[index].size
        for i in range(index + 1, len(self.messages)):
            size = self.messages[i].size
            if size > SMALL_MESSAGE or total + size > READ_AHEAD or len(wanted) >= READ_AHEAD_COUNT:
                break
            wanted.append(i)
            total += size
        return wanted

    async def chunks(self, index: int, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """The stored octets in slices of `chunk_size`, one query each; the size is checked before the last
        slice goes out, so a wrong body is cut rather than ended."""
        uid = self._check()
        info = self.messages[index]
        key = int(info.key)
        try:
            length = await self.db.fetchval(_LENGTH, key, uid)
        except DB_ERRORS as exc:
            raise db_error(exc, f"message {index + 1} of {self.name}") from exc
        if length is None:
            raise MessageGone(f"message {index + 1} was removed")
        count = NetworkCount()
        offset = 0
        while offset < length:
            self._check()
            try:
                data = await self.db.fetchval(_SLICE, key, uid, offset + 1, chunk_size)
            except DB_ERRORS as exc:
                raise db_error(exc, f"message {index + 1} of {self.name}") from exc
            if not data:
                raise MessageGone(f"message {index + 1} was removed while being read")
            offset += len(data)
            count.feed(data)
            if offset >= length and count.size != info.size:
                raise MessageUnreadable(f"message {index + 1}: its size is not the {info.size} announced")
            yield bytes(data)

    async def commit(self, deleted: set[int], seen: set[int]) -> None:
        """UPDATE state (RFC 1939 §6): one statement, which changes nothing unless our lock still stands, and
        none when there is nothing to change (like the Maildir driver, which renames no file already seen)."""
        uid = self._check()
        gone = [int(self.messages[i].key) for i in sorted(deleted)]
        read = [int(self.messages[i].key) for i in sorted(seen - deleted) if not self._done[i]]
        if not gone and not read:  # everything retrieved was flagged already: no statement at all
            return
        pid = self._lock_pid
        try:
            held = pid is not None and await self.db.fetchval(
                _COMMIT, pid, LOCK_SPACE, uid, uid, gone, read, self.mark_seen
            )
        except DB_ERRORS as exc:
            raise db_error(exc, f"commit of {self.name}") from exc
        if not held:
            self.lock_lost()
            raise TemporaryError(f"maildrop of {self.name}: the lock was lost; nothing committed")

    async def close(self) -> None:
        """Release the lock. Idempotent; deletes nothing."""
        self._forget_ahead()
        self._user_id = None
        self._lock_pid = None
        await self.db.unlock(self.name, self)
