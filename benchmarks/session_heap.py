"""Python heap per idle logged-in session, by allocation site (tracemalloc), for one in-process server.

    python benchmarks/session_heap.py [--sessions 1000] [--top 15]

Makes a corpus with `pop3d mkmaildrops` (10 messages of 4 KiB per user) in a temporary directory, starts
pop3d in a thread of this process (uvloop, workers = 1), logs 50 sessions in and out to warm it up, then
opens SESSIONS connections, logs each in (USER, PASS) and leaves it idle. The heap grown between the two
snapshots, divided by SESSIONS, is what a held session costs in Python objects; the lines that allocated
it say where. RSS per session (what `pop3d bench --scenario idle --server-pid` reports) is higher: it also
counts uvloop's C allocations and the allocator's slack. The baseline is the same process before the
sessions, in the same run.
"""

from __future__ import annotations

import argparse
import gc
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import ServerThread  # noqa: E402  (the tests' in-thread server)

from pop3d.config import load_settings  # noqa: E402


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--top", type=int, default=15, help="allocation sites to show")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pop3d-heap-"))
    subprocess.run(
        [sys.executable, "-m", "pop3d", "mkmaildrops", "--users", str(args.sessions + 50), "--messages", "10",
         "--size", "4k", str(work / "corpus")],
        check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    cfg = tomllib.loads((work / "corpus" / "pop3d.toml").read_text())
    cfg["server"].update(listen=["127.0.0.1:0"], workers=1, state_dir=str(work / "state"))
    server = ServerThread(load_settings(None, **cfg)).start()
    users = [line.strip().split(":", 1) for line in (work / "corpus" / "users.txt").read_text().splitlines()]
    for name, password in users[-50:]:  # warm-up: imports, caches, the first-use allocations
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            _line(s)
            s.sendall(f"USER {name}\r\nPASS {password}\r\nQUIT\r\n".encode())
            for _ in range(3):
                _line(s)
    time.sleep(0.5)
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(args.sessions)]
    for s in socks:
        _line(s)
    for s, (name, password) in zip(socks, users, strict=False):
        s.sendall(f"USER {name}\r\nPASS {password}\r\n".encode())
    for s in socks:
        _line(s)
        reply = _line(s)
        if not reply.startswith(b"+OK"):
            raise SystemExit(f"login failed: {reply!r}")
    time.sleep(1)
    gc.collect()
    stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
    n = args.sessions
    print(f"{sum(x.size_diff for x in stats) / n:.0f} B of Python heap per idle logged-in session ({n} sessions)")
    for x in stats[: args.top]:
        print(f"{x.size_diff / n:7.0f} B {x.count_diff / n:5.2f} objects  {x.traceback}")
    for s in socks:
        s.close()
    server.stop()


if __name__ == "__main__":
    main()
