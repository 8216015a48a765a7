"""Password schemes: round trips, hashes made by other implementations, and failure modes."""

from __future__ import annotations

import os
import secrets
import string
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
from tooling import needs_tool

from pop3d.auth import crypt_schemes, sasl_schemes, schemes
from pop3d.auth.schemes import (
    DEFAULT_SCHEME,
    REGISTRY,
    SCHEMES,
    SchemeEntry,
    SchemeRegistry,
    UnknownScheme,
    hash_password,
    split_scheme,
    verify,
)

PASSWORD = "Pässwörd ✓ with spaces"

# Published test vectors, i.e. produced by other implementations, not by the code under test:
# SHA-crypt: Ulrich Drepper's specification; bcrypt: OpenBSD/Openwall crypt_blowfish test suite;
# Argon2: the reference implementation (phc-winner-argon2, src/test.c and README).
KNOWN: list[tuple[str, str, str]] = [
    (
        "SHA512-CRYPT",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
        "Hello world!",
    ),
    ("SHA256-CRYPT", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5", "Hello world!"),
    ("BLF-CRYPT", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW", "U*U"),
    ("BLF-CRYPT", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.VGOzA784oUp/Z0DY336zx7pLYAy0lwK", "U*U*"),
    # $2y$ (what Dovecot and PHP write) is the same algorithm under another prefix.
    ("BLF-CRYPT", "$2y$05$XXXXXXXXXXXXXXXXXXXXXOAcXxm9kjPGEMsLznoKqmqw7tc8WCx4a", "U*U*U"),
    ("ARGON2ID", "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc", "password"),
    ("ARGON2I", "$argon2i$v=19$m=65536,t=2,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG", "password"),
]


def test_public_constants() -> None:
    assert SCHEMES == (
        "PLAIN",
        "SHA512-CRYPT",
        "SHA256-CRYPT",
        "BLF-CRYPT",
        "ARGON2ID",
        "CRAM-MD5",
        "SCRAM-SHA-256",
    )
    assert DEFAULT_SCHEME == "ARGON2ID" and DEFAULT_SCHEME in SCHEMES
    assert issubclass(UnknownScheme, ValueError)


@pytest.mark.parametrize("scheme", [*SCHEMES, "ARGON2I"])
def test_round_trip(scheme: str) -> None:
    stored = hash_password(scheme, PASSWORD)
    assert stored.startswith("{" + scheme + "}")
    name, secret = split_scheme(stored)
    assert name == scheme
    assert verify(name, secret, PASSWORD)
    assert not verify(name, secret, PASSWORD + "x")


@pytest.mark.parametrize("scheme", ["SHA256-CRYPT", "ARGON2ID"])
def test_hashes_are_salted(scheme: str) -> None:
    assert hash_password(scheme, "same") != hash_password(scheme, "same")


@pytest.mark.parametrize(("scheme", "secret", "password"), KNOWN)
def test_known_vectors(scheme: str, secret: str, password: str) -> None:
    assert verify(scheme, secret, password)
    assert not verify(scheme, secret, password + "!")
    # The same hash labelled {CRYPT}, or given without braces (passwd-file default), is detected by prefix.
    assert verify("CRYPT", secret, password)
    assert verify(*split_scheme(secret), password)


@needs_tool("openssl", "openssl")
@pytest.mark.parametrize(("flag", "scheme"), [("-6", "SHA512-CRYPT"), ("-5", "SHA256-CRYPT"), ("-1", "MD5-CRYPT")])
def test_openssl_hashes(flag: str, scheme: str) -> None:
    salt = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(16 if flag != "-1" else 8))
    out = subprocess.run(
        ["openssl", "passwd", flag, "-salt", salt, "-stdin"],
        input=PASSWORD.encode(),
        capture_output=True,
        check=True,
    )
    secret = out.stdout.decode().strip()
    assert verify(scheme, secret, PASSWORD)
    assert verify("CRYPT", secret, PASSWORD)
    assert not verify(scheme, secret, "wrong")


@pytest.mark.parametrize(
    ("scheme", "secret"),
    [
        ("SHA512-CRYPT", ""),
        ("SHA512-CRYPT", "garbage"),
        ("SHA512-CRYPT", "$6$"),
        ("SHA512-CRYPT", "$6$saltstring$svn8UoSVapNtMuq1uk"),  # truncated
        ("SHA512-CRYPT", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),  # wrong algorithm
        ("SHA256-CRYPT", "$5$rounds=notanumber$abc$def"),
        ("BLF-CRYPT", ""),
        ("BLF-CRYPT", "$2b$05$short"),
        ("BLF-CRYPT", "$2x$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"),
        ("BLF-CRYPT", "$2a$99$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"),
        ("ARGON2ID", ""),
        ("ARGON2ID", "$argon2id$v=19$m=65536"),
        ("ARGON2ID", "$argon2id$v=19$m=65536,t=2,p=1$!!!!$!!!!"),
        # a valid argon2i hash is not an ARGON2ID hash
        ("ARGON2ID", "$argon2i$v=19$m=65536,t=2,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"),
        ("CRYPT", ""),
        ("CRYPT", "plaintext-by-mistake"),
        ("CRYPT", "abJnggxhB/yWI"),  # DES crypt: not supported
        ("CRYPT", "$y$j9T$abc$def"),  # yescrypt: not supported
        ("CRYPT", "$6$"),
    ],
)
def test_malformed_hash_is_false(scheme: str, secret: str) -> None:
    assert verify(scheme, secret, "password") is False


def test_bcrypt_over_72_bytes_is_a_mismatch_not_a_crash() -> None:
    long_pw = "x" * 73
    secret = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(rounds=4)).decode()  # cheap cost keeps the test fast
    assert verify("BLF-CRYPT", secret, "x" * 72)
    assert verify("BLF-CRYPT", secret, long_pw) is False  # bcrypt would have truncated: must not match
    with pytest.raises(ValueError, match="72"):
        hash_password("BLF-CRYPT", long_pw)
    assert verify("BLF-CRYPT", secret, "ü" * 37) is False  # 74 bytes in UTF-8 though only 37 characters


def test_nul_in_password_is_a_mismatch() -> None:
    assert verify("SHA512-CRYPT", KNOWN[0][1], "Hello\0world!") is False
    assert verify("BLF-CRYPT", KNOWN[2][1], "U*U\0") is False


def test_unknown_scheme_raises() -> None:
    with pytest.raises(UnknownScheme, match="NOPE"):
        verify("NOPE", "x", "x")
    with pytest.raises(UnknownScheme):
        hash_password("NOPE", "x")
    with pytest.raises(UnknownScheme):
        hash_password("CRYPT", "x")  # verify-only: which algorithm would it be?
    with pytest.raises(ValueError):  # what callers that only know ValueError catch
        verify("MD5", "x", "x")


def test_plain_and_cleartext() -> None:
    assert verify("PLAIN", "secret", "secret")
    assert not verify("PLAIN", "secret", "Secret")
    assert not verify("PLAIN", "secret", "secret ")
    assert verify("CLEARTEXT", "secret", "secret")
    assert verify("cleartext", "ünï", "ünï")
    assert hash_password("PLAIN", "pw") == "{PLAIN}pw"
    assert hash_password("CLEARTEXT", "pw") == "{PLAIN}pw"
    with pytest.raises(ValueError):
        hash_password("PLAIN", "a:b")  # would break the passwd-file line


def test_plain_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr("hmac.compare_digest", spy)
    assert verify("PLAIN", "abc", "abc")
    assert calls == [(b"abc", b"abc")]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("{PLAIN}secret", ("PLAIN", "secret")),
        ("{sha512-crypt}$6$x$y", ("SHA512-CRYPT", "$6$x$y")),
        ("{PLAIN}{not-a-scheme}", ("PLAIN", "{not-a-scheme}")),
        ("{PLAIN}", ("PLAIN", "")),
        ("$6$x$y", ("CRYPT", "$6$x$y")),
        ("{}x", ("CRYPT", "{}x")),
        ("{unterminated", ("CRYPT", "{unterminated")),
        ("", ("CRYPT", "")),
    ],
)
def test_split_scheme(stored: str, expected: tuple[str, str]) -> None:
    assert split_scheme(stored) == expected


def test_split_scheme_default() -> None:
    assert split_scheme("secret", default="plain") == ("PLAIN", "secret")


def test_register() -> None:
    reg = SchemeRegistry(crypt_schemes.ENTRIES)  # a registry of its own: the server's is never touched
    reg.register(SchemeEntry("rev", lambda secret, pw: secret == pw[::-1], lambda pw: pw[::-1]))
    assert reg.is_known("REV") and not schemes.is_known("REV")
    assert reg.hash_password("REV", "abc") == "{REV}cba"
    assert reg.verify("rev", "cba", "abc")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(SchemeEntry("REV", lambda s, p: True))
    reg.register(SchemeEntry("REV", lambda s, p: False), replace=True)
    assert not reg.verify("REV", "cba", "abc")
    with pytest.raises(UnknownScheme):
        reg.hash_password("REV", "abc")  # replaced without a hasher
    with pytest.raises(ValueError):
        reg.register(SchemeEntry("CLEARTEXT", lambda s, p: True))  # an alias, not a free name
    with pytest.raises(ValueError):
        reg.register(SchemeEntry("{BAD}", lambda s, p: True))


def test_registered_verifier_that_raises_is_false() -> None:
    def broken(secret: str, password: str) -> bool:
        raise ValueError("corrupt")

    reg = SchemeRegistry([SchemeEntry("BROKEN", broken)])
    assert reg.verify("BROKEN", "x", "x") is False


def test_registry_has_every_scheme_module_once() -> None:
    """Built from the leaf modules' lists, each scheme exactly once; a clash would fail at import."""
    entries = [*crypt_schemes.ENTRIES, *sasl_schemes.ENTRIES]
    names = [e.name for e in entries]
    assert len(names) == len(set(names))
    assert REGISTRY.names() == tuple(names)
    assert {"CRAM-MD5", "SCRAM-SHA-256", "SHA512-CRYPT", "CRYPT", "ARGON2I"} <= set(names)
    with pytest.raises(ValueError, match="already registered"):
        SchemeRegistry([*entries, crypt_schemes.ENTRIES[0]])


def test_passwd_offers_what_verification_knows() -> None:
    """`pop3d passwd --scheme` and passwd-file verification use one registry: all offered schemes verify."""
    assert set(SCHEMES) <= set(REGISTRY.names())
    assert all(REGISTRY.is_known(s) for s in SCHEMES)


def test_no_scheme_arrives_by_import_side_effect() -> None:
    """Importing the scheme modules in any order yields the same registry; the leaves do not import it."""
    code = (
        "import sys; import pop3d.auth.sasl_schemes, pop3d.auth.crypt_schemes; "
        "assert 'pop3d.auth.schemes' not in sys.modules, 'a leaf imported the registry'; "
        "from pop3d.auth import schemes; print(','.join(schemes.REGISTRY.names()))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    ).stdout
    assert out.strip() == ",".join(REGISTRY.names())


# -- decoys: same shape, nobody's password -------------------------------------------------------------


def _cheap(scheme: str) -> str:
    from argon2 import PasswordHasher, Type
    from passlib.hash import sha256_crypt, sha512_crypt

    return {
        "PLAIN": "x",
        "SHA512-CRYPT": sha512_crypt.using(rounds=1234).hash("x"),
        "SHA256-CRYPT": sha256_crypt.using(rounds=1000, salt="ab").hash("x"),
        "MD5-CRYPT": crypt_schemes.md5_crypt.hash("x"),
        "BLF-CRYPT": bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=5, prefix=b"2a")).decode(),
        "ARGON2ID": PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1, type=Type.ID).hash("x"),
        "ARGON2I": PasswordHasher(time_cost=1, memory_cost=2048, parallelism=2, type=Type.I).hash("x"),
        "CRYPT": bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)).decode(),
        "CRAM-MD5": hash_password("CRAM-MD5", "x")[len("{CRAM-MD5}") :],
        "SCRAM-SHA-256": sasl_schemes.ScramKeys.from_password("x", 5000, b"salt1234salt1234").encode(),
    }[scheme]


@pytest.mark.parametrize("scheme", REGISTRY.names())
def test_every_scheme_has_a_decoy_of_the_same_shape(scheme: str) -> None:
    entry = REGISTRY.entry(scheme)
    assert entry is not None and entry.shape is not None and entry.decoy is not None
    template = _cheap(scheme)
    decoy = entry.decoy(template, b"\x01" * 32)
    assert entry.shape(decoy) == entry.shape(template)  # same algorithm and cost parameters
    assert decoy != template and not verify(scheme, decoy, "x")
    assert entry.decoy(template, b"\x02" * 32) != decoy or not entry.cheap_decoy  # per-name when cheap


def test_shape_rejects_malformed_secrets() -> None:
    for scheme, bad in [
        ("SHA512-CRYPT", "nonsense"),
        ("BLF-CRYPT", "$2b$99$x"),
        ("ARGON2ID", "$argon2id$bad"),
        ("CRYPT", "$y$yescrypt"),
        ("SCRAM-SHA-256", "1,2"),
        ("CRAM-MD5", "abcd"),
    ]:
        entry = REGISTRY.entry(scheme)
        assert entry is not None and entry.shape is not None
        with pytest.raises(ValueError):
            entry.shape(bad)
