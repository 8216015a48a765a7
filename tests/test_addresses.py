"""pop3d.net.addresses: one matcher for auth.secure_networks and server.proxy_trusted."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from pop3d.net.addresses import Networks, in_networks, networks, parse_peer

v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
v4_net = st.tuples(v4, st.integers(0, 32)).map(lambda t: ipaddress.IPv4Network((t[0], t[1]), strict=False))
v6_net = st.tuples(v6, st.integers(0, 128)).map(lambda t: ipaddress.IPv6Network((t[0], t[1]), strict=False))
nets = st.lists(st.one_of(v4_net, v6_net), max_size=4)


@given(v4, nets)
def test_ipv4_matches_like_ipaddress(addr, ns):
    cidrs = [str(n) for n in ns]
    expected = any(addr in n for n in ns if n.version == 4)
    assert in_networks(str(addr), cidrs) is expected
    # the same client seen through a dual-stack (IPv6) listener: its IPv4 networks, or an IPv6 one holding it
    mapped = ipaddress.IPv6Address(f"::ffff:{addr}")
    assert in_networks(str(mapped), cidrs) is (expected or any(mapped in n for n in ns if n.version == 6))


@given(v6, nets, st.sampled_from(["", "%eth0", "%1"]))
def test_ipv6_matches_like_ipaddress_whatever_the_scope(addr, ns, scope):
    cidrs = [str(n) for n in ns]
    mapped = addr.ipv4_mapped
    expected = any(addr in n for n in ns) or (mapped is not None and any(mapped in n for n in ns))
    assert in_networks(f"{addr}{scope}", cidrs) is expected


@given(st.text(max_size=40).map(lambda t: "/run/" + t), nets)
def test_unix_socket_peers_never_match(path, ns):
    assert parse_peer(path) is None
    assert not in_networks(path, [str(n) for n in ns] + ["0.0.0.0/0", "::/0"])


def test_examples():
    cidrs = ("127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32")
    assert in_networks("10.9.8.7", cidrs) and in_networks("127.0.0.1", cidrs)
    assert in_networks("::ffff:10.1.1.1", cidrs)
    assert in_networks("2001:db8::5%eth0", cidrs)
    assert not in_networks("127.0.0.2", cidrs) and not in_networks("192.0.2.1", cidrs)
    assert not in_networks("", cidrs) and not in_networks("not-an-ip", cidrs)
    assert not in_networks("127.0.0.1", [])
    assert in_networks("::ffff:192.0.2.7", ["::ffff:0:0/96"])  # a network written in mapped form


def test_parsed_once_per_list():
    a = networks(["10.0.0.0/8", "::1"])
    assert a is networks(("10.0.0.0/8", "::1")) and len(a) == 2
    assert isinstance(a, Networks) and "10.1.2.3" in a and 10 not in a


@given(st.lists(v4, min_size=1, max_size=30), nets)
def test_remembered_answers_stay_right_and_bounded(addrs, ns):
    """The memo never changes an answer, asked once or again, and a flood of addresses cannot grow it."""

    class Small(Networks):
        MEMO = 8

    matcher = Small([str(n) for n in ns])
    for _ in range(2):
        for addr in addrs:
            assert (str(addr) in matcher) is any(addr in n for n in ns if n.version == 4)
    assert len(matcher._answers) <= 8
