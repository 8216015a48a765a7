"""The {CRAM-MD5} and {SCRAM-SHA-256} password schemes (`ENTRIES`, collected by pop3d.auth.schemes).

Both store a key a SASL mechanism can work from instead of the clear password, in Dovecot's encoding, so a
passwd-file line moves between Dovecot and pop3d unchanged:

- `{CRAM-MD5}` + 64 hex digits: the HMAC-MD5 outer and inner states (see pop3d.auth.cram_md5).
- `{SCRAM-SHA-256}` + `iterations,base64(salt),base64(StoredKey),base64(ServerKey)` (RFC 5802 §3 terms,
  RFC 7677 with SHA-256). Iterations default to 4096, the RFC 7677 §4 minimum and Dovecot's default.

Both also verify a plain password (USER/PASS, PLAIN, LOGIN) by recomputing the stored value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Final

import scramp

from pop3d.auth import cram_md5
from pop3d.auth.scheme_entry import SchemeEntry

SCRAM_ITERATIONS: Final[int] = 4096
_SCRAM = scramp.ScramMechanism("SCRAM-SHA-256")


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What a SCRAM server needs per user (RFC 5802 §3): never the password itself."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode("ascii")

        return f"{self.iterations},{b64(self.salt)},{b64(self.stored_key)},{b64(self.server_key)}"

    @classmethod
    def decode(cls, secret: str) -> ScramKeys:
        """Parse Dovecot's encoding; ValueError (never the secret in the message) when malformed."""
        parts = secret.strip().split(",")
        if len(parts) != 4 or not parts[0].isdigit():
            raise ValueError("SCRAM-SHA-256 secret is not iterations,salt,StoredKey,ServerKey")
        try:
            salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[1:])
        except binascii.Error:
            raise ValueError("SCRAM-SHA-256 secret has bad base64") from None
        iterations = int(parts[0])
        if iterations < 1 or len(stored) != 32 or len(server) != 32 or not salt:
            raise ValueError("SCRAM-SHA-256 secret has the wrong sizes")
        return cls(iterations, salt, stored, server)

    @classmethod
    def from_password(cls, password: str, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None) -> ScramKeys:
        """Derive the keys (scramp applies SASLprep to the password, RFC 5802 §2.2)."""
        salt_, stored, server, it = _SCRAM.make_auth_info(
            password, iteration_count=iterations, salt=salt if salt is not None else os.urandom(16)
        )
        return cls(it, salt_, stored, server)


def _scram_verify(secret: str, password: str) -> bool:
    keys = ScramKeys.decode(secret)
    mine = ScramKeys.from_password(password, keys.iterations, keys.salt)
    return hmac.compare_digest(mine.stored_key, keys.stored_key)


def _scram_hash(password: str) -> str:
    return ScramKeys.from_password(password).encode()


def _scram_shape(secret: str) -> str:
    keys = ScramKeys.decode(secret)
    return f"i={keys.iterations},s={len(keys.salt)}"


def _scram_decoy(template: str, seed: bytes) -> str:
    """Same iteration count and salt length as `template`; salt and keys follow from the seed (RFC 5802 §9:
    an unknown user gets a salt that stays the same, like a real one)."""
    shape = ScramKeys.decode(template)
    salt = hashlib.shake_256(b"salt\0" + seed).digest(len(shape.salt))
    stored = hmac.new(seed, b"StoredKey", hashlib.sha256).digest()
    server = hmac.new(seed, b"ServerKey", hashlib.sha256).digest()
    return ScramKeys(shape.iterations, salt, stored, server).encode()


def _cram_md5_shape(secret: str) -> str:
    if len(bytes.fromhex(secret.strip())) != 32:
        raise ValueError("a CRAM-MD5 context is 32 octets")
    return ""


def _cram_md5_decoy(template: str, seed: bytes) -> str:
    return seed.hex()


ENTRIES: Final[tuple[SchemeEntry, ...]] = (
    SchemeEntry(
        "CRAM-MD5",
        cram_md5.verify_password,
        cram_md5.context,
        shape=_cram_md5_shape,
        decoy=_cram_md5_decoy,
        cheap_decoy=True,
    ),
    SchemeEntry("SCRAM-SHA-256", _scram_verify, _scram_hash, shape=_scram_shape, decoy=_scram_decoy, cheap_decoy=True),
)
