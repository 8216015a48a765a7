"""A log-bucketed latency histogram: fixed memory however long the run, mergeable across processes.

Buckets are 1/64 of a power of two wide (about 1.1 % relative error), from 1 µs up; percentiles report the
bucket's upper bound, so they never flatter the server. min, max, count and sum are exact.
"""

from __future__ import annotations

import math
from typing import Any

_SUB = 64  # buckets per power of two


class Histogram:
    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    @staticmethod
    def bucket(seconds: float) -> int:
        us = seconds * 1e6
        return 0 if us <= 1.0 else math.ceil(math.log2(us) * _SUB)

    @staticmethod
    def upper(bucket: int) -> float:
        """Upper bound of a bucket, in seconds."""
        return float(2.0 ** (bucket / _SUB)) / 1e6

    def add(self, seconds: float) -> None:
        b = self.bucket(seconds)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.count += 1
        self.total += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Histogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> float:
        """The smallest bucket bound with at least p % of the samples at or below it (seconds); 0 if empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * p / 100.0))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(self.upper(b), self.max)
        return self.max  # pragma: no cover - rank <= count

    def summary_ms(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50": round(self.percentile(50) * 1e3, 3),
            "p95": round(self.percentile(95) * 1e3, 3),
            "p99": round(self.percentile(99) * 1e3, 3),
            "max": round(self.max * 1e3, 3),
            "mean": round(self.total / self.count * 1e3, 3) if self.count else 0.0,
        }

    def to_state(self) -> dict[str, Any]:
        return {"counts": self.counts, "count": self.count, "total": self.total, "min": self.min, "max": self.max}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Histogram:
        h = cls()
        h.counts = {int(k): v for k, v in state["counts"].items()}
        h.count, h.total, h.min, h.max = state["count"], state["total"], state["min"], state["max"]
        return h
