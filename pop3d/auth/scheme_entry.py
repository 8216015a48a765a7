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
#: secret -> what, besides the password, decides how long a check takes (e.g. "rounds=5000"). ValueError when
#: the secret is malformed.
ShapeFn = Callable[[str], str]
#: (a secret to imitate, 32 seed octets) -> a secret of the same shape (algorithm and cost parameters) for a
#: password nobody knows. Used for unknown users (pop3d.auth.decoys). ValueError when it cannot.
DecoyFn = Callable[[str, bytes], str]


@dataclass(frozen=True, slots=True)
class SchemeEntry:
    """One scheme in Dovecot's naming. `hash` None: verify-only (legacy entries keep working, nothing new
    gets it); `offered` False: hashes can be made but `pop3d passwd --scheme` does not suggest the scheme.

    `shape` and `decoy` let an unknown user cost what a user of this scheme costs; without them unknown users
    never imitate this scheme. `cheap_decoy`: making a decoy does no hashing, so one is made per user name
    (the scheme shows parts of its secret to clients, like the SCRAM salt, which must then differ per name);
    otherwise one decoy per shape is hashed once and reused.
    """

    name: str
    verify: VerifyFn
    hash: HashFn | None = None
    offered: bool = True
    shape: ShapeFn | None = None
    decoy: DecoyFn | None = None
    cheap_decoy: bool = False


def password_bytes(password: str) -> bytes:
    """UTF-8 bytes; surrogateescape so a password decoded that way from the wire gets its original bytes back."""
    return password.encode("utf-8", "surrogateescape")
