"""The verified-credentials cache (pop3d.auth.cred_cache): a repeat login with the right password skips the hash,
anything else pays it in full; shared by the workers, bounded, never on disk, never holding a password."""

from __future__ import annotations

import base64
import builtins
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import USERS, Raw
from fakes import ClockLoop, Connection, FakeAuth, make_context
from passlib.hash import sha512_crypt

from pop3d.auth import cred_cache, schemes
from pop3d.auth.base import Authenticator, Credentials, User
from pop3d.auth.cred_cache import WAYS, CredCache
from pop3d.auth.passwd_file import PasswdFileAuthenticator
from pop3d.ops.metrics import Metrics
from pop3d.runtime.reload import plan

TTL = 3600.0


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def digests(cache: CredCache, n: int) -> list[bytes]:
    return [cache.digest(f"user{i}", f"pw{i}", "PLAIN", f"pw{i}") for i in range(n)]


# ---- the table --------------------------------------------------------------------------------------------


def test_remembered_digest_is_fresh_until_the_ttl() -> None:
    clock = FakeClock()
    cache = CredCache(64, clock=clock)
    d = cache.digest("alice", "wonderland", "PLAIN", "wonderland")
    assert not cache.fresh(d, TTL)
    cache.remember(d)
    assert cache.fresh(d, TTL)
    clock.now += TTL - 0.001
    assert cache.fresh(d, TTL)
    assert not cache.fresh(d, 60)  # a lower ttl (a reload) shortens what is there at once
    clock.now += 0.001
    assert not cache.fresh(d, TTL)
    assert not cache.fresh(d, 0)  # 0 = off


def test_digest_covers_every_field_unambiguously() -> None:
    cache = CredCache(16)
    base = ("alice", "wonderland", "SHA512-CRYPT", "$6$salt$hash")
    variants = [
        ("alicE", "wonderland", "SHA512-CRYPT", "$6$salt$hash"),
        ("alice", "wonderlanD", "SHA512-CRYPT", "$6$salt$hash"),
        ("alice", "wonderland", "SHA256-CRYPT", "$6$salt$hash"),
        ("alice", "wonderland", "SHA512-CRYPT", "$6$salt$hasH"),
        ("alicew", "onderland", "SHA512-CRYPT", "$6$salt$hash"),  # same octets, other split
    ]
    d = cache.digest(*base)
    assert d == cache.digest(*base) and len(d) == 32
    assert all(cache.digest(*v) != d for v in variants)
    assert cache.digest("a\udcff", "p", "PLAIN", "p")  # undecodable input is hashed, never an error
    assert CredCache(16).digest(*base) != d  # a key of its own per start


def test_size_is_bounded_and_the_oldest_goes_first() -> None:
    clock = FakeClock()
    cache = CredCache(WAYS, clock=clock)  # one bucket: eviction order is visible
    ds = digests(cache, WAYS + 1)
    for d in ds:
        clock.now += 1
        cache.remember(d)
    assert not cache.fresh(ds[0], TTL)  # the oldest made room
    assert all(cache.fresh(d, TTL) for d in ds[1:])
    clock.now += 1
    cache.remember(ds[1])  # refreshed in place, no second slot
    cache.remember(ds[0])  # evicts ds[2], now the oldest
    assert cache.fresh(ds[1], TTL) and cache.fresh(ds[0], TTL) and not cache.fresh(ds[2], TTL)
    assert cache.used(TTL) == WAYS

    big = CredCache(100, clock=clock)
    assert big.entries >= 100 and len(big.buf) == big.entries * 24
    for d in digests(big, 5000):
        big.remember(d)
    assert big.used(TTL) <= big.entries


def test_expired_entries_make_room_before_fresh_ones() -> None:
    clock = FakeClock()
    cache = CredCache(WAYS, clock=clock)
    ds = digests(cache, WAYS + 1)
    cache.remember(ds[0])
    clock.now += 2 * TTL  # ds[0] expired
    for d in ds[1:WAYS]:
        cache.remember(d)
    cache.remember(ds[WAYS])
    assert all(cache.fresh(d, TTL) for d in ds[1:])
    with pytest.raises(ValueError):
        CredCache(0)


def test_shared_table_is_seen_by_a_forked_worker_and_a_private_one_is_not() -> None:
    for shared in (True, False):
        cache = CredCache(256, shared=shared)
        d = cache.digest("alice", "wonderland", "PLAIN", "wonderland")
        pid = os.fork()
        if pid == 0:  # the "other worker": same key (inherited), same memory when shared
            cache.remember(d)
            os._exit(0)
        os.waitpid(pid, 0)
        assert cache.fresh(d, TTL) is shared


def test_no_password_name_or_key_in_the_table() -> None:
    cache = CredCache(64)
    users = {**USERS, "carol": "sea shells", "dave": "correct horse battery"}
    for name, password in users.items():
        cache.remember(cache.digest(name, password, "PLAIN", password))
    memory = bytes(cache.buf)
    assert cache.used(TTL) == len(users)
    for name, password in users.items():
        for text in (name, password, name + password, f"{name}\0{password}"):
            raw = text.encode()
            assert raw not in memory and raw.hex().encode() not in memory and base64.b64encode(raw) not in memory
    assert cache._key not in memory


def test_nothing_goes_to_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Made and used without opening a file: anonymous memory only."""

    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError(f"the cache opened a file: {args!r}")

    before = set(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(cred_cache.mmap, "mmap", _anonymous_only(cred_cache.mmap.mmap), raising=True)
    cache = CredCache(64, shared=True)
    d = cache.digest("alice", "wonderland", "PLAIN", "wonderland")
    cache.remember(d)
    assert cache.fresh(d, TTL)
    monkeypatch.undo()
    assert set(os.listdir(tmp_path)) == before


def _anonymous_only(real: Callable[..., Any]) -> Callable[..., Any]:
    def mmap(fileno: int, *args: Any, **kw: Any) -> Any:
        assert fileno == -1, "the cache mapped a file"
        return real(fileno, *args, **kw)

    return mmap


# ---- through a user database -------------------------------------------------------------------------------


class CountingPool(ThreadPoolExecutor):
    """The hash pool, counting the jobs handed to it (each is a thread hop)."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.jobs = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> Future[Any]:
        self.jobs += 1
        return super().submit(fn, *args, **kw)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The scheme of every password hash check the passwd-file runs (a spy on pop3d.auth.schemes.verify)."""
    seen: list[str] = []
    real = schemes.verify

    def spy(scheme: str, secret: str, password: str) -> bool:
        seen.append(scheme)
        return real(scheme, secret, password)

    monkeypatch.setattr(schemes, "verify", spy)
    return seen


def sha(password: str) -> str:
    return "{SHA512-CRYPT}" + sha512_crypt.using(rounds=1000).hash(password)


@pytest.fixture
def pool() -> Iterator[CountingPool]:
    p = CountingPool()
    yield p
    p.shutdown()


def passwd(tmp_path: Path, pool: CountingPool, **users: str) -> PasswdFileAuthenticator:
    path = tmp_path / "passwd"
    path.write_text("".join(f"{u}:{s}\n" for u, s in users.items()))
    return PasswdFileAuthenticator(path, min_check_interval=0, executor=pool, settle=0)


async def test_a_hit_skips_the_hash_and_the_thread(tmp_path: Path, pool: CountingPool, hashes: list[str]) -> None:
    auth = passwd(tmp_path, pool, alice=sha("wonderland"))
    cache, hits = CredCache(64), []
    for _ in range(3):
        user = await auth.verify_remembered("alice", "wonderland", cache, TTL, lambda: hits.append(1))
        assert user is not None and user.name == "alice"
    assert hashes == ["SHA512-CRYPT"] and pool.jobs == 1 and len(hits) == 2


async def test_a_miss_looks_the_entry_up_once(
    tmp_path: Path, pool: CountingPool, hashes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's entry is the one verified: with PostgreSQL each lookup is a query."""
    auth = passwd(tmp_path, pool, alice=sha("wonderland"))
    lookups: list[str] = []
    real = auth.lookup

    async def counted(name: str) -> Credentials | None:
        lookups.append(name)
        return await real(name)

    monkeypatch.setattr(auth, "lookup", counted)
    cache = CredCache(64)
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None  # miss, then remembered
    assert await auth.verify_remembered("alice", "not it", cache, TTL) is None  # miss
    assert await auth.verify_remembered("nobody", "x", cache, TTL) is None  # miss (decoy)
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None  # hit
    assert lookups == ["alice", "alice", "nobody", "alice"] and len(hashes) == 3


async def test_a_wrong_password_pays_the_hash_every_time_and_is_never_remembered(
    tmp_path: Path, pool: CountingPool, hashes: list[str]
) -> None:
    auth = passwd(tmp_path, pool, alice=sha("wonderland"))
    cache = CredCache(64)
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None
    for _ in range(3):
        assert await auth.verify_remembered("alice", "not it", cache, TTL) is None
        assert await auth.verify_remembered("nobody", "wonderland", cache, TTL) is None  # a decoy's hash
    assert len(hashes) == 1 + 6 and pool.jobs == 7
    assert cache.used(TTL) == 1  # the one success only


async def test_a_changed_entry_misses(tmp_path: Path, pool: CountingPool, hashes: list[str]) -> None:
    auth = passwd(tmp_path, pool, alice=sha("wonderland"), bob=sha("builder"))
    cache = CredCache(64)
    for _ in range(2):
        assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None
        assert await auth.verify_remembered("bob", "builder", cache, TTL) is not None
    assert len(hashes) == 2
    # the same password hashed again (a new salt), and bob's password changed; reloaded as on SIGHUP
    (tmp_path / "passwd").write_text(f"alice:{sha('wonderland')}\nbob:{sha('new one')}\n")
    auth.reload_soon()
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None
    assert len(hashes) == 3  # missed: the entry is part of what is remembered
    assert await auth.verify_remembered("bob", "builder", cache, TTL) is None  # the old password is gone
    assert len(hashes) == 4
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None
    assert len(hashes) == 4  # the new entry is remembered in turn
    (tmp_path / "passwd").write_text(f"bob:{sha('new one')}\n")  # alice removed
    auth.reload_soon()
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is None


async def test_an_expired_entry_is_checked_again(tmp_path: Path, pool: CountingPool, hashes: list[str]) -> None:
    auth = passwd(tmp_path, pool, alice=sha("wonderland"))
    clock = FakeClock()
    cache = CredCache(64, clock=clock)
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None
    clock.now += TTL - 1
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None
    assert len(hashes) == 1
    clock.now += 1
    assert await auth.verify_remembered("alice", "wonderland", cache, TTL) is not None
    assert len(hashes) == 2


async def test_ttl_zero_or_no_cache_is_plain_verify(tmp_path: Path, pool: CountingPool, hashes: list[str]) -> None:
    auth = passwd(tmp_path, pool, alice=sha("wonderland"))
    cache = CredCache(64)
    for _ in range(2):
        assert await auth.verify_remembered("alice", "wonderland", cache, 0) is not None
        assert await auth.verify_remembered("alice", "wonderland", None, TTL) is not None
    assert len(hashes) == 4 and cache.used(TTL) == 0


async def test_any_user_database_gets_the_cache() -> None:
    """The default `verify_entry` remembers only an entry that did not change while it was checked."""

    class Slow(Authenticator):
        def __init__(self) -> None:
            self.secret = "pw"
            self.checks = 0
            self.rewrite_during_check: str | None = None

        async def lookup(self, name: str) -> Credentials | None:
            return Credentials(User(name), "PLAIN", self.secret) if name == "u" else None

        async def verify(self, name: str, password: str) -> User | None:
            self.checks += 1
            ok = name == "u" and password == self.secret
            if self.rewrite_during_check is not None:
                self.secret = self.rewrite_during_check
            return User(name) if ok else None

    db, cache = Slow(), CredCache(16)
    db.rewrite_during_check = "pw2"  # the entry changes under the first check
    assert await db.verify_remembered("u", "pw", cache, TTL) is not None
    assert cache.used(TTL) == 0
    db.secret, db.rewrite_during_check = "pw", None
    for _ in range(3):
        assert await db.verify_remembered("u", "pw", cache, TTL) is not None
    assert db.checks == 2


# ---- through the session: USER/PASS, SASL PLAIN and LOGIN -----------------------------------------------------


@pytest.fixture
def loop() -> Iterator[ClockLoop]:
    lp = ClockLoop()
    yield lp
    lp.settle()
    lp.close()


def verifications(auth: FakeAuth) -> int:
    return sum(1 for kind, _ in auth.calls if kind == "verify")


def session_login(loop: ClockLoop, ctx: Any, how: str, password: str = "wonderland") -> bytes:
    c = Connection(loop, ctx)
    if how == "USER":
        c.send(b"USER alice\r\nPASS " + password.encode() + b"\r\n")
    elif how == "PLAIN":
        c.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + password.encode()) + b"\r\n")
    else:
        c.send(b"AUTH LOGIN\r\n")
        c.send(base64.b64encode(b"alice") + b"\r\n")
        c.send(base64.b64encode(password.encode()) + b"\r\n")
    loop.advance(20)  # past any penalty wait (at most 15 s), short of the login timeout
    answer = c.lines()[-1]
    c.send(b"QUIT\r\n")
    return answer


def test_user_pass_plain_and_login_share_the_cache(loop: ClockLoop) -> None:
    auth = FakeAuth()
    ctx = make_context(auth, metrics={"listen": "127.0.0.1:0"})
    assert ctx.cred_cache is not None
    for how in ("USER", "PLAIN", "LOGIN", "USER"):
        assert session_login(loop, ctx, how).startswith(b"+OK alice has"), how
    assert verifications(auth) == 1
    assert isinstance(ctx.metrics, Metrics) and ctx.metrics.auth_cache_hits == 3
    assert ctx.metrics.registry.get_sample_value("pop3d_auth_cache_hits_total") == 3


def test_a_wrong_password_after_a_hit_pays_the_check_and_the_penalty(loop: ClockLoop) -> None:
    auth = FakeAuth()
    ctx = make_context(auth, auth={"failure_delay": 2.0})
    assert session_login(loop, ctx, "USER").startswith(b"+OK")
    for how in ("USER", "PLAIN", "LOGIN"):
        assert session_login(loop, ctx, how, "wrong").startswith(b"-ERR [AUTH]")
    assert verifications(auth) == 4
    assert ctx.penalty.failures("127.0.0.1", time.monotonic()) == 3
    assert session_login(loop, ctx, "USER").startswith(b"+OK")  # a hit still waits out the penalty, then clears it
    assert verifications(auth) == 4 and ctx.penalty.failures("127.0.0.1", time.monotonic()) == 0


def test_cache_ttl_zero_turns_it_off_live(loop: ClockLoop) -> None:
    auth = FakeAuth()
    ctx = make_context(auth, auth={"cache_ttl": 0})
    for _ in range(2):
        assert session_login(loop, ctx, "USER").startswith(b"+OK")
    assert verifications(auth) == 2
    ctx.settings = make_context(auth).settings  # a reload back to the default ttl
    for _ in range(2):
        assert session_login(loop, ctx, "USER").startswith(b"+OK")
    assert verifications(auth) == 3
    assert make_context(auth, auth={"cache_size": 0}).cred_cache is None


def test_cache_size_needs_a_restart_and_ttl_does_not() -> None:
    old = make_context().settings
    new = make_context(auth={"cache_size": 10, "cache_ttl": 60}).settings
    p = plan(old, new)
    assert "auth.cache_ttl" in p.live and "auth.cache_size" in p.restart
    assert (p.settings.auth.cache_ttl, p.settings.auth.cache_size) == (60, old.auth.cache_size)


# ---- across worker processes, end to end -------------------------------------------------------------------------


def test_a_login_on_one_worker_is_a_hit_on_the_other(env: Any) -> None:
    import urllib.request

    from test_cli import free_port, start
    from test_workers import config_with_workers, one_per_worker

    env.passwd.write_text(f"alice:{sha(USERS['alice'])}\n")
    port, mport = free_port(), free_port()
    cfg = config_with_workers(env, port, 2)
    cfg.write_text(cfg.read_text() + f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    proc = start(cfg, port)
    try:
        first, second = one_per_worker(port).values()
        for c in (first, second):  # the second login lands on the other worker
            assert c.cmd(b"USER alice").startswith(b"+OK")
            assert c.cmd(b"PASS " + USERS["alice"].encode()).startswith(b"+OK")
            assert c.cmd(b"QUIT").startswith(b"+OK")
            c.close()
        bad = Raw(port)
        bad.cmd(b"USER alice")
        assert bad.cmd(b"PASS wrong").startswith(b"-ERR [AUTH]")
        bad.close()
        url = f"http://127.0.0.1:{mport}/metrics"
        deadline = time.monotonic() + 10
        while True:  # totals reach the supervisor within a second
            body = urllib.request.urlopen(url, timeout=10).read().decode()
            hits = re.search(r"^pop3d_auth_cache_hits_total ([0-9.e+]+)$", body, re.M)
            logins = re.search(r'^pop3d_logins_total\{result="ok"\} ([0-9.e+]+)$', body, re.M)
            if hits and logins and float(logins[1]) == 2:
                assert float(hits[1]) == 1
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
