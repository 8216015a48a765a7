"""Results: a live progress line for a terminal, interval lines, a table for people, one JSON object for scripts."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from pop3d.bench.hist import Histogram
from pop3d.bench.stats import LATENCY_KEYS, Stats


def _order(key: str) -> tuple[int, str]:
    """Sessions' order of commands, each `-failed` key right after its success."""
    base = key.removesuffix("-failed")
    return (LATENCY_KEYS.index(base) if base in LATENCY_KEYS else len(LATENCY_KEYS), key)


def latency_summary(hists: dict[str, Histogram]) -> dict[str, dict[str, float]]:
    return {key: hists[key].summary_ms() for key in sorted(hists, key=_order)}


def result(
    stats: Stats, elapsed: float, meta: dict[str, Any], intervals: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The JSON object: meta (scenario, target, …) plus rates over the whole elapsed time."""
    elapsed = max(elapsed, 1e-9)
    out = {
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
        "tls_resumed": stats.tls_resumed,
        "unfinished": stats.unfinished,
        "arrivals": stats.arrivals,
        "late": stats.late,
        "not_started": stats.not_started,
        "errors_total": sum(stats.errors.values()),
        "errors": dict(sorted(stats.errors.items())),
        "latency_ms": latency_summary(stats.latency),
    }
    if intervals is not None:
        out["intervals"] = intervals
    return out


def table(r: dict[str, Any], out: TextIO = sys.stdout) -> None:
    w = out.write
    w(
        f"pop3d bench {r['scenario']} against {r['target']}: concurrency {r['concurrency']}, "
        f"{r['procs']} process(es), {r['duration_s']} s"
        + (f", rate {r['rate']}/s" if r.get("rate") else "")
        + (f", {r['tls']}" if r.get("tls") else "")
        + (" (resuming sessions)" if r.get("resume") else "")
        + (f", login {r['login']}" if r.get("login", "user") != "user" else "")
        + "\n"
    )
    w(f"  elapsed      {r['elapsed_s']:.2f} s\n")
    if r.get("rate"):
        w(
            f"  arrivals     {r['arrivals']:>10}   scheduled; {r['late']} started late (every client busy), "
            f"{r['not_started']} not started (never reached the server)\n"
        )
    w(f"  sessions     {r['sessions']:>10}   {r['sessions_per_s']:>10.1f} /s   (logins {r['logins']})\n")
    w(f"  messages     {r['messages']:>10}   {r['messages_per_s']:>10.1f} /s\n")
    w(f"  data         {r['octets'] / 1e6:>10.1f} MB {r['mb_per_s']:>10.2f} MB/s\n")
    if r.get("resume"):
        w(f"  resumed      {r['tls_resumed']:>10}   TLS handshakes that resumed a session\n")
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
    if r.get("maildrops_left") is not None:
        w(f"  left         {r['maildrops_left']:>10}   messages in the maildrops after the run (STAT)\n")
    w(f"\n  {'latency':<12} {'count':>9} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9}\n")
    for key, s in r["latency_ms"].items():
        w(f"  {key:<12} {s['count']:>9} {s['p50']:>9.2f} {s['p95']:>9.2f} {s['p99']:>9.2f} {s['max']:>9.2f}\n")
    if r.get("thresholds"):
        w("\n  fail-if\n")
        for t in r["thresholds"]:
            w(f"    {'CROSSED' if t['crossed'] else 'ok':<8} {t['result']}\n")


class Intervals:
    """One line per `--interval`: what happened during it (not since the start), and its latencies."""

    def __init__(self, out: TextIO | None, idle: bool = False, open_loop: bool = False) -> None:
        self.out = out
        self.key = "NOOP" if idle else "session"
        self.open_loop = open_loop
        self.prev: dict[str, Any] = {"elapsed": 0.0}
        self.records: list[dict[str, Any]] = []

    def __call__(self, snap: dict[str, Any]) -> None:
        prev, self.prev = self.prev, snap
        span = max(snap["elapsed"] - prev["elapsed"], 1e-9)
        delta = {k: snap[k] - prev.get(k, 0) for k in ("sessions", "logins", "messages", "errors", "late")}
        if snap["final"] and not any(delta.values()) and not snap["window"]:
            return  # the run ended right on a tick: nothing left to report
        rec: dict[str, Any] = {
            "start_s": round(prev["elapsed"], 3),
            "end_s": round(snap["elapsed"], 3),
            **delta,
            "sessions_per_s": round(delta["sessions"] / span, 1),
            "not_started": snap["not_started"] - prev.get("not_started", 0),
            "held": snap["held"],
            "final": snap["final"],  # the end of the run: in-flight sessions finishing, a partial interval
            "latency_ms": latency_summary(snap["window"]),
        }
        self.records.append(rec)
        if self.out is not None:
            self.out.write(self.line(rec))
            self.out.flush()

    def line(self, rec: dict[str, Any]) -> str:
        lat = rec["latency_ms"].get(self.key)
        rate = "(run end)" if rec["final"] else f"({rec['sessions_per_s']:.1f}/s)"
        text = (
            f"{rec['start_s']:7.1f} -{rec['end_s']:7.1f} s  sessions {rec['sessions']:>7} {rate:>11}  "
            f"errors {rec['errors']:>5}"
        )
        if self.open_loop:
            text += f"  late {rec['late']:>5}  not started {rec['not_started']:>5}"
        if self.key == "NOOP":
            text += f"  held {rec['held']:>6}"
        if lat:
            text += f"  {self.key} p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} max {lat['max']:.2f} ms"
        return text + "\n"


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
