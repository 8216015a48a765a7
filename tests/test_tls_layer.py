"""Implicit TLS on pop3d.net.tls_layer: what the session relies on from a transport, over real TLS."""

from __future__ import annotations

import socket

import pytest
from conftest import deliver
from tls_helpers import Pki, TlsRaw

from pop3d import wire


@pytest.fixture
def pki(tmp_path):
    return Pki.make(tmp_path)


def _server(start_server, pki, **tls):  # type: ignore[no-untyped-def]
    srv = start_server(server={"tls_listen": ["127.0.0.1:0"]}, tls={**pki.tls_section(), **tls})
    return srv, srv.server.tls_addresses()[0][1]


def _read_until(c: TlsRaw, end: bytes) -> bytes:
    while not c.buf.endswith(end):
        data = c.sock.recv(65536)
        assert data, "connection closed"
        c.buf += data
    out, c.buf = c.buf, b""
    return out


def test_pipelined_burst_waits_for_the_password_check_and_stays_in_order(start_server, pki, env):
    """PASS pauses reading (a Pending result): the lines after it, decrypted in the same record, wait."""
    deliver(env.maildir("alice"), b"Subject: x\n\nhello\n")
    _srv, port = _server(start_server, pki)
    c = TlsRaw(port, pki.client_context())
    c.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nNOOP\r\nQUIT\r\n")
    replies = [c.line() for _ in range(5)]
    assert [r[:3] for r in replies] == [b"+OK"] * 5, replies
    assert replies[2].startswith(b"+OK 1 ")


def test_big_message_over_tls_arrives_exactly_with_flow_control(start_server, pki, env):
    body = b"".join(b".line %d of a big message\n" % i for i in range(60000))  # ~1.6 MB, dot-stuffed lines
    deliver(env.maildir("alice"), b"Subject: big\n\n" + body)
    _srv, port = _server(start_server, pki)
    c = TlsRaw(port, pki.client_context())
    assert c.cmd(b"USER alice").startswith(b"+OK")
    assert c.cmd(b"PASS wonderland").startswith(b"+OK")
    c.send(b"RETR 1\r\n")  # bigger than the socket buffers: sent in slices that wait for the transport
    reply = _read_until(c, b"\r\n.\r\n")
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"+OK")
    assert rest == wire.encode(b"Subject: big\n\n" + body)  # terminator included
    assert c.cmd(b"QUIT").startswith(b"+OK")


def test_a_client_that_stalls_the_handshake_is_cut(start_server, pki):
    srv, port = _server(start_server, pki, handshake_timeout=0.2)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01")  # the start of a record header, then nothing
        assert s.recv(100) == b""  # closed by the server, no greeting
    srv.wait_idle()


def test_close_notify_from_the_client_ends_the_session(start_server, pki):
    srv, port = _server(start_server, pki)
    c = TlsRaw(port, pki.client_context())
    assert c.greeting.startswith(b"+OK")
    c.sock = c.sock.unwrap()  # sends close_notify
    c.sock.close()
    srv.wait_idle()
