"""Drive many benchmark sessions: closed loop (each client starts its next session when one ends) or open
loop (`--rate`: sessions arrive on a fixed schedule whether or not the server keeps up), in one or several
processes, each on its own event loop.

Each concurrent client owns distinct users (a maildrop lock is exclusive, RFC 1939 §4), so a client never
collides with another one: an `[IN-USE]` in the results is the server's doing, not the generator's.

Open-loop accounting: an arrival that finds every client busy waits for the first one freed and starts
late; its `connect` and `session` latencies run from the scheduled time, like wrk2's, so a stalling server
cannot hide its stall by slowing the generator down (coordinated omission). Arrivals still waiting when the
schedule is over never reached the server: they are `not_started`, apart from the server's errors, and
`arrivals == sessions + errors + unfinished + not_started`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import resource
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

from pop3d.bench import logins
from pop3d.bench.client import client_context
from pop3d.bench.commands import BenchError, RunConfig, command, open_connection
from pop3d.bench.hist import Histogram
from pop3d.bench.names import LOGINS, PIPELINABLE
from pop3d.bench.scenarios import BY_NAME, one_session
from pop3d.bench.stats import Stats

#: receives one snapshot per tick, merged over the generator processes (see `Ticks`)
Progress = Callable[[dict[str, Any]], None]
_TICK = 0.5
_GC_THRESHOLD = 50_000  # allocations net of deallocations between young-generation collections
#: cumulative counters a snapshot carries
SNAPSHOT_COUNTS = ("sessions", "logins", "messages", "octets", "arrivals", "late", "not_started", "held")


class UsageError(Exception):
    """Bad arguments or users file; printed as one line, exit status 2."""


def read_users(path: str | Path) -> list[tuple[str, str]]:
    """`user:password` lines (the password may contain ':'); blank lines and `#` comments are skipped."""
    users: list[tuple[str, str]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--users: cannot read {path}: {exc}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise UsageError(f"--users: {path} line {n}: expected user:password")
        users.append((user, password))
    return users


@dataclass
class Plan:
    """One run, as given on the command line."""

    rc: RunConfig
    users: list[tuple[str, str]]
    concurrency: int
    duration: float
    procs: int = 1
    rate: float | None = None
    cafile: str | None = None
    ramp: float = 0.0  # closed loop: client i starts at i * ramp / concurrency seconds
    interval: float | None = None  # seconds between snapshots (interval lines); None: every half second


def check(plan: Plan) -> None:
    if plan.concurrency < 1 or plan.procs < 1 or plan.duration <= 0:
        raise UsageError("--concurrency and --procs must be >= 1, --duration > 0")
    if plan.rate is not None and plan.rate <= 0:
        raise UsageError("--rate must be > 0")
    if plan.interval is not None and plan.interval <= 0:
        raise UsageError("--interval must be > 0")
    if plan.ramp < 0 or plan.ramp >= plan.duration:
        raise UsageError("--ramp must be >= 0 and shorter than --duration")
    if plan.rc.login not in LOGINS:
        raise UsageError(f"--login must be one of {', '.join(LOGINS)}")
    if plan.rc.scenario == "pipelined" and plan.rc.login not in PIPELINABLE:
        raise UsageError(f"--scenario pipelined needs a one-line login: --login {' or '.join(PIPELINABLE)}")
    if len({u for u, _ in plan.users}) < plan.concurrency:
        raise UsageError(
            f"--concurrency {plan.concurrency} needs as many distinct users; "
            f"the users file has {len({u for u, _ in plan.users})}"
        )
    if plan.procs > plan.concurrency:
        raise UsageError("--procs cannot exceed --concurrency")
    if plan.rc.resume and not plan.rc.tls:
        raise UsageError("--resume needs --tls or --stls")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class _Job:
    """What one generator process runs (picklable: it crosses to child processes)."""

    rc: RunConfig
    users: list[tuple[str, str]]
    duration: float
    rate: float | None
    cafile: str | None
    ramp: float
    tick: float


def _snapshot(stats: Stats, tick: int, elapsed: float, final: bool = False) -> dict[str, Any]:
    snap: dict[str, Any] = {k: getattr(stats, k) for k in SNAPSHOT_COUNTS}
    snap.update(
        tick=tick,
        elapsed=elapsed,
        final=final,
        errors=sum(stats.errors.values()),
        window={key: h.to_state() for key, h in stats.take_window().items()},
    )
    return snap


async def _run(job: _Job, emit: Callable[[dict[str, Any]], None]) -> tuple[Stats, float]:
    """Run until `duration` is over and in-flight sessions ended (at most rc.timeout more)."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    scenario = BY_NAME[job.rc.scenario]
    start = loop.time()
    users = job.users
    rc = replace(job.rc, deadline=start + job.duration, clients=len(users))
    tasks: set[asyncio.Task[None]] = set()

    async def client(user: str, password: str, delay: float) -> None:
        await asyncio.sleep(delay)
        while loop.time() < rc.deadline:
            errors = sum(stats.errors.values())
            await one_session(scenario, stats, rc, user, password)
            if sum(stats.errors.values()) > errors:
                await asyncio.sleep(0.05)  # a failing server must not turn the generator into a busy loop

    async def arrivals(rate: float) -> None:
        free = deque(users)  # round robin: every user gets sessions, not only the last one freed
        waiting: deque[float] = deque()  # due times of arrivals that found every client busy
        interval = 1.0 / rate
        t0 = time.perf_counter()  # the schedule's clock is the one latencies are measured with

        def begin(user: tuple[str, str], due: float) -> None:
            stats.record("start-lag", time.perf_counter() - due)
            t = loop.create_task(one(user, due))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        async def one(user: tuple[str, str], due: float) -> None:
            try:
                await one_session(scenario, stats, rc, *user, scheduled=due)
            finally:
                if waiting and loop.time() < rc.deadline:  # the oldest waiting arrival takes this client
                    stats.late += 1
                    begin(user, waiting.popleft())
                else:
                    free.append(user)

        for k in range(max(1, round(job.duration * rate))):  # exactly duration x rate arrivals
            due = t0 + k * interval
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            stats.arrivals += 1
            if free:
                begin(free.popleft(), due)
            else:
                waiting.append(due)
        await asyncio.sleep(max(0.0, rc.deadline - loop.time()))  # waiting arrivals may still start until then
        stats.not_started += len(waiting)
        waiting.clear()

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(max(0.0, start + (ticks + 1) * job.tick - loop.time()))
            ticks += 1
            emit(_snapshot(stats, ticks, loop.time() - start))

    tick = loop.create_task(ticker())
    if job.rate is None:
        main = [loop.create_task(client(u, p, i * job.ramp / len(users))) for i, (u, p) in enumerate(users)]
    else:
        main = [loop.create_task(arrivals(job.rate))]
    await asyncio.wait(main)
    if tasks:
        _done, pending = await asyncio.wait(set(tasks), timeout=rc.timeout)
        stats.unfinished += len(pending)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
    tick.cancel()
    elapsed = loop.time() - start
    emit(_snapshot(stats, ticks + 1, elapsed, final=True))
    return stats, elapsed


def _quiet_gc() -> None:
    """The run allocates futures and replies by the million and frees them by reference counting; the
    cyclic collector walking the generator's long-lived objects at every few hundred allocations was a
    tenth of its CPU time. Freeze what exists and collect the young generation rarely."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, 50, 100)


def _run_loop(job: _Job, emit: Callable[[dict[str, Any]], None]) -> tuple[Stats, float]:
    if job.rc.tls:
        job = replace(job, rc=replace(job.rc, ssl_context=client_context(job.cafile)))
    _quiet_gc()
    try:
        import uvloop

        return uvloop.run(_run(job, emit))
    except ImportError:  # pragma: no cover
        return asyncio.run(_run(job, emit))


def _child(conn: Connection, job: _Job) -> None:
    raise_nofile()
    stats, elapsed = _run_loop(job, lambda snap: conn.send(("progress", snap)))
    conn.send(("result", (stats.to_state(), elapsed)))
    conn.close()


class Ticks:
    """Merges the k-th snapshot of every generator process into one, in tick order.

    Counters are cumulative (a process that finished counts with its last snapshot); `window` holds the
    latencies recorded during tick k only, merged into Histograms.
    """

    def __init__(self, procs: int, progress: Progress | None) -> None:
        self.procs = procs
        self.progress = progress
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}
        self.last: dict[int, dict[str, Any]] = {}
        self.finished: set[int] = set()
        self.next = 1

    def add(self, proc: int, snap: dict[str, Any]) -> None:
        self.pending.setdefault(snap["tick"], {})[proc] = snap
        self._flush()

    def finish(self, proc: int) -> None:
        self.finished.add(proc)
        self._flush()

    def _flush(self) -> None:
        while self.next in self.pending:
            group = self.pending[self.next]
            if any(p not in group and p not in self.finished for p in range(self.procs)):
                return
            del self.pending[self.next]
            self.next += 1
            self.last.update(group)
            merged: dict[str, Any] = {k: 0 for k in (*SNAPSHOT_COUNTS, "errors")}
            for snap in self.last.values():
                for k in merged:
                    merged[k] += snap[k]
            window: dict[str, Histogram] = {}
            for snap in group.values():
                for key, state in snap["window"].items():
                    window.setdefault(key, Histogram()).merge(Histogram.from_state(state))
            merged.update(
                tick=self.next - 1,
                elapsed=max(s["elapsed"] for s in group.values()),
                final=all(s["final"] for s in group.values()),
                window=window,
            )
            if self.progress is not None:
                self.progress(merged)


def run(plan: Plan, progress: Progress | None = None) -> tuple[Stats, float]:
    """Run the plan; returns merged Stats and the wall-clock seconds until the last process finished.

    `progress` receives merged snapshots every `plan.interval` seconds (half a second without one): the
    cumulative counters (sessions, logins, messages, octets, errors, held, arrivals, late, not_started),
    `elapsed`, the tick number, and `window`, the latencies recorded during that tick. The last one,
    `final`, covers the end of the run (in-flight sessions finishing).
    """
    check(plan)
    raise_nofile()
    users = plan.users[: plan.concurrency]
    tick = plan.interval or _TICK
    ticks = Ticks(plan.procs, progress)
    if plan.procs == 1:
        job = _Job(plan.rc, users, plan.duration, plan.rate, plan.cafile, plan.ramp, tick)
        return _run_loop(job, lambda snap: ticks.add(0, snap))
    # fork is fast, but unsafe from a process with other threads (a test harness): spawn there
    ctx = multiprocessing.get_context("fork") if threading.active_count() == 1 else multiprocessing.get_context("spawn")
    rate = plan.rate / plan.procs if plan.rate is not None else None
    pipes: list[Connection] = []
    procs = []
    for i in range(plan.procs):
        r, w = ctx.Pipe(duplex=False)
        job = _Job(plan.rc, users[i :: plan.procs], plan.duration, rate, plan.cafile, plan.ramp, tick)
        p = ctx.Process(target=_child, args=(w, job), daemon=True)
        p.start()
        w.close()
        pipes.append(r)
        procs.append(p)
    start = time.monotonic()
    total = Stats()
    elapsed = 0.0
    got_result: set[int] = set()
    open_pipes = {id(r): i for i, r in enumerate(pipes)}
    while open_pipes:
        for ready in wait([p for p in pipes if id(p) in open_pipes], timeout=1.0):
            r = cast(Connection, ready)
            i = open_pipes[id(r)]
            try:
                kind, payload = r.recv()
            except EOFError:
                del open_pipes[id(r)]
                if i not in got_result:
                    total.errors["generator process died"] += 1
                ticks.finish(i)
                continue
            if kind == "progress":
                ticks.add(i, payload)
            else:
                state, child_elapsed = payload
                total.merge(state)
                elapsed = max(elapsed, child_elapsed)
                got_result.add(i)
    for p in procs:
        p.join(5)
    return total, elapsed or time.monotonic() - start


async def _left(rc: RunConfig, users: list[tuple[str, str]]) -> int | None:
    stats = Stats()
    sem = asyncio.Semaphore(50)
    counts: list[int | None] = []

    async def stat(user: str, password: str) -> None:
        async with sem:
            conn = None
            try:
                conn = await open_connection(rc, stats)
                await logins.BY_NAME[rc.login](conn, stats, rc, user, password)
                reply = await command(conn, stats, rc, b"STAT")
                counts.append(int(reply.status.split()[1]))
                await command(conn, stats, rc, b"QUIT")
            except (BenchError, IndexError, ValueError):
                counts.append(None)
            finally:
                if conn is not None and conn.transport is not None:
                    conn.transport.close()

    await asyncio.gather(*(stat(u, p) for u, p in users))
    return None if None in counts else sum(c for c in counts if c is not None)


def messages_left(plan: Plan) -> int | None:
    """STAT every user of the run once more: the messages left in their maildrops (None: some check failed)."""
    rc = plan.rc
    if rc.tls:
        rc = replace(rc, ssl_context=client_context(plan.cafile))
    return asyncio.run(_left(rc, plan.users[: plan.concurrency]))


def server_rss_kib(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (a supervisor and its workers), in KiB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return total
