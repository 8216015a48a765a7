#!/usr/bin/env python3
"""Micro-benchmarks of the hot path, each reported as a ratio against a baseline measured in the same run.

    python benchmarks/micro.py            # all
    python benchmarks/micro.py wire       # only names containing "wire"

Baselines are the cheapest thing that does the job in C (bytes.split / bytes.replace / one read()), so
"x 1.8" means pop3d's code costs 1.8 times that floor. Numbers are best-of-5 timeit rounds.
"""

from __future__ import annotations

import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pop3d import wire
from pop3d.pop3.protocol import CommandParser, LineBuffer, State

Case = tuple[str, Callable[[], object], Callable[[], object], int]  # name, baseline, subject, octets per call


def _best(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def _message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuv\n"
    body = (line * (size // len(line) + 1))[:size]
    return body.replace(b"\nThe q", b"\n.The q", 3)  # a few lines to stuff


def cases() -> list[Case]:
    parser = CommandParser()
    burst = b"STAT\r\nLIST 1\r\nUIDL\r\nRETR 1\r\nDELE 1\r\nNOOP\r\n" * 50

    def parse_burst() -> None:
        buf = LineBuffer()
        for line in buf.feed(burst):
            parser.parse(line, State.TRANSACTION)

    def split_burst() -> None:
        for line in burst.split(b"\r\n"):
            line.split(b" ")

    out: list[Case] = [
        ("parser: 300 pipelined commands (LineBuffer + CommandParser)", split_burst, parse_burst, len(burst))
    ]
    for size in (4 * 1024, 100 * 1024, 5 * 1024 * 1024):
        raw = _message(size)

        def floor(raw: bytes = raw) -> bytes:
            return raw.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..") + b".\r\n"

        def whole(raw: bytes = raw) -> bytes:
            return wire.encode(raw)

        def chunked(raw: bytes = raw) -> bytes:
            enc = wire.Encoder()
            parts = [enc.feed(raw[i : i + 256 * 1024]) for i in range(0, len(raw), 256 * 1024)]
            parts.append(enc.finish())
            return b"".join(parts)

        def size_only(raw: bytes = raw) -> int:
            return wire.network_size(raw)

        def len_only(raw: bytes = raw) -> int:
            return raw.count(b"\n")

        label = f"{size // 1024} KiB"
        out += [
            (f"wire: encode {label} (CRLF + dot-stuffing + terminator)", floor, whole, size),
            (f"wire: Encoder in 256 KiB chunks, {label}", floor, chunked, size),
            (f"wire: network_size {label}", len_only, size_only, size),
        ]
    return out


def read_cases() -> list[Case]:
    """Performance rule 2: reading a small message directly vs through aiofiles (three thread hops)."""
    import asyncio

    import aiofiles

    with tempfile.NamedTemporaryFile(delete=False) as tmp:
        tmp.write(_message(4 * 1024))
    path = tmp.name
    loop = asyncio.new_event_loop()

    def direct() -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.readall()

    async def via_aiofiles() -> bytes:
        async with aiofiles.open(path, "rb") as f:
            return await f.read()

    async def via_to_thread() -> bytes:
        return await asyncio.to_thread(direct)

    return [
        (
            "read 4 KiB: aiofiles open+read+close vs direct read",
            direct,
            lambda: loop.run_until_complete(via_aiofiles()),
            4096,
        ),
        (
            "read 4 KiB: one to_thread(open+read+close) vs direct read",
            direct,
            lambda: loop.run_until_complete(via_to_thread()),
            4096,
        ),
    ]


def main(argv: list[str]) -> int:
    want = argv[1] if len(argv) > 1 else ""
    print(f"{'benchmark':<62} {'baseline':>11} {'pop3d':>11} {'ratio':>7} {'MB/s':>8}")
    for name, base, subject, octets in cases() + read_cases():
        if want not in name:
            continue
        probe = _best(subject, 1)
        number = max(1, int(0.05 / max(probe, 1e-7)))
        b = _best(base, number)
        s = _best(subject, number)
        print(f"{name:<62} {b * 1e6:>9.1f}µs {s * 1e6:>9.1f}µs {s / b:>6.2f}x {octets / s / 1e6:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
