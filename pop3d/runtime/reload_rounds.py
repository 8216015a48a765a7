"""Which workers have finished the latest SIGHUP, so the supervisor says READY=1 only once all of them have.

systemd (Type=notify-reload, `systemctl reload`) reads READY=1 after RELOADING=1 as "the new configuration
is in force": a script that adds a user, reloads and logs in must not land on a worker that has not read
it yet. The supervisor only forwards SIGHUP, so the workers report back through one anonymous shared
mapping made before the first fork: word 0 is the round the supervisor asked for last, word 1 + slot the
round that slot's worker last finished.

A worker reads the asked round *before* it loads the configuration, so what it loads is at least that
new (two SIGHUPs that reach it together are one reload, and it answers the later round), and writes that
round to its slot once the reload is over, applied or refused: either way it has looked. A worker (re)started
after a reload runs the supervisor's current settings, so its slot starts at the current round.
Aligned 8-octet loads and stores: no lock, no system call.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

_WORD: Final = struct.Struct("=Q")
#: seconds between two looks at the slots while the supervisor waits (a reload takes milliseconds)
POLL: Final[float] = 0.005


class ReloadRounds:
    """The asked round and one finished round per worker slot, shared with workers forked after it is made."""

    def __init__(self, slots: int) -> None:
        self._map = mmap.mmap(-1, _WORD.size * (1 + max(slots, 1)))

    def asked(self) -> int:
        return int(_WORD.unpack_from(self._map, 0)[0])

    def ask(self) -> int:
        """A new round (call before sending SIGHUP); returns its number."""
        value = self.asked() + 1
        _WORD.pack_into(self._map, 0, value)
        return value

    def finished(self, slot: int) -> int:
        return int(_WORD.unpack_from(self._map, _WORD.size * (1 + slot))[0])

    def finish(self, slot: int, round_: int) -> None:
        _WORD.pack_into(self._map, _WORD.size * (1 + slot), round_)

    def behind(self, pids: dict[int, int], round_: int) -> list[tuple[int, int]]:
        """(slot, pid) of the workers in `pids` (pid -> slot) that have not finished `round_`."""
        return sorted((slot, pid) for pid, slot in pids.items() if self.finished(slot) < round_)

    def for_slot(self, slot: int) -> ReloadAck:
        return ReloadAck(self, slot)

    def close(self) -> None:
        self._map.close()


@dataclass(frozen=True)
class ReloadAck:
    """What one worker gets: run each SIGHUP's reload inside `answering()`."""

    rounds: ReloadRounds
    slot: int

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        round_ = self.rounds.asked()  # before the configuration is read: see the module
        try:
            yield
        finally:
            self.rounds.finish(self.slot, round_)


def wait_for_workers(
    rounds: ReloadRounds,
    round_: int,
    pids: Callable[[], dict[int, int]],
    timeout: float,
    idle: Callable[[], bool],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[tuple[int, int]]:
    """Wait until every worker in `pids()` (read anew each look: workers die and are replaced) has finished
    `round_`, or `timeout` seconds; returns the (slot, pid) still behind (empty: all done). `idle` runs
    between looks (the supervisor reaps and pings the watchdog there) and ends the wait early by returning
    True (a stop is pending: a stuck worker must not hold a shutdown back)."""
    deadline = clock() + timeout
    while True:
        late = rounds.behind(pids(), round_)
        if not late or clock() >= deadline or idle():
            return late
        sleep(POLL)
