"""The sans-IO core: no loop, no sockets, no files."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pop3d.pop3.protocol import (
    MAX_COMMAND_LINE,
    Command,
    CommandParser,
    LineBuffer,
    Rejected,
    State,
    err,
    multiline,
    ok,
)

A, T = State.AUTHORIZATION, State.TRANSACTION
P = CommandParser()


def parse(line: bytes, state: State = T):
    return P.parse(line, state)


def test_keywords_are_case_insensitive():
    assert parse(b"stat") == Command("STAT", ())
    assert parse(b"StAt") == Command("STAT", ())
    assert parse(b"uSeR bob", A) == Command("USER", ("bob",))


def test_arguments():
    assert parse(b"LIST") == Command("LIST", ())
    assert parse(b"LIST 3") == Command("LIST", ("3",))
    assert parse(b"TOP 1 0") == Command("TOP", ("1", "0"))
    assert parse(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb", A) == Command(
        "APOP", ("mrose", "c4c9334bac560ecc979e58001b3e22fb")
    )


def test_pass_keeps_spaces_in_password():
    assert parse(b"PASS my secret  pass ", A) == Command("PASS", ("my secret  pass ",))


def test_malformed_arguments_are_rejected_with_err():
    for line in [
        b"RETR",
        b"RETR x",
        b"RETR 0",
        b"RETR -1",
        b"RETR +1",
        b"RETR 1 2",
        b"LIST 1 2",
        b"TOP 1",
        b"TOP 1 -1",
        b"TOP 0 1",
        b"DELE 1.0",
        b"STAT 1",
        b"NOOP x",
        b"UIDL a",
        "RETR ١".encode(),
        b"RETR 99999999999",
    ]:
        ev = parse(line)
        assert isinstance(ev, Rejected), line
        assert ev.reply.startswith(b"-ERR ") and ev.reply.endswith(b"\r\n")
    assert isinstance(parse(b"APOP bob nothex", A), Rejected)
    assert isinstance(parse(b"PASS", A), Rejected)
    assert isinstance(parse(b"USER", A), Rejected)


def test_state_legality():
    # RFC 1939 §3: transaction verbs before login, and authorization verbs after, are refused
    for verb in [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL", b"LAST"]:
        assert isinstance(parse(verb, A), Rejected), verb
    for verb in [b"USER a", b"PASS a", b"APOP a " + b"0" * 32, b"RPOP x"]:
        assert isinstance(parse(verb, T), Rejected), verb
    assert parse(b"QUIT", A) == Command("QUIT", ())
    assert parse(b"CAPA", A) == Command("CAPA", ())
    assert parse(b"CAPA", T) == Command("CAPA", ())


def test_unknown_and_empty():
    assert parse(b"FOO").reply == err("unknown command")
    assert parse(b"").reply == err("empty command")
    assert isinstance(parse(b"\xff\xfe"), Rejected)
    assert isinstance(parse(b"ST4T"), Rejected)


def test_reply_format():
    assert ok() == b"+OK\r\n"
    assert ok("x y") == b"+OK x y\r\n"
    assert err("no", "IN-USE") == b"-ERR [IN-USE] no\r\n"
    assert multiline(ok("list"), ["1 2", ".x"]) == b"+OK list\r\n1 2\r\n..x\r\n.\r\n"


# -- line splitting ------------------------------------------------------------------------------


def test_lines_split_across_feeds_and_in_one_segment():
    lb = LineBuffer()
    assert lb.feed(b"ST") == []
    assert lb.feed(b"AT\r\nLIST\r") == [b"STAT"]
    assert lb.feed(b"\nNOOP\nQUIT\r\n") == [b"LIST", b"NOOP", b"QUIT"]
    assert lb.pending == 0


def test_line_limit_counts_crlf():
    lb = LineBuffer()
    ok_line = b"X" * (MAX_COMMAND_LINE - 2)
    assert lb.feed(ok_line + b"\r\n") == [ok_line]
    assert lb.feed(ok_line + b"Y\r\n") == [None]


def test_flood_without_crlf_stays_bounded_and_recovers():
    lb = LineBuffer()
    for _ in range(1000):
        assert lb.feed(b"A" * 4096) == []
        assert lb.pending <= MAX_COMMAND_LINE
    assert lb.feed(b"AAAA\r\nNOOP\r\n") == [None, b"NOOP"]


@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=20), st.data())
def test_chunking_never_changes_lines(lines, data):
    """Property: however the stream is cut, the same lines come out."""
    stream = b"".join(line + b"\r\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole = LineBuffer().feed(stream)
    lb = LineBuffer()
    got = [x for p in pieces for x in lb.feed(p)]
    assert got == whole
    assert got == [(ln if len(ln) + 2 <= MAX_COMMAND_LINE else None) for ln in lines]


@given(st.binary(max_size=400))
def test_parser_never_raises(line):
    for state in (A, T):
        ev = P.parse(line, state)
        assert isinstance(ev, (Command, Rejected))
