"""Implicit TLS on pop3d.net.tls_layer: what the session relies on from a transport, over real TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import pytest
from conftest import deliver
from tls_helpers import Pki, TlsRaw

from pop3d import wire
from pop3d.net.tls_layer import TlsLayer


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


# ---- without sockets: what leaves in how many writes ------------------------------------------------------


class _Raw:
    """The socket transport under a TlsLayer: records each write (one send each, on a real socket)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Echo(asyncio.Protocol):
    """A session: a greeting, "+OK" per line, and on QUIT a last reply and close, all inside data_received."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport
        self.rest = b""  # a line cut between two deliveries
        self.t.write(b"+OK ready\r\n")

    def data_received(self, data: bytes) -> None:
        *lines, self.rest = (self.rest + data).split(b"\r\n")
        for line in lines:
            self.t.write(b"+OK bye\r\n" if line == b"QUIT" else b"+OK " + line + b"\r\n")
            if line == b"QUIT":
                self.t.close()


class _Pair:
    """A TlsLayer over a recording transport, and a client on memory BIOs: no socket, every write seen.
    Made in a running loop (the layer takes it)."""

    def __init__(self, pki: Any) -> None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(pki.server_pem))
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = pki.client_context().wrap_bio(self.cin, self.cout, server_hostname="localhost")
        self.raw = _Raw()
        self.layer = TlsLayer(_Echo, server_ctx, 10.0)
        self.layer.connection_made(self.raw)  # type: ignore[arg-type]

    def round_trip(self) -> list[bytes]:
        """The client's pending output to the layer; what the layer wrote back, to the client."""
        before = len(self.raw.writes)
        self.layer.data_received(self.cout.read())
        new = self.raw.writes[before:]
        for w in new:
            self.cin.write(w)
        return new


def test_replies_of_one_read_leave_in_one_write(pki):
    """Each raw write is a send system call and, on the wire, a segment: what one read of the client makes
    (the session ticket with the greeting; pipelined replies; the last reply with close_notify) leaves in one."""

    async def main() -> None:
        p = _Pair(pki)
        with pytest.raises(ssl.SSLWantReadError):
            p.client.do_handshake()
        assert len(p.round_trip()) == 1  # the server's flight
        p.client.do_handshake()  # done: the client's Finished is pending
        assert len(p.round_trip()) == 1  # ticket and greeting together
        assert p.client.read(100) == b"+OK ready\r\n"
        p.client.write(b"USER a\r\nNOOP\r\nQUIT\r\n")
        assert len(p.round_trip()) == 1 and p.raw.closed  # three replies and close_notify
        got = b""
        while chunk := p.client.read(100):  # a record per reply; then close_notify reads as b""
            got += chunk
        assert got == b"+OK USER a\r\n+OK NOOP\r\n+OK bye\r\n"
        assert not p.cin.pending  # read to the end: close_notify came (otherwise SSLWantReadError)

    asyncio.run(main())


def test_a_read_that_makes_much_output_still_leaves_it_in_bounded_writes(pki):
    """A client pipelining thousands of commands in one flight: the replies do not pile up encrypted until
    the end of the read (the MemoryBIO would keep the capacity it grew to), but leave whenever about a
    record's worth waits."""

    async def main() -> None:
        p = _Pair(pki)
        with pytest.raises(ssl.SSLWantReadError):
            p.client.do_handshake()
        p.round_trip()
        p.client.do_handshake()
        p.round_trip()
        lines = [b"NOOP %04d" % i for i in range(3000)]
        p.client.write(b"".join(line + b"\r\n" for line in lines))
        writes = p.round_trip()
        assert len(writes) > 2  # ~39 KB of replies: not one write at the end
        assert max(map(len, writes)) <= 16384 + 2 * 1024  # a record's worth and the reply that crossed it
        got = b""
        while True:
            try:
                got += p.client.read(65536)
            except ssl.SSLWantReadError:
                break
        expected = b"".join(b"+OK " + line + b"\r\n" for line in lines)
        assert got == b"+OK ready\r\n" + expected

    asyncio.run(main())
