"""Implicit TLS behind a PROXY-protocol proxy: the header is read exactly, the ClientHello is left for TLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import pytest
from tls_helpers import Pki

from pop3d.net.proxy import ProxyError, encode_v1, encode_v2
from pop3d.net.proxy_tls import read_header


@pytest.mark.parametrize(
    "header",
    [
        encode_v1(("192.0.2.1", 1), ("192.0.2.2", 995)),
        encode_v1(None, None),  # exactly the 15-octet minimum
        encode_v2(("2001:db8::1", 7), ("2001:db8::2", 995), b"\x04\x00\x03abc"),
        encode_v2(None, None),  # LOCAL: zero-length payload
    ],
)
async def test_read_header_consumes_nothing_after_it(header):
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(header + b"\x16\x03\x01CLIENTHELLO")  # header and a TLS record in one segment
        got = await read_header(loop, b)
        assert got.rest == b""
        assert b.recv(100) == b"\x16\x03\x01CLIENTHELLO"


async def test_read_header_refuses_garbage_and_eof():
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 8)  # a bare ClientHello
        with pytest.raises(ProxyError):
            await read_header(loop, b)
    a, b = socket.socketpair()
    with b:
        b.setblocking(False)
        a.sendall(b"PROXY TCP4 1.2.3.4")
        a.close()
        with pytest.raises(ProxyError, match="closed"):
            await read_header(loop, b)


def _tls_through_header(port: int, header: bytes, ctx: ssl.SSLContext) -> tuple[socket.socket, ssl.SSLObject, bytes]:
    """Connect, send the header *and* the ClientHello in one write, finish the handshake, read the greeting."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    sock.sendall(header + outgoing.read())
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during handshake") from None
            incoming.write(data)
    if outgoing.pending:
        sock.sendall(outgoing.read())
    buf = b""
    while b"\r\n" not in buf:
        try:
            buf += obj.read(4096)
        except ssl.SSLWantReadError:
            incoming.write(sock.recv(65536))
    return sock, obj, buf


def test_implicit_tls_behind_proxy(start_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pop3d")
    pki = Pki.make(tmp_path)
    st = start_server(server={"proxy_protocol": True, "tls_listen": ["127.0.0.1:0"]}, tls=pki.tls_section())
    (tls_port,) = [p for _h, p in st.server.tls_addresses()]
    sock, _obj, greeting = _tls_through_header(
        tls_port, encode_v2(("203.0.113.50", 4444), ("127.0.0.1", tls_port)), pki.client_context()
    )
    assert greeting.startswith(b"+OK pop3d ready")
    (session,) = list(st.ctx.sessions)
    assert session.handler.peer == "203.0.113.50" and session.transport.get_extra_info("ssl_object") is not None
    sock.close()
    st.wait_idle()
    assert "session end user=- rip=203.0.113.50" in caplog.text

    # no header: the TLS ClientHello is not a PROXY header, the connection is cut
    raw = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        pki.client_context().wrap_socket(raw, server_hostname="localhost")
    raw.close()
    assert "bad PROXY header from 127.0.0.1" in caplog.text
    # the plain listener of the same server still uses the gate
    plain = socket.create_connection(("127.0.0.1", st.port), timeout=10)
    plain.sendall(encode_v1(None, None))
    assert plain.makefile("rb").readline().startswith(b"+OK")
    plain.close()


def test_implicit_tls_untrusted_peer(start_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pop3d")
    pki = Pki.make(tmp_path)
    st = start_server(
        server={"proxy_protocol": True, "proxy_trusted": ["10.0.0.0/8"], "tls_listen": ["127.0.0.1:0"]},
        tls=pki.tls_section(),
    )
    (tls_port,) = [p for _h, p in st.server.tls_addresses()]
    s = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    s.sendall(encode_v1(None, None))
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(10) == b""
    s.close()
    assert "peer 127.0.0.1 is not in server.proxy_trusted" in caplog.text


def test_implicit_tls_header_timeout(start_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pop3d")
    pki = Pki.make(tmp_path)
    st = start_server(
        server={"proxy_protocol": True, "tls_listen": ["127.0.0.1:0"]},
        session={"timeout_authorization": 0.3},
        tls=pki.tls_section(),
    )
    (tls_port,) = [p for _h, p in st.server.tls_addresses()]
    s = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    s.sendall(b"PROXY TCP4 192.0.2.1")  # and then silence
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(10) == b""
    s.close()
    assert "no PROXY header from 127.0.0.1" in caplog.text
