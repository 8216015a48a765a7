"""Brute-force penalty per remote address: each consecutive failed login waits longer, success resets it.

Dovecot's numbers (auth penalty): 2 s after the first failure, doubling, at most 15 s. While an address is
under penalty *every* authentication answer to it waits, the right password included: if only failures
waited, a client could take silence for "wrong" and reconnect. The history is per address, not per
connection, so hanging up neither cancels nor resets it. The wait is an `asyncio.sleep` in the answering
session only, so the loop and other clients never notice.

How a handler uses it (`now` is time.monotonic(); `peer` the client address, after PROXY protocol):

- failed authentication (any mechanism, unknown user or wrong secret alike)::

      wait = penalty.fail(peer, now)      # recorded at once: a hang-up during the wait changes nothing
      await asyncio.sleep(wait)
      reply -ERR [AUTH]; after auth.max_failures_per_connection failures on this connection, close it

- successful authentication, before *any* reply that follows it (+OK, but also -ERR [LOGIN-DELAY],
  [IN-USE], [SYS/...], which all tell that the password was right)::

      wait = penalty.delay(peer, now)     # what a failure would have waited: the answers look alike
      await asyncio.sleep(wait)
      penalty.succeed(peer)               # only after the wait: a hang-up keeps the penalty in force
      go on with the login

IPv6 clients usually own a whole /64, so IPv6 addresses count per /64; an IPv4-mapped IPv6 address counts as
the IPv4 address. The table is
bounded: entries idle for `forget_after` seconds are dropped, and past `max_entries` the oldest go first,
so an attacker cycling addresses costs memory O(max_entries), not O(addresses). With worker processes the
history lives in a fixed-size shared-memory table instead (`SharedPenalty` over a `SharedTable` the worker
supervisor creates before it forks, pop3d.runtime.shared), or a client could spread its attempts over the
workers. That table survives a restart: the supervisor writes it to `server.state_dir/penalty` (`dump`) and
reads it back at start (`restore`), so restarting the server does not wipe an attacker's record.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import mmap
import os
import struct
from collections import OrderedDict
from typing import Final

DEFAULT_FORGET_AFTER: Final[float] = 3600.0
DEFAULT_MAX_ENTRIES: Final[int] = 65536


def penalty_key(address: str) -> str:
    """The key an address is counted under: IPv4 as is, IPv6 by its /64, anything unparsable verbatim."""
    if ":" not in address:  # IPv4 (or a UNIX-socket peer): already its own key, no parse on every login
        return address
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class Penalty:
    """Consecutive-failure counts per address and the delay they earn. Pure: the caller supplies `now`."""

    __slots__ = ("_table", "base", "forget_after", "max_entries", "maximum")

    def __init__(
        self,
        base: float,
        maximum: float,
        forget_after: float = DEFAULT_FORGET_AFTER,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.base = base
        self.maximum = max(base, maximum)
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._table: OrderedDict[str, tuple[int, float]] = OrderedDict()  # address -> (failures, last failure)

    def failures(self, address: str, now: float) -> int:
        """Consecutive failures from `address` not yet forgotten at `now`."""
        entry = self._table.get(penalty_key(address))
        if entry is None or now - entry[1] > self.forget_after:
            return 0
        return entry[0]

    def delay(self, address: str, now: float) -> float:
        """Seconds *any* authentication answer to `address` must wait at `now`, success included.

        0 when the address is not under penalty; otherwise what `fail` would return now, so a right and a
        wrong password are answered after the same wait. Records nothing (call `succeed` after the wait).
        """
        failures = self.failures(address, now)
        return self.delay_for(failures + 1) if failures else 0.0

    def delay_for(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th consecutive failure: base, 2·base, 4·base … capped."""
        if failures <= 0 or self.base <= 0:
            return 0.0
        return min(self.base * (1 << min(failures - 1, 32)), self.maximum)

    def fail(self, address: str, now: float) -> float:
        """Record a failure at once; return how long to hold the -ERR reply back."""
        count = self.failures(address, now) + 1
        key = penalty_key(address)
        self._table[key] = (count, now)
        self._table.move_to_end(key)
        self._trim(now)
        return self.delay_for(count)

    def succeed(self, address: str) -> None:
        """Clear the record of `address` (Dovecot does the same); call it once the success has waited `delay`."""
        self._table.pop(penalty_key(address), None)

    def __len__(self) -> int:
        return len(self._table)

    def _trim(self, now: float) -> None:
        table = self._table
        while table:
            oldest, (_count, last) = next(iter(table.items()))
            if len(table) > self.max_entries or now - last > self.forget_after:
                del table[oldest]
            else:
                break


# --- shared between worker processes -------------------------------------------------------------------------

_SLOT = struct.Struct("<QI4xd")  # keyed hash of the address (0 = empty), failures, monotonic time of the last
_DUMP_MAGIC = b"pop3d-penalty 1\n"
# hash key, slots, wall-clock and monotonic time of the dump: monotonic times restart at boot, so each entry
# is carried over as wall-clock time and brought back onto the monotonic clock of the process that restores it
_DUMP_HEAD = struct.Struct("<16sIdd")
#: slots a dump may have (a larger file is garbage and is not read)
MAX_DUMP_SLOTS = 1 << 20
#: octets of the largest dump `restore` accepts
MAX_DUMP_SIZE = len(_DUMP_MAGIC) + _DUMP_HEAD.size + MAX_DUMP_SLOTS * _SLOT.size


class SharedTable:
    """A fixed-size table in anonymous shared memory, created before the workers fork so all of them see it.

    Addresses map to slots by a keyed hash (a per-start random key, so nobody can aim collisions); a collision
    simply replaces the older entry, like the bounded dict above forgets its oldest. Updates from two workers
    may race and lose one increment: the penalty is a brake, not an account. CLOCK_MONOTONIC is system-wide,
    so the times compare across processes.
    """

    __slots__ = ("_key", "buf", "slots")

    def __init__(self, slots: int = 16384) -> None:
        self.slots = slots
        self.buf = mmap.mmap(-1, slots * _SLOT.size, flags=mmap.MAP_SHARED)
        self._key = os.urandom(16)

    def _where(self, address: str) -> tuple[int, int]:
        h = (
            int.from_bytes(
                hashlib.blake2b(address.encode("utf-8", "surrogateescape"), digest_size=8, key=self._key).digest(),
                "little",
            )
            | 1
        )
        return h, (h % self.slots) * _SLOT.size

    def get(self, address: str) -> tuple[int, float]:
        h, off = self._where(address)
        key, count, last = _SLOT.unpack_from(self.buf, off)
        return (count, last) if key == h else (0, 0.0)

    def put(self, address: str, count: int, last: float) -> None:
        h, off = self._where(address)
        _SLOT.pack_into(self.buf, off, h, min(count, 0xFFFFFFFF), last)

    def clear(self, address: str) -> None:
        h, off = self._where(address)
        if _SLOT.unpack_from(self.buf, off)[0] == h:
            _SLOT.pack_into(self.buf, off, 0, 0, 0.0)

    def used(self) -> int:
        return sum(1 for i in range(self.slots) if _SLOT.unpack_from(self.buf, i * _SLOT.size)[0])

    def dump(self, wall: float, mono: float) -> bytes:
        """The table as a file: what `restore` reads back (`wall`, `mono`: time.time(), time.monotonic())."""
        return _DUMP_MAGIC + _DUMP_HEAD.pack(self._key, self.slots, wall, mono) + bytes(self.buf)

    def restore(self, data: bytes, wall: float, mono: float, forget_after: float = DEFAULT_FORGET_AFTER) -> int:
        """Load a dump into this (fresh) table; returns the entries kept. ValueError for anything that is not
        a well-formed dump (the caller ignores the file). Entries idle longer than `forget_after` are dropped;
        a time in the future (clock set back) counts as now. The dump's hash key is adopted, so the stored
        hashes still locate their addresses; the slot count may differ (entries are placed again)."""
        head_end = len(_DUMP_MAGIC) + _DUMP_HEAD.size
        if not data.startswith(_DUMP_MAGIC) or len(data) < head_end:
            raise ValueError("not a pop3d penalty table")
        key, slots, saved_wall, saved_mono = _DUMP_HEAD.unpack_from(data, len(_DUMP_MAGIC))
        if not 0 < slots <= MAX_DUMP_SLOTS or len(data) != head_end + slots * _SLOT.size:
            raise ValueError("penalty table has the wrong size")
        if not (math.isfinite(saved_wall) and math.isfinite(saved_mono)):
            raise ValueError("penalty table has a bad time stamp")
        self._key = key
        self.buf[:] = bytes(len(self.buf))
        kept = 0
        for h, count, last in _SLOT.iter_unpack(memoryview(data)[head_end:]):
            if not h or not count or not math.isfinite(last):
                continue
            last_wall = min(saved_wall - (saved_mono - last), wall)
            if wall - last_wall > forget_after:
                continue
            _SLOT.pack_into(self.buf, (h % self.slots) * _SLOT.size, h, count, mono - (wall - last_wall))
            kept += 1
        return kept


class SharedPenalty(Penalty):
    """`Penalty` whose history lives in a `SharedTable`, so it holds whichever worker a client reaches."""

    __slots__ = ("table",)

    def __init__(
        self, base: float, maximum: float, table: SharedTable, forget_after: float = DEFAULT_FORGET_AFTER
    ) -> None:
        super().__init__(base, maximum, forget_after)
        self.table = table

    def failures(self, address: str, now: float) -> int:
        count, last = self.table.get(penalty_key(address))
        return 0 if count == 0 or now - last > self.forget_after else count

    def fail(self, address: str, now: float) -> float:
        count = self.failures(address, now) + 1
        self.table.put(penalty_key(address), count, now)
        return self.delay_for(count)

    def succeed(self, address: str) -> None:
        self.table.clear(penalty_key(address))

    def __len__(self) -> int:
        return self.table.used()
