"""The library-backed password schemes: PLAIN and the crypt(3) family (SHA-crypt, MD5-crypt, bcrypt, Argon2).

Every real hash is computed by a maintained library (passlib/libpass, bcrypt, argon2-cffi); this module only
maps Dovecot's scheme names onto them, so a passwd-file written for Dovecot works here and vice versa.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Final

import bcrypt
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from passlib.hash import md5_crypt, sha256_crypt, sha512_crypt

from pop3d.auth.scheme_entry import DecoyFn, HashFn, SchemeEntry, ShapeFn, VerifyFn
from pop3d.auth.scheme_entry import password_bytes as _b

log = logging.getLogger(__name__)

#: bcrypt only looks at the first 72 bytes; bcrypt>=5 refuses longer input instead of truncating silently.
BCRYPT_MAX_BYTES: Final[int] = 72
BCRYPT_ROUNDS: Final[int] = 12
# Same parameters Dovecot/libsodium write (64 MiB, t=3, p=1), so hashes made here verify in Dovecot too.
ARGON2_TIME_COST: Final[int] = 3
ARGON2_MEMORY_KIB: Final[int] = 65536
# 5000 rounds: glibc's and Dovecot's default. passlib's own default (656,000) costs ~0.6 s of GIL-holding
# pure Python per login here; ARGON2ID is the scheme to pick for strength.
SHA_CRYPT_ROUNDS: Final[int] = 5000
_BCRYPT_PREFIXES: Final[tuple[str, ...]] = ("$2a$", "$2b$", "$2y$")


def _plain_verify(secret: str, password: str) -> bool:
    return hmac.compare_digest(_b(secret), _b(password))


def _plain_hash(password: str) -> str:
    # The secret is stored verbatim in a ':'-separated, line-based file; these would corrupt the entry.
    if any(c in password for c in ":\r\n"):
        raise ValueError("a PLAIN password cannot contain ':' or line breaks")
    return password


def _passlib_verifier(handler: Any) -> VerifyFn:
    def _verify(secret: str, password: str) -> bool:
        # passlib raises on NUL in the password; that is a wrong password, not a broken hash worth a warning.
        if "\0" in password:
            return False
        return bool(handler.verify(_b(password), secret))

    return _verify


def _sha_crypt_hasher(handler: Any) -> HashFn:
    configured = handler.using(rounds=SHA_CRYPT_ROUNDS)

    def _hash(password: str) -> str:
        return str(configured.hash(_b(password)))

    return _hash


_sha512_verify = _passlib_verifier(sha512_crypt)
_sha256_verify = _passlib_verifier(sha256_crypt)
_md5_crypt_verify = _passlib_verifier(md5_crypt)
_sha512_hash = _sha_crypt_hasher(sha512_crypt)
_sha256_hash = _sha_crypt_hasher(sha256_crypt)


def _bcrypt_verify(secret: str, password: str) -> bool:
    pw = _b(password)
    if len(pw) > BCRYPT_MAX_BYTES or not secret.startswith(_BCRYPT_PREFIXES):
        return False
    return bcrypt.checkpw(pw, secret.encode("ascii"))


def _bcrypt_hash(password: str) -> str:
    pw = _b(password)
    if len(pw) > BCRYPT_MAX_BYTES:
        raise ValueError(f"BLF-CRYPT passwords are limited to {BCRYPT_MAX_BYTES} bytes")
    return bcrypt.hashpw(pw, bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode("ascii")


_argon2_id = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=1, type=Type.ID)
_argon2_i = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=1, type=Type.I)


def _argon2_verifier(prefix: str, hasher: PasswordHasher) -> VerifyFn:
    def _verify(secret: str, password: str) -> bool:
        if not secret.startswith(prefix):  # argon2-cffi would accept any variant; the scheme name promises one
            return False
        try:
            return hasher.verify(secret, _b(password))
        except (VerificationError, InvalidHashError):  # mismatch *and* undecodable hash
            return False

    return _verify


_argon2id_verify = _argon2_verifier("$argon2id$", _argon2_id)
_argon2i_verify = _argon2_verifier("$argon2i$", _argon2_i)


def _argon2id_hash(password: str) -> str:
    return _argon2_id.hash(_b(password))


def _argon2i_hash(password: str) -> str:
    return _argon2_i.hash(_b(password))


# --- decoys: hashes of the same shape as a stored one, for unknown users (pop3d.auth.decoys) -----------------

_CRYPT_SALT_CHARS: Final[str] = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _crypt_salt(seed: bytes, length: int) -> str:
    return "".join(_CRYPT_SALT_CHARS[b % 64] for b in (seed * 2)[:length])


def _sha_fields(secret: str) -> tuple[int, int]:
    """(rounds, salt length) of "$5$/$6$[rounds=N$]salt$hash"; rounds default 5000 as in glibc."""
    parts = secret.split("$")
    if len(parts) < 4 or parts[0] != "":
        raise ValueError("not a SHA-crypt hash")
    rounds = 5000
    if parts[2].startswith("rounds="):
        rounds = int(parts[2][7:])
        parts.pop(2)
    return min(max(rounds, 1000), 999_999_999), min(max(len(parts[2]), 1), 16)  # glibc clamps the same way


def _sha_shape(secret: str) -> str:
    rounds, salt_len = _sha_fields(secret)
    return f"rounds={rounds},salt={salt_len}"


def _sha_decoy(handler: Any) -> DecoyFn:
    def _decoy(template: str, seed: bytes) -> str:
        rounds, salt_len = _sha_fields(template)
        return str(handler.using(rounds=rounds, salt=_crypt_salt(seed, salt_len)).hash(seed.hex()))

    return _decoy


def _md5_crypt_shape(secret: str) -> str:
    if not secret.startswith("$1$"):
        raise ValueError("not an MD5-crypt hash")
    return ""


def _md5_crypt_decoy(template: str, seed: bytes) -> str:
    return str(md5_crypt.using(salt=_crypt_salt(seed, 8)).hash(seed.hex()))


def _bcrypt_fields(secret: str) -> tuple[str, int]:
    """("$2b$", cost) of a bcrypt hash."""
    if not secret.startswith(_BCRYPT_PREFIXES) or len(secret) < 7 or secret[6] != "$":
        raise ValueError("not a bcrypt hash")
    cost = int(secret[4:6])
    if not 4 <= cost <= 31:
        raise ValueError("bcrypt cost out of range")
    return secret[:4], cost


def _bcrypt_shape(secret: str) -> str:
    prefix, cost = _bcrypt_fields(secret)
    return f"{prefix}{cost}"


def _bcrypt_decoy(template: str, seed: bytes) -> str:
    prefix, cost = _bcrypt_fields(template)
    made = bcrypt.hashpw(seed.hex().encode("ascii"), bcrypt.gensalt(rounds=cost, prefix=b"2b")).decode("ascii")
    return prefix + made[4:]  # $2a$/$2b$/$2y$ differ in how a hash was made, not in what checking costs


def _argon2_shape(prefix: str) -> ShapeFn:
    def _shape(secret: str) -> str:
        if not secret.startswith(prefix):
            raise ValueError("not an Argon2 hash of this variant")
        try:
            p = extract_parameters(secret)
        except InvalidHashError:
            raise ValueError("malformed Argon2 hash") from None
        return f"v={p.version},m={p.memory_cost},t={p.time_cost},p={p.parallelism},h={p.hash_len},s={p.salt_len}"

    return _shape


def _argon2_decoy(template: str, seed: bytes) -> str:
    try:
        params = extract_parameters(template)
    except InvalidHashError:
        raise ValueError("malformed Argon2 hash") from None
    return PasswordHasher.from_parameters(params).hash(seed.hex())


def _plain_decoy(template: str, seed: bytes) -> str:
    return seed.hex()


def _no_parameters(secret: str) -> str:
    return ""


# crypt(3)-style detection for CRYPT (and passwd-file entries without braces): the "$id$" prefix picks the
# algorithm.
_CRYPT_PREFIXES: Final[tuple[tuple[str, VerifyFn], ...]] = (
    ("$6$", _sha512_verify),
    ("$5$", _sha256_verify),
    ("$1$", _md5_crypt_verify),
    ("$2a$", _bcrypt_verify),
    ("$2b$", _bcrypt_verify),
    ("$2y$", _bcrypt_verify),
    ("$argon2id$", _argon2id_verify),
    ("$argon2i$", _argon2i_verify),
)


#: CRYPT's prefixes -> (shape, decoy) of the algorithm they name
_CRYPT_DECOYS: Final[tuple[tuple[str, ShapeFn, DecoyFn], ...]] = (
    ("$6$", _sha_shape, _sha_decoy(sha512_crypt)),
    ("$5$", _sha_shape, _sha_decoy(sha256_crypt)),
    ("$1$", _md5_crypt_shape, _md5_crypt_decoy),
    ("$2a$", _bcrypt_shape, _bcrypt_decoy),
    ("$2b$", _bcrypt_shape, _bcrypt_decoy),
    ("$2y$", _bcrypt_shape, _bcrypt_decoy),
    ("$argon2id$", _argon2_shape("$argon2id$"), _argon2_decoy),
    ("$argon2i$", _argon2_shape("$argon2i$"), _argon2_decoy),
)


def _crypt_algorithm(secret: str) -> tuple[str, ShapeFn, DecoyFn]:
    for entry in _CRYPT_DECOYS:
        if secret.startswith(entry[0]):
            return entry
    raise ValueError("unsupported crypt format")


def _crypt_shape(secret: str) -> str:
    prefix, shape, _decoy = _crypt_algorithm(secret)
    return prefix + shape(secret)


def _crypt_decoy(template: str, seed: bytes) -> str:
    return _crypt_algorithm(template)[2](template, seed)


def _crypt_verify(secret: str, password: str) -> bool:
    for prefix, fn in _CRYPT_PREFIXES:
        if secret.startswith(prefix):
            return fn(secret, password)
    # DES crypt, yescrypt ($y$), ... are not supported: the login fails; say why without quoting the hash.
    log.debug("CRYPT: unsupported hash format (prefix %r)", secret[:4] if secret.startswith("$") else "")
    return False


ENTRIES: Final[tuple[SchemeEntry, ...]] = (
    SchemeEntry("PLAIN", _plain_verify, _plain_hash, shape=_no_parameters, decoy=_plain_decoy, cheap_decoy=True),
    SchemeEntry("SHA512-CRYPT", _sha512_verify, _sha512_hash, shape=_sha_shape, decoy=_sha_decoy(sha512_crypt)),
    SchemeEntry("SHA256-CRYPT", _sha256_verify, _sha256_hash, shape=_sha_shape, decoy=_sha_decoy(sha256_crypt)),
    SchemeEntry("MD5-CRYPT", _md5_crypt_verify, shape=_md5_crypt_shape, decoy=_md5_crypt_decoy),
    SchemeEntry("BLF-CRYPT", _bcrypt_verify, _bcrypt_hash, shape=_bcrypt_shape, decoy=_bcrypt_decoy),
    SchemeEntry("ARGON2ID", _argon2id_verify, _argon2id_hash, shape=_argon2_shape("$argon2id$"), decoy=_argon2_decoy),
    SchemeEntry(
        "ARGON2I",
        _argon2i_verify,
        _argon2i_hash,
        offered=False,  # ARGON2ID is the one to pick
        shape=_argon2_shape("$argon2i$"),
        decoy=_argon2_decoy,
    ),
    SchemeEntry("CRYPT", _crypt_verify, shape=_crypt_shape, decoy=_crypt_decoy),  # verify-only: which algorithm?
)
