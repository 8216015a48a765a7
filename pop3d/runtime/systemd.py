"""The two systemd interfaces a `Type=notify` socket-activated service needs, without a dependency.

- sd_notify(3): datagrams such as `READY=1` to the unix socket named by `$NOTIFY_SOCKET` (a leading `@` means
  the abstract namespace). READY=1 once listening, RELOADING=1 + MONOTONIC_USEC while re-reading the
  configuration, STOPPING=1 on shutdown, WATCHDOG=1 every half `$WATCHDOG_USEC` when the unit sets WatchdogSec.
- sd_listen_fds(3): inherited listening sockets are fds 3 .. 3+`$LISTEN_FDS`-1, meant for us only when
  `$LISTEN_PID` is our pid; `$LISTEN_FDNAMES` (colon-separated, from FileDescriptorName=) tells plain POP3
  ("pop3") from implicit-TLS POP3 ("pop3s", RFC 8314 §3.3 port 995) apart. A socket unit without
  FileDescriptorName= names its sockets after itself ("pop3d.socket"), and sockets passed without any name
  are "unknown": those are matched by their bound address to `server.tls_listen` (implicit TLS) or
  `server.listen` (plain), and are plain when neither matches.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pop3d.config import parse_hostport

log = logging.getLogger("pop3d")

SD_LISTEN_FDS_START: Final = 3
#: FileDescriptorName= → listener kind
FD_KINDS: Final = {"pop3": "plain", "pop3s": "tls", "poppassd": "poppassd"}
#: names systemd gives sockets nobody named: "unknown", or the socket unit's own name (`*.socket`)
_UNNAMED: Final = ("unknown", "")


def notify(*states: str) -> bool:
    """Send `KEY=VALUE` lines to the service manager; False when not running under one (or it is gone)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not states:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        # non-blocking: this runs on the event loop, and a manager that stops reading must not stall it
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            s.connect(addr)
            s.send("\n".join(states).encode("utf-8"))
        return True
    except BlockingIOError:
        log.debug("sd_notify: %s is full, dropped %s", addr.lstrip("\0"), states)
        return False
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", addr.lstrip("\0"), exc)
        return False


def reloading_states() -> tuple[str, str]:
    """RELOADING=1 must carry CLOCK_MONOTONIC in µs (systemd ≥ 253 matches it against the reload request)."""
    return "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog is asked of us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


class ActivationError(Exception):
    """The inherited sockets cannot be used (wrong type, unknown name)."""


@dataclass(frozen=True)
class Inherited:
    """One socket handed over by systemd."""

    name: str
    kind: str  # "plain" or "tls"
    sock: socket.socket


def listen_fds(
    listen: Sequence[str] = (), tls_listen: Sequence[str] = (), unset_environment: bool = True
) -> list[Inherited]:
    """The sockets systemd passed us (empty when not socket-activated).

    Sockets named pop3 or pop3s are what their name says; unnamed or default-named ones are told apart by
    their bound address, against `listen` (plain) and `tls_listen` (implicit TLS) from the configuration.
    The variables are removed by default so that processes we start (or fork and exec) do not take the
    sockets for theirs, as sd_listen_fds(3) recommends.
    """
    env = os.environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not pid or not count:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for another process (e.g. our parent shell)
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number")
    split = names.split(":") if names else []
    out: list[Inherited] = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        name = split[i] if i < len(split) else "unknown"
        unnamed = name in _UNNAMED or name.endswith(".socket")
        if name not in FD_KINDS and not unnamed:
            raise ActivationError(
                f"socket {fd} is named {name!r}; FileDescriptorName= must be pop3 or pop3s (or left unset)"
            )
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"fd {fd} from LISTEN_FDS is not a socket: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ActivationError(f"socket {fd} ({name}) is not a listening stream socket (ListenStream=)")
        sock.set_inheritable(False)
        kind = _kind_by_address(fd, name, sock, listen, tls_listen) if unnamed else FD_KINDS[name]
        out.append(Inherited(name, kind, sock))
    return out


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(text: str) -> _IP | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _configured_ips(host: str) -> set[_IP] | None:
    """The addresses a configured host stands for; None for a wildcard ("" or 0.0.0.0 or ::)."""
    ip = _ip(host) if host else None
    if not host or (ip is not None and ip.is_unspecified):
        return None
    if ip is not None:
        return {ip}
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {a for info in infos if (a := _ip(str(info[4][0]))) is not None}


def _match(sock_ip: _IP, sock_port: int, items: Sequence[str]) -> int:
    """How well the socket fits the best of `items`: 2 same address and port, 1 same port with a wildcard on
    either side, 0 not at all (a configured port 0 is chosen at bind time and matches nothing)."""
    best = 0
    for item in items:
        try:
            host, port = parse_hostport(item)
        except ValueError:
            continue
        if port == 0 or port != sock_port:
            continue
        ips = _configured_ips(host)
        if ips is None or sock_ip.is_unspecified:
            best = max(best, 1)
        elif sock_ip in ips:
            return 2
    return best


def _kind_by_address(fd: int, name: str, sock: socket.socket, listen: Sequence[str], tls_listen: Sequence[str]) -> str:
    """ "tls" when the socket's bound address is one of `tls_listen` (better than any of `listen`), else plain."""
    bound = sock.getsockname()
    sock_ip = _ip(str(bound[0])) if sock.family in (socket.AF_INET, socket.AF_INET6) else None
    if sock_ip is not None:
        tls, plain = _match(sock_ip, int(bound[1]), tls_listen), _match(sock_ip, int(bound[1]), listen)
        if tls > plain:
            log.info("socket %d (%s) on %s matches server.tls_listen: implicit TLS", fd, name, _text(bound))
            return "tls"
        if plain:
            return "plain"
    where = _text(bound) if sock_ip is not None else repr(bound)
    log.warning(
        "socket %d (%s) on %s matches no server.listen or server.tls_listen address: serving plain POP3 "
        "(FileDescriptorName=pop3s in the socket unit marks implicit TLS)",
        fd,
        name,
        where,
    )
    return "plain"


def _text(bound: tuple[object, ...]) -> str:
    host, port = str(bound[0]), bound[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
