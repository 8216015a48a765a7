"""`pop3d health`: exit 0 only on a +OK greeting, within a bounded time."""

from __future__ import annotations

import logging
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


# --- without HOST:PORT: the configuration's first listener, reached as a client would -----------------------


def _config(tmp_path, server: str, tls: dict[str, str] | None = None) -> str:
    """A new configuration file for `pop3d health`; the server under test runs equivalent settings."""
    text = f"[server]\n{server}\n"
    if tls:
        text += "[tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in tls.items())
    path = tmp_path / f"pop3d-{len(list(tmp_path.glob('pop3d-*.toml')))}.toml"
    path.write_text(text)
    return str(path)


def test_config_with_proxy_protocol_sends_the_header(start_server, tmp_path, capsys):
    st = start_server(server={"proxy_protocol": True})
    # a wildcard listen address is probed on loopback, which proxy_trusted trusts by default
    cfg = _config(tmp_path, f'listen = ["0.0.0.0:{st.port}"]\nproxy_protocol = true')
    assert main(["health", "--config", cfg]) == 0
    assert capsys.readouterr().out.startswith("healthy: +OK pop3d ready")
    # the same server checked from a configuration that does not say PROXY: the gate never greets
    plain = _config(tmp_path, f'listen = ["127.0.0.1:{st.port}"]')
    assert main(["health", "-c", plain, "--timeout", "0.5"]) == 1
    assert "no greeting within 0.5 s" in capsys.readouterr().err


def test_config_with_tls_listen_only_speaks_tls(start_server, tmp_path, capsys):
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    st = start_server(server={"listen": [], "tls_listen": ["127.0.0.1:0"]}, tls=pki.tls_section())
    (port,) = [p for _h, p in st.server.tls_addresses()]
    cfg = _config(tmp_path, f'listen = []\ntls_listen = ["0.0.0.0:{port}"]', pki.tls_section())
    assert main(["health", "-c", cfg]) == 0
    assert capsys.readouterr().out.startswith("healthy: +OK")
    # and TLS behind the PROXY protocol: the header comes before the handshake
    st2 = start_server(
        server={"listen": [], "tls_listen": ["127.0.0.1:0"], "proxy_protocol": True}, tls=pki.tls_section()
    )
    (port2,) = [p for _h, p in st2.server.tls_addresses()]
    cfg2 = _config(
        tmp_path, f'listen = []\ntls_listen = ["127.0.0.1:{port2}"]\nproxy_protocol = true', pki.tls_section()
    )
    assert main(["health", "-c", cfg2]) == 0


def test_config_from_the_environment_and_plain_listener_first(start_server, tmp_path, monkeypatch, capsys):
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    st = start_server(server={"tls_listen": ["127.0.0.1:0"]}, tls=pki.tls_section())
    (tls_port,) = [p for _h, p in st.server.tls_addresses()]
    # both kinds configured: the plain listener is checked, without TLS
    cfg = _config(
        tmp_path, f'listen = ["127.0.0.1:{st.port}"]\ntls_listen = ["127.0.0.1:{tls_port}"]', pki.tls_section()
    )
    monkeypatch.setenv("POP3D_CONFIG_FILE", cfg)
    assert main(["health"]) == 0
    # POP3D_* variables override the file, as for `pop3d serve`
    monkeypatch.setenv("POP3D_SERVER__LISTEN", "[]")
    assert main(["health"]) == 0  # now the TLS listener, over TLS
    assert main(["health", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.count("healthy: +OK") == 2 and out.err == ""


def test_quiet_prints_nothing_and_exit_codes(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        assert main(["health", f"127.0.0.1:{port}", "--quiet"]) == 1
        assert main(["health", "-q", "-c", _config(tmp_path, f'listen = ["127.0.0.1:{port}"]')]) == 1
    assert capsys.readouterr() == ("", "")
    # usage and configuration problems: 2, with one line even under --quiet
    cases = {
        "not found": ["-c", str(tmp_path / "missing.toml")],
        "nothing to check": ["-c", _config(tmp_path, "listen = []")],
        "lets the system choose the port": ["-c", _config(tmp_path, 'listen = ["127.0.0.1:0"]')],
        "not both": ["127.0.0.1:110", "-c", _config(tmp_path, "")],
        "is not host:port": ["nonsense"],
    }
    for expect, args in cases.items():
        assert main(["health", "--quiet", *args]) == 2, args
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1, (args, err)


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["health", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 healthy; 1 unhealthy" in text and "2 usage or configuration error" in text
    assert "--quiet" in text and "--config" in text


@pytest.mark.parametrize(
    "listen,expect",
    [
        ("0.0.0.0:110", ("127.0.0.1", 110)),
        (":110", ("127.0.0.1", 110)),
        ("[::]:995", ("::1", 995)),
        ("192.0.2.7:1110", ("192.0.2.7", 1110)),
        ("[2001:db8::1]:110", ("2001:db8::1", 110)),
        ("mail.example.org:110", ("mail.example.org", 110)),
    ],
)
def test_wildcards_are_probed_on_loopback(listen, expect):
    from pop3d.config import load_settings
    from pop3d.ops.health import probe_for

    p = probe_for(load_settings(None, server={"listen": [listen]}))
    assert (p.host, p.port, p.proxy, p.tls) == (*expect, False, False)


def test_a_probe_is_recognisable_in_the_log(start_server, tmp_path, caplog):
    """The probe sends QUIT and nothing else: its session ends without a user, reason QUIT, no login failure."""
    st = start_server(server={"proxy_protocol": True})
    cfg = _config(tmp_path, f'listen = ["0.0.0.0:{st.port}"]\nproxy_protocol = true')
    with caplog.at_level(logging.INFO, logger="pop3d"):
        assert main(["health", "-q", "-c", cfg]) == 0
        assert main(["health", "-q", f"127.0.0.1:{st.port}", "--proxy"]) == 0
        st.wait_idle()
    ends = [r.getMessage() for r in caplog.records if "session end" in r.getMessage()]
    assert ends and all("user=-" in m and "reason=QUIT" in m for m in ends), ends
    assert not [r for r in caplog.records if "fail" in r.getMessage().lower()]
