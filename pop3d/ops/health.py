"""`pop3d health HOST:PORT`: a real greeting check for container HEALTHCHECKs and monitoring.

Connects, reads one line, and passes only on `+OK` (RFC 1939 §4: the greeting is positive when the server
accepts the session). Then it says QUIT politely. The whole exchange shares one deadline, so a server that
accepts but never greets fails in `timeout` seconds instead of hanging the health checker.
`--tls` speaks implicit TLS (port 995) first; the certificate is not verified, because the question is
"does this server answer", and a health check must not fail on a name mismatch with 127.0.0.1.
"""

from __future__ import annotations

import socket
import ssl
import time

from pop3d.net.proxy import encode_v1


def _unverified() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check(host: str, port: int, timeout: float, proxy: bool = False, tls: bool = False) -> tuple[bool, str]:
    """(healthy, one line to print)."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if proxy:
                raw.sendall(encode_v1(None, None))  # UNKNOWN: "use the socket's own addresses"
            sock = _unverified().wrap_socket(raw, server_hostname=host) if tls else raw
            buf = b""
            while b"\n" not in buf and len(buf) < 512:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no greeting")
                sock.settimeout(left)
                chunk = sock.recv(512)
                if not chunk:
                    break
                buf += chunk
            line = buf.split(b"\n", 1)[0].rstrip(b"\r")
            if line.startswith(b"+OK"):
                try:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(512)
                except OSError:
                    pass  # healthy either way: the greeting was positive
                return True, f"healthy: {line.decode('utf-8', 'replace')}"
            if not line:
                return False, f"unhealthy: {host}:{port} closed the connection without a greeting"
            return False, f"unhealthy: {host}:{port} greeted {line[:80].decode('utf-8', 'replace')!r}"
    except TimeoutError:
        return False, f"unhealthy: {host}:{port} sent no greeting within {timeout:g} s"
    except ssl.SSLError as exc:
        return False, f"unhealthy: {host}:{port}: TLS: {exc.reason or exc}"
    except OSError as exc:
        return False, f"unhealthy: {host}:{port}: {exc.strerror or exc}"
