"""Shared fixtures: a real pop3d on a loopback port, run in a thread so blocking clients (poplib) can test it."""

from __future__ import annotations

import asyncio
import os
import poplib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import ClockLoop

from pop3d.config import Settings, load_settings
from pop3d.runtime.server import Pop3Server, build_context

USERS = {"alice": "wonderland", "bob": "builder pass"}  # bob's password has a space on purpose


def deliver(maildir: Path, body: bytes, name: str | None = None, sub: str = "new") -> Path:
    """Drop a message into a Maildir the way an MTA does (tmp/ then rename)."""
    for d in ("tmp", "new", "cur"):
        (maildir / d).mkdir(parents=True, exist_ok=True)
    deliver.counter += 1  # type: ignore[attr-defined]
    name = name or f"{1_700_000_000 + deliver.counter}.M{deliver.counter}P{os.getpid()}.test"  # type: ignore[attr-defined]
    tmp = maildir / "tmp" / name
    tmp.write_bytes(body)
    final = maildir / sub / name
    os.rename(tmp, final)
    return final


deliver.counter = 0  # type: ignore[attr-defined]


class Env:
    """A test installation: passwd-file, mail root, settings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.passwd = root / "passwd"
        self.mail = root / "mail"
        self.mail.mkdir()  # the mail root exists (a mount point); per-user directories are created on demand
        self.passwd.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items()))

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"

    def settings(self, **sections: dict[str, Any]) -> Settings:
        base: dict[str, dict[str, Any]] = {
            # state_dir: penalties and LOGIN-DELAY kept there survive restarts; never the machine's /var/lib/pop3d
            "server": {
                "listen": ["127.0.0.1:0"],
                "hostname": "test.invalid",
                "shutdown_grace": 0.5,
                "state_dir": str(self.root / "state"),
            },
            "auth": {"passwd_file": str(self.passwd), "failure_delay": 0},
            "storage": {"location": str(self.mail / "{user}" / "Maildir")},
        }
        for k, v in sections.items():
            base.setdefault(k, {}).update(v)
        return load_settings(None, **base)


class ServerThread:
    """pop3d in a background thread with its own event loop (uvloop, as in production)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Pop3Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # report start-up errors to the test
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _start(self) -> None:
        self.server = Pop3Server(build_context(self.settings))
        await self.server.start()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    @property
    def ctx(self):  # type: ignore[no-untyped-def]
        assert self.server is not None
        return self.server.ctx

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.addresses()[0][1]

    def call(self, coro: Any, timeout: float = 30) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.2) -> None:
        if self.loop is None or not self.loop.is_running():
            return
        assert self.server is not None
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def wait_idle(self, timeout: float = 10) -> None:
        """Wait until every session has ended and released its maildrop."""
        end = time.monotonic() + timeout
        while self.ctx.sessions and time.monotonic() < end:
            time.sleep(0.01)
        assert not self.ctx.sessions, "sessions did not end"


@pytest.fixture
def clock() -> Iterator[ClockLoop]:
    """An event loop whose time moves only when the test advances it (tests/fakes.py)."""
    loop = ClockLoop()
    yield loop
    loop.settle()
    loop.close()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
def start_server(env: Env) -> Iterator[Any]:
    """start_server(**sections) → a running ServerThread; stopped at teardown."""
    started: list[ServerThread] = []

    def start(**sections: dict[str, Any]) -> ServerThread:
        st = ServerThread(env.settings(**sections)).start()
        started.append(st)
        return st

    yield start
    for st in started:
        st.stop()


@pytest.fixture
def server(start_server: Any) -> ServerThread:
    return start_server()


class _SourcedPOP3(poplib.POP3):
    source: str = "127.0.0.1"

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def pop3_from(port: int, source: str, timeout: float = 10) -> poplib.POP3:
    """A poplib client whose connection comes from `source` (any 127.0.0.0/8 address): another client address,
    for what is kept per address (penalty, connection limits)."""
    cls = type("SourcedPOP3", (_SourcedPOP3,), {"source": source})
    return cls("127.0.0.1", port, timeout=timeout)


class Raw:
    """A raw line-level client, for what poplib cannot do (pipelining, bad input, partial lines)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffer {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def multi(self) -> list[bytes]:
        """Lines of a multi-line body after its +OK line, unstuffed, without the terminator."""
        out = []
        while True:
            ln = self.line()
            if ln == b".":
                return out
            out.append(ln[1:] if ln.startswith(b"..") else ln)

    def cmd(self, text: bytes) -> bytes:
        self.send(text + b"\r\n")
        return self.line()

    def closed(self) -> bool:
        """True when the server closed the connection (reads EOF)."""
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster for the whole test session (tests/pgcluster.py); skipped loudly where
    PostgreSQL is not installed, a failure under CI."""
    from pgcluster import running_cluster

    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_dsn(pg_cluster: Any) -> str:
    """A DSN for a fresh database of its own, owned by an ordinary role (not a superuser)."""
    return str(pg_cluster.new_database())
