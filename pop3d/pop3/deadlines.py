"""Session deadlines (login timeout, RFC 1939 §3 autologout) on one loop timer per worker.

A loop timer per session costs about 640 bytes (the handle, its callback and uvloop's timer) and a create and
cancel at every login; a worker holding 10,000 idle sessions pays that 10,000 times (docs/DESIGN.md
performance rule 5). Here a session sits in a bucket per whole second of its deadline: a set entry and an
int. One loop timer fires at the earliest bucket and calls each of its sessions back; a session whose
deadline moved (it was active) puts itself in a later bucket from that callback.

The price: a deadline is met up to one second late (`GRAIN`), which the RFC's "at least 10 minutes" allows.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Protocol

#: bucket width in seconds: deadlines are rounded up to it
GRAIN = 1.0


class Sleeper(Protocol):
    """What a deadline calls: the session, which decides whether it really timed out."""

    def _on_timer(self) -> None: ...


class Deadlines:
    """The deadlines of one event loop's sessions."""

    __slots__ = ("_buckets", "_handle", "_handle_tick", "_of", "_ticks", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._buckets: dict[int, set[Sleeper]] = {}
        self._of: dict[Sleeper, int] = {}  # session -> its bucket
        self._ticks: list[int] = []  # heap of the buckets' ticks, one entry per bucket
        self._handle: asyncio.TimerHandle | None = None
        self._handle_tick = 0

    def __len__(self) -> int:
        return len(self._of)

    def arm(self, who: Sleeper, due: float) -> None:
        """Call `who._on_timer()` once, at `due` (loop time) or up to GRAIN later; replaces its earlier one."""
        tick = math.ceil(due / GRAIN)
        old = self._of.get(who)
        if old == tick:
            return
        if old is not None:
            self._drop(who, old)
        self._of[who] = tick
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
        bucket.add(who)
        if self._handle is None or tick < self._handle_tick:
            self._schedule(tick)

    def disarm(self, who: Sleeper) -> None:
        """No call for `who` (its session ended). Idempotent."""
        tick = self._of.pop(who, None)
        if tick is not None:
            self._drop(who, tick)

    def _drop(self, who: Sleeper, tick: int) -> None:
        # an emptied bucket stays until its tick comes up: one heap entry per bucket, however many sessions
        # come and go in it (a poll session arms and disarms within milliseconds); a bucket being fired is
        # no longer in the dict
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.discard(who)

    def _schedule(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle_tick = tick
        self._handle = self.loop.call_at(tick * GRAIN, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = self.loop.time()
        ticks, buckets, of = self._ticks, self._buckets, self._of
        while ticks and ticks[0] * GRAIN <= now:
            tick = heapq.heappop(ticks)
            for who in buckets.pop(tick):
                if of.get(who) != tick:  # re-armed or disarmed by an earlier callback of this bucket
                    continue
                del of[who]
                who._on_timer()  # may arm again: in a later bucket, its deadline being after now
        if ticks:
            self._ensure(ticks[0])

    def _ensure(self, tick: int) -> None:
        """The loop timer set for `tick`, the earliest bucket (callbacks may have set it for a later one)."""
        if self._handle is None or self._handle_tick != tick:
            self._schedule(tick)
