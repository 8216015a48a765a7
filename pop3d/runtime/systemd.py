"""The two systemd interfaces a `Type=notify` socket-activated service needs, without a dependency.

- sd_notify(3): datagrams such as `READY=1` to the unix socket named by `$NOTIFY_SOCKET` (a leading `@` means
  the abstract namespace). READY=1 once listening, RELOADING=1 + MONOTONIC_USEC while re-reading the
  configuration, STOPPING=1 on shutdown, WATCHDOG=1 every half `$WATCHDOG_USEC` when the unit sets WatchdogSec.
- sd_listen_fds(3): inherited listening sockets are fds 3 .. 3+`$LISTEN_FDS`-1, meant for us only when
  `$LISTEN_PID` is our pid; `$LISTEN_FDNAMES` (colon-separated, from FileDescriptorName=) tells plain POP3
  ("pop3") from implicit-TLS POP3 ("pop3s", RFC 8314 §3.3 port 995) apart. Unnamed sockets are plain.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("pop3d")

SD_LISTEN_FDS_START: Final = 3
#: FileDescriptorName= → listener kind. "unknown" is what systemd reports for sockets without a name.
FD_KINDS: Final = {"pop3": "plain", "pop3s": "tls", "unknown": "plain", "": "plain"}


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


def listen_fds(unset_environment: bool = True) -> list[Inherited]:
    """The sockets systemd passed us (empty when not socket-activated).

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
        kind = FD_KINDS.get(name)
        if kind is None:
            raise ActivationError(f"socket {fd} is named {name!r}; FileDescriptorName= must be pop3 or pop3s")
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"fd {fd} from LISTEN_FDS is not a socket: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ActivationError(f"socket {fd} ({name}) is not a listening stream socket (ListenStream=)")
        sock.set_inheritable(False)
        out.append(Inherited(name, kind, sock))
    return out
