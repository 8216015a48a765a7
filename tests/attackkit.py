"""Shared tools of the attack tests (tests/test_attack_*.py): a real `python -m pop3d serve` subprocess, what
/proc says about it, and raw loopback clients that behave badly on purpose.

Why a subprocess for most attacks: the quantities under attack (resident memory, threads, uids, a frozen
event loop, a thread stuck in open() on a FIFO) belong to the server process; measured inside the pytest
process they would mix with the client, and a wedged thread would hang pytest at exit.
Every server started here is SIGKILLed at teardown, and a watchdog kills it early if its memory runs away,
so an attack that works on the code under test costs the machine a bounded amount.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POP3D = [sys.executable, "-m", "pop3d"]
MIB = 1024 * 1024


# -- configuration files -----------------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # a JSON string is a TOML basic string for the characters used here
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def merged(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


# -- /proc -------------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def hwm_kib(pid: int) -> int:
    return int(proc_status(pid)["VmHWM"].split()[0])


def uids(pid: int) -> list[int]:
    """Real, effective, saved and file-system uid of a process."""
    return [int(x) for x in proc_status(pid)["Uid"].split()]


def gids(pid: int) -> list[int]:
    return [int(x) for x in proc_status(pid)["Gid"].split()]


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# -- the server subprocess ----------------------------------------------------------------------------------


class Pop3dProcess:
    """`python -m pop3d serve --config FILE` on a fresh loopback port, output in a file, killed at the end.

    `memory_cap`: SIGKILL the server as soon as its RSS grows by this many bytes over the value at start
    (the watchdog samples every 10 ms and remembers the peak it saw; `peak_growth()` also uses VmHWM).
    """

    def __init__(
        self,
        root: Path,
        sections: dict[str, dict[str, Any]],
        *,
        name: str = "pop3d",
        memory_cap: int = 768 * MIB,
        port: int | None = None,
    ) -> None:
        self.root = root
        self.port = port or free_port()
        server = {"listen": [f"127.0.0.1:{self.port}"], "hostname": "test.invalid", "shutdown_grace": 0.5, "workers": 1}
        self.sections = merged({"server": server}, sections)
        self.config = write_toml(root / f"{name}.toml", self.sections)
        self.log_path = root / f"{name}.log"
        self.memory_cap = memory_cap
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed_for_memory = 0  # growth (bytes) at which the watchdog killed the server, 0 if it did not
        self._peak_kib = 0
        self._base_kib = 0
        self._base_hwm = 0
        self._stop_watch = threading.Event()
        self._watch: threading.Thread | None = None

    # start and stop

    def start(self, timeout: float = 15) -> Pop3dProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*POP3D, "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"pop3d exited {self.proc.returncode} at start:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if self.sections["server"].get("proxy_protocol"):
                        s.sendall(b"PROXY UNKNOWN\r\n")  # a trusted peer (127.0.0.1) must send a header first
                    if s.recv(512).startswith(b"+OK"):
                        break
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"pop3d did not greet within {timeout} s:\n{self.output()}")
            time.sleep(0.05)
        self.reset_memory_baseline()
        self._watch = threading.Thread(target=self._watchdog, daemon=True)
        self._watch.start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM and wait (the server drains); SIGKILL if it does not stop in time. Returns the status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._stop_watch.set()
        return int(self.proc.returncode if self.proc.returncode is not None else -9)

    def kill(self) -> None:
        """SIGKILL the whole process group (workers included); never waits on a wedged server."""
        self._stop_watch.set()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    # memory

    def reset_memory_baseline(self) -> None:
        self._base_kib = rss_kib(self.pid)
        self._base_hwm = hwm_kib(self.pid)
        self._peak_kib = self._base_kib

    def _watchdog(self) -> None:
        while not self._stop_watch.wait(0.01):
            try:
                now = rss_kib(self.pid)
            except (OSError, KeyError, ValueError):
                return
            self._peak_kib = max(self._peak_kib, now)
            growth = (now - self._base_kib) * 1024
            if growth > self.memory_cap:
                self.killed_for_memory = growth
                self.kill()
                return

    def peak_growth(self) -> int:
        """Bytes the resident set grew over the baseline, at its peak: VmHWM if the attack raised it (a
        peak between samples), else the highest sample; the watchdog's figure if it had to kill."""
        if self.killed_for_memory:
            return self.killed_for_memory
        peak = self._peak_kib
        try:
            now = rss_kib(self.pid)
            peak = max(peak, now)
            hwm = hwm_kib(self.pid)
            if hwm > self._base_hwm:
                peak = max(peak, hwm)
        except (OSError, KeyError, ValueError):
            pass
        return (peak - self._base_kib) * 1024


# -- clients -------------------------------------------------------------------------------------------------


class Line:
    """A minimal blocking line client with a deadline on every read (no reply = AssertionError/TimeoutError)."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", source: str | None = None, timeout: float = 10, greet: bool = True
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buf = b""
        self.greeting = self.line() if greet else b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, timeout: float | None = None) -> bytes:
        if timeout is not None:
            self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by the server; unread {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def cmd(self, text: bytes, timeout: float | None = None) -> bytes:
        self.send(text + b"\r\n")
        return self.line(timeout)

    def multi(self, timeout: float | None = None) -> list[bytes]:
        out: list[bytes] = []
        while True:
            ln = self.line(timeout)
            if ln == b".":
                return out
            out.append(ln[1:] if ln.startswith(b"..") else ln)

    def login(self, user: str, password: str) -> bytes:
        assert self.cmd(b"USER " + user.encode()).startswith(b"+OK")
        return self.cmd(b"PASS " + password.encode())

    def closed_within(self, seconds: float) -> bool:
        """True if the server closes (EOF or reset) within `seconds`; whatever it sends first is discarded."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return False
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not data:
                return True
            self.buf += data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def first_line(port: int, source: str | None = None, timeout: float = 5) -> tuple[bytes, Line | None]:
    """Connect and read the first line; (line, client) or (b"", None) when the connection was closed at once."""
    try:
        c = Line(port, source=source, timeout=timeout)
    except (ConnectionError, OSError):
        return b"", None
    return c.greeting, c


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def blast(sock: socket.socket, chunk: bytes, total: int, seconds: float) -> int:
    """Send `chunk` repeatedly, up to `total` octets or until `seconds` pass, never blocking on a server
    that stopped reading. Returns the octets the kernel accepted."""
    sock.setblocking(False)
    sent = 0
    end = time.monotonic() + seconds
    view = memoryview(chunk)
    off = 0
    while sent < total and time.monotonic() < end:
        _, w, _ = select.select([], [sock], [], min(0.05, max(0.0, end - time.monotonic())))
        if not w:
            continue
        try:
            n = sock.send(view[off:])
        except BlockingIOError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            break  # the server closed the connection: the flood is over
        sent += n
        off = (off + n) % len(chunk)
    sock.setblocking(True)
    return sent


def drain(sock: socket.socket, limit: int, seconds: float) -> tuple[int, bool]:
    """Read and discard up to `limit` octets for at most `seconds`: (octets read, whether EOF/reset came)."""
    got = 0
    end = time.monotonic() + seconds
    while got <= limit:
        left = end - time.monotonic()
        if left <= 0:
            return got, False
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            return got, False
        try:
            data = sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            return got, True
        if not data:
            return got, True
        got += len(data)
    return got, False


_STAMP = re.compile(rb"<[^>]+>")


def apop_stamp(greeting: bytes) -> bytes:
    m = _STAMP.search(greeting)
    assert m, greeting
    return m.group()
