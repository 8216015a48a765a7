"""Verified credentials, remembered so a client that polls with the same password does not pay the hash again.

The idea of saslauthd's `-c`. A POP3 client logs in every few minutes with the same password, and a strong
hash ({ARGON2ID}, {SHA512-CRYPT}) costs milliseconds to tens of milliseconds of CPU each time. After a
password was proved right, the cache keeps HMAC-SHA256(key, name, password, scheme, stored secret) and the
time it was proved; a later login whose HMAC is in the table, younger than `auth.cache_ttl`, is right
without hashing. What is kept and what is not:

- never the password nor the name: only (half of) the HMAC, under a key drawn at start (before the workers fork, so
  all of them compute the same HMACs) that lives in process memory only;
- never on disk: the table is anonymous memory (shared between the workers when it is made before they
  fork), left out of core dumps (MADV_DONTDUMP); a restart forgets everything;
- never a failure: only `remember` after a successful check puts anything in, so a wrong password always
  pays the full hash, the failure floor and the penalty;
- the stored entry is part of the HMAC, so a changed passwd-file entry (new password, new salt, new scheme)
  simply misses, on every worker, with no invalidation message to lose;
- bounded: `entries` slots in buckets of `WAYS`, chosen by the HMAC (which nobody can aim without the key);
  a new entry takes a free, expired or else the oldest slot of its bucket.

Workers update the table without a lock. A reader racing a writer may see a slot half written: a digest
mixed from two entries matches no computed HMAC (but with probability 2**-128), and a whole new digest next
to the replaced entry's older time still names a password proved right just now. Either way the worst
outcome is a miss, which costs one hash.

The trade-off: whoever can read a worker's memory (key and table) can test guesses for the remembered
passwords at HMAC speed instead of the hash's, for as long as the entries live.
"""

from __future__ import annotations

import hmac
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import Final

__all__ = ["WAYS", "CredCache"]

#: slots per bucket: a new entry evicts the oldest of these, so one busy bucket cannot evict the others
WAYS: Final[int] = 4
#: the last 16 octets of the HMAC-SHA256 (all zero: empty; the first 8 chose the bucket), clock time it was
#: proved. 128 bits: a guess must hit a stored tag by chance (2**-128 a try), so a longer tag buys nothing,
#: and 24-octet slots keep the default table at 2.4 MB
_SLOT = struct.Struct("<16sd")
_TAG = slice(16, 32)
_EMPTY: Final[bytes] = bytes(16)


def _field(value: str) -> bytes:
    """One length-prefixed HMAC input field: no two different tuples of fields give the same octets."""
    raw = value.encode("utf-8", "surrogatepass")  # lone surrogates (undecodable input) included, never raises
    return len(raw).to_bytes(4, "big") + raw


class CredCache:
    """A fixed-size table of (HMAC, time proved) slots in anonymous memory.

    `shared`: MAP_SHARED, for a supervisor to make before it forks its workers (pop3d.runtime.shared); else
    private to this process (a single-process server). `clock`: monotonic seconds (CLOCK_MONOTONIC is
    system-wide, so times written by one worker compare in another); tests hand in a fake one.
    """

    __slots__ = ("_key", "buckets", "buf", "clock")

    def __init__(self, entries: int, *, shared: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        if entries < 1:
            raise ValueError("a credentials cache needs at least one entry")
        self.buckets = -(-entries // WAYS)
        self.clock = clock
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        self.buf = mmap.mmap(-1, self.buckets * WAYS * _SLOT.size, flags=flags)
        if hasattr(mmap, "MADV_DONTDUMP"):  # Linux: digests stay out of core dumps
            self.buf.madvise(mmap.MADV_DONTDUMP)
        self._key = os.urandom(32)

    @property
    def entries(self) -> int:
        return self.buckets * WAYS

    def digest(self, name: str, password: str, scheme: str, secret: str) -> bytes:
        """What is remembered of a proved password: HMAC-SHA256 over the four fields (microseconds)."""
        message = _field(name) + _field(password) + _field(scheme) + _field(secret)
        return hmac.digest(self._key, message, "sha256")

    def _bucket(self, digest: bytes) -> int:
        return (int.from_bytes(digest[:8], "little") % self.buckets) * WAYS * _SLOT.size

    def fresh(self, digest: bytes, ttl: float) -> bool:
        """True when `digest` was remembered less than `ttl` seconds ago (the ttl in force now, so lowering
        it on reload shortens every entry at once); always False for ttl 0."""
        if ttl <= 0:
            return False
        now = self.clock()
        base, tag = self._bucket(digest), digest[_TAG]
        for off in range(base, base + WAYS * _SLOT.size, _SLOT.size):
            stored, proved = _SLOT.unpack_from(self.buf, off)
            if stored == tag and 0.0 <= now - proved < ttl:
                return True
        return False

    def remember(self, digest: bytes) -> None:
        """Keep `digest` as proved now: in its own slot if present, else a free, expired or the oldest one."""
        now = self.clock()
        base, tag = self._bucket(digest), digest[_TAG]
        victim, oldest = base, float("inf")
        for off in range(base, base + WAYS * _SLOT.size, _SLOT.size):
            stored, proved = _SLOT.unpack_from(self.buf, off)
            if stored == tag:
                victim = off
                break
            if stored == _EMPTY:
                proved = float("-inf")
            if proved < oldest:
                victim, oldest = off, proved
        _SLOT.pack_into(self.buf, victim, tag, now)

    def used(self, ttl: float) -> int:
        """Slots holding an entry still fresh under `ttl` (a full scan: for tests and diagnostics)."""
        now = self.clock()
        count = 0
        for off in range(0, len(self.buf), _SLOT.size):
            stored, proved = _SLOT.unpack_from(self.buf, off)
            count += stored != _EMPTY and 0.0 <= now - proved < ttl
        return count
