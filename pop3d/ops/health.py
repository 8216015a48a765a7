"""`pop3d health`: a real greeting check for container HEALTHCHECKs and monitoring.

Without an address it reads the configuration and checks the first configured listener the way a client
reaches it: the first of `server.listen`, else the first of `server.tls_listen` over implicit TLS, with a
PROXY header first when `server.proxy_protocol` is on. A wildcard address (0.0.0.0, ::, or none) is
probed on loopback, which is also what `server.proxy_trusted` trusts by default. So the image's
HEALTHCHECK follows the configuration instead of a hard-coded 127.0.0.1:110.

It passes only on `+OK` (RFC 1939 §4: the greeting is positive when the server accepts the session). The
whole exchange shares one deadline, so a server that accepts but never greets fails in `timeout` seconds
instead of hanging the health checker. TLS certificates are not verified: the question is "does this
server answer", and a health check must not fail on a name mismatch with 127.0.0.1.

A probe is recognisable in the server's log without any help from the server: right after the greeting
it sends `QUIT` and nothing else (RFC 1939 §4: QUIT in the AUTHORIZATION state ends the session), so its
session ends with no user and reason QUIT, and it never counts as a failed login. Behind the PROXY
protocol its header is `PROXY UNKNOWN`, so the server logs the probe's real socket address.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import time
from dataclasses import dataclass

from pop3d.config import ConfigError, Settings, load_settings, parse_hostport
from pop3d.net.proxy import encode_v1

#: exit statuses of `pop3d health` (documented in its --help and the README)
HEALTHY, UNHEALTHY, USAGE = 0, 1, 2


@dataclass(frozen=True)
class Probe:
    """Where and how to connect: a PROXY header first, then implicit TLS, as the configuration says."""

    host: str
    port: int
    proxy: bool = False
    tls: bool = False

    def describe(self) -> str:
        via = [w for w, on in (("PROXY header", self.proxy), ("TLS", self.tls)) if on]
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"{where} ({', '.join(via)})" if via else where


def _loopback_for(host: str) -> str:
    """A wildcard listen address is reached on loopback of the same family; anything else as written."""
    if host in ("", "*"):
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return host


def probe_for(settings: Settings) -> Probe:
    """The first configured listener; ConfigError when there is none a client could reach."""
    s = settings.server
    if s.listen:
        key, value, tls = "server.listen", s.listen[0], False
    elif s.tls_listen:
        key, value, tls = "server.tls_listen", s.tls_listen[0], True
    else:
        raise ConfigError("server.listen and server.tls_listen are both empty: nothing to check (give HOST:PORT)")
    host, port = parse_hostport(value)  # validated when the settings loaded
    if port == 0:
        raise ConfigError(f"{key}: {value} lets the system choose the port: nothing to check (give HOST:PORT)")
    return Probe(_loopback_for(host), port, s.proxy_protocol, tls)


def from_config(config: str | None, proxy: bool = False, tls: bool = False) -> Probe:
    """What `pop3d health` without HOST:PORT checks: the configuration's first listener.

    `config`: the file (None: $POP3D_CONFIG_FILE, else defaults and POP3D_* variables, as `pop3d serve`).
    `proxy`/`tls` force a PROXY header / implicit TLS on, in addition to what the configuration says.
    Raises ConfigError (exit status 2) when the configuration does not load or has no listener to check."""
    found = probe_for(load_settings(config or os.environ.get("POP3D_CONFIG_FILE") or None))
    return Probe(found.host, found.port, found.proxy or proxy, found.tls or tls)


def _unverified() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def run(p: Probe, timeout: float) -> tuple[bool, str]:
    """(healthy, one line to print)."""
    where = p.describe()
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no greeting")
        return remaining

    try:
        with socket.create_connection((p.host, p.port), timeout=timeout) as raw:
            if p.proxy:
                raw.sendall(encode_v1(None, None))  # UNKNOWN: "use the socket's own addresses"
            raw.settimeout(left())  # the handshake too
            sock = _unverified().wrap_socket(raw, server_hostname=p.host) if p.tls else raw
            buf = b""
            while b"\n" not in buf and len(buf) < 512:
                sock.settimeout(left())
                chunk = sock.recv(512)
                if not chunk:
                    break
                buf += chunk
            line = buf.split(b"\n", 1)[0].rstrip(b"\r")
            if line.startswith(b"+OK"):
                try:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.sendall(b"QUIT\r\n")  # the only command a probe sends: its mark in the log
                    sock.recv(512)
                except OSError:
                    pass  # healthy either way: the greeting was positive
                return True, f"healthy: {line.decode('utf-8', 'replace')}"
            if not line:
                hint = " (is this address in server.proxy_trusted?)" if p.proxy else ""
                return False, f"unhealthy: {where} closed the connection without a greeting{hint}"
            return False, f"unhealthy: {where} greeted {line[:80].decode('utf-8', 'replace')!r}"
    except TimeoutError:
        return False, f"unhealthy: {where} sent no greeting within {timeout:g} s"
    except ssl.SSLError as exc:
        return False, f"unhealthy: {where}: TLS: {exc.reason or exc}"
    except OSError as exc:
        return False, f"unhealthy: {where}: {exc.strerror or exc}"


def check(host: str, port: int, timeout: float, proxy: bool = False, tls: bool = False) -> tuple[bool, str]:
    """(healthy, one line to print) for HOST:PORT."""
    return run(Probe(host, port, proxy, tls), timeout)
