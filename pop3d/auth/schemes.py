"""Password schemes in Dovecot's `{SCHEME}secret` notation: one registry, assembled here from the scheme modules.

The schemes themselves live in leaf modules that know nothing of this one: pop3d.auth.crypt_schemes (PLAIN
and the crypt(3) family) and pop3d.auth.sasl_schemes (CRAM-MD5, SCRAM-SHA-256, next to their mechanisms).
`REGISTRY` lists both explicitly, so passwd-file verification and `pop3d passwd --scheme` see one set, and
importing a module never adds a scheme behind anybody's back.

`verify` never raises for a bad *hash* (a corrupt entry is just a failed login), but does raise `UnknownScheme`
for a scheme name nobody registered, because that is a configuration mistake an operator has to see.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final

from pop3d.auth import crypt_schemes, sasl_schemes
from pop3d.auth.scheme_entry import HashFn, SchemeEntry, VerifyFn

__all__ = [
    "DEFAULT_SCHEME",
    "REGISTRY",
    "SCHEMES",
    "HashFn",
    "SchemeEntry",
    "SchemeRegistry",
    "UnknownScheme",
    "VerifyFn",
    "canonical",
    "hash_password",
    "is_known",
    "split_scheme",
    "verify",
]

log = logging.getLogger(__name__)


#: other names Dovecot accepts for a scheme
ALIASES: Final[Mapping[str, str]] = MappingProxyType({"CLEARTEXT": "PLAIN"})


class UnknownScheme(ValueError):
    """No verifier (or, for hashing, no hasher) is registered under this scheme name."""


class SchemeRegistry:
    """Scheme name -> verify/hash functions. Filled when built; nothing changes it while the server runs."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[SchemeEntry] = ()) -> None:
        self._entries: dict[str, SchemeEntry] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: SchemeEntry, *, replace: bool = False) -> None:
        """Add a scheme. A name given twice is an error unless `replace`, so two modules cannot silently clash."""
        key = entry.name.strip().upper()
        if not key or any(c in key for c in "{}:"):
            raise ValueError(f"invalid scheme name {entry.name!r}")
        if key in ALIASES:
            raise ValueError(f"{key} is an alias of {ALIASES[key]}")
        if key in self._entries and not replace:
            raise ValueError(f"scheme {key} is already registered")
        self._entries[key] = entry

    def names(self) -> tuple[str, ...]:
        """Every scheme `verify` accepts, in registration order (aliases not included)."""
        return tuple(self._entries)

    def offered(self) -> tuple[str, ...]:
        """The schemes suggested for new hashes (`pop3d passwd --scheme`)."""
        return tuple(k for k, e in self._entries.items() if e.hash is not None and e.offered)

    def canonical(self, scheme: str) -> str:
        """Upper-cased name with aliases resolved (CLEARTEXT -> PLAIN)."""
        name = scheme.strip().upper()
        return ALIASES.get(name, name)

    def entry(self, scheme: str) -> SchemeEntry | None:
        """The registered entry for `scheme` (aliases resolved), None when nobody registered it."""
        return self._entries.get(self.canonical(scheme))

    def is_known(self, scheme: str) -> bool:
        """True when `verify` accepts this scheme name (lets a loader warn early about a typo'd scheme)."""
        return self.canonical(scheme) in self._entries

    def verify(self, scheme: str, secret: str, password: str) -> bool:
        """Check `password` against `secret` (no braces). Malformed secret -> False; unknown scheme -> UnknownScheme."""
        name = self.canonical(scheme)
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownScheme(f"unknown password scheme {scheme!r}")
        try:
            return bool(entry.verify(secret, password))
        except Exception as exc:  # a corrupt entry must fail the login, not crash the session
            # Only the exception type: library messages could quote parts of the hash.
            log.warning("%s: could not check password against stored hash (%s)", name, type(exc).__name__)
            return False

    def hash_password(self, scheme: str, password: str) -> str:
        """The full '{SCHEME}secret' string for a new password, using the scheme's current default cost."""
        name = self.canonical(scheme)
        entry = self._entries.get(name)
        if entry is None or entry.hash is None:
            raise UnknownScheme(f"password scheme {scheme!r} cannot be used for new hashes")
        return "{" + name + "}" + entry.hash(password)


#: every scheme pop3d knows, from the modules that implement them
REGISTRY: Final[SchemeRegistry] = SchemeRegistry((*crypt_schemes.ENTRIES, *sasl_schemes.ENTRIES))
#: schemes `pop3d passwd --scheme` offers for new hashes (verification knows more, e.g. CRYPT, ARGON2I)
SCHEMES: Final[tuple[str, ...]] = REGISTRY.offered()
DEFAULT_SCHEME: Final[str] = "ARGON2ID"


def split_scheme(stored: str, default: str = "CRYPT") -> tuple[str, str]:
    """'{SHA512-CRYPT}$6$...' -> ('SHA512-CRYPT', '$6$...'); without a '{SCHEME}' prefix -> (default, stored)."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 1:
            return stored[1:end].upper(), stored[end + 1 :]
    return default.upper(), stored


def canonical(scheme: str) -> str:
    """`SchemeRegistry.canonical` of `REGISTRY`."""
    return REGISTRY.canonical(scheme)


def is_known(scheme: str) -> bool:
    """`SchemeRegistry.is_known` of `REGISTRY`."""
    return REGISTRY.is_known(scheme)


def verify(scheme: str, secret: str, password: str) -> bool:
    """`SchemeRegistry.verify` of `REGISTRY`."""
    return REGISTRY.verify(scheme, secret, password)


def hash_password(scheme: str, password: str) -> str:
    """`SchemeRegistry.hash_password` of `REGISTRY`."""
    return REGISTRY.hash_password(scheme, password)
