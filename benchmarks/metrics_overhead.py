"""Cost of the metrics hooks on the session hot path, all measured in the same run:

1. the per-command hook alone: prometheus-client's `inc()` + `observe()` on pre-bound children (the
   obvious design, as a baseline) vs pop3d's accumulate-then-flush `Metrics.command()`;
2. pipelined commands through a real Pop3Session on a fake transport (no sockets), metrics off vs on.

    python benchmarks/metrics_overhead.py [--commands 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pop3d.config import load_settings
from pop3d.ops.metrics import Metrics, NullMetrics
from pop3d.pop3.session import Pop3Session
from pop3d.runtime.server import build_context


class Sink:
    """Just enough of a transport: counts what is written."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None: ...
    def abort(self) -> None: ...


async def one_round(ctx: Any, commands: int) -> float:
    session = Pop3Session(ctx)
    session.connection_made(Sink())
    # RFC 2449 pipelining: 50 commands per segment, as a pipelining client sends them; all synchronous
    segment = b"CAPA\r\nUSER alice\r\n" * 25
    t0 = time.perf_counter()
    for _ in range(commands // 50):
        session.data_received(segment)
    elapsed = time.perf_counter() - t0
    ctx.sessions.discard(session)
    return elapsed / commands * 1e9


def hooks(n: int) -> tuple[float, float]:
    """ns per command: direct prometheus-client calls vs Metrics.command (+ its share of the flush)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from pop3d.ops.metrics import LATENCY_BUCKETS

    m = Metrics()
    reg = CollectorRegistry()
    counter = Counter("c", "baseline", ["verb"], registry=reg).labels("STAT")
    hist = Histogram("h", "baseline", ["verb"], buckets=LATENCY_BUCKETS, registry=reg).labels("STAT")
    t0 = time.perf_counter()
    for _ in range(n):
        counter.inc()
        hist.observe(0.00002)
    direct = (time.perf_counter() - t0) / n * 1e9
    command = m.command
    t0 = time.perf_counter()
    for _ in range(n):
        command("STAT", 0.00002)
    m.flush()
    ours = (time.perf_counter() - t0) / n * 1e9
    return direct, ours


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "passwd").write_text("alice:{PLAIN}x\n")
        s = load_settings(
            None,
            auth={"passwd_file": f"{d}/passwd"},
            server={"hostname": "bench"},
            storage={"location": d + "/{user}"},
            session={"max_bad_commands": 10**9},
        )
        ctx = build_context(s)
        off, on = [], []
        for _ in range(a.rounds):  # interleaved, so drift hits both alike
            ctx.metrics = NullMetrics()
            off.append(await one_round(ctx, a.commands))
            ctx.metrics = Metrics()
            on.append(await one_round(ctx, a.commands))
    direct, ours = zip(*(hooks(a.commands) for _ in range(a.rounds)), strict=True)
    d, o = statistics.median(direct), statistics.median(ours)
    print(f"hook: prometheus inc+observe {d:6.0f} ns, Metrics.command {o:6.0f} ns, ratio {o / d:.2f}")
    mo, mn = statistics.median(off), statistics.median(on)
    print(f"metrics off: {mo:7.0f} ns/command (median of {a.rounds})")
    print(f"metrics on:  {mn:7.0f} ns/command")
    print(f"ratio on/off: {mn / mo:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
