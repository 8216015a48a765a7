"""Authentication hardening: penalty on every answer, no user enumeration by time or answer, long passwords,
passwd-file rewritten in place, hostile user names, and the server secret in state_dir.

The timing tests compare medians of interleaved tries (40 each) with the 25 % tolerance the requirement
states, and measure the whole comparison again (up to 3 times) before failing: the property itself is a
timing one, so it cannot be checked any other way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import bcrypt
import pytest
import scramp
from argon2 import PasswordHasher, Type
from passlib.hash import sha512_crypt

from pop3d.auth import build_auth, cram_md5, sasl, schemes, state_secret
from pop3d.auth.base import Authenticator, Credentials, Decoy, User
from pop3d.auth.passwd_file import PasswdFileAuthenticator, plausible_name
from pop3d.auth.penalty import Penalty, SharedPenalty, SharedTable
from pop3d.auth.sasl_schemes import ScramKeys
from pop3d.config import load_settings

# Cheap hashes (low cost parameters), made with the libraries directly.
CHEAP = {
    "SHA512-CRYPT": lambda pw: "{SHA512-CRYPT}" + sha512_crypt.using(rounds=1000).hash(pw),
    "BLF-CRYPT": lambda pw: "{BLF-CRYPT}" + bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode(),
    "ARGON2ID": lambda pw: (
        "{ARGON2ID}" + PasswordHasher(time_cost=1, memory_cost=2048, parallelism=1, type=Type.ID).hash(pw)
    ),
    "PLAIN": lambda pw: "{PLAIN}" + pw,
    "CRAM-MD5": lambda pw: "{CRAM-MD5}" + cram_md5.context(pw),
    "SCRAM-SHA-256": lambda pw: "{SCRAM-SHA-256}" + ScramKeys.from_password(pw).encode(),
}
USERS = [f"user{i}" for i in range(4)]
TRIES = 40
TOLERANCE = 1.25


def passwd(tmp_path: Path, scheme: str, name: str = "passwd") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{u}:{CHEAP[scheme](f'pw-{u}')}\n" for u in USERS))
    return path


async def same_time(
    real: Callable[[int], Awaitable[object]], unknown: Callable[[int], Awaitable[object]], batch: int = 1
) -> None:
    """Medians of interleaved tries within TOLERANCE of each other; the whole measurement retried 3 times."""
    ratios = []
    for _attempt in range(3):
        times: dict[str, list[float]] = {"real": [], "unknown": []}
        for i in range(TRIES):
            pair = [("real", real), ("unknown", unknown)]
            for kind, fn in pair if i % 2 else pair[::-1]:
                t0 = time.perf_counter()
                for j in range(batch):
                    await fn(i * batch + j)
                times[kind].append(time.perf_counter() - t0)
        ratio = statistics.median(times["unknown"]) / statistics.median(times["real"])
        if 1 / TOLERANCE <= ratio <= TOLERANCE:
            return
        ratios.append(ratio)
    pytest.fail(f"unknown/real median time ratios {ratios}, allowed {1 / TOLERANCE:.2f}..{TOLERANCE}")


# -- 1. the penalty holds every answer back ----------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: Penalty(2.0, 15.0), lambda: SharedPenalty(2.0, 15.0, SharedTable(64))])
def test_success_waits_as_long_as_a_failure_while_under_penalty(make: Callable[[], Penalty]) -> None:
    p = make()
    assert p.delay("192.0.2.1", 0.0) == 0.0  # not under penalty: nothing to wait
    assert p.fail("192.0.2.1", 0.0) == 2.0
    for n in range(5):
        # the right password is answered after what a wrong one would wait: silence tells nothing
        would_wait = p.delay("192.0.2.1", 1.0 + n)
        assert would_wait > 0 and would_wait == p.fail("192.0.2.1", 1.0 + n)
    assert p.delay("192.0.2.2", 10.0) == 0.0  # per address
    p.succeed("192.0.2.1")
    assert p.delay("192.0.2.1", 10.0) == 0.0
    p.fail("192.0.2.1", 10.0)
    assert p.delay("192.0.2.1", 10.0 + 7200) == 0.0  # forgotten after an idle hour


def test_penalty_is_per_address_not_per_connection() -> None:
    """Two "connections" from one address see one history: hanging up resets nothing."""
    table = SharedTable(64)
    first, second = SharedPenalty(2.0, 15.0, table), SharedPenalty(2.0, 15.0, table)
    first.fail("198.51.100.1", 0.0)
    first.fail("198.51.100.1", 0.0)
    del first
    assert second.delay("198.51.100.1", 1.0) == 8.0


def test_success_waits_in_another_worker_process() -> None:
    table = SharedTable(slots=256)
    pid = os.fork()
    if pid == 0:
        SharedPenalty(2.0, 15.0, table).fail("203.0.113.5", 5.0)
        os._exit(0)
    os.waitpid(pid, 0)
    assert SharedPenalty(2.0, 15.0, table).delay("203.0.113.5", 6.0) == 4.0


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    p = Penalty(1.0, 8.0)
    p.fail("2001:db8:1:2::1", 0.0)
    assert p.failures("2001:db8:1:2:ffff::9", 0.0) == 1  # same /64
    assert p.failures("2001:db8:1:3::1", 0.0) == 0
    p.fail("::ffff:192.0.2.7", 0.0)
    assert p.failures("192.0.2.7", 0.0) == 1


def test_config_keys() -> None:
    s = load_settings(None)
    assert s.auth.max_failures_per_connection == 3
    assert s.auth.max_password_length == 1024
    assert s.server.state_dir == Path("/var/lib/pop3d")


# -- 2. unknown users: same time, same answer --------------------------------------------------------


@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "PLAIN", "CRAM-MD5", "SCRAM-SHA-256"])
async def test_verify_unknown_user_takes_as_long_as_a_wrong_password(tmp_path: Path, scheme: str) -> None:
    a = PasswdFileAuthenticator(passwd(tmp_path, scheme))

    async def real(i: int) -> None:
        assert await a.verify(USERS[i % len(USERS)], "wrong") is None

    async def unknown(i: int) -> None:
        assert await a.verify(f"nobody{i}", "wrong") is None

    await same_time(real, unknown, batch=20 if scheme in ("PLAIN", "CRAM-MD5") else 1)


def mixed(tmp_path: Path) -> Path:
    """A file in migration: user0 {SHA512-CRYPT} at the default 5000 rounds, the others still {PLAIN}."""
    path = tmp_path / "mixed"
    path.write_text(
        f"user0:{{SHA512-CRYPT}}{sha512_crypt.using(rounds=5000).hash('pw-user0')}\n"
        + "".join(f"{u}:{{PLAIN}}pw-{u}\n" for u in USERS[1:])
    )
    return path


@pytest.mark.parametrize("who", ["user0", "user1"])
async def test_verify_in_a_mixed_file_every_failure_takes_the_dearest_time(tmp_path: Path, who: str) -> None:
    """Most unknown names imitate the {PLAIN} majority, so without a floor user0 (SHA512) stands out; with
    it, an unknown user, user0 and a {PLAIN} user all fail in the time of the dearest entry."""
    a = PasswdFileAuthenticator(mixed(tmp_path))
    assert await a.verify("user0", "pw-user0") == User("user0")
    assert await a.verify("user1", "pw-user1") == User("user1")

    async def real(i: int) -> None:
        assert await a.verify(who, "wrong") is None

    async def unknown(i: int) -> None:
        assert await a.verify(f"nobody{i}", "wrong") is None

    await same_time(real, unknown)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "CRAM-MD5"])
async def test_sasl_lookup_in_a_mixed_file_takes_the_dearest_time(tmp_path: Path, mechanism: str) -> None:
    """user0's {SHA512-CRYPT} entry can serve neither mechanism; an unknown name imitating a {PLAIN} entry runs
    PBKDF2 for SCRAM. The lookup step answers after the same time for both."""
    a = PasswdFileAuthenticator(mixed(tmp_path))

    def resume(name: str) -> Callable[[Credentials | None, Decoy], sasl.Step]:
        return scram_first(name)[0].resume if mechanism == "SCRAM-SHA-256" else cram_exchange(name, "x").resume

    async def real(i: int) -> None:
        assert not isinstance(await a.with_credentials("user0", resume("user0")), sasl.Success)

    async def unknown(i: int) -> None:
        assert not isinstance(await a.with_credentials(f"nobody{i}", resume(f"nobody{i}")), sasl.Success)

    await same_time(real, unknown, batch=1 if mechanism == "SCRAM-SHA-256" else 5)


async def test_apop_in_a_mixed_file_unknown_user_takes_as_long_as_a_hashed_entry(tmp_path: Path) -> None:
    a = PasswdFileAuthenticator(mixed(tmp_path))
    stamp = "<1.2@test.invalid>"

    async def real(i: int) -> None:
        assert await a.verify_apop("user0", stamp, "0" * 32) is None

    async def unknown(i: int) -> None:
        assert await a.verify_apop(f"nobody{i}", stamp, "0" * 32) is None

    await same_time(real, unknown, batch=5)


async def test_apop_unknown_user_takes_as_long_as_a_wrong_digest(tmp_path: Path) -> None:
    a = PasswdFileAuthenticator(passwd(tmp_path, "PLAIN"))
    stamp = "<1.2@test.invalid>"
    good = hashlib.md5((stamp + "pw-user0").encode()).hexdigest()
    assert await a.verify_apop("user0", stamp, good) is not None

    async def real(i: int) -> None:
        assert await a.verify_apop(USERS[i % len(USERS)], stamp, "0" * 32) is None

    async def unknown(i: int) -> None:
        assert await a.verify_apop(f"nobody{i}", stamp, good) is None

    await same_time(real, unknown, batch=20)


def cram_exchange(name: str, password: str) -> sasl.CramMd5:
    m = sasl.CramMd5("test.invalid")
    ch = m.start(None)
    assert isinstance(ch, sasl.Challenge)
    assert m.step(f"{name} {hmac.new(password.encode(), ch.data, 'md5').hexdigest()}".encode()) == sasl.Lookup(name)
    return m


@pytest.mark.parametrize("scheme", ["CRAM-MD5", "PLAIN"])
async def test_cram_md5_unknown_user_takes_as_long_as_a_wrong_digest(tmp_path: Path, scheme: str) -> None:
    a = PasswdFileAuthenticator(passwd(tmp_path, scheme))
    m = cram_exchange("user1", "pw-user1")
    assert await a.with_credentials("user1", m.resume) == sasl.Success(User("user1"))

    async def real(i: int) -> None:
        step = await a.with_credentials(USERS[i % len(USERS)], cram_exchange(USERS[i % len(USERS)], "x").resume)
        assert isinstance(step, sasl.Failure)

    async def unknown(i: int) -> None:
        step = await a.with_credentials(f"nobody{i}", cram_exchange(f"nobody{i}", "x").resume)
        assert isinstance(step, sasl.Failure)

    await same_time(real, unknown, batch=5)


def scram_first(name: str) -> tuple[sasl.ScramSha256, scramp.ScramClient]:
    client = scramp.ScramClient(["SCRAM-SHA-256"], name, "wrong")
    m = sasl.ScramSha256()
    assert m.step(client.get_client_first().encode()) == sasl.Lookup(name)
    return m, client


def server_first_fields(step: sasl.Step) -> dict[str, str]:
    assert isinstance(step, sasl.Challenge)
    return dict(part.split("=", 1) for part in step.data.decode().split(","))


@pytest.mark.parametrize("scheme", ["SCRAM-SHA-256", "PLAIN"])
async def test_scram_server_first_for_unknown_user_looks_and_costs_like_a_real_one(tmp_path: Path, scheme: str) -> None:
    a = PasswdFileAuthenticator(passwd(tmp_path, scheme))
    real_first = server_first_fields(await a.with_credentials("user0", scram_first("user0")[0].resume))
    fake_first = server_first_fields(await a.with_credentials("nobody", scram_first("nobody")[0].resume))
    assert real_first["i"] == fake_first["i"] == "4096"
    assert len(base64.b64decode(real_first["s"])) == len(base64.b64decode(fake_first["s"]))

    async def real(i: int) -> None:
        name = USERS[i % len(USERS)]
        assert isinstance(await a.with_credentials(name, scram_first(name)[0].resume), sasl.Challenge)

    async def unknown(i: int) -> None:
        name = f"nobody{i}"
        assert isinstance(await a.with_credentials(name, scram_first(name)[0].resume), sasl.Challenge)

    await same_time(real, unknown, batch=1 if scheme == "PLAIN" else 5)


async def test_scram_unknown_user_fails_at_the_proof_like_a_wrong_password(tmp_path: Path) -> None:
    a = PasswdFileAuthenticator(passwd(tmp_path, "SCRAM-SHA-256"))
    for name in ("user0", "nobody"):
        m, client = scram_first(name)
        first = await a.with_credentials(name, m.resume)
        assert isinstance(first, sasl.Challenge)
        client.set_server_first(first.data.decode())
        assert isinstance(m.step(client.get_client_final().encode()), sasl.Failure)


async def test_scram_iterations_of_unknown_users_follow_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_text(
        "".join(f"u{i}:{{SCRAM-SHA-256}}{ScramKeys.from_password('x', 10000).encode()}\n" for i in range(3))
    )
    a = PasswdFileAuthenticator(path)
    for name in ("nobody", "zed", "u0"):
        assert server_first_fields(await a.with_credentials(name, scram_first(name)[0].resume))["i"] == "10000"


async def test_fake_scram_salt_stable_across_restarts(tmp_path: Path) -> None:
    path = passwd(tmp_path, "SCRAM-SHA-256")
    state = tmp_path / "state"

    async def salt(name: str) -> tuple[str, str]:
        a = PasswdFileAuthenticator(path, secret=state_secret.load_or_create(state))  # a fresh start
        f = server_first_fields(await a.with_credentials(name, scram_first(name)[0].resume))
        return f["s"], f["i"]

    assert await salt("nobody") == await salt("nobody")
    assert await salt("nobody") != await salt("somebody-else")
    other = PasswdFileAuthenticator(path, secret=state_secret.load_or_create(tmp_path / "other-state"))
    fields = server_first_fields(await other.with_credentials("nobody", scram_first("nobody")[0].resume))
    assert fields["s"] != (await salt("nobody"))[0]  # it is the secret that fixes it


async def test_build_auth_takes_the_secret(tmp_path: Path) -> None:
    cfg = load_settings(None, auth={"passwd_file": str(passwd(tmp_path, "PLAIN"))}).auth
    assert build_auth(cfg, b"k" * 32).decoy("nobody") == build_auth(cfg, b"k" * 32).decoy("nobody")
    assert build_auth(cfg, b"k" * 32).decoy("nobody") != build_auth(cfg, b"j" * 32).decoy("nobody")


# -- the state secret -----------------------------------------------------------------------------------


def test_state_secret_is_created_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    first = state_secret.load_or_create(state)
    path = state / state_secret.FILE_NAME
    assert len(first) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert state_secret.load_or_create(state) == first
    assert [p.name for p in state.iterdir()] == [state_secret.FILE_NAME]  # no temporary file left


def test_unusable_state_dir_warns_once_and_uses_a_random_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="pop3d.auth.state_secret"):
        a = state_secret.load_or_create(blocker / "state")
    assert len(a) == 32 and len(caplog.records) == 1 and "state_dir" in caplog.text
    assert state_secret.load_or_create(blocker / "state") != a


def test_state_secret_symlink_is_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 32)
    (state / state_secret.FILE_NAME).symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="pop3d.auth.state_secret"):
        secret = state_secret.load_or_create(state)
    assert secret != b"x" * 32 and "state_dir" in caplog.text


def test_demo_keeps_its_state_in_its_own_tree(tmp_path: Path) -> None:
    from pop3d import demo

    settings = demo.prepare(tmp_path / "demo")
    assert settings.server.state_dir == (tmp_path / "demo").resolve() / "state"
    secret = state_secret.load_or_create(settings.server.state_dir)  # a fresh tree: created there
    assert (settings.server.state_dir / state_secret.FILE_NAME).read_bytes() == secret


# -- 3. long passwords fail unhashed ---------------------------------------------------------------------


async def test_long_password_is_not_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = PasswdFileAuthenticator(passwd(tmp_path, "SHA512-CRYPT"))
    calls: list[str] = []
    real_verify = schemes.verify
    monkeypatch.setattr(schemes, "verify", lambda sc, se, pw: calls.append(sc) or real_verify(sc, se, pw))
    long = "x" * 4000
    for name in ("user0", "nobody"):
        assert await a.verify(name, long) is None
    assert calls == []
    plain = sasl.Plain().step(b"\0user0\0" + long.encode())
    assert isinstance(plain, sasl.CheckPassword) and await a.verify(plain.authcid, plain.password) is None
    assert calls == []
    assert await a.verify("user0", "é" * 513) is None  # 1026 octets: octets count, not characters
    assert calls == []
    assert await a.verify("user0", "pw-user0") is not None and calls == ["SHA512-CRYPT"]


async def test_max_password_length_is_configurable(tmp_path: Path) -> None:
    cfg = load_settings(None, auth={"passwd_file": str(passwd(tmp_path, "PLAIN")), "max_password_length": 4}).auth
    a = build_auth(cfg)
    assert await a.verify("user0", "pw-user0") is None  # 8 octets > 4


# -- 4. passwd-file rewritten in place -----------------------------------------------------------------


OLD = "".join(f"{u}:{{PLAIN}}pw-{u}\n" for u in ("alice", "bob", "carol", "dave", "gone"))
NEW = "".join(f"{u}:{{PLAIN}}pw-{u}\n" for u in ("added", "alice", "bob", "carol", "dave"))


# empty; inside the first line; at a line end; inside bob's password; inside the last line (dave's)
@pytest.mark.parametrize("split", [0, 7, NEW.index("bob"), NEW.index("pw-bob") + 3, len(NEW) - 3])
async def test_in_place_rewrite_never_fails_a_login(
    tmp_path: Path, split: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "passwd"
    path.write_text(OLD)
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    mid, go = threading.Event(), threading.Event()

    def rewrite() -> None:  # truncate, write a first part, (the server reads), write the rest
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(NEW[:split].encode())
            f.flush()
            mid.set()
            go.wait(10)
            f.write(NEW[split:].encode())

    writer = threading.Thread(target=rewrite)
    results: list[bool] = []
    with caplog.at_level(logging.INFO, logger="pop3d.auth.passwd_file"):
        writer.start()
        await asyncio.to_thread(mid.wait, 10)
        for _ in range(5):  # logins while the file is half written
            for u in ("alice", "bob", "carol", "dave"):
                results.append(await a.verify(u, f"pw-{u}") is not None)
        go.set()
        await asyncio.to_thread(writer.join)
        for u in ("alice", "bob", "carol", "dave"):
            results.append(await a.verify(u, f"pw-{u}") is not None)
    assert all(results)
    assert await a.verify("added", "pw-added") is not None  # the complete new file is in force
    assert "0 users" not in caplog.text
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))  # ... and once it has settled,
    assert await a.lookup("gone") is None  # removals apply too
    assert await a.verify("alice", "pw-alice") is not None


async def test_read_during_a_write_keeps_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pop3d.auth import passwd_file

    path = tmp_path / "passwd"
    path.write_text(OLD)
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    path.write_text(NEW)
    real_fstat = os.fstat
    calls = 0

    def growing(fd: int) -> os.stat_result:  # the second fstat of a read sees another size: a writer was busy
        nonlocal calls
        calls += 1
        st = real_fstat(fd)
        if calls % 2 == 0:
            return os.stat_result(
                (
                    st.st_mode,
                    st.st_ino,
                    st.st_dev,
                    st.st_nlink,
                    st.st_uid,
                    st.st_gid,
                    st.st_size + 1,
                    st.st_atime,
                    st.st_mtime,
                    st.st_ctime,
                )
            )
        return st

    monkeypatch.setattr(passwd_file.os, "fstat", growing)
    with caplog.at_level(logging.WARNING, logger="pop3d.auth.passwd_file"):
        for _ in range(3):
            assert await a.verify("gone", "pw-gone") is not None
            assert await a.lookup("added") is None
    assert caplog.text.count("is being written") == 1  # logged once per event
    monkeypatch.undo()
    assert await a.verify("added", "pw-added") is not None  # retried at the next lookup


async def test_empty_file_never_replaces_the_table_unless_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "passwd"
    path.write_text(OLD)
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    path.write_text("")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))  # even an old empty file
    with caplog.at_level(logging.WARNING, logger="pop3d.auth.passwd_file"):
        for _ in range(3):
            assert await a.verify("alice", "pw-alice") is not None
    assert caplog.text.count("has no users") == 1
    a.reload_soon()  # SIGHUP: the operator means it
    assert await a.lookup("alice") is None


# -- 5. hostile user names ---------------------------------------------------------------------------------

HOSTILE = ["a\0b", "..", "../etc/passwd", "a/b", "x" * 1000, "caf\udce9", "\ud800", "a\r\nb", "", " ", "é" * 200]


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_are_unknown_users(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = PasswdFileAuthenticator(passwd(tmp_path, "SHA512-CRYPT"))
    calls: list[str] = []
    real_verify = schemes.verify
    monkeypatch.setattr(schemes, "verify", lambda sc, se, pw: calls.append(sc) or real_verify(sc, se, pw))
    assert await a.lookup(name) is None
    assert await a.verify(name, "pw") is None
    assert calls == ["SHA512-CRYPT"]  # the same hash check as for a real name
    assert await a.verify_apop(name, "<1@h>", "0" * 32) is None
    assert isinstance(a.decoy(name), Decoy)
    m = sasl.ScramSha256()
    m._client_first, m._user = "n,,n=x,r=abc", name  # as if the client had sent this name
    assert isinstance(await a.with_credentials(name, m.resume), sasl.Challenge)
    c = sasl.CramMd5("h")
    c.step(f"{name or 'x'} {'é' * 32}".encode("utf-8", "surrogatepass"))
    assert isinstance(await a.with_credentials(name, c.resume), sasl.Failure)


def test_plausible_names() -> None:
    assert all(plausible_name(n) for n in ("alice", "alice@example.org", "a.b", "Ünïcode", "x" * 255))
    # path-like names may be in a passwd-file: the storage refuses them at login with [SYS/PERM]
    pathlike = {"..", "../etc/passwd", "a/b"}
    assert all(plausible_name(n) for n in pathlike)
    assert not any(plausible_name(n) for n in HOSTILE if n.strip() and n not in pathlike)
    assert not plausible_name("é" * 128)  # 256 octets


async def test_hostile_names_in_the_file_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Names that cannot be names (too long, control characters) are skipped with a warning; path-like names
    load, and the storage refuses them at login with [SYS/PERM] (tests/test_attack_runtime.py)."""
    path = tmp_path / "p"
    path.write_text("ok:{PLAIN}x\n../x:{PLAIN}x\na/b:{PLAIN}x\n" + "y" * 300 + ":{PLAIN}x\nc\x01d:{PLAIN}x\n")
    with caplog.at_level(logging.WARNING, logger="pop3d.auth.passwd_file"):
        a = PasswdFileAuthenticator(path)
    assert len([r for r in caplog.records if "line" in r.getMessage()]) == 2
    assert await a.lookup("ok") is not None
    assert await a.lookup("a/b") is not None and await a.lookup("../x") is not None


async def test_interface_defaults_use_decoys_too() -> None:
    """Another user database gets decoy-based `with_credentials` and `verify_apop` from the interface."""

    class One(Authenticator):
        async def lookup(self, name: str) -> Credentials | None:
            return Credentials(User("alice"), "PLAIN", "s3cret") if name == "alice" else None

        async def verify(self, name: str, password: str) -> User | None:
            return None

    a = One()
    d = a.decoy("x")
    assert d == a.decoy("x") and d.creds.plaintext() is not None and len(d.key) == 32
    seen: list[tuple[Credentials | None, Decoy]] = []
    await a.with_credentials("nobody", lambda c, dec: seen.append((c, dec)))
    assert seen == [(None, a.decoy("nobody"))]
    stamp = "<1@h>"
    right = hashlib.md5((stamp + "s3cret").encode()).hexdigest()
    assert await a.verify_apop("alice", stamp, right) == User("alice")
    assert await a.verify_apop("nobody", stamp, right) is None
    assert a.floors.value("apop") > 0  # failures there are held to a floor too (pop3d.auth.floors)
