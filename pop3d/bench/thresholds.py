"""`--fail-if EXPR`: pass/fail conditions on a run's results, parsed by a small grammar (never `eval`).

    EXPR   := METRIC OP NUMBER [UNIT]
    METRIC := NAME | FUNC "(" KEY ")"
    OP     := ">" | ">=" | "<" | "<=" | "==" | "!="
    UNIT   := "ms" | "s" (latencies, required) | "%" (error_rate, optional)

NAME is a count or rate of the run (`errors`, `error_rate`, `sessions`, `sessions_per_s`, `not_started`, ...,
see `SCALARS`); FUNC is a latency statistic (`p50`, `p99`, `p99.9`, any `pN`, `mean`, `max`, `min`) or `count`
of a latency KEY (`PASS`, `PASS-failed`, `RETR`, `session`, `connect`, `start-lag`, ...), or
`errors(TEXT)`: the failures whose kind contains TEXT (`errors(IN-USE)`). A condition that holds makes the run
fail. A latency that was never measured cannot be checked, so it fails the run too (a gate must not pass a run
that measured nothing), except a `-failed` key: no failed command is the good case.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pop3d.bench.hist import Histogram
from pop3d.bench.stats import LATENCY_KEYS, Stats

#: run-wide numbers a condition may name, and how to read each from the result object (report.result)
SCALARS: Final[Mapping[str, Callable[[Mapping[str, Any]], float]]] = {
    "errors": lambda r: r["errors_total"],
    "error_rate": lambda r: 100.0 * r["errors_total"] / max(1, r["sessions"] + r["errors_total"]),
    "sessions": lambda r: r["sessions"],
    "sessions_per_s": lambda r: r["sessions_per_s"],
    "logins": lambda r: r["logins"],
    "messages": lambda r: r["messages"],
    "messages_per_s": lambda r: r["messages_per_s"],
    "mb_per_s": lambda r: r["mb_per_s"],
    "held_max": lambda r: r["held_max"],
    "unfinished": lambda r: r["unfinished"],
    "arrivals": lambda r: r.get("arrivals", 0),
    "late": lambda r: r.get("late", 0),
    "not_started": lambda r: r.get("not_started", 0),
}
_OPS: Final[Mapping[str, Callable[[float, float], bool]]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
_EXPR = re.compile(
    r"\s*(?P<name>[A-Za-z_][A-Za-z0-9_.]*)\s*(?:\(\s*(?P<key>[^()]*?)\s*\))?"
    r"\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>ms|s|%)?\s*"
)
_PERCENTILE = re.compile(r"p([0-9]+(?:\.[0-9]+)?)")
_STATS = ("mean", "max", "min")
_UNIT_SECONDS = {"ms": 1e-3, "s": 1.0}


class ThresholdError(ValueError):
    """The expression does not parse or names something unknown (a usage error, exit status 2)."""


@dataclass(frozen=True, slots=True)
class Threshold:
    text: str
    func: str  # a SCALARS name, "pNN", "mean", "max", "min", "count" or "errors()"
    key: str | None  # the latency key, or the text errors(...) looks for
    op: str
    limit: float  # seconds for latencies, percent for error_rate, a plain number otherwise

    @property
    def is_latency(self) -> bool:
        return self.func in _STATS or _PERCENTILE.fullmatch(self.func) is not None


@dataclass(frozen=True, slots=True)
class Verdict:
    threshold: Threshold
    value: float | None  # None: nothing measured
    crossed: bool  # the condition holds: the run fails

    def describe(self) -> str:
        t = self.threshold
        if self.value is None:
            return f"{t.text}: no {t.key} samples" + (", cannot check" if self.crossed else "")
        name = t.text.split(t.op, 1)[0].strip()
        shown = f"{self.value * 1e3:.3f} ms" if t.is_latency else f"{self.value:g}"
        return f"{t.text}: {name} = {shown}"


def _latency_key(key: str) -> str:
    """The canonical spelling of a latency key (case-insensitive), or ThresholdError listing them."""
    base, failed = (key[: -len("-failed")], "-failed") if key.lower().endswith("-failed") else (key, "")
    for known in LATENCY_KEYS:
        if known.lower() == base.lower():
            return known + failed
    raise ThresholdError(f"unknown latency {key!r} (known: {', '.join(LATENCY_KEYS)}, each also as KEY-failed)")


def parse(text: str) -> Threshold:
    m = _EXPR.fullmatch(text)
    if not m:
        raise ThresholdError(f"--fail-if {text!r}: expected METRIC OP NUMBER[UNIT], e.g. 'errors>0', 'p99(PASS)>50ms'")
    name, key, op, unit = m["name"].lower(), m["key"], m["op"], m["unit"]
    number = float(m["num"])
    where = f"--fail-if {text!r}"
    if key is None:
        if name not in SCALARS:
            raise ThresholdError(f"{where}: unknown metric {name!r} (known: {', '.join(SCALARS)}, or FUNC(KEY))")
        if (unit == "%" and name != "error_rate") or unit in _UNIT_SECONDS:
            raise ThresholdError(f"{where}: {name} takes no unit {unit!r}")
        return Threshold(text.strip(), name, None, op, number)
    if name == "errors":
        if not key:
            raise ThresholdError(f"{where}: errors(TEXT) needs the text an error kind contains")
        if unit:
            raise ThresholdError(f"{where}: errors(...) takes no unit")
        return Threshold(text.strip(), "errors()", key, op, number)
    if name == "count":
        if unit:
            raise ThresholdError(f"{where}: count(...) takes no unit")
        return Threshold(text.strip(), "count", _latency_key(key), op, number)
    pm = _PERCENTILE.fullmatch(name)
    if not (name in _STATS or (pm and 0 < float(pm[1]) <= 100)):
        raise ThresholdError(f"{where}: unknown function {name!r} (pN such as p50, p99, p99.9; mean, max, min; count)")
    if unit not in _UNIT_SECONDS:
        raise ThresholdError(f"{where}: a latency needs a unit, ms or s (e.g. {name}({key}){op}{m['num']}ms)")
    return Threshold(text.strip(), name, _latency_key(key), op, number * _UNIT_SECONDS[unit])


def _value(t: Threshold, stats: Stats, result: Mapping[str, Any]) -> float | None:
    if t.key is None:
        return float(SCALARS[t.func](result))
    if t.func == "errors()":
        return float(sum(n for kind, n in stats.errors.items() if t.key in kind))
    h = stats.latency.get(t.key, Histogram())
    if t.func == "count":
        return float(h.count)
    if not h.count:
        return None
    if t.func == "mean":
        return h.total / h.count
    if t.func in ("max", "min"):
        return h.max if t.func == "max" else h.min
    return h.percentile(float(t.func[1:]))


def evaluate(thresholds: list[Threshold], stats: Stats, result: Mapping[str, Any]) -> list[Verdict]:
    verdicts = []
    for t in thresholds:
        value = _value(t, stats, result)
        # never measured: only a -failed key may be absent
        absent_fails = not (t.key or "").endswith("-failed")
        verdicts.append(Verdict(t, value, absent_fails if value is None else _OPS[t.op](value, t.limit)))
    return verdicts
