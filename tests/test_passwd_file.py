"""PasswdFileAuthenticator: parsing, verification, live reload, and not blocking the event loop."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import subprocess
from pathlib import Path

import bcrypt
import pytest
from argon2 import PasswordHasher, Type
from passlib.hash import sha512_crypt
from tooling import needs_tool

from pop3d.auth import passwd_file, schemes
from pop3d.auth.base import Credentials, User
from pop3d.auth.passwd_file import PasswdFileAuthenticator

# Cheap hashes made directly with the libraries (not through pop3d), so these tests stay fast.
SHA512 = sha512_crypt.using(rounds=1000).hash("sha-pw")
BCRYPT = bcrypt.hashpw(b"blf-pw", bcrypt.gensalt(rounds=4)).decode()
ARGON2ID_CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=Type.ID).hash("argon-pw")

GOOD = f"""\
# a comment, then a blank line

alice:{{PLAIN}}wonderland:1000:1001:Alice Liddell:/home/alice:/bin/sh:quota=1G userdb_mail=maildir:~/Maildir nopassword
bob:{{SHA512-CRYPT}}{SHA512}
carol:{{BLF-CRYPT}}{BCRYPT}::::/var/mail/carol::
   # an indented comment
dave:{SHA512}:2000:2000
erin:{{ARGON2ID}}{ARGON2ID_CHEAP}:3000:3000::/home/erin
frank:{{cleartext}}plain-frank
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    return write(tmp_path / "passwd", GOOD)


@pytest.fixture
def auth(pwfile: Path) -> PasswdFileAuthenticator:
    return PasswdFileAuthenticator(pwfile, min_check_interval=0)


async def test_all_fields(auth: PasswdFileAuthenticator) -> None:
    creds = await auth.lookup("alice")
    assert creds == Credentials(
        user=User(
            name="alice",
            uid=1000,
            gid=1001,
            home="/home/alice",
            extra={"quota": "1G", "userdb_mail": "maildir:~/Maildir", "nopassword": ""},
        ),
        scheme="PLAIN",
        secret="wonderland",
    )
    assert creds.plaintext() == "wonderland"


async def test_optional_fields(auth: PasswdFileAuthenticator) -> None:
    bob = await auth.lookup("bob")
    assert bob is not None
    assert bob.user == User(name="bob")
    assert (bob.scheme, bob.secret) == ("SHA512-CRYPT", SHA512)
    assert bob.plaintext() is None
    carol = await auth.lookup("carol")
    assert carol is not None and carol.user == User(name="carol", home="/var/mail/carol")
    dave = await auth.lookup("dave")  # no {SCHEME}: CRYPT, as in Dovecot
    assert dave is not None and (dave.scheme, dave.user.uid, dave.user.gid) == ("CRYPT", 2000, 2000)
    frank = await auth.lookup("frank")
    assert frank is not None and frank.scheme == "CLEARTEXT" and frank.plaintext() == "plain-frank"


@pytest.mark.parametrize(
    ("name", "password"),
    [
        ("alice", "wonderland"),
        ("bob", "sha-pw"),
        ("carol", "blf-pw"),
        ("dave", "sha-pw"),
        ("erin", "argon-pw"),
        ("frank", "plain-frank"),
    ],
)
async def test_verify(auth: PasswdFileAuthenticator, name: str, password: str) -> None:
    user = await auth.verify(name, password)
    assert user is not None and user.name == name
    assert await auth.verify(name, password + "x") is None
    assert await auth.verify(name.upper(), password) is None  # names are exact


async def test_unknown_user(auth: PasswdFileAuthenticator, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await auth.lookup("nobody") is None
    checked: list[str] = []
    real_verify = schemes.verify

    def spy(scheme: str, secret: str, password: str) -> bool:
        checked.append(scheme)
        return real_verify(scheme, secret, password)

    monkeypatch.setattr(schemes, "verify", spy)
    assert await auth.verify("nobody", "whatever") is None
    # One real hash check ran, of a scheme the file uses, so the answer takes as long as for a real user.
    present = {c.scheme for c in auth._users.values()}
    assert len(checked) == 1 and checked[0] in present


async def test_unknown_users_imitate_the_schemes_in_proportion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha256 = schemes.hash_password("SHA256-CRYPT", "z")
    path = write(tmp_path / "p", "".join(f"u{i}:{{PLAIN}}x{i}\n" for i in range(3)) + f"c:{sha256}\n")
    checked: list[str] = []
    real_verify = schemes.verify
    monkeypatch.setattr(schemes, "verify", lambda sc, se, pw: checked.append(sc) or real_verify(sc, se, pw))
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    for i in range(200):
        assert a.decoy(f"nobody{i}").creds.scheme in ("PLAIN", "SHA256-CRYPT")
    counts = collections.Counter(a.decoy(f"nobody{i}").creds.scheme for i in range(400))
    assert 200 < counts["PLAIN"] < 400 and 40 < counts["SHA256-CRYPT"] < 200  # about 3:1, like the file
    name = next(f"nobody{i}" for i in range(400) if a.decoy(f"nobody{i}").creds.scheme == "SHA256-CRYPT")
    assert await a.verify(name, "pw") is None
    assert checked == ["SHA256-CRYPT"]  # the same verify code as for user c, on a hash of the same shape


async def test_uid_gid_by_name(tmp_path: Path) -> None:
    a = PasswdFileAuthenticator(write(tmp_path / "p", "u:{PLAIN}x:root:root\n"), min_check_interval=0)
    creds = await a.lookup("u")
    assert creds is not None and (creds.user.uid, creds.user.gid) == (0, 0)


async def test_crlf_and_no_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(b"a:{PLAIN}one\r\nb:{PLAIN}two")
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    assert await a.verify("a", "one") is not None
    assert await a.verify("b", "two") is not None


async def test_malformed_lines_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "passwd"
    lines = [
        b"good1:{PLAIN}s3cret-one",  # 1
        b"no-password-field",  # 2
        b":{PLAIN}s3cret-nameless",  # 3
        b"emptypw:",  # 4
        b"emptyplain:{PLAIN}",  # 5
        b"baduid:{PLAIN}s3cret-uid:not-a-user-zz9:1",  # 6
        b"badgid:{PLAIN}s3cret-gid:1:not-a-group-zz9",  # 7
        b"badextra:{PLAIN}s3cret-extra:1:1::::=value",  # 8
        b"latin1:{PLAIN}s3cret-\xe9",  # 9: not UTF-8
        b"good1:{PLAIN}s3cret-dup",  # 10: duplicate
        b"good2:{PLAIN}s3cret-two",  # 11
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="pop3d.auth.passwd_file"):
        a = PasswdFileAuthenticator(path, min_check_interval=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 9
    for lineno, msg in zip([2, 3, 4, 5, 6, 7, 8, 9, 10], warnings, strict=True):
        assert str(path) in msg and f"line {lineno}:" in msg
    assert "s3cret" not in caplog.text
    assert (await a.verify("good1", "s3cret-one")) is not None  # the first definition wins
    assert (await a.verify("good2", "s3cret-two")) is not None
    for name in ("baduid", "badgid", "badextra", "emptypw", "emptyplain", "latin1"):
        assert await a.lookup(name) is None


async def test_unknown_scheme_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "p", "u:{NO-SUCH-SCHEME}s3cret\n")
    with caplog.at_level(logging.WARNING, logger="pop3d.auth.passwd_file"):
        a = PasswdFileAuthenticator(path, min_check_interval=0)
        creds = await a.lookup("u")
        assert creds is not None and creds.scheme == "NO-SUCH-SCHEME"
        assert await a.verify("u", "s3cret") is None  # refused, not an exception
    assert "NO-SUCH-SCHEME" in caplog.text and "s3cret" not in caplog.text


async def test_passwords_never_logged(auth: PasswdFileAuthenticator, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        for name, pw in [("alice", "guess-one"), ("bob", "guess-two"), ("zed", "guess-three")]:
            await auth.verify(name, pw)
    assert "guess-" not in caplog.text and "wonderland" not in caplog.text


async def test_reload_on_change(pwfile: Path, auth: PasswdFileAuthenticator) -> None:
    assert await auth.verify("alice", "wonderland") is not None
    write(pwfile, "alice:{PLAIN}looking-glass\n")
    assert await auth.verify("alice", "looking-glass") is not None  # changes apply at once
    assert await auth.verify("alice", "wonderland") is None
    assert await auth.lookup("bob") is not None  # the file may be mid-rewrite: removals wait until it settles
    st = pwfile.stat()
    os.utime(pwfile, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))
    assert await auth.lookup("bob") is None
    assert await auth.verify("alice", "looking-glass") is not None


async def test_reload_same_size_new_mtime(tmp_path: Path) -> None:
    path = write(tmp_path / "p", "a:{PLAIN}aaaa\n")
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    st = path.stat()
    write(path, "a:{PLAIN}bbbb\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse-timestamp filesystems
    assert await a.verify("a", "bbbb") is not None


async def test_reload_atomic_replace(tmp_path: Path) -> None:
    path = write(tmp_path / "p", "a:{PLAIN}old\n")
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    os.replace(write(tmp_path / "p.new", "a:{PLAIN}new\n"), path)  # new inode, how editors and tools save
    assert await a.verify("a", "new") is not None


async def test_check_interval_limits_stat(tmp_path: Path) -> None:
    path = write(tmp_path / "p", "a:{PLAIN}old\n")
    a = PasswdFileAuthenticator(path, min_check_interval=3600)
    write(path, "a:{PLAIN}new-and-longer\n")
    assert await a.verify("a", "old") is not None  # not looked at again yet


async def test_file_vanishes_keeps_last_copy(
    pwfile: Path, auth: PasswdFileAuthenticator, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pop3d.auth.passwd_file"):
        pwfile.unlink()
        for _ in range(3):
            assert await auth.verify("alice", "wonderland") is not None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(pwfile) in warnings[0].getMessage()
        write(pwfile, "alice:{PLAIN}back-again\n")
        assert await auth.verify("alice", "back-again") is not None
        assert "readable again" in caplog.text


async def test_missing_file_at_start(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        PasswdFileAuthenticator(path)
    with pytest.raises(IsADirectoryError):
        PasswdFileAuthenticator(tmp_path)


async def test_unreadable_file_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "unreadable", "a:{PLAIN}x\n")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make open() fail the way it would for anyone else

        def denied(file: object, *args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(passwd_file, "open", denied, raising=False)
    with pytest.raises(PermissionError, match="unreadable"):
        PasswdFileAuthenticator(path)


async def test_hash_check_does_not_block_the_loop(tmp_path: Path) -> None:
    # Real ARGON2ID cost (64 MiB, t=3): a few hundred milliseconds that must not stall other sessions.
    path = write(tmp_path / "p", f"u:{schemes.hash_password('ARGON2ID', 'right')}\n")
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(a.verify("u", "wrong"), a.verify("nobody", "wrong"))
    finally:
        done.set()
        await task
    assert all(r is None for r in results)
    assert ticks >= 3


async def test_concurrent_verifies(auth: PasswdFileAuthenticator) -> None:
    results = await asyncio.gather(*(auth.verify("carol", "blf-pw" if i % 2 else "no") for i in range(8)))
    assert [r is not None for r in results] == [bool(i % 2) for i in range(8)]


async def test_decoy_hash_made_once_per_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    entry = schemes.REGISTRY.entry("SHA512-CRYPT")
    assert entry is not None and entry.decoy is not None
    real_decoy = entry.decoy
    spy = dataclasses.replace(entry, decoy=lambda t, s: made.append(t) or real_decoy(t, s))
    monkeypatch.setitem(schemes.REGISTRY._entries, "SHA512-CRYPT", spy)
    path = write(tmp_path / "p", f"a:{{SHA512-CRYPT}}{SHA512}\nb:{{SHA512-CRYPT}}{SHA512}\n")
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    assert len(made) == 1  # one hash for the shape, at load time, none per unknown name
    for i in range(5):
        assert await a.verify(f"nobody{i}", "pw") is None
    write(path, f"a:{{SHA512-CRYPT}}{SHA512}\nc:{{SHA512-CRYPT}}{SHA512}\n")
    assert await a.lookup("c") is not None
    assert len(made) == 1  # a reload with the same shapes reuses it


@needs_tool("openssl", "openssl")
async def test_dovecot_style_file_with_openssl_hash(tmp_path: Path) -> None:
    cmd = ["openssl", "passwd", "-6", "-salt", "abcdefgh", "pw"]
    out = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, check=True)
    path = write(tmp_path / "p", f"u:{{SHA512-CRYPT}}{out.stdout.decode().strip()}:::::\n")
    a = PasswdFileAuthenticator(path, min_check_interval=0)
    assert await a.verify("u", "pw") == User(name="u")
