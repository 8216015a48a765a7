"""What a generator process measures, in a form that merges across processes (`to_state` / `merge`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from pop3d.bench.hist import Histogram

#: latency keys in the order a session meets them; a command answered `-ERR` counts as `KEY-failed` instead
LATENCY_KEYS: Final[tuple[str, ...]] = (
    "start-lag",  # open loop: scheduled arrival -> the generator starts it (a busy generator or no free client)
    "connect",  # connect + greeting; open loop: from the scheduled arrival
    "STLS",
    "USER",
    "PASS",
    "APOP",
    "AUTH",  # a whole SASL exchange, first line to the final +OK
    "STAT",
    "LIST",
    "TOP",
    "UIDL",
    "RETR",
    "DELE",
    "NOOP-ramp",
    "NOOP",
    "QUIT",
    "session",  # a whole successful session, start (open loop: scheduled arrival) to the +OK of QUIT
)
_COUNTS: Final = ("sessions", "logins", "messages", "octets", "received", "held_max", "unfinished", "tls_resumed")
_OPEN_LOOP: Final = ("arrivals", "late", "not_started")


@dataclass
class Stats:
    """What one generator process measured; merged across processes by `merge`."""

    sessions: int = 0
    logins: int = 0
    messages: int = 0
    octets: int = 0
    received: int = 0
    held: int = 0  # idle: sessions logged in right now
    held_max: int = 0
    unfinished: int = 0  # sessions still running when the run ended (neither counted nor errors)
    tls_resumed: int = 0  # TLS handshakes that resumed an earlier session (--resume)
    arrivals: int = 0  # open loop: sessions the schedule asked for
    late: int = 0  # open loop: arrivals that started late because every client (user) had a session open
    not_started: int = 0  # open loop: arrivals still waiting for a free client when the run ended
    errors: Counter[str] = field(default_factory=Counter)
    latency: dict[str, Histogram] = field(default_factory=dict)
    window: dict[str, Histogram] = field(default_factory=dict)  # since the last interval line

    def hist(self, key: str) -> Histogram:
        h = self.latency.get(key)
        if h is None:
            h = self.latency[key] = Histogram()
        return h

    def record(self, key: str, seconds: float) -> None:
        self.hist(key).add(seconds)
        w = self.window.get(key)
        if w is None:
            w = self.window[key] = Histogram()
        w.add(seconds)

    def take_window(self) -> dict[str, Histogram]:
        """The latencies recorded since the previous call."""
        w, self.window = self.window, {}
        return w

    def to_state(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in (*_COUNTS, *_OPEN_LOOP)}
        d["errors"] = dict(self.errors)
        d["latency"] = {key: h.to_state() for key, h in self.latency.items()}
        return d

    def merge(self, state: dict[str, Any]) -> None:
        for k in (*_COUNTS, *_OPEN_LOOP):
            setattr(self, k, getattr(self, k) + state.get(k, 0))
        self.errors.update(state["errors"])
        for key, h in state["latency"].items():
            self.hist(key).merge(Histogram.from_state(h))
