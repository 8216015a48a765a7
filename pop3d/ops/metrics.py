"""Prometheus metrics (prometheus-client), off unless `metrics.listen` is set.

Cost on the hot path: a `perf_counter` pair and a few integer additions per command. prometheus-client's
own `inc()`/`observe()` take a lock each (≈1.7 µs per command together vs ≈0.26 µs here, measured by
benchmarks/metrics_overhead.py), so commands are counted in plain per-verb accumulators (`_VerbStats`, bound
per verb: no `labels()` lookup per command) and moved into the Prometheus instruments by `flush()`, which
the server runs from its event loop every `FLUSH_INTERVAL` seconds and at shutdown; scrapes therefore lag
by at most that long. Bytes sent are summed in the session and added at session end. With metrics off,
`ctx.metrics` is a `NullMetrics` whose `enabled` is False and the session skips the timing altogether.

Several worker processes: prometheus-client's multiprocess mode. Each process writes its samples into
mmap files named by its pid in one directory; the endpoint (served by the supervisor) sums them with
`MultiProcessCollector`. The supervisor (pop3d.runtime.shared) switches the mode on with
`enable_multiprocess(directory)` before it builds the workers' `Metrics` and forks, serves
`exposition_registry(None, directory)`, and calls `process_dead(pid, directory)` when it reaps a worker so
that worker's open-session gauge stops counting (its counters stay: they count what happened). Every
function here takes the directory as an argument; only the library itself reads PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import asyncio
import logging
import os
from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pop3d.ops.endpoint import MetricsEndpoint

log = logging.getLogger("pop3d")

#: seconds; POP3 commands range from a dict lookup (STAT) to an Argon2 check (PASS) or a 50 MiB RETR
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
FLUSH_INTERVAL = 1.0
LOGIN_RESULTS = ("ok", "failed", "in_use", "login_delay", "unavailable")
STORAGE_OPS = ("open", "read", "commit")


def enable_multiprocess(directory: str) -> None:
    """Switch prometheus-client to multiprocess mode: instruments made from now on write to `directory`.

    The library reads the directory from the environment variable PROMETHEUS_MULTIPROC_DIR, both here and
    whenever a process (re)opens its files; the caller has set it to `directory` (the supervisor does, in
    pop3d.runtime.shared). Files left by an earlier run are removed: their pids are gone and would be summed.
    """
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))
    from prometheus_client import values

    lib: Any = values  # untyped module
    lib.ValueClass = lib.get_value_class()  # chosen at import time; re-pick now that the dir is set


def process_dead(pid: int, directory: str) -> None:
    """A worker exited: drop its live gauges (sessions open) from the sum."""
    from prometheus_client import multiprocess

    lib: Any = multiprocess  # untyped module
    lib.mark_process_dead(pid, directory)


class NullMetrics:
    """Metrics off: every hook is a no-op, and `enabled` lets the session skip timing."""

    enabled = False

    def session_opened(self) -> None: ...
    def session_closed(self, sent: int) -> None: ...
    def login(self, result: str) -> None: ...
    def lock_conflict(self) -> None: ...
    def storage_error(self, op: str) -> None: ...
    def command(self, verb: str, seconds: float) -> None: ...
    def flush(self) -> None: ...
    def start_flushing(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def stop_flushing(self) -> None: ...


class _VerbStats:
    """One verb's commands since the last flush: count, latency sum, non-cumulative bucket counts."""

    __slots__ = ("buckets", "count", "counter", "hist", "total")

    def __init__(self, counter: Any, hist: Any) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.counter, self.hist = counter, hist

    def flush(self) -> None:
        if not self.count:
            return
        self.counter.inc(self.count)
        # Histogram.observe() one by one would cost what we saved; add the batch to its values instead.
        # (_sum and _buckets are prometheus-client's per-child values; tests pin the resulting series.)
        self.hist._sum.inc(self.total)
        for i, n in enumerate(self.buckets):
            if n:
                self.hist._buckets[i].inc(n)
                self.buckets[i] = 0
        self.count = 0
        self.total = 0.0


class Metrics(NullMetrics):
    """The live instruments of one process."""

    enabled = True

    def __init__(self, registry: CollectorRegistry | None = None, verbs: Iterable[str] = ()) -> None:
        """`verbs`: the command verbs to bind now (pop3d.pop3.protocol.VERBS); others are bound on first use."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # our own registry: several servers in one process (tests) must not collide in the global one
        reg = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = reg
        self.sessions_open = Gauge(
            "pop3d_sessions_open", "POP3 sessions currently connected", registry=reg, multiprocess_mode="livesum"
        )
        self.sessions_total = Counter("pop3d_sessions", "POP3 sessions accepted", registry=reg)
        self.logins = Counter("pop3d_logins", "Login attempts by result", ["result"], registry=reg)
        self.auth_failures = Counter(
            "pop3d_auth_failures", "Failed authentications (bad user or password)", registry=reg
        )
        self.commands = Counter("pop3d_commands", "Commands answered, by verb", ["verb"], registry=reg)
        self.latency = Histogram(
            "pop3d_command_duration_seconds",
            "Time from command to complete reply",
            ["verb"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.bytes_sent = Counter("pop3d_sent_bytes", "Octets sent to clients (added at session end)", registry=reg)
        self.lock_conflicts = Counter(
            "pop3d_lock_conflicts", "Logins refused because the maildrop was locked", registry=reg
        )
        self.storage_errors = Counter(
            "pop3d_storage_errors", "Storage failures by operation", ["operation"], registry=reg
        )
        # bind label children once: the per-event cost is then one dict get at most
        self._logins = {r: self.logins.labels(r) for r in LOGIN_RESULTS}
        self._storage = {op: self.storage_errors.labels(op) for op in STORAGE_OPS}
        self._verbs: dict[str, _VerbStats] = {}
        self._timer: asyncio.TimerHandle | None = None
        for v in verbs:
            self.verb(v)

    def session_opened(self) -> None:
        self.sessions_open.inc()
        self.sessions_total.inc()

    def session_closed(self, sent: int) -> None:
        self.sessions_open.dec()
        if sent:
            self.bytes_sent.inc(sent)

    def login(self, result: str) -> None:
        self._logins[result].inc()
        if result == "failed":
            self.auth_failures.inc()

    def lock_conflict(self) -> None:
        self.lock_conflicts.inc()

    def storage_error(self, op: str) -> None:
        self._storage[op].inc()

    def verb(self, verb: str) -> _VerbStats:
        """A verb's accumulator; extensions' verbs (AUTH, STLS) are bound on first use."""
        stats = self._verbs.get(verb)
        if stats is None:
            stats = self._verbs[verb] = _VerbStats(self.commands.labels(verb), self.latency.labels(verb))
        return stats

    def command(self, verb: str, seconds: float) -> None:
        stats = self._verbs.get(verb) or self.verb(verb)
        stats.count += 1
        stats.total += seconds
        stats.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # first bound >= seconds, as observe()

    def flush(self) -> None:
        """Move the accumulated command counts and latencies into the Prometheus instruments."""
        for stats in self._verbs.values():
            stats.flush()

    def start_flushing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every FLUSH_INTERVAL seconds from `loop` (the thread that accumulates: no locking needed)."""

        def tick() -> None:
            self.flush()
            self._timer = loop.call_later(FLUSH_INTERVAL, tick)

        self._timer = loop.call_later(FLUSH_INTERVAL, tick)

    def stop_flushing(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()


def exposition_registry(own: CollectorRegistry | None, directory: str | None = None) -> CollectorRegistry:
    """What the endpoint serves: with a multiprocess `directory` the sum over every process's files there,
    else the instruments of this process (`own`)."""
    if directory is not None:
        from prometheus_client import CollectorRegistry, multiprocess

        reg = CollectorRegistry()
        lib: Any = multiprocess  # untyped module
        lib.MultiProcessCollector(reg, directory)
        return reg
    if own is None:
        raise ValueError("no registry to expose: pass this process's registry or a multiprocess directory")
    return own


def build(listen: str | None, verbs: Iterable[str] = ()) -> NullMetrics:
    """Live instruments when `metrics.listen` is set, else the no-op stand-in."""
    return Metrics(verbs=verbs) if listen else NullMetrics()


def start_endpoint(
    listen: str, registry: CollectorRegistry, idle_timeout: float | None = None, max_connections: int | None = None
) -> MetricsEndpoint:
    """Bind `listen` ("host:port") and serve GET /metrics from one thread (pop3d.ops.endpoint).

    A server that drops root binds first (`MetricsEndpoint.bind`) and starts serving after the drop."""
    from pop3d.ops.endpoint import IDLE_TIMEOUT, MAX_CONNECTIONS, MetricsEndpoint

    endpoint = MetricsEndpoint.bind(
        listen,
        IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
        MAX_CONNECTIONS if max_connections is None else max_connections,
    )
    endpoint.start(registry)
    return endpoint
