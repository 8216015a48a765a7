"""Credentials for users that do not exist, shaped like those of the users that do.

An unknown user must cost what a real one costs and look like one (RFC 1939 §13, RFC 5802 §9), whatever the
user database holds. So the decoy for a name imitates one of the *shapes* present in the database (scheme
plus cost parameters: SHA512-CRYPT rounds, bcrypt cost, Argon2 m/t/p, SCRAM iterations), picked by
HMAC(secret, name) with each shape weighted by how many entries have it. The verify code then runs on a
decoy hash of exactly that shape, the same code path as for a real entry.

The pick uses weighted rendezvous hashing, so adding or removing one user moves few names to another shape,
and with a secret kept on disk (pop3d.auth.state_secret) the decoy of a name survives restarts, like a real
entry. Decoy hashes that need real hashing are made once per shape when a table is loaded (`update`, off the
event loop); `for_name` itself only computes a few HMACs, and is run for real names too.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pop3d.auth import schemes
from pop3d.auth.base import Credentials, Decoy, User, name_bytes

__all__ = ["Decoys"]

log = logging.getLogger(__name__)

#: at most this many distinct shapes are imitated (the most common ones); each costs one hash per load
MAX_SHAPES: Final[int] = 16


@dataclass(frozen=True, slots=True)
class _Shape:
    scheme: str  # canonical scheme name
    shape: str
    weight: int  # entries of this shape
    example: str  # one real secret of this shape, for cheap decoys to imitate
    made: str | None  # the decoy hash made once (None: cheap, made per name)

    @property
    def label(self) -> bytes:
        return f"{self.scheme}\0{self.shape}".encode()


class Decoys:
    """Decoy credentials for one user database; thread-safe (`update` may run in a reload thread)."""

    __slots__ = ("_lock", "_made", "_registry", "_secret", "_shapes")

    def __init__(self, secret: bytes, registry: schemes.SchemeRegistry = schemes.REGISTRY) -> None:
        self._secret = secret
        self._registry = registry
        self._shapes: tuple[_Shape, ...] = ()
        self._made: dict[tuple[str, str], str] = {}  # (scheme, shape) -> decoy hash, kept across reloads
        self._lock = threading.Lock()

    def update(self, entries: Iterable[Credentials]) -> None:
        """Learn the shapes of the table now in force. Hashes once per new costly shape: call off the loop."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        examples: dict[tuple[str, str], str] = {}
        for creds in entries:
            scheme = self._registry.canonical(creds.scheme)
            entry = self._registry.entry(scheme)
            if entry is None or entry.shape is None or entry.decoy is None:
                continue
            try:
                key = (scheme, entry.shape(creds.secret))
            except (ValueError, TypeError):
                continue  # a malformed secret fails its own logins fast; nothing worth imitating
            counts[key] += 1
            examples.setdefault(key, creds.secret)
        shapes: list[_Shape] = []
        with self._lock:
            made: dict[tuple[str, str], str] = {}
            for key, weight in counts.most_common(MAX_SHAPES):
                entry = self._registry.entry(key[0])
                assert entry is not None and entry.decoy is not None
                secret: str | None = None
                if not entry.cheap_decoy:
                    secret = self._made.get(key)
                    if secret is None:
                        try:
                            secret = entry.decoy(examples[key], self._mac(b"shape\0" + "\0".join(key).encode()))
                        except (ValueError, TypeError) as exc:
                            log.warning("cannot imitate %s entries for unknown users (%s)", key[0], type(exc).__name__)
                            continue
                    made[key] = secret
                shapes.append(_Shape(key[0], key[1], weight, examples[key], secret))
            self._made = made
            self._shapes = tuple(sorted(shapes, key=lambda s: s.label))

    def key(self, name: str) -> bytes:
        """32 octets from the secret and the name: the per-user key of `Decoy.key`."""
        return self._mac(b"user\0" + name_bytes(name))

    def for_name(self, name: str) -> Decoy:
        """The decoy of `name`: a few HMACs, no hashing; the same answer for the same name and table."""
        key = self.key(name)
        shape = self._pick(key)
        if shape is None:  # an empty (or unimitable) table: nobody exists, so there is nobody to look like
            return Decoy(Credentials(User(name=name), "PLAIN", key.hex()), key)
        secret = shape.made
        if secret is None:
            entry = self._registry.entry(shape.scheme)
            assert entry is not None and entry.decoy is not None
            secret = entry.decoy(shape.example, hmac.new(key, b"decoy\0" + shape.label, hashlib.sha256).digest())
        return Decoy(Credentials(User(name=name), shape.scheme, secret), key)

    def samples(self) -> list[Decoy]:
        """One decoy of each shape imitated: timing them gives the dearest path of the table (pop3d.auth.floors)."""
        out: list[Decoy] = []
        for shape in self._shapes:
            key = self._mac(b"sample\0" + shape.label)
            secret = shape.made
            if secret is None:
                entry = self._registry.entry(shape.scheme)
                assert entry is not None and entry.decoy is not None
                secret = entry.decoy(shape.example, key)
            out.append(Decoy(Credentials(User(name=""), shape.scheme, secret), key))
        return out

    def shapes(self) -> dict[str, int]:
        """'SCHEME shape' -> weight, for tests and logs."""
        return {f"{s.scheme} {s.shape}".strip(): s.weight for s in self._shapes}

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def _pick(self, key: bytes) -> _Shape | None:
        """Weighted rendezvous hashing: each shape draws -ln(u)/weight from HMAC(key, shape); the least wins."""
        best: _Shape | None = None
        best_score = math.inf
        for shape in self._shapes:
            u = (int.from_bytes(hmac.new(key, shape.label, hashlib.sha256).digest()[:8], "big") + 1) / (2**64 + 1)
            score = -math.log(u) / shape.weight
            if score < best_score:
                best, best_score = shape, score
        return best
