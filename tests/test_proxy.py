"""PROXY protocol v1/v2: the sans-IO parser (no sockets) and the gate in front of real sessions."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.net.addresses import in_networks
from pop3d.net.proxy import V2_SIGNATURE, ProxyError, ProxyHeader, ProxyParser, encode_v1, encode_v2


def parse_all(data: bytes, step: int | None = None) -> ProxyHeader | None:
    p = ProxyParser()
    if step is None:
        return p.feed(data)
    out = None
    for i in range(0, len(data), step):
        out = p.feed(data[i : i + step])
        if out is not None:  # later segments go straight to the session: model that by appending them
            return ProxyHeader(out.version, out.source, out.destination, out.rest + data[i + step :])
    return out


# -- v1 ---------------------------------------------------------------------------------------------------


def test_v1_tcp4_with_pipelined_rest():
    h = parse_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\nUSER alice\r\n")
    assert h == ProxyHeader(1, ("192.0.2.7", 56324), ("198.51.100.1", 110), b"USER alice\r\n")


def test_v1_tcp6_and_unknown():
    h = parse_all(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 995\r\n")
    assert h is not None and h.source == ("2001:db8::7", 4000) and h.destination == ("2001:db8::1", 995)
    h = parse_all(b"PROXY UNKNOWN ffff:f::1 whatever 1 2\r\n")
    assert h is not None and h.source is None and h.rest == b""


def test_v1_byte_by_byte():
    data = b"PROXY TCP4 10.1.2.3 10.0.0.1 1 2\r\n+"
    assert parse_all(data, 1) == ProxyHeader(1, ("10.1.2.3", 1), ("10.0.0.1", 2), b"+")
    assert ProxyParser().feed(b"PROXY TCP4 10.1") is None


@pytest.mark.parametrize(
    "bad",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # missing field
        b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 110\r\n",  # port range
        b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 110\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 0110 110\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.999 198.51.100.1 1 110\r\n",
        b"PROXY TCP4  192.0.2.7 198.51.100.1 1 110\r\n",  # double space
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 110\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 110\n",  # bare LF
        b"PROXY " + b"A" * 120,  # no CRLF within 107 octets
        b"USER alice\r\n",  # no header at all
        b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n",
    ],
)
def test_v1_malformed(bad):
    with pytest.raises(ProxyError):
        parse_all(bad)


# -- v2 ---------------------------------------------------------------------------------------------------


def test_v2_tcp4_tcp6_local_and_tlvs():
    h = parse_all(encode_v2(("192.0.2.7", 5000), ("198.51.100.1", 110)) + b"CAPA\r\n")
    assert h == ProxyHeader(2, ("192.0.2.7", 5000), ("198.51.100.1", 110), b"CAPA\r\n")
    tlv = b"\x01\x00\x04pop3"  # PP2_TYPE_ALPN, skipped
    h = parse_all(encode_v2(("2001:db8::7", 1), ("2001:db8::1", 995), tlv), 3)
    assert h is not None and h.source == ("2001:db8::7", 1) and h.rest == b""
    h = parse_all(encode_v2(None, None))
    assert h is not None and h.version == 2 and h.source is None


def test_v2_hand_made_bytes():
    """Spelled out from the spec, independent of encode_v2."""
    raw = (
        b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
        + b"\x21\x11\x00\x0c"
        + bytes([203, 0, 113, 9])
        + bytes([10, 0, 0, 1])
        + struct.pack("!HH", 40000, 110)
    )
    assert parse_all(raw) == ProxyHeader(2, ("203.0.113.9", 40000), ("10.0.0.1", 110), b"")
    unix = V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + b"\0" * 216
    h = parse_all(unix)
    assert h is not None and h.source is None


@pytest.mark.parametrize(
    "bad",
    [
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\0" * 12,  # version 1 in a v2 header
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\0" * 12,  # command 2
        V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\0" * 12,  # unknown family
        V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4,  # address block too short
        V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\0" * 12,  # TCP6 needs 36 octets
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # absurd length
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c",  # signature off by one octet
    ],
)
def test_v2_malformed(bad):
    with pytest.raises(ProxyError):
        parse_all(bad)


# -- properties -------------------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    port,
    port,
    st.booleans(),
    st.binary(max_size=40),
    st.integers(1, 40),
)
def test_roundtrip_any_split(addrs, sp, dp, v2, rest, step):
    src, dst = (addrs[0], sp), (addrs[1], dp)
    data = (encode_v2(src, dst) if v2 else encode_v1(src, dst)) + rest
    h = parse_all(data, step)
    assert h is not None
    assert (h.version, h.source, h.destination, h.rest) == (2 if v2 else 1, src, dst, rest)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=60).map(lambda b: b"PROXY " + b),
        st.binary(max_size=60).map(lambda b: V2_SIGNATURE + b),
    ),
    st.integers(1, 20),
)
def test_garbage_only_ever_raises_proxy_error(data, step):
    with contextlib.suppress(ProxyError):
        parse_all(data, step)


def test_trusted_networks():
    cidrs = ("127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32")
    assert in_networks("10.9.8.7", cidrs) and in_networks("127.0.0.1", cidrs)
    assert in_networks("::ffff:10.1.1.1", cidrs)  # IPv4-mapped on a dual-stack listener
    assert in_networks("2001:db8::5", cidrs)
    assert not in_networks("127.0.0.2", cidrs) and not in_networks("192.0.2.1", cidrs)
    assert not in_networks("not-an-ip", cidrs)


# -- the gate in front of a real server -------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    return buf[:-2]


def _closed_without_greeting(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_real_client_address_in_logs_and_session(start_server, caplog):
    caplog.set_level(logging.INFO, logger="pop3d")
    st_ = start_server(
        server={"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"]}, auth={"secure_networks": ["203.0.113.0/24"]}
    )
    s = _connect(st_.port)
    # header, then pipelined commands in the same segment: nothing is lost
    s.sendall(encode_v1(("203.0.113.7", 40001), ("127.0.0.1", st_.port)) + b"USER alice\r\nPASS wonderland\r\n")
    assert _read_line(s).startswith(b"+OK pop3d ready")
    assert _read_line(s).startswith(b"+OK")
    assert _read_line(s).startswith(b"+OK alice has")
    (session,) = list(st_.ctx.sessions)
    assert session.handler.peer == "203.0.113.7"
    s.sendall(b"QUIT\r\n")
    assert _read_line(s).startswith(b"+OK")
    s.close()
    st_.wait_idle()
    assert "login user=alice rip=203.0.113.7" in caplog.text
    assert "session end user=alice rip=203.0.113.7" in caplog.text


def test_v2_header_split_over_segments(start_server):
    st_ = start_server(server={"proxy_protocol": True})
    s = _connect(st_.port)
    hdr = encode_v2(("2001:db8::9", 1234), ("::1", 110))
    s.sendall(hdr[:7])
    s.sendall(hdr[7:20])
    s.sendall(hdr[20:])
    assert _read_line(s).startswith(b"+OK pop3d ready")
    assert next(iter(st_.ctx.sessions)).handler.peer == "2001:db8::9"
    s.close()


def test_local_and_unknown_keep_socket_address(start_server):
    st_ = start_server(server={"proxy_protocol": True})
    for hdr in (encode_v2(None, None), encode_v1(None, None)):
        s = _connect(st_.port)
        s.sendall(hdr)
        assert _read_line(s).startswith(b"+OK")
        assert {x.handler.peer for x in st_.ctx.sessions} == {"127.0.0.1"}
        s.close()
        st_.wait_idle()


@pytest.mark.parametrize(
    "payload", [b"USER alice\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", V2_SIGNATURE + b"\x21\x11\x00\x01\x00"]
)
def test_malformed_header_closes_without_greeting(start_server, payload, caplog):
    caplog.set_level(logging.WARNING, logger="pop3d")
    st_ = start_server(server={"proxy_protocol": True})
    s = _connect(st_.port)
    s.sendall(payload)
    assert _closed_without_greeting(s)
    s.close()
    assert "bad PROXY header from 127.0.0.1" in caplog.text


def test_untrusted_peer_closed_before_anything(start_server, caplog):
    caplog.set_level(logging.WARNING, logger="pop3d")
    st_ = start_server(server={"proxy_protocol": True, "proxy_trusted": ["10.0.0.0/8"]})
    s = _connect(st_.port)
    assert _closed_without_greeting(s)  # not even waiting for a header
    s.close()
    assert "peer 127.0.0.1 is not in server.proxy_trusted" in caplog.text


def test_no_header_in_time_is_cut(start_server):
    st_ = start_server(server={"proxy_protocol": True}, session={"timeout_authorization": 0.3})
    s = _connect(st_.port)
    s.sendall(b"PROXY TCP4 1.2")  # and nothing more
    assert _closed_without_greeting(s)
    s.close()


def test_off_by_default_header_is_just_a_bad_command(server):
    s = _connect(server.port)
    assert _read_line(s).startswith(b"+OK")  # greeting comes at once: no gate
    s.sendall(encode_v1(("192.0.2.1", 1), ("192.0.2.2", 2)))
    assert _read_line(s).startswith(b"-ERR")
    s.close()


def test_cleartext_policy_and_penalty_see_the_client_not_the_proxy(start_server, caplog):
    """The TCP peer is loopback (a secure network); the proxied client is not, so USER/PASS is refused."""
    caplog.set_level(logging.INFO, logger="pop3d")
    st_ = start_server(server={"proxy_protocol": True})
    s = _connect(st_.port)
    s.sendall(encode_v2(("198.51.100.1", 5555), ("127.0.0.1", st_.port)) + b"USER alice\r\n")
    assert _read_line(s).startswith(b"+OK pop3d ready")
    assert _read_line(s).startswith(b"-ERR [AUTH] plaintext authentication disallowed")
    s.close()
    st_.wait_idle()
    assert "session end user=- rip=198.51.100.1" in caplog.text
