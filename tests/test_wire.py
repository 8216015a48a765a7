"""Wire transforms: sizes, CRLF normalisation, dot-stuffing, TOP, chunk boundaries (property tests)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pop3d import wire

# messages made of the bytes that matter: CR, LF, dot, and ordinary text
_msg = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"From ", b"\xe9", b" "]), max_size=60).map(
    b"".join
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(c % (len(data) + 1) for c in cuts)
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_examples():
    assert wire.to_network(b"a\nb") == b"a\r\nb\r\n"
    assert wire.to_network(b"a\r\nb\r\n") == b"a\r\nb\r\n"
    assert wire.to_network(b"a\rb\n") == b"a\rb\r\n"  # bare CR kept
    assert wire.to_network(b"") == b""
    assert wire.encode(b".x\n..y\nz") == b"..x\r\n...y\r\nz\r\n.\r\n"
    assert wire.encode(b"") == b".\r\n"
    assert wire.network_size(b"a\nb") == 6


def test_top():
    msg = b"H: 1\nH: 2\n\nl1\nl2\n.l3\n"
    assert wire.top(msg, 0) == b"H: 1\r\nH: 2\r\n\r\n.\r\n"
    assert wire.top(msg, 2) == b"H: 1\r\nH: 2\r\n\r\nl1\r\nl2\r\n.\r\n"
    assert wire.top(msg, 3) == b"H: 1\r\nH: 2\r\n\r\nl1\r\nl2\r\n..l3\r\n.\r\n"
    assert wire.top(msg, 99) == wire.encode(msg)
    assert wire.top(b"H: 1\nno-body", 0) == b"H: 1\r\nno-body\r\n.\r\n"  # no blank line: all headers
    assert wire.top(b"\nbody1\nbody2\n", 1) == b"\r\nbody1\r\n.\r\n"  # no headers at all


@given(_msg)
def test_size_is_octets_sent_before_stuffing(raw):
    net = wire.to_network(raw)
    assert wire.network_size(raw) == len(net)
    enc = wire.Encoder()
    body = enc.feed(raw) + enc.finish()
    assert enc.size == len(net)
    assert body.endswith(b".\r\n")
    assert wire.unstuff(body[:-3]) == net


@given(_msg)
def test_network_form_is_crlf_clean(raw):
    net = wire.to_network(raw)
    assert net == b"" or net.endswith(b"\r\n")
    assert b"\n" not in net.replace(b"\r\n", b"")  # no bare LF left
    assert wire.to_network(net) == net  # idempotent: stored CRLF is not doubled


@given(st.binary(max_size=200))
def test_unstuff_inverts_stuff(raw):
    net = wire.to_network(raw)
    stuffed = wire.encode(raw)[:-3]
    assert wire.unstuff(stuffed) == net
    # no line of the stuffed body is the terminator
    assert b"\r\n.\r\n" not in b"\r\n" + stuffed


@given(_msg, st.lists(st.integers(0, 1000), max_size=8), st.one_of(st.none(), st.integers(0, 5)))
def test_chunk_boundaries_do_not_matter(raw, cuts, lines):
    chunks = _split(raw, cuts)
    assert wire.encode_chunks(chunks, lines) == wire.encode_chunks([raw], lines)


@given(_msg, st.integers(0, 5))
def test_top_is_a_prefix_of_retr(raw, n):
    full = wire.encode(raw)[:-3]
    part = wire.top(raw, n)[:-3]
    assert full.startswith(part)


def _headers_ascii_reference(data: bytes) -> bool:
    """RFC 6532/6856 as read plainly: the header section ends at the first empty line (LF or CRLF ends)."""
    lines = data.split(b"\n")
    header = []
    for line in lines:
        if line in (b"", b"\r"):
            break
        header.append(line)
    else:
        return data.isascii()
    return b"\n".join(header).isascii()


@given(
    st.lists(
        st.sampled_from([b"Subject: x", b"\n", b"\r\n", b"\r", b"\xc3\xa9", b"body", b"\x80", b":", b" "]),
        max_size=30,
    ).map(b"".join)
)
def test_headers_ascii_looks_at_the_header_section_only(data: bytes) -> None:
    assert wire.headers_ascii(data) is _headers_ascii_reference(data)
