"""The listening sockets, bound before the event loop starts and before privileges are dropped.

`server.workers = N` gets N sets of SO_REUSEPORT sockets, one per worker slot, bound in the supervisor
before it forks; each worker calls listen() on its own set when its loop starts (docs/DESIGN.md
performance rule 4: each worker accepts from its own queue, and the port opens when a worker serves).
Binding here rather than in each worker lets the workers run without root (a port below 1024 and the
kernel's same-uid rule for SO_REUSEPORT groups are both satisfied by the process that still has it), and
a slot's socket outlives a crashed worker: connections queued there are served by its replacement.

SO_REUSEPORT would also let a *second* pop3d join the group silently and take half the connections. So
each address is first probed, twice: a SO_REUSEADDR bind, which the kernel refuses while anything
listens there (the error names the pid holding it, read from /proc); then a bind without SO_REUSEADDR,
which is also refused by sockets that are bound but not yet listening (another pop3d starting) and by
leftover TIME_WAIT connections. Only the former are invisible in /proc/net/tcp, which tells the two apart.
The probes are closed and the real sockets bound microseconds later; from then on a probe fails.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from pop3d.config import parse_hostport
from pop3d.runtime.systemd import Inherited

_LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}


class ListenError(OSError):
    """A listen address cannot be bound (in use, no permission); str() is one line naming it."""

    def __str__(self) -> str:
        return str(self.strerror)


def address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_listeners(
    listen: Sequence[str], tls_listen: Sequence[str], copies: int = 1, poppassd_listen: Sequence[str] = ()
) -> tuple[list[list[Inherited]], list[tuple[str, int, bool]]]:
    """`copies` sets of bound sockets for every address; and the concrete (host, port, implicit TLS)
    addresses of the POP3 listeners (a configured port 0 becomes the port the kernel chose, the same in every
    set). `poppassd_listen` sockets (kind "poppassd") are in the sets, not in the addresses.

    With one copy the sockets are exclusive (no SO_REUSEPORT). Raises ListenError.
    """
    sets: list[list[Inherited]] = [[] for _ in range(copies)]
    resolved: list[tuple[str, int, bool]] = []
    item = ""
    try:
        kinds = [(i, "plain") for i in listen] + [(i, "tls") for i in tls_listen]
        for item, kind in kinds + [(i, "poppassd") for i in poppassd_listen]:
            host, port = parse_hostport(item)
            implicit = kind == "tls"
            for family, stype, proto, _, addr in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                if port:
                    _probe(family, stype, proto, (addr[0], port, *addr[2:]), item)
                for copy in sets:
                    s = socket.socket(family, stype, proto)
                    copy.append(Inherited(item, kind, s))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if copies > 1:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's create_server
                    s.bind((addr[0], port, *addr[2:]))
                    port = s.getsockname()[1]  # port 0: the other copies and families take the chosen one
                    s.setblocking(False)  # listen(): by the process that serves it (Pop3Server.start)
            if kind != "poppassd":
                resolved.append((host, port, implicit))
    except OSError as exc:
        close(sets)
        if isinstance(exc, ListenError):
            raise
        raise ListenError(exc.errno, f"{item}: {exc.strerror}") from None
    return sets, resolved


def close(sets: Sequence[Sequence[Inherited]]) -> None:
    for copy in sets:
        for inh in copy:
            inh.sock.close()


def _probe(family: int, stype: int, proto: int, addr: tuple[object, ...], item: str) -> None:
    """Fail, naming the holder where /proc tells it, when another socket serves or is about to serve
    `addr` (see the module docstring)."""
    host, port = str(addr[0]), int(str(addr[1]))
    for reuse in (True, False):
        with socket.socket(family, stype, proto) as probe:
            if reuse:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(addr)
                continue
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        if reuse:
            pids = listening_pids(family, host, port)
            holder = f" by pid {pids[0]}" if pids else ""
            raise ListenError(errno.EADDRINUSE, f"{item}: address already in use{holder}")
        if sys.platform.startswith("linux") and not _sockets_on(family, host, port, any_state=True):
            raise ListenError(
                errno.EADDRINUSE, f"{item}: address already in use (bound by another process that is starting)"
            )


def listening_pids(family: int, host: str, port: int) -> list[int]:
    """Pids of processes with a listening TCP socket that covers host:port, parents first; [] if /proc
    cannot tell (not Linux, or another user's processes). Best effort: only the error message uses it."""
    if not sys.platform.startswith("linux"):
        return []
    inodes = _sockets_on(family, host, port)
    if not inodes:
        return []
    targets = {f"socket:[{i}]" for i in inodes}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in targets for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to look at
            continue
    return sorted(pids, key=lambda pid: (_ppid(pid) in pids, pid))


def _sockets_on(family: int, host: str, port: int, any_state: bool = False) -> set[str]:
    """Inodes of the TCP sockets in /proc/net/tcp{,6} whose local address covers host:port: listening
    ones, or with `any_state` also connections (TIME_WAIT leftovers, accepted ones)."""
    want = socket.inet_pton(family, host)
    inodes = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or not (any_state or fields[3] == _LISTEN_STATE):
                continue
            hexaddr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and _covers(_unhex(hexaddr), want):
                inodes.add(fields[9])
    return inodes


def _unhex(text: str) -> bytes:
    """/proc/net/tcp prints addresses as 32-bit words in host byte order."""
    raw = bytes.fromhex(text)
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    return b"".join(w[::-1] if sys.byteorder == "little" else w for w in words)


def _covers(bound: bytes, want: bytes) -> bool:
    """A listener on `bound` takes connections for `want` (same address, or either is a wildcard)."""
    if len(bound) == 16 and bound[:12] == b"\0" * 10 + b"\xff\xff" and len(want) == 4:
        bound = bound[12:]  # v4-mapped
    return bound == want or not any(bound) or not any(want)


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])
