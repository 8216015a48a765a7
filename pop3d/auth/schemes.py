"""Password schemes in Dovecot's `{SCHEME}secret` notation.

Every real hash is computed by a maintained library (passlib/libpass, bcrypt, argon2-cffi); this module only
maps Dovecot's scheme names onto them, so a passwd-file written for Dovecot works here and vice versa.
`verify` never raises for a bad *hash* (a corrupt entry is just a failed login), but does raise `UnknownScheme`
for a scheme name nobody registered, because that is a configuration mistake an operator has to see.
Other modules (SASL: CRAM-MD5, SCRAM-SHA-256) add their schemes with `register`.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

import bcrypt
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from passlib.hash import md5_crypt, sha256_crypt, sha512_crypt

__all__ = [
    "DEFAULT_SCHEME",
    "SCHEMES",
    "HashFn",
    "UnknownScheme",
    "VerifyFn",
    "canonical",
    "hash_password",
    "is_known",
    "register",
    "split_scheme",
    "verify",
]

log = logging.getLogger(__name__)

#: (secret without the "{SCHEME}" prefix, password) -> match. May raise ValueError/TypeError for a malformed secret.
VerifyFn = Callable[[str, str], bool]
#: password -> secret without the "{SCHEME}" prefix.
HashFn = Callable[[str], str]

#: Schemes `pop3d passwd --scheme` offers for new hashes (verification knows more, e.g. CRYPT, ARGON2I).
SCHEMES: Final[tuple[str, ...]] = (
    "PLAIN", "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID", "CRAM-MD5", "SCRAM-SHA-256",
)
DEFAULT_SCHEME: Final[str] = "ARGON2ID"

#: bcrypt only looks at the first 72 bytes; bcrypt>=5 refuses longer input instead of truncating silently.
BCRYPT_MAX_BYTES: Final[int] = 72
BCRYPT_ROUNDS: Final[int] = 12
# Same parameters Dovecot/libsodium write (64 MiB, t=3, p=1), so hashes made here verify in Dovecot too.
ARGON2_TIME_COST: Final[int] = 3
ARGON2_MEMORY_KIB: Final[int] = 65536
_BCRYPT_PREFIXES: Final[tuple[str, ...]] = ("$2a$", "$2b$", "$2y$")


class UnknownScheme(ValueError):
    """No verifier (or, for hashing, no hasher) is registered under this scheme name."""


_verifiers: dict[str, VerifyFn] = {}
_hashers: dict[str, HashFn] = {}
_aliases: dict[str, str] = {"CLEARTEXT": "PLAIN"}
_lock = threading.Lock()


def _b(password: str) -> bytes:
    """UTF-8 bytes; surrogateescape so a password decoded that way from the wire gets its original bytes back."""
    return password.encode("utf-8", "surrogateescape")


def canonical(scheme: str) -> str:
    """Upper-cased name with aliases resolved (CLEARTEXT -> PLAIN)."""
    name = scheme.strip().upper()
    return _aliases.get(name, name)


def is_known(scheme: str) -> bool:
    """True when `verify` accepts this scheme name (lets a loader warn early about a typo'd scheme)."""
    return canonical(scheme) in _verifiers


def register(name: str, verify_fn: VerifyFn, hash_fn: HashFn | None = None, *, replace: bool = False) -> None:
    """Add a scheme. Re-registering a name is an error unless `replace`, so two modules cannot silently clash."""
    key = name.strip().upper()
    if not key or any(c in key for c in "{}:"):
        raise ValueError(f"invalid scheme name {name!r}")
    with _lock:
        if key in _aliases:
            raise ValueError(f"{key} is an alias of {_aliases[key]}")
        if key in _verifiers and not replace:
            raise ValueError(f"scheme {key} is already registered")
        _verifiers[key] = verify_fn
        if hash_fn is not None:
            _hashers[key] = hash_fn
        else:
            _hashers.pop(key, None)


def split_scheme(stored: str, default: str = "CRYPT") -> tuple[str, str]:
    """'{SHA512-CRYPT}$6$...' -> ('SHA512-CRYPT', '$6$...'); without a '{SCHEME}' prefix -> (default, stored)."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 1:
            return stored[1:end].upper(), stored[end + 1 :]
    return default.upper(), stored


def verify(scheme: str, secret: str, password: str) -> bool:
    """Check `password` against `secret` (no braces). Malformed secret -> False; unknown scheme -> UnknownScheme."""
    name = canonical(scheme)
    fn = _verifiers.get(name)
    if fn is None:
        raise UnknownScheme(f"unknown password scheme {scheme!r}")
    try:
        return bool(fn(secret, password))
    except Exception as exc:  # noqa: BLE001 - a corrupt entry must fail the login, not crash the session
        # Only the exception type: library messages could quote parts of the hash.
        log.warning("%s: could not check password against stored hash (%s)", name, type(exc).__name__)
        return False


def hash_password(scheme: str, password: str) -> str:
    """The full '{SCHEME}secret' string for a new password, using the scheme's current default cost."""
    name = canonical(scheme)
    fn = _hashers.get(name)
    if fn is None:
        raise UnknownScheme(f"password scheme {scheme!r} cannot be used for new hashes")
    return "{" + name + "}" + fn(password)


# --- built-in schemes --------------------------------------------------------------------------------------


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


_sha512_verify = _passlib_verifier(sha512_crypt)
_sha256_verify = _passlib_verifier(sha256_crypt)
_md5_crypt_verify = _passlib_verifier(md5_crypt)


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


def _crypt_verify(secret: str, password: str) -> bool:
    for prefix, fn in _CRYPT_PREFIXES:
        if secret.startswith(prefix):
            return fn(secret, password)
    # DES crypt, yescrypt ($y$), ... are not supported: the login fails; say why without quoting the hash.
    log.debug("CRYPT: unsupported hash format (prefix %r)", secret[:4] if secret.startswith("$") else "")
    return False


register("PLAIN", _plain_verify, _plain_hash)
# 5000 rounds: glibc's and Dovecot's default. passlib's own default (656,000) costs ~0.6 s of GIL-holding
# pure Python per login here; ARGON2ID is the scheme to pick for strength.
SHA_CRYPT_ROUNDS = 5000
register("SHA512-CRYPT", _sha512_verify, lambda pw: str(sha512_crypt.using(rounds=SHA_CRYPT_ROUNDS).hash(_b(pw))))
register("SHA256-CRYPT", _sha256_verify, lambda pw: str(sha256_crypt.using(rounds=SHA_CRYPT_ROUNDS).hash(_b(pw))))
register("MD5-CRYPT", _md5_crypt_verify)  # verify only: legacy entries keep working, nothing new gets it
register("BLF-CRYPT", _bcrypt_verify, _bcrypt_hash)
register("ARGON2ID", _argon2id_verify, lambda pw: _argon2_id.hash(_b(pw)))
register("ARGON2I", _argon2i_verify, lambda pw: _argon2_i.hash(_b(pw)))
register("CRYPT", _crypt_verify)

# The SASL schemes live next to their mechanisms; importing them here (last, once register() exists) makes
# every user of this module see them: passwd-file verification and `pop3d passwd --scheme`.
from pop3d.auth import sasl_schemes as _sasl_schemes  # noqa: E402,F401
