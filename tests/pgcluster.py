"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary directory, no system service.

The server listens on a unix socket in that directory and on 127.0.0.1 at a free port (TCP, as a pop3d node
on another host would connect). `trust` authentication: nothing but this machine's loopback can reach it,
and it lives only as long as the test session.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster belongs to an unprivileged account
(`postgres`, which Debian's package creates, else `nobody`) and every program of it runs as that user.
The binaries come from PATH or from /usr/lib/postgresql/*/bin, where Debian keeps them off PATH.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tooling import require_tool

PACKAGE = "postgresql"
SUPERUSER = "pgadmin"


def _find(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), key=_version_key, reverse=True)
    return candidates[0] if candidates else None


def _version_key(path: str) -> tuple[int, ...]:
    part = path.split("/")[4]
    return tuple(int(x) for x in part.split(".") if x.isdigit())


def find_bindir() -> str:
    """The directory of initdb, pg_ctl and postgres; missing: skip loudly, or fail under CI."""
    initdb = _find("initdb")
    if initdb is None:
        require_tool("initdb", PACKAGE)  # skips or fails
        raise AssertionError("unreachable")
    bindir = os.path.dirname(os.path.realpath(initdb))
    for program in ("pg_ctl", "postgres"):
        if not os.access(os.path.join(bindir, program), os.X_OK):
            require_tool(program, PACKAGE)
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The account the cluster runs as when we are root; None when we are not (we run it ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a postgres nor a nobody account exists")


@dataclass
class PgCluster:
    """A running cluster. `admin_dsn` is its superuser's; tests get ordinary roles from `new_database`."""

    bindir: str
    root: Path
    port: int
    owner: pwd.struct_passwd | None
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def socket_dir(self) -> str:
        return str(self.root / "sock")

    @property
    def datadir(self) -> str:
        return str(self.root / "data")

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self.owner is not None:
            kwargs.update(user=self.owner.pw_uid, group=self.owner.pw_gid, extra_groups=[])
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            argv, check=check, capture_output=True, text=True, timeout=120, cwd=str(self.root), **kwargs
        )

    def start(self) -> None:
        os.makedirs(self.socket_dir, exist_ok=True)
        if self.owner is not None:
            for path in (self.root, self.socket_dir):
                os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        self._run(
            f"{self.bindir}/initdb", "-D", self.datadir, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
            "--no-sync", "--locale=C",
        )  # fmt: skip
        options = " ".join(
            [
                f"-c port={self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c max_connections=400",
                "-c fsync=off",  # a test cluster: durability across a power cut is not what is tested
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
            ]
        )
        self._run(f"{self.bindir}/pg_ctl", "-D", self.datadir, "-l", str(self.root / "log"), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        self._run(f"{self.bindir}/pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop", check=False)

    def psql_admin(self, sql: str, database: str = "postgres") -> None:
        """Run `sql` as the superuser through a blocking asyncpg connection of its own."""
        import asyncio

        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(self.admin_dsn(database))
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(go())

    def new_database(self) -> str:
        """A fresh database owned by a fresh ordinary role (no superuser, no CREATEDB); its DSN over TCP."""
        n = next(self._counter)
        name = f"t{os.getpid()}_{n}"
        self.psql_admin(f"CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        self.psql_admin(f"CREATE DATABASE {name} OWNER {name}")
        self.psql_admin(f"REVOKE ALL ON SCHEMA public FROM PUBLIC; ALTER SCHEMA public OWNER TO {name}", name)
        return f"postgresql://{name}@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def running_cluster() -> Iterator[PgCluster]:
    """Start a cluster for the test session, stop it and remove its files at the end."""
    bindir = find_bindir()
    root = Path(tempfile.mkdtemp(prefix="pop3d-pg-"))
    cluster = PgCluster(bindir, root, _free_port(), _run_as())
    try:
        try:
            cluster.start()
        except subprocess.CalledProcessError as exc:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{log}") from None
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
