"""pop3d.pop3.deadlines: one loop timer for every session's deadline, on a hand-moved clock."""

from __future__ import annotations

import math

from fakes import ClockLoop
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.pop3.deadlines import GRAIN, Deadlines


class Sleeper:
    def __init__(self, loop: ClockLoop, log: list[tuple[str, float]], name: str) -> None:
        self.loop, self.log, self.name = loop, log, name
        self.then: object = None  # what to do when called: a callable

    def _on_timer(self) -> None:
        self.log.append((self.name, self.loop.time()))
        if callable(self.then):
            self.then()


def test_each_sleeper_is_called_once_at_its_second(clock: ClockLoop) -> None:
    log: list[tuple[str, float]] = []
    d = Deadlines(clock)
    a, b = Sleeper(clock, log, "a"), Sleeper(clock, log, "b")
    d.arm(a, clock.time() + 60)
    d.arm(b, clock.time() + 30.2)
    clock.advance(30)
    assert log == []
    clock.advance(1)  # 30.2 is met at the next whole second
    assert log == [("b", 1031.0)]
    clock.advance(29)
    assert log == [("b", 1031.0), ("a", 1060.0)] and len(d) == 0
    clock.advance(600)
    assert len(log) == 2


def test_rearming_moves_and_disarming_cancels(clock: ClockLoop) -> None:
    log: list[tuple[str, float]] = []
    d = Deadlines(clock)
    a, b = Sleeper(clock, log, "a"), Sleeper(clock, log, "b")
    d.arm(a, 1010)
    d.arm(a, 1020)  # activity moved the deadline
    d.arm(b, 1005)
    d.disarm(b)
    d.disarm(b)  # idempotent
    clock.advance(15)
    assert log == []
    clock.advance(5)
    assert log == [("a", 1020.0)]


def test_a_callback_may_rearm_itself_and_disarm_a_neighbour(clock: ClockLoop) -> None:
    log: list[tuple[str, float]] = []
    d = Deadlines(clock)
    a, b, c = (Sleeper(clock, log, n) for n in "abc")
    for s in (a, b, c):
        d.arm(s, 1010)
    a.then = lambda: (d.arm(a, clock.time() + 5), d.disarm(b), d.disarm(c))
    b.then = lambda: d.disarm(a)
    c.then = lambda: d.disarm(a)
    clock.advance(10)
    first = [name for name, _ in log]
    # whichever ran first, nobody is called for a deadline that was taken back
    assert first in (["a"], ["b", "c"], ["c", "b"])
    clock.advance(5)
    if first == ["a"]:
        assert log[-1] == ("a", 1015.0)
    else:
        assert len(log) == 2


def test_sessions_that_come_and_go_leave_one_bucket_per_second(clock: ClockLoop) -> None:
    """Poll sessions arm and disarm within milliseconds: the wheel must not grow with their number."""
    d = Deadlines(clock)
    log: list[tuple[str, float]] = []
    for i in range(10_000):
        s = Sleeper(clock, log, str(i))
        d.arm(s, clock.time() + 60)
        d.disarm(s)
    assert len(d) == 0 and len(d._ticks) == 1 and len(d._buckets) == 1
    clock.advance(61)
    assert not d._ticks and not d._buckets and log == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["arm", "disarm", "advance"]), st.integers(0, 4), st.floats(0, 90)),
        max_size=40,
    )
)
def test_matches_a_model(ops: list[tuple[str, int, float]]) -> None:
    """Against a model: a sleeper is called once, at its last deadline rounded up to GRAIN, unless disarmed."""
    clock = ClockLoop()
    try:
        log: list[tuple[str, float]] = []
        d = Deadlines(clock)
        sleepers = [Sleeper(clock, log, str(i)) for i in range(5)]
        due: dict[str, float] = {}
        for op, who, amount in ops:
            name = str(who)
            if op == "arm":
                d.arm(sleepers[who], clock.time() + amount)
                due[name] = clock.time() + amount
            elif op == "disarm":
                d.disarm(sleepers[who])
                due.pop(name, None)
            else:
                before = len(log)
                clock.advance(amount)
                now = clock.time()
                fired = {n for n, _ in log[before:]}
                expected = {n for n, t in due.items() if math.ceil(t / GRAIN) * GRAIN <= now}
                assert fired == expected
                for n, at in log[before:]:  # never early; not late either: `expected` is all that was due
                    assert due[n] <= at
                    del due[n]
        assert len(d) == len(due)
    finally:
        clock.close()
