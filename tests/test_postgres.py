"""The postgres storage driver, its user database and its commands, on a throwaway cluster
(tests/pgcluster.py; skipped loudly without PostgreSQL, a failure under CI)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import poplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import Env, ServerThread, deliver

from pop3d.auth.base import User
from pop3d.auth.postgres import PostgresAuthenticator
from pop3d.storage.base import InUse, MessageGone, TemporaryError
from pop3d.storage.postgres import Database, PostgresStorage, schema
from pop3d.storage.postgres import drop as postgres_drop
from pop3d.storage.postgres.drop import PostgresDrop
from pop3d.wire import network_size

ROOT = Path(__file__).resolve().parents[1]


async def init(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await schema.upgrade(conn)
    finally:
        await conn.close()


@pytest.fixture
async def db(pg_dsn: str) -> Any:
    await init(pg_dsn)
    d = Database(pg_dsn, 4)
    yield d
    await d.close()


async def filled(storage: PostgresStorage, user: User, bodies: list[bytes]) -> PostgresDrop:
    """`user`'s maildrop after delivering `bodies`, opened (locked, its snapshot taken)."""
    for body in bodies:
        await storage.deliver(user, body)
    drop = storage.maildrop(user)
    assert isinstance(drop, PostgresDrop)
    await drop.open()
    return drop


def pop3d(*args: str, stdin: str = "", config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "pop3d", *args] + (["--config", str(config)] if config else [])
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=120)


def config_file(tmp_path: Path, dsn: str, auth: str = "postgres", passwd: Path | None = None) -> Path:
    path = tmp_path / "pop3d.toml"
    lines = ["[storage]", 'driver = "postgres"', f'dsn = "{dsn}"', "[auth]", f'driver = "{auth}"']
    if passwd is not None:
        lines.append(f'passwd_file = "{passwd}"')
    path.write_text("\n".join(lines) + "\n")
    return path


BODIES = [b"Subject: one\n\nhello\n", b"Subject: two\r\n\r\nno final newline", b"", b".dot\n..two\n" * 3]


# ---- schema ----------------------------------------------------------------------------------------------


async def test_db_init_is_idempotent_and_needs_no_superuser(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_file(tmp_path, pg_dsn)
    first = pop3d("db", "init", config=cfg)
    assert first.returncode == 0, first.stderr
    assert "applied 001_init.sql" in first.stdout
    again = pop3d("db", "init", config=cfg)
    assert again.returncode == 0 and "up to date" in again.stdout
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert await schema.current_version(conn) == schema.LATEST
    finally:
        await conn.close()


# ---- driver semantics --------------------------------------------------------------------------------------


async def test_deliver_then_snapshot_keeps_octets_sizes_and_uids(db: Database) -> None:
    storage = PostgresStorage(db)
    alice = User("alice")
    drop = await filled(storage, alice, BODIES)
    try:
        assert [m.size for m in drop.messages] == [network_size(b) for b in BODIES]
        assert [await drop.read(i) for i in range(len(BODIES))] == BODIES
        for i, body in enumerate(BODIES):
            assert b"".join([c async for c in drop.chunks(i, 5)]) == body
        uids = [m.uid for m in drop.messages]
        assert len(set(uids)) == len(uids)
    finally:
        await drop.close()
    again = storage.maildrop(alice)
    await again.open()
    assert [m.uid for m in again.messages] == uids  # stable across sessions
    await again.close()


async def test_reads_in_order_take_one_query_and_hold_nothing_after(db: Database, monkeypatch: Any) -> None:
    """A download reads messages in order: the first read fetches the small ones after it too (one round
    trip instead of ten), each body is served once from there, and a big message is not read ahead."""
    storage = PostgresStorage(db)
    bob = User("bob")
    small = [b"Subject: %d\n\nbody %d\n" % (i, i) for i in range(8)]
    big = b"z" * 200_000
    drop = await filled(storage, bob, [*small[:4], big, *small[4:]])
    queries: list[int] = []
    real_fetch = db.fetch

    async def counting(query: str, *args: Any) -> Any:
        queries.append(len(args[1]) if len(args) > 1 and isinstance(args[1], list) else 0)
        return await real_fetch(query, *args)

    monkeypatch.setattr(db, "fetch", counting)
    try:
        assert [await drop.read(i) for i in range(4)] == small[:4]
        assert queries == [4]  # messages 1-4 in one query; the big 5th stops the read-ahead
        assert [await drop.read(i) for i in range(5, 9)] == small[4:]
        assert queries == [4, 4]
        assert await drop.read(0) == small[0]  # served already: read again, not kept
        assert queries[-1] == 4 and len(queries) == 3
        # a client that stops reading does not keep the bodies read ahead: they are forgotten after AHEAD_TTL
        assert drop._ahead
        monkeypatch.setattr(postgres_drop, "AHEAD_TTL", 0.01)
        assert await drop.read(5) == small[4]  # a fresh read ahead (messages 7-9), under the short TTL
        assert drop._ahead
        await asyncio.sleep(0.2)
        assert drop._ahead is None
    finally:
        await drop.close()
    assert drop._ahead is None


async def test_dele_only_at_commit_and_seen(db: Database) -> None:
    storage = PostgresStorage(db)
    bob = User("bob")
    drop = await filled(storage, bob, BODIES)
    await drop.close()  # no commit: nothing deleted
    drop = storage.maildrop(bob)
    await drop.open()
    assert len(drop.messages) == 4
    keep = drop.messages[2].uid
    await storage.deliver(bob, b"during the session\n")  # not in this session's numbering
    await drop.commit({0, 1, 3}, {2})
    await drop.close()
    drop = storage.maildrop(bob)
    await drop.open()
    assert drop.messages[0].uid == keep and len(drop.messages) == 2
    await drop.close()
    seen = await db.fetch("SELECT seen, retrieved_at IS NOT NULL AS r FROM messages WHERE uid = $1", keep)
    assert seen[0]["seen"] and seen[0]["r"]


async def test_in_use_in_one_worker_and_across_pools(db: Database, pg_dsn: str) -> None:
    storage = PostgresStorage(db)
    other = Database(pg_dsn, 2)  # another node
    try:
        first = storage.maildrop(User("carol"))
        await first.open()
        with pytest.raises(InUse):
            await storage.maildrop(User("carol")).open()
        with pytest.raises(InUse):
            await PostgresStorage(other).maildrop(User("carol")).open()
        await first.close()
        third = PostgresStorage(other).maildrop(User("carol"))
        await third.open()  # released
        await third.close()
    finally:
        await other.close()


async def test_close_while_the_lock_is_being_taken_leaves_it_free(db: Database, pg_dsn: str) -> None:
    """close() during open(), while the lock statement is on the wire: the lock it then gets is released,
    not left held for as long as the worker's lock connection lives."""
    storage = PostgresStorage(db)
    hank = User("hank")
    warm = await filled(storage, hank, [b"x\n"])  # the lock connection is up and the users row exists
    await warm.close()
    drop = storage.maildrop(hank)
    opening = asyncio.ensure_future(drop.open())
    await asyncio.sleep(0)  # the lock statement is sent
    await drop.close()
    await opening
    assert db.link().held() == 0
    other = Database(pg_dsn, 2)  # another node
    try:
        theirs = PostgresStorage(other).maildrop(hank)
        await theirs.open()  # not InUse
        await theirs.close()
    finally:
        await other.close()


async def test_lost_lock_connection_commits_nothing(db: Database, pg_dsn: str) -> None:
    storage = PostgresStorage(db)
    dave = User("dave")
    drop = await filled(storage, dave, [b"keep me\n"])
    pid = db.link().lock_pid()
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    for _ in range(200):  # the termination listener runs once the socket closes
        if db.link().lock_pid() is None:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(TemporaryError):
        await drop.commit({0}, set())
    with pytest.raises(TemporaryError):
        await drop.read(0)
    await drop.close()
    again = storage.maildrop(dave)
    await again.open()  # a new lock connection
    assert len(again.messages) == 1
    await again.close()


async def test_lock_gone_unnoticed_commits_nothing(db: Database, pg_dsn: str) -> None:
    """The commit itself checks the lock: a lock the server no longer holds for us (a partition the node has
    not noticed yet, the lock now another node's) deletes and flags nothing, however the node sees it."""
    storage = PostgresStorage(db)
    fred = User("fred")
    drop = await filled(storage, fred, [b"one\n", b"two\n"])
    conn = db.link()._lock_conn  # released behind the maildrop's back: the node still thinks it holds it
    assert await conn.fetchval("SELECT pg_advisory_unlock_all() IS NULL") is not None
    other = Database(pg_dsn, 2)  # another node takes the lock
    try:
        theirs = PostgresStorage(other).maildrop(fred)
        await theirs.open()
        with pytest.raises(TemporaryError):
            await drop.commit({0}, {1})
        await theirs.close()
    finally:
        await other.close()
    await drop.close()
    rows = await db.fetch(
        "SELECT seen, retrieved_at FROM messages m JOIN users u ON u.id = m.user_id WHERE name = 'fred'"
    )
    assert [(r["seen"], r["retrieved_at"]) for r in rows] == [(False, None), (False, None)]


async def test_open_commit_close_take_four_statements(db: Database, monkeypatch: Any) -> None:
    """Round trips are what a postgres login costs: the lock with the user's id, the snapshot, the commit
    and the unlock, one statement each; nothing more (asyncpg's default sends a reset query at every
    release of a pool connection, and a transaction costs a BEGIN and a COMMIT)."""
    storage = PostgresStorage(db)
    gina = User("gina")
    warm = await filled(storage, gina, [b"a\n", b"b\n", b"c\n"])  # connects and prepares every statement once
    await warm.commit(set(), {0})
    await warm.close()
    sent: list[str] = []
    connection = asyncpg.connection.Connection
    real_execute, real_inner = connection.execute, connection._execute

    async def execute(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        if not args:  # a simple query (with arguments, execute goes through _execute)
            sent.append(query)
        return await real_execute(self, query, *args, **kw)

    async def inner(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        sent.append(query)
        return await real_inner(self, query, *args, **kw)

    monkeypatch.setattr(connection, "execute", execute)
    monkeypatch.setattr(connection, "_execute", inner)
    drop = storage.maildrop(gina)
    await drop.open()
    await drop.commit({0}, {1})
    await drop.close()
    assert len(sent) == 4, sent
    sent.clear()
    drop = storage.maildrop(gina)  # retrieves messages retrieved before: nothing to write, no commit statement
    await drop.open()
    await drop.commit(set(), {0})  # "b", flagged by the session before
    await drop.close()
    assert len(sent) == 3, sent
    rows = await db.fetch(
        "SELECT seen FROM messages m JOIN users u ON u.id = m.user_id WHERE name = 'gina' ORDER BY m.id"
    )
    assert [r["seen"] for r in rows] == [True, False]


async def test_lost_pool_connection_is_temporary_and_recovers(db: Database, pg_dsn: str) -> None:
    storage = PostgresStorage(db)
    erin = User("erin")
    drop = await filled(storage, erin, [b"x\n"])
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND pid <> $1",
            db.link().lock_pid(),
        )
    finally:
        await admin.close()
    with contextlib.suppress(TemporaryError):
        await drop.read(0)  # the pool may hand out a dead connection once
    assert await drop.read(0) == b"x\n"
    await drop.commit({0}, set())
    await drop.close()


async def test_deleted_elsewhere_is_gone(db: Database) -> None:
    storage = PostgresStorage(db)
    drop = await filled(storage, User("fay"), [b"a\n"])
    await db.execute("DELETE FROM messages")
    with pytest.raises(MessageGone):
        await drop.read(0)
    await drop.close()


# ---- users -------------------------------------------------------------------------------------------------


async def _background_done() -> None:
    """Let the authenticator's background work (its decoy sampling, PostgresAuthenticator._relearn) end before
    the pool closes: left pending, it is destroyed with the test's loop and its error lands in a later test."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*others, return_exceptions=True)


async def test_user_commands_and_auth(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_file(tmp_path, pg_dsn)
    assert pop3d("db", "init", config=cfg).returncode == 0
    r = pop3d("user", "add", "gus", "--password-stdin", "--scheme", "SHA512-CRYPT", stdin="pw one\n", config=cfg)
    assert r.returncode == 0, r.stderr
    assert pop3d("user", "add", "gus", "--password-stdin", stdin="x\n", config=cfg).returncode == 1
    db = Database(pg_dsn, 2)
    try:
        auth = PostgresAuthenticator(db)
        assert (await auth.verify("gus", "pw one")) is not None
        assert await auth.verify("gus", "wrong") is None
        assert await auth.verify("nobody", "pw one") is None
        r = pop3d("user", "passwd", "gus", "--password-stdin", "--scheme", "PLAIN", stdin="pw two\n", config=cfg)
        assert r.returncode == 0, r.stderr
        assert await auth.verify("gus", "pw two") is not None
        assert pop3d("user", "passwd", "ghost", "--password-stdin", stdin="x\n", config=cfg).returncode == 1
        assert pop3d("user", "del", "gus", config=cfg).returncode == 0
        assert await auth.verify("gus", "pw two") is None
        assert pop3d("user", "del", "gus", config=cfg).returncode == 1
    finally:
        await _background_done()
        await db.close()


async def test_user_import_is_idempotent_with_every_scheme(pg_dsn: str, tmp_path: Path) -> None:
    from pop3d.auth import schemes

    passwd = tmp_path / "passwd"
    lines = [f"u{n}:{schemes.hash_password(s, 'secret ' + s)}:1000:1000::/home/u{n}::" for n, s in
             enumerate(["PLAIN", "SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "SCRAM-SHA-256"])]  # fmt: skip
    passwd.write_text("\n".join(lines) + "\n")
    cfg = config_file(tmp_path, pg_dsn)
    assert pop3d("db", "init", config=cfg).returncode == 0
    first = pop3d("user", "import", str(passwd), config=cfg)
    assert first.returncode == 0 and "5 added" in first.stdout, first.stdout + first.stderr
    again = pop3d("user", "import", str(passwd), config=cfg)
    assert "0 added, 0 changed, 5 unchanged" in again.stdout
    db = Database(pg_dsn, 2)
    try:
        auth = PostgresAuthenticator(db)
        for n, s in enumerate(["PLAIN", "SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "SCRAM-SHA-256"]):
            user = await auth.verify(f"u{n}", "secret " + s)
            assert user is not None and user.home == f"/home/u{n}" and user.uid == 1000
            assert await auth.verify(f"u{n}", "nope") is None
    finally:
        await _background_done()
        await db.close()


# ---- import ------------------------------------------------------------------------------------------------


async def test_import_maildir_keeps_octets_and_uidls(pg_dsn: str, tmp_path: Path) -> None:
    env = Env(tmp_path)
    for body in BODIES:
        deliver(env.maildir("alice"), body)
    before = ServerThread(env.settings()).start()
    try:
        c = poplib.POP3("127.0.0.1", before.port)
        c.user("alice")
        c.pass_("wonderland")
        served = c.uidl()[1]
        c.quit()
    finally:
        before.stop()
    cfg = config_file(tmp_path, pg_dsn, auth="passwd-file", passwd=env.passwd)
    assert pop3d("db", "init", config=cfg).returncode == 0
    template = str(env.mail / "{user}" / "Maildir")
    first = pop3d("import", "--from", "maildir", template, config=cfg)
    assert first.returncode == 0, first.stderr
    assert "alice: 4 message(s) copied" in first.stdout
    deliver(env.maildir("alice"), b"late\n")
    again = pop3d("import", "--from", "maildir", template, "--user", "alice", config=cfg)
    assert "alice: 1 message(s) copied, 4 already there" in again.stdout
    after = ServerThread(env.settings(storage={"driver": "postgres", "dsn": pg_dsn})).start()
    try:
        c = poplib.POP3("127.0.0.1", after.port)
        c.user("alice")
        c.pass_("wonderland")
        assert c.uidl()[1][:4] == served
        for i, body in enumerate(BODIES, start=1):
            got = b"\n".join(c.retr(i)[1])
            assert got == b"\n".join(body.replace(b"\r\n", b"\n").split(b"\n")).rstrip(b"\n") or body == b""
        c.quit()
    finally:
        after.call(after.ctx.storage.db.close())
        after.stop()


# ---- end to end ------------------------------------------------------------------------------------------


def _login(port: int, name: str, password: str) -> poplib.POP3:
    c = poplib.POP3("127.0.0.1", port, timeout=30)
    c.user(name)
    c.pass_(password)
    return c


async def test_pop3_session_on_postgres(pg_dsn: str, tmp_path: Path) -> None:
    await init(pg_dsn)
    cfg = config_file(tmp_path, pg_dsn)
    assert pop3d("user", "add", "hal", "--password-stdin", stdin="open pod\n", config=cfg).returncode == 0
    env = Env(tmp_path)
    st = ServerThread(env.settings(storage={"driver": "postgres", "dsn": pg_dsn, "pool_size": 3},
                                   auth={"driver": "postgres"})).start()  # fmt: skip
    try:
        big = (b"y" * 99 + b"\n") * 2000
        for body in [*BODIES, big]:
            st.call(st.ctx.storage.deliver(User("hal"), body))
        assert st.ctx.auth._db is st.ctx.storage.db  # one pool for both
        c = await asyncio.to_thread(_login, st.port, "hal", "open pod")
        assert c.stat() == (5, sum(network_size(b) for b in [*BODIES, big]))
        assert c.retr(5)[1] == [b"y" * 99] * 2000
        assert c.retr(2)[1] == [b"Subject: two", b"", b"no final newline"]
        with pytest.raises(poplib.error_proto, match=r"IN-USE"):
            await asyncio.to_thread(_login, st.port, "hal", "open pod")
        c.dele(1)
        c.quit()
        c = await asyncio.to_thread(_login, st.port, "hal", "open pod")
        assert c.stat()[0] == 4
        c.quit()
        with pytest.raises(poplib.error_proto, match=r"AUTH"):
            await asyncio.to_thread(_login, st.port, "hal", "wrong")
    finally:
        st.call(st.ctx.storage.db.close())
        st.stop()


async def test_many_idle_sessions_hold_only_the_pool(pg_dsn: str, tmp_path: Path) -> None:
    await init(pg_dsn)
    env = Env(tmp_path)
    names = [f"idle{n}" for n in range(200)]
    env.passwd.write_text("".join(f"{n}:{{PLAIN}}pw\n" for n in names))
    st = ServerThread(env.settings(storage={"driver": "postgres", "dsn": pg_dsn, "pool_size": 3})).start()
    clients: list[poplib.POP3] = []
    try:
        for n in names:
            clients.append(await asyncio.to_thread(_login, st.port, n, "pw"))
        admin = await asyncpg.connect(pg_dsn)
        try:
            count = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert count <= 3 + 1  # the pool and the lock connection
        assert st.ctx.storage.db.link is not None
    finally:
        for c in clients:
            c.sock.close()
        st.call(st.ctx.storage.db.close())
        st.stop()


async def test_lost_lock_connection_mid_session_answers_sys_temp(pg_dsn: str, tmp_path: Path) -> None:
    await init(pg_dsn)
    env = Env(tmp_path)
    st = ServerThread(env.settings(storage={"driver": "postgres", "dsn": pg_dsn, "pool_size": 2})).start()
    try:
        st.call(st.ctx.storage.deliver(User("alice"), b"precious\n"))
        c = await asyncio.to_thread(_login, st.port, "alice", "wonderland")
        c.dele(1)
        admin = await asyncpg.connect(pg_dsn)
        try:  # every connection of the node: the lock connection and the pool's
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        # the session ends at once, unasked: another node may hold the lock now (its DELE is not committed)
        c.sock.settimeout(15)
        assert c.file.readline().startswith(b"-ERR [SYS/TEMP] maildrop lock lost")
        assert c.file.readline() == b""  # and the connection is closed
        c.close()
        c = await asyncio.to_thread(_login, st.port, "alice", "wonderland")  # the node serves again
        assert c.stat()[0] == 1
        assert c.retr(1)[1] == [b"precious"]
        c.quit()
    finally:
        st.call(st.ctx.storage.db.close())
        st.stop()


async def _lock_pid(st: ServerThread) -> int | None:
    return st.ctx.storage.db.link().lock_pid()  # type: ignore[no-any-return]
