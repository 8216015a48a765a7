"""Durations on the command line: `10s`, `2m`, `500ms`, `1h`, or a bare number of seconds."""

from __future__ import annotations

import argparse
import re

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?")
_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'10s' -> 10.0, '2m' -> 120.0, '250ms' -> 0.25, '1.5' -> 1.5 (seconds). ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 10s, 2m, 500ms, 1.5)")
    return float(m[1]) * _SECONDS[m[2]]


def duration(text: str) -> float:
    """argparse `type=`: the same, with argparse's one-line error."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_duration(seconds: float) -> str:
    """Seconds for a human: '10s', '2m', '250ms'."""
    if seconds and seconds < 1:
        return f"{seconds * 1e3:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
