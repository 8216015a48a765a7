"""Brute-force penalty per remote address: each consecutive failed login waits longer, success resets it.

Dovecot's numbers (auth penalty): 2 s after the first failure, doubling, at most 15 s. The wait is an
`asyncio.sleep` in the failing session only, so the loop and other clients never notice. The table is
bounded: entries idle for `forget_after` seconds are dropped, and past `max_entries` the oldest go first,
so an attacker cycling addresses costs memory O(max_entries), not O(addresses).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

DEFAULT_FORGET_AFTER: Final[float] = 3600.0
DEFAULT_MAX_ENTRIES: Final[int] = 65536


class Penalty:
    """Consecutive-failure counts per address and the delay they earn. Pure: the caller supplies `now`."""

    __slots__ = ("base", "maximum", "forget_after", "max_entries", "_table")

    def __init__(self, base: float, maximum: float, forget_after: float = DEFAULT_FORGET_AFTER,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.base = base
        self.maximum = max(base, maximum)
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._table: OrderedDict[str, tuple[int, float]] = OrderedDict()  # address -> (failures, last failure)

    def failures(self, address: str, now: float) -> int:
        entry = self._table.get(address)
        if entry is None or now - entry[1] > self.forget_after:
            return 0
        return entry[0]

    def delay_for(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th consecutive failure: base, 2·base, 4·base … capped."""
        if failures <= 0 or self.base <= 0:
            return 0.0
        return min(self.base * 2 ** min(failures - 1, 32), self.maximum)

    def fail(self, address: str, now: float) -> float:
        """Record a failure; return how long to hold the -ERR reply back."""
        count = self.failures(address, now) + 1
        self._table[address] = (count, now)
        self._table.move_to_end(address)
        self._trim(now)
        return self.delay_for(count)

    def succeed(self, address: str) -> None:
        """A successful login from `address` clears its record (Dovecot does the same)."""
        self._table.pop(address, None)

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
