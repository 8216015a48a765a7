"""Prometheus metrics, off unless `metrics.listen` is set.

The counting is pop3d's own; prometheus-client only renders it (custom collectors yielding metric
families, its documented extension point) and serves nothing it has to patch.

Cost on the hot path: a `perf_counter` pair and a few integer additions per command, no lock (prometheus-
client's `inc()`/`observe()` take one each: ≈1.1 µs per command together vs ≈0.2 µs here, measured by
benchmarks/metrics_overhead.py). Commands are counted in plain per-verb accumulators (`_VerbStats`, bound
per verb: no label lookup per command) and folded into the published totals by `flush()`, which the server
runs from its event loop every `FLUSH_INTERVAL` seconds and at shutdown; command counts and the
histograms therefore lag by at most that long. Session, login and TLS counters are plain integers read
live. With metrics off, `ctx.metrics` is a `NullMetrics` whose `enabled` is False and the session skips
the timing altogether.

Several worker processes: every worker writes its totals, at each flush that changed something, to one
small JSON file in a directory its supervisor made (`<pid>-<token>.json`, replaced atomically). The
supervisor's endpoint sums the files (`exposition_registry(None, directory)`); when it reaps a worker,
`process_dead` moves that worker's totals into `retired.json` (without its open sessions: they are gone),
so counters never go back. A worker killed with SIGKILL loses what it counted since its last flush.

Process metrics (CPU, memory, descriptors) come from prometheus-client's `ProcessCollector`, which reads
/proc for any pid: the endpoint reports its own process and every live worker, labelled by `role` and `pid`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import ssl
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pop3d import __version__

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

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
#: seconds from connect to close: health checks and failed logins (< 1 s) to long idle sessions
SESSION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
FLUSH_INTERVAL = 1.0
LOGIN_RESULTS = ("ok", "failed", "in_use", "login_delay", "unavailable")
STORAGE_OPS = ("open", "read", "commit")
TLS_RESULTS = ("ok", "failed")
RETIRED = "retired.json"

#: a snapshot of one process's totals, as written to its file (JSON types only):
#: scalars, {label: count} maps, and histograms as [non-cumulative bucket counts..., +Inf count, sum]
Totals = dict[str, Any]


class NullMetrics:
    """Metrics off: every hook is a no-op, and `enabled` lets the session skip timing."""

    enabled = False

    def session_opened(self) -> None: ...
    def session_closed(self, sent: int, seconds: float, retrieved: int, deleted: int) -> None: ...
    def login(self, result: str) -> None: ...
    def auth_cache_hit(self) -> None: ...
    def lock_conflict(self) -> None: ...
    def storage_error(self, op: str) -> None: ...
    def tls_handshake(self, ok: bool) -> None: ...
    def command(self, verb: str, seconds: float) -> None: ...
    def flush(self) -> None: ...
    def start_flushing(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def stop_flushing(self) -> None: ...


class _VerbStats:
    """One verb's commands since the last flush: count, latency sum, non-cumulative bucket counts."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self, bounds: int) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (bounds + 1)  # the last one is +Inf

    def drain_into(self, published: list[float]) -> list[float]:
        """`published` plus what was counted since; resets the accumulator."""
        out = [a + b for a, b in zip(published[:-1], self.buckets, strict=True)]
        out.append(published[-1] + self.total)
        self.buckets = [0] * len(self.buckets)
        self.count = 0
        self.total = 0.0
        return out


def _empty_hist(bounds: tuple[float, ...]) -> list[float]:
    return [0] * (len(bounds) + 1) + [0.0]


class Metrics(NullMetrics):
    """The counters of one process: plain numbers, written by its event loop only."""

    enabled = True

    def __init__(self, verbs: Iterable[str] = (), directory: str | None = None) -> None:
        """`verbs`: the command verbs to bind now (pop3d.pop3.protocol.VERBS); others are bound on first use.
        `directory`: where this process writes its totals for a supervisor to sum (None: one process)."""
        self.directory = directory
        self.sessions_open = 0
        self.sessions = 0
        self.sent_bytes = 0
        self.retrieved = 0
        self.deleted = 0
        self.auth_failures = 0
        self.auth_cache_hits = 0
        self.lock_conflicts = 0
        self.logins = dict.fromkeys(LOGIN_RESULTS, 0)
        self.storage_errors = dict.fromkeys(STORAGE_OPS, 0)
        self.tls_handshakes = dict.fromkeys(TLS_RESULTS, 0)
        self._verbs: dict[str, _VerbStats] = {}
        self._sessions = _VerbStats(len(SESSION_BUCKETS))  # session durations since the last flush
        # what flush() published: replaced as a whole, so a scrape from another thread sees one consistent state
        self._commands: dict[str, list[float]] = {}
        self._durations: list[float] = _empty_hist(SESSION_BUCKETS)
        self._timer: asyncio.Handle | None = None
        self._file: str | None = None  # this process's file in `directory` (named after the fork)
        self._written: Totals | None = None
        self._registry: CollectorRegistry | None = None
        for v in verbs:
            self.verb(v)
        self._commands = {v: _empty_hist(LATENCY_BUCKETS) for v in self._verbs}

    # -- hooks ------------------------------------------------------------------------------------

    def session_opened(self) -> None:
        self.sessions_open += 1
        self.sessions += 1

    def session_closed(self, sent: int, seconds: float, retrieved: int, deleted: int) -> None:
        """Once per session: octets sent, how long it lasted, messages retrieved (RETR) and deleted at UPDATE."""
        self.sessions_open -= 1
        self.sent_bytes += sent
        self.retrieved += retrieved
        self.deleted += deleted
        s = self._sessions
        s.count += 1
        s.total += seconds
        s.buckets[bisect_left(SESSION_BUCKETS, seconds)] += 1

    def login(self, result: str) -> None:
        self.logins[result] += 1
        if result == "failed":
            self.auth_failures += 1

    def auth_cache_hit(self) -> None:
        """A password found right in the verified-credentials cache (pop3d.auth.cred_cache): no hash run."""
        self.auth_cache_hits += 1

    def lock_conflict(self) -> None:
        self.lock_conflicts += 1

    def storage_error(self, op: str) -> None:
        self.storage_errors[op] += 1

    def tls_handshake(self, ok: bool) -> None:
        self.tls_handshakes["ok" if ok else "failed"] += 1

    def verb(self, verb: str) -> _VerbStats:
        """A verb's accumulator; extensions' verbs (AUTH, STLS) are bound on first use."""
        stats = self._verbs.get(verb)
        if stats is None:
            stats = self._verbs[verb] = _VerbStats(len(LATENCY_BUCKETS))
        return stats

    def command(self, verb: str, seconds: float) -> None:
        stats = self._verbs.get(verb) or self.verb(verb)
        stats.count += 1
        stats.total += seconds
        stats.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # first bound >= seconds, as observe()

    # -- publishing -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Fold the accumulated commands and session durations into the published totals; with a directory,
        write them to this process's file if anything changed."""
        pending = [(v, s) for v, s in self._verbs.items() if s.count or v not in self._commands]
        if pending:
            commands = dict(self._commands)
            for verb, stats in pending:
                commands[verb] = stats.drain_into(commands.get(verb) or _empty_hist(LATENCY_BUCKETS))
            self._commands = commands
        if self._sessions.count:
            self._durations = self._sessions.drain_into(self._durations)
        if self.directory is not None:
            self._write()

    def totals(self) -> Totals:
        """This process's totals now (commands and durations as of the last flush)."""
        return {
            "sessions_open": self.sessions_open,
            "sessions": self.sessions,
            "sent_bytes": self.sent_bytes,
            "retrieved": self.retrieved,
            "deleted": self.deleted,
            "auth_failures": self.auth_failures,
            "auth_cache_hits": self.auth_cache_hits,
            "lock_conflicts": self.lock_conflicts,
            "logins": dict(self.logins),
            "storage_errors": dict(self.storage_errors),
            "tls_handshakes": dict(self.tls_handshakes),
            "commands": self._commands,
            "session_duration": self._durations,
        }

    def _write(self) -> None:
        assert self.directory is not None
        snapshot = self.totals()
        if snapshot == self._written:
            return
        pid = os.getpid()
        if self._file is None or not os.path.basename(self._file).startswith(f"{pid}-"):
            # a token besides the pid: a pid reused within one run must not be taken for a retired worker
            self._file = os.path.join(self.directory, f"{pid}-{secrets.token_hex(4)}.json")
        try:
            _write_json(self._file, snapshot)
        except OSError as exc:  # a full or vanished directory costs the metrics, never the session
            log.warning("metrics: cannot write %s: %s", self._file, exc)
            return
        self._written = snapshot

    def start_flushing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every FLUSH_INTERVAL seconds from `loop` (the thread that counts: no locking needed); the
        first right away, so a worker's file (and its process metrics) exist from its start."""

        def tick() -> None:
            self.flush()
            self._timer = loop.call_later(FLUSH_INTERVAL, tick)

        self._timer = loop.call_soon(tick)

    def stop_flushing(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    @property
    def registry(self) -> CollectorRegistry:
        """A registry holding this process's pop3d_* series (tests read it; the endpoint uses
        `exposition_registry`, which adds the build and process metrics)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_TotalsCollector(self.totals))
        return self._registry


def _write_json(path: str, data: object) -> None:
    """Replace `path` atomically: a reader sees the old content or the new, never half of it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _add(a: Any, b: Any) -> Any:
    """Sum two totals of the same shape: numbers, lists element by element, maps key by key."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    if isinstance(a, list) and isinstance(b, list):
        return [x + y for x, y in zip(a, b, strict=False)]
    return a + b


def count_handshakes(context: ssl.SSLContext, metrics: NullMetrics) -> None:
    """Count the handshakes of an implicit-TLS listener's `context`.

    asyncio (and uvloop) run that handshake before any session exists, and a failed one never reaches
    pop3d's code; `SSLContext.sslobject_class` (the documented hook for what `wrap_bio` returns) sees it.
    Counts TLS-level outcomes; a client that goes silent mid-handshake is cut by `tls.handshake_timeout`
    and counted by neither. STLS handshakes are counted by the session itself.
    """
    if not metrics.enabled:
        return

    class CountedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError:
                metrics.tls_handshake(False)
                raise
            metrics.tls_handshake(True)

    context.sslobject_class = CountedSSLObject


# -- exposition ----------------------------------------------------------------------------------


def _add_histogram(family: Any, bounds: tuple[float, ...], values: list[float], labels: list[str]) -> None:
    from prometheus_client import utils

    lib: Any = utils  # untyped module; its `le` spelling is what Histogram.observe() series use
    cumulative, acc = [], 0.0
    for bound, n in zip([*bounds, float("inf")], values[:-1], strict=True):
        acc += n
        cumulative.append((lib.floatToGoString(bound), acc))
    family.add_metric(labels, cumulative, values[-1])


def families(t: Totals) -> list[Metric]:
    """The pop3d_* metric families of `t` (one process's totals, or their sum)."""
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    def counter(name: str, doc: str, value: float) -> Metric:
        return CounterMetricFamily(name, doc, value=value)

    def labelled(name: str, doc: str, label: str, values: dict[str, float]) -> Metric:
        fam = CounterMetricFamily(name, doc, labels=[label])
        for k, v in values.items():
            fam.add_metric([k], v)
        return fam

    out: list[Metric] = [
        GaugeMetricFamily("pop3d_sessions_open", "POP3 sessions currently connected", value=t["sessions_open"]),
        counter("pop3d_sessions", "POP3 sessions accepted", t["sessions"]),
        labelled("pop3d_logins", "Login attempts by result", "result", t["logins"]),
        counter("pop3d_auth_failures", "Failed authentications (bad user or password)", t["auth_failures"]),
        counter(
            "pop3d_auth_cache_hits",
            "Passwords found right in the verified-credentials cache (no hash computed)",
            t.get("auth_cache_hits", 0),
        ),
        counter("pop3d_lock_conflicts", "Logins refused because the maildrop was locked", t["lock_conflicts"]),
        labelled("pop3d_storage_errors", "Storage failures by operation", "operation", t["storage_errors"]),
        labelled(
            "pop3d_tls_handshakes", "TLS handshakes (STLS, implicit TLS) by result", "result", t["tls_handshakes"]
        ),
        counter("pop3d_sent_bytes", "Octets sent to clients (added at session end)", t["sent_bytes"]),
        counter("pop3d_messages_retrieved", "Messages sent by RETR (added at session end)", t["retrieved"]),
        counter("pop3d_messages_deleted", "Messages removed at UPDATE (added at session end)", t["deleted"]),
    ]
    commands = CounterMetricFamily("pop3d_commands", "Commands answered, by verb", labels=["verb"])
    latency = HistogramMetricFamily(
        "pop3d_command_duration_seconds", "Time from command to complete reply", labels=["verb"]
    )
    for verb, values in sorted(t["commands"].items()):
        commands.add_metric([verb], sum(values[:-1]))
        _add_histogram(latency, LATENCY_BUCKETS, values, [verb])
    durations = HistogramMetricFamily("pop3d_session_duration_seconds", "Time from connect to close")
    _add_histogram(durations, SESSION_BUCKETS, t["session_duration"], [])
    return [*out, commands, latency, durations]


def empty_totals() -> Totals:
    return Metrics().totals()


class _TotalsCollector:
    """prometheus-client collector over a function returning totals."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from families(self._source())


class _DirectoryTotals:
    """The sum of the totals files in a supervisor's directory (see the module docstring)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def live_files(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return [n for n in names if n.endswith(".json") and n[0].isdigit()]

    def __call__(self) -> Totals:
        # Live files first, then the retired ones: a worker retired meanwhile is then either read in its own
        # file and dropped as retired, or missing from the listing and counted once in retired.json.
        live = {name: _read_json(os.path.join(self.directory, name)) for name in self.live_files()}
        retired = _read_json(os.path.join(self.directory, RETIRED)) or {"files": [], "totals": empty_totals()}
        total: Totals = retired["totals"]
        gone = set(retired["files"])
        for name, t in live.items():
            if t is not None and name not in gone:
                total = _add(total, t)
        return total


def process_dead(pid: int, directory: str) -> None:
    """The supervisor reaped worker `pid`: its counts move to retired.json (its open sessions are gone, its
    counters stay), in an order a concurrent scrape cannot count twice or miss (see `_DirectoryTotals`)."""
    prefix = f"{pid}-"
    try:
        names = os.listdir(directory)
    except OSError as exc:  # the supervisor must go on supervising
        log.warning("metrics: cannot read %s: %s", directory, exc)
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".json")):
            continue
        path = os.path.join(directory, name)
        t = _read_json(path)
        retired = _read_json(os.path.join(directory, RETIRED)) or {"files": [], "totals": empty_totals()}
        if t is not None:
            t["sessions_open"] = 0
            retired["totals"] = _add(retired["totals"], t)
        retired["files"].append(name)
        try:
            _write_json(os.path.join(directory, RETIRED), retired)
            os.unlink(path)
        except OSError as exc:
            log.warning("metrics: cannot retire %s: %s", path, exc)


def prepare_directory(directory: str) -> None:
    """Make the supervisor's directory and empty it: files of an earlier run would be summed."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith((".json", ".tmp", ".db")):
            os.unlink(os.path.join(directory, name))


class _BuildInfo:
    def collect(self) -> Iterator[Metric]:
        import platform

        from prometheus_client.metrics_core import GaugeMetricFamily

        fam = GaugeMetricFamily(
            "pop3d_build_info", "pop3d version and Python it runs on (always 1)", labels=["version", "python"]
        )
        fam.add_metric([__version__, platform.python_version()], 1)
        yield fam


class _Processes:
    """CPU, memory and descriptors of each process from /proc (prometheus-client's ProcessCollector, one per
    pid), as one family per metric labelled `role` and `pid`."""

    def __init__(self, pids: Any) -> None:
        self._pids = pids  # () -> [(role, pid)]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import ProcessCollector
        from prometheus_client.metrics_core import Metric

        merged: dict[str, Metric] = {}
        for role, pid in self._pids():
            for fam in ProcessCollector(pid=_constant(pid), registry=None).collect():
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "role": role, "pid": str(pid)}, s.value)
        yield from merged.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def exposition_registry(own: Metrics | None, directory: str | None = None) -> CollectorRegistry:
    """What the endpoint serves: the pop3d_* series (with a multiprocess `directory`, the sum over every
    worker's file there, else this process's `own`), `pop3d_build_info`, and process metrics."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    me = os.getpid()
    if directory is not None:
        summed = _DirectoryTotals(directory)
        reg.register(_TotalsCollector(summed))

        def pids() -> list[tuple[str, int]]:
            workers = sorted({int(n.split("-", 1)[0]) for n in summed.live_files()})
            return [("supervisor", me)] + [("worker", p) for p in workers]

        reg.register(_Processes(pids))
    elif own is not None:
        reg.register(_TotalsCollector(own.totals))
        reg.register(_Processes(lambda: [("main", os.getpid())]))
    else:
        raise ValueError("nothing to expose: pass this process's Metrics or a multiprocess directory")
    reg.register(_BuildInfo())
    return reg


def build(listen: str | None, verbs: Iterable[str] = (), directory: str | None = None) -> NullMetrics:
    """Live counters when `metrics.listen` is set, else the no-op stand-in. `directory`: see `Metrics`."""
    return Metrics(verbs, directory) if listen else NullMetrics()


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
