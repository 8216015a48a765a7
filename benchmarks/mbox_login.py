#!/usr/bin/env python3
"""Benchmark: USER/PASS + STAT on a 100,000-message mbox spool, first login (no index) and second login.

Not a test. Runs a real `python -m pop3d serve` on loopback and times the client's view with poplib:

  first   no index yet: the whole spool is scanned (sizes, digests, UIDLs) and the index is written
  second  unchanged spool: the index is reused, the spool is not read (one 4 KiB tail check)
  append  after N more messages were appended: only the new part is scanned
  commit  DELE 1 + QUIT: the worst case of the in-place commit (journal and move of the whole spool)

Baseline, measured in the same run: one sequential read of the spool file (page-cached, 1 MiB reads),
the least any scan of it could cost. Results are printed as seconds and as ratios to that baseline.

    python benchmarks/mbox_login.py [--messages 100000] [--size 1024] [--append 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import poplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.node()} {platform.machine()} {model}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def make_spool(path: Path, count: int, size: int, first: int = 0) -> None:
    filler = (b"x" * 75 + b"\n") * max(1, size // 76)
    with open(path, "ab") as f:
        for n in range(first, first + count):
            f.write(b"From sender@example.org Thu Nov 26 10:00:00 2026\nMessage-ID: <%d@bench>\n"
                    b"Subject: message %d\n\n%s>From quoted\n\n" % (n, n, filler))  # fmt: skip


def baseline_read(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def login_stat(port: int) -> tuple[float, tuple[int, int]]:
    t = time.perf_counter()
    c = poplib.POP3("127.0.0.1", port, timeout=600)
    c.user("bench")
    c.pass_("bench")
    stat = c.stat()
    elapsed = time.perf_counter() - t
    c.quit()
    return elapsed, stat


def dele_first_quit(port: int) -> float:
    c = poplib.POP3("127.0.0.1", port, timeout=600)
    c.user("bench")
    c.pass_("bench")
    c.dele(1)
    t = time.perf_counter()
    c.quit()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=1024, help="approximate octets per message body")
    ap.add_argument("--append", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "mail").mkdir()
        spool = root / "mail" / "bench"
        (root / "passwd").write_text("bench:{PLAIN}bench\n")
        make_spool(spool, args.messages, args.size)
        port = free_port()
        (root / "pop3d.toml").write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "bench.invalid"\n'
            f'[auth]\npasswd_file = "{root}/passwd"\nfailure_delay = 0\n[log]\nlevel = "WARNING"\n'
            f'[storage]\ndriver = "mbox"\nlocation = "{root}/mail/{{user}}"\nmbox_index_dir = "{root}/idx"\n'
        )
        proc = subprocess.Popen([sys.executable, "-m", "pop3d", "serve", "--config", str(root / "pop3d.toml")],
                                cwd=ROOT)  # fmt: skip
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            base = min(baseline_read(spool) for _ in range(3))
            first, stat1 = login_stat(port)
            second = min(login_stat(port)[0] for _ in range(3))
            make_spool(spool, args.append, args.size, first=args.messages)
            append, stat3 = login_stat(port)
            commit = dele_first_quit(port)
            after_commit = login_stat(port)[0]
        finally:
            proc.terminate()
            proc.wait()
        mib = spool.stat().st_size / 2**20
    print(f"machine: {machine()}")
    print(f"spool: {args.messages} messages, {mib:.0f} MiB; STAT after first login {stat1}, after append {stat3}")
    print(f"baseline (read the spool once):   {base:8.3f} s   1.00x")
    print(f"first login + STAT (no index):    {first:8.3f} s  {first / base:5.2f}x baseline")
    print(f"second login + STAT (index):      {second:8.3f} s  {second / base:5.2f}x baseline,"
          f" {first / second:.0f}x faster than first")  # fmt: skip
    print(f"login after {args.append} appended:     {append:8.3f} s  {append / base:5.2f}x baseline")
    print(f"QUIT committing DELE 1 (worst):   {commit:8.3f} s  {commit / base:5.2f}x baseline")
    print(f"login after that commit:          {after_commit:8.3f} s  {after_commit / base:5.2f}x baseline")


if __name__ == "__main__":
    main()
