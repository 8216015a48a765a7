"""A real HAProxy on loopback in front of pop3d, speaking PROXY v1 (send-proxy) and v2 (send-proxy-v2).

The client connects from 127.0.0.5; HAProxy connects to pop3d from 127.0.0.1, the only trusted peer. If
pop3d reports 127.0.0.5, it parsed the header HAProxy wrote. Without HAProxy it fails under CI (`.ci/run`
installs it) and skips loudly elsewhere (tests/tooling.py).
"""

from __future__ import annotations

import socket
import subprocess
import time

from tooling import needs_tool, which

HAPROXY = which("haproxy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("haproxy did not listen")


@needs_tool("haproxy", "haproxy")
def _logged_in_peers(st_) -> set[str]:
    """The client addresses of the sessions logged in (ours): HAProxy may still be opening or closing the
    backend connection of a readiness probe (peer 127.0.0.1), which never logs in."""
    return {s.handler.peer for s in st_.ctx.sessions if s.handler.user is not None}


def test_haproxy_v1_v2_and_implicit_tls(start_server, tmp_path):
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    st_ = start_server(
        server={"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"], "tls_listen": ["127.0.0.1:0"]},
        tls=pki.tls_section(),
    )
    (tls_port,) = [p for _h, p in st_.server.tls_addresses()]
    front1, front2, front3 = _free_port(), _free_port(), _free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
global
    maxconn 50
defaults
    mode tcp
    timeout connect 5s
    timeout client 20s
    timeout server 20s
frontend v1
    bind 127.0.0.1:{front1}
    default_backend v1
frontend v2
    bind 127.0.0.1:{front2}
    default_backend v2
frontend tls
    bind 127.0.0.1:{front3}
    default_backend tls
backend v1
    server pop 127.0.0.1:{st_.port} send-proxy
backend v2
    server pop 127.0.0.1:{st_.port} send-proxy-v2
backend tls
    server pop 127.0.0.1:{tls_port} send-proxy-v2
""")
    proc = subprocess.Popen([str(HAPROXY), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(front1, proc)
        _wait_port(front2, proc)
        _wait_port(front3, proc)
        st_.wait_idle()  # the readiness probes above went through HAProxy too; let those sessions end
        for front in (front1, front2):
            c = socket.create_connection(("127.0.0.1", front), timeout=10, source_address=("127.0.0.5", 0))
            f = c.makefile("rb")
            assert f.readline().startswith(b"+OK pop3d ready")
            c.sendall(b"USER alice\r\nPASS wonderland\r\n")
            assert f.readline().startswith(b"+OK")
            assert f.readline().startswith(b"+OK alice has")
            assert _logged_in_peers(st_) == {"127.0.0.5"}
            c.sendall(b"QUIT\r\n")
            assert f.readline().startswith(b"+OK")
            f.close()
            c.close()
            st_.wait_idle()
        # TLS passes through HAProxy untouched (mode tcp); the header goes before the ClientHello
        raw = socket.create_connection(("127.0.0.1", front3), timeout=10, source_address=("127.0.0.5", 0))
        with pki.client_context().wrap_socket(raw, server_hostname="localhost") as t:
            f = t.makefile("rb")
            assert f.readline().startswith(b"+OK pop3d ready")
            t.sendall(b"USER alice\r\nPASS wonderland\r\n")
            assert f.readline().startswith(b"+OK") and f.readline().startswith(b"+OK alice has")
            assert _logged_in_peers(st_) == {"127.0.0.5"}
            t.sendall(b"QUIT\r\n")
            assert f.readline().startswith(b"+OK")
            f.close()
        st_.wait_idle()
    finally:
        proc.terminate()
        proc.wait(10)
