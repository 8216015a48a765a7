"""Drive many benchmark sessions: closed loop (each client starts its next session when one ends) or open
loop (`--rate`: sessions arrive on a fixed schedule whether or not the server keeps up), in one or several
processes, each on its own event loop.

Each concurrent client owns distinct users (a maildrop lock is exclusive, RFC 1939 §4), so a client never
collides with another one: an `[IN-USE]` in the results is the server's doing, not the generator's.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from pop3d.bench.client import client_context
from pop3d.bench.scenarios import BY_NAME, RunConfig, Stats, one_session

Progress = Callable[[dict[str, Any]], None]
_TICK = 0.5


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


def check(plan: Plan) -> None:
    if plan.concurrency < 1 or plan.procs < 1 or plan.duration <= 0:
        raise UsageError("--concurrency and --procs must be >= 1, --duration > 0")
    if plan.rate is not None and plan.rate <= 0:
        raise UsageError("--rate must be > 0")
    if plan.ramp < 0 or plan.ramp >= plan.duration:
        raise UsageError("--ramp must be >= 0 and shorter than --duration")
    if len({u for u, _ in plan.users}) < plan.concurrency:
        raise UsageError(
            f"--concurrency {plan.concurrency} needs as many distinct users; "
            f"the users file has {len({u for u, _ in plan.users})}"
        )
    if plan.procs > plan.concurrency:
        raise UsageError("--procs cannot exceed --concurrency")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _run(
    rc: RunConfig,
    users: list[tuple[str, str]],
    duration: float,
    rate: float | None,
    progress: Progress | None,
    ramp: float = 0.0,
) -> tuple[Stats, float]:
    """Run until `duration` is over and in-flight sessions ended (at most rc.timeout more)."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    scenario = BY_NAME[rc.scenario]
    start = loop.time()
    rc = replace(rc, deadline=start + duration, clients=len(users))
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
        interval = 1.0 / rate

        async def one(user: str, password: str) -> None:
            try:
                await one_session(scenario, stats, rc, user, password)
            finally:
                free.append((user, password))

        for k in range(max(1, round(duration * rate))):  # exactly duration x rate arrivals
            await asyncio.sleep(max(0.0, start + k * interval - loop.time()))
            if free:
                t = loop.create_task(one(*free.popleft()))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            else:
                stats.errors["dropped: every user busy"] += 1

    async def ticker() -> None:
        while True:
            await asyncio.sleep(_TICK)
            if progress is not None:
                progress(_snapshot(stats, loop.time() - start))

    tick = loop.create_task(ticker())
    if rate is None:
        main = [loop.create_task(client(u, p, i * ramp / len(users))) for i, (u, p) in enumerate(users)]
    else:
        main = [loop.create_task(arrivals(rate))]
    await asyncio.wait(main)
    if tasks:
        _done, pending = await asyncio.wait(set(tasks), timeout=rc.timeout)
        stats.unfinished += len(pending)
        for t in pending:
            t.cancel()
    tick.cancel()
    return stats, loop.time() - start


def _snapshot(stats: Stats, elapsed: float) -> dict[str, Any]:
    return {
        "elapsed": elapsed,
        "sessions": stats.sessions,
        "logins": stats.logins,
        "octets": stats.octets,
        "errors": sum(stats.errors.values()),
        "held": stats.held,
    }


def _run_loop(
    rc: RunConfig,
    users: list[tuple[str, str]],
    duration: float,
    rate: float | None,
    cafile: str | None,
    progress: Progress | None,
    ramp: float = 0.0,
) -> tuple[Stats, float]:
    if rc.tls:
        rc = replace(rc, ssl_context=client_context(cafile))
    try:
        import uvloop

        return uvloop.run(_run(rc, users, duration, rate, progress, ramp))
    except ImportError:  # pragma: no cover
        return asyncio.run(_run(rc, users, duration, rate, progress, ramp))


def _child(
    conn: Connection,
    rc: RunConfig,
    users: list[tuple[str, str]],
    duration: float,
    rate: float | None,
    cafile: str | None,
    ramp: float,
) -> None:
    raise_nofile()
    stats, elapsed = _run_loop(rc, users, duration, rate, cafile, lambda snap: conn.send(("progress", snap)), ramp)
    conn.send(("result", (stats.to_state(), elapsed)))
    conn.close()


def run(plan: Plan, progress: Progress | None = None) -> tuple[Stats, float]:
    """Run the plan; returns merged Stats and the wall-clock seconds until the last process finished.

    `progress` receives aggregated snapshots (sessions, octets, errors, held, elapsed) every half second.
    """
    check(plan)
    raise_nofile()
    users = plan.users[: plan.concurrency]
    if plan.procs == 1:
        return _run_loop(plan.rc, users, plan.duration, plan.rate, plan.cafile, progress, plan.ramp)
    # fork is fast, but unsafe from a process with other threads (a test harness): spawn there
    ctx = multiprocessing.get_context("fork") if threading.active_count() == 1 else multiprocessing.get_context("spawn")
    rate = plan.rate / plan.procs if plan.rate is not None else None
    pipes: list[Connection] = []
    procs = []
    for i in range(plan.procs):
        r, w = ctx.Pipe(duplex=False)
        args = (w, plan.rc, users[i :: plan.procs], plan.duration, rate, plan.cafile, plan.ramp)
        p = ctx.Process(target=_child, args=args, daemon=True)
        p.start()
        w.close()
        pipes.append(r)
        procs.append(p)
    start = time.monotonic()
    latest: dict[int, dict[str, Any]] = {}
    total = Stats()
    elapsed = 0.0
    open_pipes = {id(r): i for i, r in enumerate(pipes)}
    while open_pipes:
        for ready in wait([p for p in pipes if id(p) in open_pipes], timeout=1.0):
            r = cast(Connection, ready)
            i = open_pipes[id(r)]
            try:
                kind, payload = r.recv()
            except EOFError:
                del open_pipes[id(r)]
                if i not in latest or "done" not in latest[i]:
                    total.errors["generator process died"] += 1
                continue
            if kind == "progress":
                latest[i] = payload
                if progress is not None:
                    progress(_merge_snapshots(latest.values(), time.monotonic() - start))
            else:
                state, child_elapsed = payload
                total.merge(state)
                elapsed = max(elapsed, child_elapsed)
                latest[i] = {**latest.get(i, {}), "done": True}
    for p in procs:
        p.join(5)
    return total, elapsed or time.monotonic() - start


def _merge_snapshots(snaps: Any, elapsed: float) -> dict[str, Any]:
    out = {"elapsed": elapsed, "sessions": 0, "logins": 0, "octets": 0, "errors": 0, "held": 0}
    for s in snaps:
        for k in ("sessions", "logins", "octets", "errors", "held"):
            out[k] += s.get(k, 0)
    return out


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
