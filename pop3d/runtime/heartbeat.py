"""Worker heartbeats for the systemd watchdog: the supervisor pings WATCHDOG=1 only while every worker's event
loop has answered recently.

A live supervisor says nothing about its workers: a worker whose loop is stuck (or SIGSTOPped) keeps its
share of the listening sockets and its accept queue, so every other connection hangs while systemd hears
that all is well. So each worker stamps CLOCK_MONOTONIC (the same clock in every process) into its own slot
of an anonymous shared mapping, from a callback on its event loop; the supervisor reads every slot before it
pings. One 8-octet aligned store per beat and no system call: nothing a worker does per connection.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass
from typing import Final

_SLOT: Final = struct.Struct("q")  # monotonic nanoseconds of the last beat


class HeartbeatTable:
    """One slot per worker, shared with the workers forked after it is made (MAP_SHARED | MAP_ANONYMOUS).

    `interval` is how often the supervisor pings (half of WatchdogSec=); workers beat twice per interval, and
    a slot older than one interval is stale.
    """

    def __init__(self, slots: int, interval: float) -> None:
        self.interval = interval
        self._map = mmap.mmap(-1, _SLOT.size * max(slots, 1))

    def stamp(self, slot: int, now_ns: int | None = None) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * slot, time.monotonic_ns() if now_ns is None else now_ns)

    def age(self, slot: int) -> float:
        """Seconds since `slot` last beat."""
        last: int = _SLOT.unpack_from(self._map, _SLOT.size * slot)[0]
        return (time.monotonic_ns() - last) / 1e9

    def stale(self, slots: dict[int, int]) -> list[tuple[int, int, float]]:
        """(slot, pid, age) of the workers in `slots` (pid -> slot) whose last beat is older than one interval."""
        out = []
        for pid, slot in slots.items():
            age = self.age(slot)
            if age > self.interval:
                out.append((slot, pid, age))
        return sorted(out)

    def beat_for(self, slot: int) -> Heartbeat:
        return Heartbeat(self, slot, self.interval / 2)

    def close(self) -> None:
        self._map.close()


@dataclass(frozen=True)
class Heartbeat:
    """What one worker gets: call `beat()` every `period` seconds from its event loop."""

    table: HeartbeatTable
    slot: int
    period: float

    def beat(self) -> None:
        self.table.stamp(self.slot)
