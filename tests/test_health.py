"""`pop3d health`: exit 0 only on a +OK greeting, within a bounded time."""

from __future__ import annotations

import socket
import threading

import pytest

from pop3d.cli import main
from pop3d.ops.health import check


def _fake_server(behaviour: bytes | None) -> tuple[socket.socket, int]:
    """Accepts one connection and sends `behaviour` (None: says nothing and holds the connection)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        if behaviour is not None:
            conn.sendall(behaviour)
            conn.close()
        else:
            conn.recv(100)  # until the checker gives up and closes
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_healthy(server, capsys):
    assert main(["health", f"127.0.0.1:{server.port}"]) == 0
    assert capsys.readouterr().out.startswith("healthy: +OK pop3d ready")


def test_with_proxy_header(start_server):
    st = start_server(server={"proxy_protocol": True})
    assert check("127.0.0.1", st.port, 5, proxy=True)[0]
    assert not check("127.0.0.1", st.port, 0.5)[0]  # without the header the gate waits: no greeting


@pytest.mark.parametrize(
    "behaviour,expect",
    [
        (b"-ERR [SYS/TEMP] go away\r\n", "greeted"),
        (b"", "without a greeting"),
        (None, "no greeting within"),
    ],
)
def test_unhealthy(behaviour, expect, capsys):
    srv, port = _fake_server(behaviour)
    try:
        assert main(["health", f"127.0.0.1:{port}", "--timeout", "0.5"]) == 1
    finally:
        srv.close()
    assert expect in capsys.readouterr().err


def test_refused_and_bad_address(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        assert main(["health", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    assert "unhealthy" in capsys.readouterr().err
    assert main(["health", "nonsense"]) == 2


def test_implicit_tls_with_and_without_proxy(start_server, tmp_path):
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    st = start_server(server={"tls_listen": ["127.0.0.1:0"]}, tls=pki.tls_section())
    (tls_port,) = [p for _h, p in st.server.tls_addresses()]
    assert main(["health", f"127.0.0.1:{tls_port}", "--tls"]) == 0
    assert main(["health", f"127.0.0.1:{st.port}", "--tls", "--timeout", "2"]) == 1  # plain port: no TLS
    st2 = start_server(server={"proxy_protocol": True, "tls_listen": ["127.0.0.1:0"]}, tls=pki.tls_section())
    (tls_port2,) = [p for _h, p in st2.server.tls_addresses()]
    assert check("127.0.0.1", tls_port2, 5, proxy=True, tls=True)[0]
