"""Results: a live progress line for a terminal, a table for people, one JSON object for scripts."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from pop3d.bench.scenarios import Stats

#: commands in the order a session sends them, for the table
_ORDER = ("connect", "STLS", "USER", "PASS", "STAT", "UIDL", "RETR", "DELE", "NOOP-ramp", "NOOP", "QUIT")


def result(stats: Stats, elapsed: float, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON object: meta (scenario, target, …) plus rates over the whole elapsed time."""
    elapsed = max(elapsed, 1e-9)
    verbs = sorted(stats.latency, key=lambda v: (_ORDER.index(v) if v in _ORDER else len(_ORDER), v))
    return {
        **meta,
        "elapsed_s": round(elapsed, 3),
        "sessions": stats.sessions,
        "sessions_per_s": round(stats.sessions / elapsed, 1),
        "logins": stats.logins,
        "messages": stats.messages,
        "messages_per_s": round(stats.messages / elapsed, 1),
        "octets": stats.octets,
        "mb_per_s": round(stats.octets / elapsed / 1e6, 3),
        "received_mb_per_s": round(stats.received / elapsed / 1e6, 3),
        "held_max": stats.held_max,
        "unfinished": stats.unfinished,
        "errors_total": sum(stats.errors.values()),
        "errors": dict(sorted(stats.errors.items())),
        "latency_ms": {v: stats.latency[v].summary_ms() for v in verbs},
    }


def table(r: dict[str, Any], out: TextIO = sys.stdout) -> None:
    w = out.write
    w(
        f"pop3d bench {r['scenario']} against {r['target']}: concurrency {r['concurrency']}, "
        f"{r['procs']} process(es), {r['duration_s']} s"
        + (f", rate {r['rate']}/s" if r.get("rate") else "")
        + (f", {r['tls']}" if r.get("tls") else "")
        + "\n"
    )
    w(f"  elapsed      {r['elapsed_s']:.2f} s\n")
    w(f"  sessions     {r['sessions']:>10}   {r['sessions_per_s']:>10.1f} /s   (logins {r['logins']})\n")
    w(f"  messages     {r['messages']:>10}   {r['messages_per_s']:>10.1f} /s\n")
    w(f"  RETR data    {r['octets'] / 1e6:>10.1f} MB {r['mb_per_s']:>10.2f} MB/s\n")
    if r["held_max"]:
        w(f"  held         {r['held_max']:>10}   sessions logged in at once (max)\n")
    if "server_memory" in r:
        m = r["server_memory"]
        w(
            f"  server RSS   {m['baseline_kib']} KiB idle, {m['peak_kib']} KiB with {m['sessions']} sessions: "
            f"{m['kib_per_session']:.2f} KiB per session\n"
        )
    if r["unfinished"]:
        w(f"  unfinished   {r['unfinished']:>10}   (still running at the end; not counted)\n")
    w(f"  errors       {r['errors_total']:>10}\n")
    for kind, n in r["errors"].items():
        w(f"    {n:>10}  {kind}\n")
    w(f"\n  {'command':<8} {'count':>9} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9}\n")
    for verb, s in r["latency_ms"].items():
        w(f"  {verb:<8} {s['count']:>9} {s['p50']:>9.2f} {s['p95']:>9.2f} {s['p99']:>9.2f} {s['max']:>9.2f}\n")


class ProgressLine:
    """`\\r`-rewritten status on stderr, only when stderr is a terminal."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self.enabled = out.isatty()
        self.last_sessions = 0
        self.last_elapsed = 0.0

    def __call__(self, snap: dict[str, Any]) -> None:
        if not self.enabled:
            return
        dt = snap["elapsed"] - self.last_elapsed
        rate = (snap["sessions"] - self.last_sessions) / dt if dt > 0 else 0.0
        self.last_sessions, self.last_elapsed = snap["sessions"], snap["elapsed"]
        self.out.write(
            f"\r{snap['elapsed']:6.1f} s  sessions {snap['sessions']:>9} ({rate:8.1f}/s)  "
            f"held {snap['held']:>6}  {snap['octets'] / 1e6:9.1f} MB  errors {snap['errors']:>6} "
        )
        self.out.flush()

    def finish(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()
