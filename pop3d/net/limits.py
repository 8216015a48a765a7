"""Connection limits: per client address, per server, and for connections that have not logged in yet.

Checked when a connection starts, before the greeting (the session's connection_made; behind a PROXY-protocol
proxy with the client address from the header, on implicit-TLS listeners once the handshake is done):

* `server.max_connections_per_ip`: connections of one client address. Addresses in `server.limit_exempt`
  (loopback by default: local health checks, benchmarks) are not counted; the exemption applies to this limit
  only. IPv6 clients count per /64, the block a single subscriber gets, or one host could take the limit
  2^64 times over.
* `server.max_connections`: all connections of the server. Whatever it says, a process never holds more than
  its open-files limit allows (`process_capacity`), because a connection it cannot serve is worse than one it
  refuses cleanly.
* `server.max_unauthenticated`: connections still in AUTHORIZATION. When full, the *oldest* of them is closed
  to admit the new one, as Dovecot's login processes do with their oldest client: a flood of half-open logins
  then costs real users one retry at worst, never a lockout. A full server (max_connections) evicts the same
  way; logged-in sessions are never evicted. Eviction is per worker process (a process can only close its own
  sockets); the counts are server-wide.

Refused and evicted clients hear `-ERR [SYS/TEMP] ...` (RFC 3206 §4: a temporary condition, try later).

Layers: `Policy` is pure arithmetic (counts in, verdict out). `LocalCounts` (a single process, tests) and
`SharedCounts` (worker processes: shared memory made before fork) store the counts. `ConnectionLimits` joins
them for one process and keeps that process's oldest-first queue of unauthenticated sessions.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import ipaddress
import mmap
import os
import resource
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from pop3d import procid
from pop3d.net.addresses import Networks

if TYPE_CHECKING:
    from pop3d.config import Settings

#: descriptors a process keeps for itself: listeners, logs, epoll, the storage thread pool's open files
FD_RESERVE: Final = 128
#: descriptors one connection may need: its socket, and its maildrop lock file once logged in
FDS_PER_CONNECTION: Final = 2


class Verdict(enum.Enum):
    ADMIT = "admit"
    EVICT = "evict"  # admit, after closing this process's oldest unauthenticated connection
    PER_IP = "too many connections from your address"
    FULL = "too many connections"


@dataclass(frozen=True, slots=True)
class Policy:
    """The limits as numbers; 0 means no limit. `unauthenticated` and `connections` are server-wide,
    `process_connections` is this process's own descriptor budget."""

    per_ip: int
    connections: int
    process_connections: int
    unauthenticated: int

    def decide(
        self, from_ip: int | None, connections: int, process_connections: int, unauthenticated: int, can_evict: bool
    ) -> Verdict:
        """`from_ip`: connections already open from the new client's address (None: exempt);
        `can_evict`: this process has an unauthenticated connection it could close."""
        if from_ip is not None and 0 < self.per_ip <= from_ip:
            return Verdict.PER_IP  # refused, not evicted: one address must not push out others
        full = (0 < self.connections <= connections) or (0 < self.process_connections <= process_connections)
        if full or 0 < self.unauthenticated <= unauthenticated:
            return Verdict.EVICT if can_evict else Verdict.FULL
        return Verdict.ADMIT


def process_capacity(soft_nofile: int | None = None) -> int:
    """Connections one process can serve within its open-files limit (read now: call it after pop3d raised
    the limit, pop3d.runtime.workers.raise_nofile_limit)."""
    if soft_nofile is None:
        soft_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft_nofile == resource.RLIM_INFINITY:
            soft_nofile = 1 << 20
    return max(1, (soft_nofile - FD_RESERVE) // FDS_PER_CONNECTION)


def address_key(address: str) -> str:
    """What the per-address limit counts: an IPv4 address (also when IPv4-mapped), an IPv6 /64, else the
    string as is (a UNIX-socket peer)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Counts(Protocol):
    """Open connections, server-wide, as seen from one process. `add`/`remove` count this process's own."""

    def totals(self) -> tuple[int, int]:
        """(connections, unauthenticated) of the whole server."""
        ...

    def of(self, key: str) -> int:
        """Connections from the address `key` (see `address_key`), server-wide."""
        ...

    def add(self, key: str | None) -> None:
        """A new unauthenticated connection; `key` None: not counted per address (exempt)."""
        ...

    def logged_in(self) -> None:
        """One of this process's unauthenticated connections logged in."""
        ...

    def remove(self, key: str | None, authenticated: bool) -> None: ...


class LocalCounts:
    """Counts of a server that is a single process."""

    __slots__ = ("_by_key", "_total", "_unauth")

    def __init__(self) -> None:
        self._by_key: dict[str, int] = {}
        self._total = 0
        self._unauth = 0

    def totals(self) -> tuple[int, int]:
        return self._total, self._unauth

    def of(self, key: str) -> int:
        return self._by_key.get(key, 0)

    def add(self, key: str | None) -> None:
        self._total += 1
        self._unauth += 1
        if key is not None:
            self._by_key[key] = self._by_key.get(key, 0) + 1

    def logged_in(self) -> None:
        self._unauth -= 1

    def remove(self, key: str | None, authenticated: bool) -> None:
        self._total -= 1
        if not authenticated:
            self._unauth -= 1
        if key is not None:
            left = self._by_key.get(key, 0) - 1
            if left > 0:
                self._by_key[key] = left
            else:
                self._by_key.pop(key, None)


# --- shared between worker processes ---------------------------------------------------------------------------

_HEAD = struct.Struct("<QII")  # owner pid (0: free region), connections, unauthenticated connections
_ENTRY = struct.Struct("<QI4x")  # keyed hash of an address (0: empty), connections from it


class SharedCounts:
    """The counts of every worker, in anonymous shared memory made before fork (the approach of
    pop3d.auth.penalty.SharedTable).

    One *region* per worker process: a header (owner pid, its totals) and an open-addressing hash table of
    (address hash, count) with linear probing. A process writes only its own region, so counting needs no
    lock and two workers never lose each other's updates; readers add up every region, so a limit may be
    overshot by a connection per other worker accepting at the same instant, never more. A region is claimed
    by the first connection a process sees (under an fcntl lock on an unlinked file, released by the kernel
    if its holder dies) and tagged with its pid. The supervisor calls `reclaim(pid)` when it reaps a dead
    worker, so a killed worker's connections stop counting at once; a claim also takes over regions whose
    owner no longer exists (a supervisor that never got to reap). Addresses are hashed with a per-start
    random key, so nobody can aim collisions; the table holds the full 64-bit hash, so two addresses share a
    count only if their hashes are equal.
    """

    __slots__ = ("_entries", "_key", "_lock", "_mask", "_pid", "_region", "buf", "regions")

    def __init__(self, regions: int, entries: int) -> None:
        """`regions`: worker processes that may live at once (with room for a restart); `entries`: addresses
        one process may track (rounded up to a power of two; keep it above twice the connections it admits)."""
        self.regions = regions
        size = 1
        while size < max(entries, 2):
            size <<= 1
        self._entries = size
        self._mask = size - 1
        self.buf = mmap.mmap(-1, regions * self._stride, flags=mmap.MAP_SHARED)
        self._key = os.urandom(16)
        self._lock = tempfile.TemporaryFile(prefix="pop3d-limits-")  # noqa: SIM115 - lives as long as we do
        self._region = -1
        self._pid = 0

    @property
    def _stride(self) -> int:
        return _HEAD.size + self._entries * _ENTRY.size

    def _hash(self, key: str) -> int:
        return (
            int.from_bytes(
                hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8, key=self._key).digest(), "little"
            )
            | 1
        )

    # -- regions -----------------------------------------------------------------------------------------------

    def _mine(self) -> int:
        """The offset of this process's region; claimed on first use (forked workers inherit `_region`)."""
        pid = procid.current()
        if self._pid != pid:
            self._region, self._pid = self._claim(pid), pid
        return self._region * self._stride

    def _claim(self, pid: int) -> int:
        fcntl.lockf(self._lock, fcntl.LOCK_EX)
        try:
            for r in range(self.regions):
                owner = _HEAD.unpack_from(self.buf, r * self._stride)[0]
                if owner == pid or owner == 0 or not _alive(owner):
                    self._clear(r)
                    _HEAD.pack_into(self.buf, r * self._stride, pid, 0, 0)
                    return r
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)
        raise RuntimeError(f"no free connection-count region among {self.regions}")

    def _clear(self, region: int) -> None:
        start = region * self._stride
        self.buf[start : start + self._stride] = bytes(self._stride)

    def reclaim(self, pid: int) -> None:
        """A worker died: its connections are gone (the kernel closed its sockets)."""
        for r in range(self.regions):
            if _HEAD.unpack_from(self.buf, r * self._stride)[0] == pid:
                self._clear(r)

    # -- Counts ------------------------------------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        total = unauth = 0
        for r in range(self.regions):
            owner, n, u = _HEAD.unpack_from(self.buf, r * self._stride)
            if owner:
                total += n
                unauth += u
        return total, unauth

    def of(self, key: str) -> int:
        h = self._hash(key)
        return sum(self._find(r * self._stride, h)[1] for r in range(self.regions))

    def add(self, key: str | None) -> None:
        base = self._mine()
        pid, n, u = _HEAD.unpack_from(self.buf, base)
        _HEAD.pack_into(self.buf, base, pid, n + 1, u + 1)
        if key is not None:
            h = self._hash(key)
            off, count = self._find(base, h)
            if off < 0:
                raise RuntimeError("connection-count table full")  # cannot happen: sized above the admissions
            _ENTRY.pack_into(self.buf, off, h, count + 1)

    def logged_in(self) -> None:
        base = self._mine()
        pid, n, u = _HEAD.unpack_from(self.buf, base)
        _HEAD.pack_into(self.buf, base, pid, n, max(0, u - 1))

    def remove(self, key: str | None, authenticated: bool) -> None:
        base = self._mine()
        pid, n, u = _HEAD.unpack_from(self.buf, base)
        _HEAD.pack_into(self.buf, base, pid, max(0, n - 1), u if authenticated else max(0, u - 1))
        if key is None:
            return
        h = self._hash(key)
        off, count = self._find(base, h)
        if count > 1:
            _ENTRY.pack_into(self.buf, off, h, count - 1)
        elif count == 1:
            self._delete(base, (off - base - _HEAD.size) // _ENTRY.size)

    def addresses(self) -> int:
        """Addresses counted by this process (tests, diagnostics)."""
        base = self._mine() + _HEAD.size
        return sum(1 for i in range(self._entries) if _ENTRY.unpack_from(self.buf, base + i * _ENTRY.size)[0])

    def _find(self, base: int, h: int) -> tuple[int, int]:
        """(offset, count) of `h`'s entry in the region at `base`, or of the empty entry where it would go
        (count 0); offset -1 when the table is full."""
        table = base + _HEAD.size
        i = h & self._mask
        for _ in range(self._entries):
            off = table + i * _ENTRY.size
            key, count = _ENTRY.unpack_from(self.buf, off)
            if key == h:
                return off, count
            if key == 0:
                return off, 0
            i = (i + 1) & self._mask
        return -1, 0

    def _delete(self, base: int, i: int) -> None:
        """Empty entry `i`, shifting later entries of its probe run back so lookups never stop early
        (deletion without tombstones for linear probing)."""
        table = base + _HEAD.size
        mask = self._mask
        j = i
        while True:
            j = (j + 1) & mask
            key, count = _ENTRY.unpack_from(self.buf, table + j * _ENTRY.size)
            if key == 0:
                break
            home = key & mask
            # move entry j into the hole at i unless its home lies cyclically in (i, j]
            if (i <= j and not i < home <= j) or (i > j and not (home > i or home <= j)):
                _ENTRY.pack_into(self.buf, table + i * _ENTRY.size, key, count)
                i = j
        _ENTRY.pack_into(self.buf, table + i * _ENTRY.size, 0, 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- one process's view ------------------------------------------------------------------------------------------


class Evictable(Protocol):
    """A connection the limits may close to make room: an unauthenticated session."""

    def evict(self) -> None: ...


class Refused(Exception):
    """The connection is over a limit; str() is the text of the -ERR [SYS/TEMP] line."""


class ConnectionLimits:
    """The limits of one process: admit or refuse a new connection, and keep its unauthenticated ones
    oldest first for eviction."""

    __slots__ = ("_exempt", "_open", "_unauth", "counts", "policy")

    def __init__(self, policy: Policy, counts: Counts, exempt: Iterable[str] = ()) -> None:
        self.policy = policy
        self.counts = counts
        self._exempt = Networks(exempt)
        self._open = 0  # this process's connections (its descriptor budget is per process)
        # this process's unauthenticated connections, oldest first (dicts keep insertion order)
        self._unauth: dict[Evictable, None] = {}

    @classmethod
    def from_settings(cls, settings: Settings, shared: bool = False) -> ConnectionLimits:
        """The configured limits; `shared`: counted in shared memory for `server.workers` processes (build
        it before they fork), else in this process only."""
        s = settings.server
        capacity = process_capacity()
        policy = Policy(s.max_connections_per_ip, s.max_connections, capacity, s.max_unauthenticated)
        if not shared:
            return cls(policy, LocalCounts(), s.limit_exempt)
        # a process never admits more than its capacity, so twice that many entries keep probe runs short
        entries = 2 * min(capacity, s.max_connections or capacity) + 16
        return cls(policy, SharedCounts(s.workers + 2, entries), s.limit_exempt)

    def admit(self, session: Evictable, address: str) -> str | None:
        """Count a new connection from `address`; return what it was counted under (None: exempt from the
        per-address limit), to hand back to `release`. Raises Refused when it must be turned away."""
        counts = self.counts
        key = None if address in self._exempt else address_key(address)
        total, unauth = counts.totals()
        verdict = self.policy.decide(
            None if key is None else counts.of(key), total, self._open, unauth, bool(self._unauth)
        )
        if verdict is Verdict.EVICT:
            oldest = next(iter(self._unauth))
            self.logged_in(oldest)  # no longer waiting to log in: it is being closed
            oldest.evict()
        elif verdict is not Verdict.ADMIT:
            raise Refused(verdict.value)
        counts.add(key)
        self._open += 1
        self._unauth[session] = None
        return key

    def logged_in(self, session: Evictable) -> None:
        """`session` authenticated: it is never evicted, and no longer counts as unauthenticated."""
        if self._unauth.pop(session, 0) is None:
            self.counts.logged_in()

    def release(self, session: Evictable, key: str | None) -> None:
        """The connection `admit` counted under `key` is closed."""
        waiting = self._unauth.pop(session, 0) is None
        self._open -= 1
        self.counts.remove(key, authenticated=not waiting)

    def reclaim(self, pid: int) -> None:
        """Worker `pid` died (the supervisor calls this): forget its connections."""
        if isinstance(self.counts, SharedCounts):
            self.counts.reclaim(pid)

    @property
    def unauthenticated(self) -> int:
        """This process's connections waiting to log in."""
        return len(self._unauth)
