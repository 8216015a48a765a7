"""mbox parsing, quoting dialects and sizes: pure, no files (pread over a bytes object)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d import wire
from pop3d.storage.mbox.format import NotMbox, Unquoter, find_xuidl, scan, unquote


def quote(body: bytes) -> bytes:
    """The mboxrd writer side (an MDA's job, not pop3d's): one `>` more on every `>*From ` line."""
    return re.sub(rb"(?m)^(>*From )", rb">\1", body)


def reader(data: bytes):  # type: ignore[no-untyped-def]
    return lambda off, n: data[off : off + n]


def contents(data: bytes, mboxrd: bool = True, block: int = 1 << 20) -> list[bytes]:
    out = []
    for e in scan(reader(data), 0, len(data), mboxrd, block):
        body = data[e.body : e.end]
        out.append(unquote(body) if mboxrd else body)
    return out


def write_mbox(bodies: list[bytes], mboxrd: bool = True) -> tuple[bytes, list[bytes]]:
    """What an MTA writes: separator, quoted body (LF added if missing), one padding line.

    mboxrd quotes `>*From ` lines and readers unquote them; mboxo writers quote only `From ` lines and
    readers deliver what is stored."""
    out, expected = [], []
    for n, body in enumerate(bodies):
        if body and not body.endswith(b"\n"):
            body += b"\n"
        stored = quote(body) if mboxrd else re.sub(rb"(?m)^From ", b">From ", body)
        out.append(b"From sender%d@example.org Thu Nov 26 10:00:00 2026\n" % n + stored + b"\n")
        expected.append(body if mboxrd else stored)
    return b"".join(out), expected


def test_separator_padding_and_dialects():
    data = (b"From a@b Thu Nov 26 10:00:00 2026\nSubject: one\n\nhello\n>From the past\n>>From deeper\n\n"
            b"From c@d Thu Nov 26 10:00:01 2026\r\nSubject: two\r\n\r\nbody\r\n\r\n"
            b"From e@f Thu Nov 26 10:00:02 2026\nno final newline")  # fmt: skip
    rd = contents(data, True)
    assert rd == [b"Subject: one\n\nhello\nFrom the past\n>From deeper\n", b"Subject: two\r\n\r\nbody\r\n",
                  b"no final newline"]  # fmt: skip
    o = contents(data, False)
    assert o[0] == b"Subject: one\n\nhello\n>From the past\n>>From deeper\n"
    entries = scan(reader(data), 0, len(data), True)
    assert [e.size for e in entries] == [wire.network_size(c) for c in rd]
    entries_o = scan(reader(data), 0, len(data), False)
    assert [e.size for e in entries_o] == [wire.network_size(c) for c in o]
    assert entries[2].size == len(b"no final newline\r\n")
    assert [e.next for e in entries[:2]] == [entries[1].start, entries[2].start]


def test_empty_messages_and_bad_files():
    data = b"From a\n\nFrom b\nFrom c\n"
    assert contents(data) == [b"", b"", b""]
    assert [e.size for e in scan(reader(data), 0, len(data), True)] == [0, 0, 0]
    with pytest.raises(NotMbox):
        scan(reader(b"Subject: not an mbox\n"), 0, 21, True)
    with pytest.raises(NotMbox):
        scan(reader(b"\nFrom a\n"), 0, 8, True)
    with pytest.raises(EOFError):
        scan(reader(b"From a\nx\n"), 0, 100, True)


def test_from_inside_a_line_is_not_a_separator():
    data = b"From a\nSubject: x\n\nsay From here\nxFrom y\n\rFrom z\n"
    assert contents(data) == [b"Subject: x\n\nsay From here\nxFrom y\n\rFrom z\n"]


def test_xuidl():
    assert find_xuidl(b"From a\nSubject: s\nX-UIDL: 3f2a\n\nbody") == "3f2a"
    assert find_xuidl(b"From a\nx-uidl:\t<abc>  \r\n\r\n") == "<abc>"
    assert find_xuidl(b"From a\nSubject: s\n\nX-UIDL: in-body\n") is None
    assert find_xuidl(b"From a\nX-UIDL: " + b"x" * 71 + b"\n\n") is None  # RFC 1939 §7: at most 70
    assert find_xuidl(b"From a\n\nX-UIDL: 1\n") is None


bodies = st.lists(
    st.lists(st.sampled_from([b"From ", b">From ", b">>From x", b"\n", b"\r\n", b"\r", b"a", b"Subject: s\n", b"."]),
             max_size=12).map(b"".join),
    max_size=6,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(bodies, st.booleans(), st.integers(min_value=64, max_value=300))
def test_roundtrip_any_block_size(msgs: list[bytes], mboxrd: bool, block: int) -> None:
    data, expected = write_mbox(msgs, mboxrd)
    assert contents(data, mboxrd, block) == expected
    entries = scan(reader(data), 0, len(data), mboxrd, block)
    assert entries == scan(reader(data), 0, len(data), mboxrd)
    assert [e.size for e in entries] == [wire.network_size(b) for b in expected]
    # scanning from any message boundary gives the tail of the list (appended-spool scans)
    for k, e in enumerate(entries):
        assert scan(reader(data), e.start, len(data), mboxrd, block) == entries[k:]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"From ", b">", b">>From ", b"F", b"ro", b"m ", b"\n", b"x", b"\r\n"]), max_size=30),
       st.lists(st.integers(min_value=1, max_value=7), max_size=30))  # fmt: skip
def test_unquoter_any_chunking(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    u = Unquoter()
    out, pos = [], 0
    for c in cuts:
        out.append(u.feed(data[pos : pos + c]))
        pos += c
    out.append(u.feed(data[pos:]))
    out.append(u.finish())
    assert b"".join(out) == unquote(data)


@given(st.binary(max_size=200))
def test_quote_unquote_inverse(body: bytes) -> None:
    assert unquote(quote(body)) == body
