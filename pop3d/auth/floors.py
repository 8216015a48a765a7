"""Time floors: a failed authentication step answers no sooner than the dearest path that step has.

Decoys (pop3d.auth.decoys) make an unknown user do the work of *a* real entry, but when the entries differ in
cost no decoy can look like all of them: in a passwd-file in migration a {SHA512-CRYPT} user already answers a
wrong password ten times slower than a {PLAIN} one, and a hashed entry cannot serve SCRAM while a {PLAIN} one
runs PBKDF2 for it. Whichever shape an unknown name imitates, some real user stands out (RFC 1939 §13,
RFC 5802 §9: nothing may tell whether a user exists). So each step whose cost depends on the user holds its
failures back until `floor` seconds after the step began, `floor` being the cost of the dearest path:

- calibrated when the user database is loaded (off the event loop): one decoy of each shape present, timed
  (`cost`), the largest kept;
- observed: a running maximum of the step's own durations, so a busy machine raises the floor. It halves every
  `HALF_LIFE` seconds and one observation may at most double it, so a single outlier neither sticks nor
  jumps it; sustained slowness still climbs geometrically. Capped at `CAP`.

The hold is an asyncio sleep: it delays the answer and costs no CPU. Successes are not held where the answer
says it succeeded anyway (password checks); a SASL lookup step is held every time, as its answer does not say
yet. Event-loop timers count whole milliseconds (uvloop rounds a delay to the nearest one, epoll waits at least
one), so floors are rounded up to `GRAIN`: otherwise two cheap paths a few microseconds apart, held to a floor
near half a tick, would land on different ticks, and microseconds would become a millisecond.

Dovecot does not pad: its auth_failure_delay adds the same delay to every failure, which keeps any difference
between them. This server pads, because the per-address penalty is off behind a proxy that hides addresses,
and files that mix schemes are common while passwords migrate to a stronger one.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable
from typing import Final

__all__ = ["CAP", "GRAIN", "HALF_LIFE", "Floor", "Floors", "cost", "step_name"]

#: seconds after which an observed peak counts half
HALF_LIFE: Final[float] = 5.0
#: no step is held longer than this (a pathological hash or an overloaded machine must not hang failures)
CAP: Final[float] = 2.0
#: one observation may raise the floor at most this many times
MAX_RISE: Final[float] = 2.0
#: floors are whole multiples of the event loop's timer resolution (see the module docstring)
GRAIN: Final[float] = 0.001


class Floor:
    """One step's floor: max(calibrated cost, decaying peak of observed durations), capped at `cap`.

    Touched by the event loop (`observe`, `value`) and by a load thread (`calibrate`: one float store).
    """

    __slots__ = ("_at", "_base", "_cap", "_peak")

    def __init__(self, cap: float = CAP) -> None:
        self._cap = cap
        self._base = 0.0
        self._peak = 0.0
        self._at = 0.0

    def calibrate(self, seconds: float) -> None:
        """The cost measured for the table now in force; replaces the previous table's."""
        self._base = max(0.0, seconds)

    def observe(self, seconds: float, now: float) -> None:
        """Record one real duration of the step (work only, never the hold itself: that would feed back)."""
        current = self.value(now)
        limit = MAX_RISE * current if current > 0 else seconds
        self._peak = max(self._decayed(now), min(seconds, limit))
        self._at = now

    def value(self, now: float) -> float:
        """Seconds a failure of this step takes at least, as of `now` (monotonic)."""
        return min(self._cap, max(self._base, self._decayed(now)))

    def _decayed(self, now: float) -> float:
        if self._peak == 0.0:
            return 0.0
        return float(self._peak * 0.5 ** (max(0.0, now - self._at) / HALF_LIFE))


class Floors:
    """The floors of one user database, by step name ("verify", "apop", or a SASL mechanism's name).

    `cap`: no hold lasts longer; 0 turns holding off (tests whose event loop has a clock that stands still).
    """

    __slots__ = ("_cap", "_floors")

    def __init__(self, cap: float = CAP) -> None:
        self._cap = cap
        self._floors: dict[str, Floor] = {}

    def floor(self, step: str) -> Floor:
        found = self._floors.get(step)
        if found is None:  # setdefault: a load thread may calibrate the same step at the same moment
            found = self._floors.setdefault(step, Floor(self._cap))
        return found

    def calibrate(self, step: str, seconds: float) -> None:
        self.floor(step).calibrate(seconds)

    def value(self, step: str) -> float:
        return self.floor(step).value(time.monotonic())

    async def hold(self, step: str, started: float, *, failed: bool = True) -> None:
        """End of `step`, begun at `started` (time.monotonic()): record its duration and, when `failed`,
        sleep until the floor has passed since `started`."""
        floor = self.floor(step)
        now = time.monotonic()
        took = now - started
        floor.observe(took, now)
        wait = math.ceil(floor.value(now) / GRAIN - 1e-6) * GRAIN - took  # 1e-6: 0.005 / 0.001 is 5.000...01
        if failed and wait > 0:
            await asyncio.sleep(wait)


def cost(fn: Callable[[], object], runs: int = 3) -> float:
    """Median seconds of `runs` calls of `fn` in this thread: a calibration, run off the event loop."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_name(fn: Callable[..., object]) -> str:
    """The floor name for a SASL lookup continuation: the mechanism's `name` when `fn` is a bound
    `Mechanism.resume`, else the function's qualified name."""
    name = getattr(getattr(fn, "__self__", None), "name", None)
    if isinstance(name, str) and name:
        return name
    return str(getattr(fn, "__qualname__", "lookup"))
