"""What a password scheme module exposes: named verify/hash functions, collected by pop3d.auth.schemes.

Leaf modules (pop3d.auth.crypt_schemes, pop3d.auth.sasl_schemes) list their schemes as `SchemeEntry`
values and import nothing of the registry, so the registry can name every scheme module explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: (secret without the "{SCHEME}" prefix, password) -> match. May raise ValueError/TypeError for a malformed secret.
VerifyFn = Callable[[str, str], bool]
#: password -> secret without the "{SCHEME}" prefix.
HashFn = Callable[[str], str]


@dataclass(frozen=True, slots=True)
class SchemeEntry:
    """One scheme in Dovecot's naming. `hash` None: verify-only (legacy entries keep working, nothing new
    gets it); `offered` False: hashes can be made but `pop3d passwd --scheme` does not suggest the scheme."""

    name: str
    verify: VerifyFn
    hash: HashFn | None = None
    offered: bool = True


def password_bytes(password: str) -> bytes:
    """UTF-8 bytes; surrogateescape so a password decoded that way from the wire gets its original bytes back."""
    return password.encode("utf-8", "surrogateescape")
