"""Pop3Handler on its own (what each command returns) and the state table of pop3d.pop3.state."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from fakes import ClockLoop, Connection, FakeAuth, FakeStorage, make_context, messages, stored
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.pop3 import protocol
from pop3d.pop3.handlers import OK, Pop3Handler
from pop3d.pop3.protocol import Command, CommandParser, Rejected
from pop3d.pop3.results import Challenge, Pending, Reply, StartTLS, Stream
from pop3d.pop3.state import TRANSITIONS, IllegalTransition, SessionEvent, State, next_state
from pop3d.storage.base import SMALL_MESSAGE, ReadLater


def handler(**kw: Any) -> Pop3Handler:
    storage = stored({"alice": [b"Subject: hi\n\n.dot\nbody\n", SMALL_MESSAGE + 1000]})
    return Pop3Handler(make_context(kw.pop("fake_auth", None), storage, **kw), "127.0.0.1")


def storage_of(h: Pop3Handler) -> FakeStorage:
    return cast(FakeStorage, h.ctx.storage)


def state_of(h: Pop3Handler) -> State:
    """The handler's state, read afresh (mypy would otherwise keep an earlier assert's narrowing)."""
    return h.state


def resolve(loop: ClockLoop, result: Any) -> Any:
    assert isinstance(result, Pending)
    return loop.run_until_complete(result.awaitable)


def logged_in(loop: ClockLoop, **kw: Any) -> Pop3Handler:
    h = handler(**kw)
    assert h.dispatch(Command("USER", ("alice",))) is not None
    reply = resolve(loop, h.dispatch(Command("PASS", ("wonderland",))))
    assert isinstance(reply, Reply) and reply.data.startswith(b"+OK alice has 2 messages")
    return h


# ---- one result object per reply --------------------------------------------------------------------------


def test_fast_verbs_return_replies_synchronously(clock: ClockLoop) -> None:
    h = logged_in(clock)
    for verb, args in [
        ("STAT", ()),
        ("LIST", ()),
        ("LIST", ("1",)),
        ("UIDL", ()),
        ("UIDL", ("2",)),
        ("DELE", ("1",)),
        ("RSET", ()),
        ("LAST", ()),
        ("CAPA", ()),
        ("RETR", ("1",)),
        ("TOP", ("1", "0")),
    ]:
        r = h.dispatch(Command(verb, args))
        assert type(r) is Reply and not r.close and r.reason is None, verb
    assert h.dispatch(Command("NOOP", ())) is OK  # a constant, built once


def test_small_retr_is_one_reply_and_big_one_a_stream(clock: ClockLoop) -> None:
    h = logged_in(clock)
    small = h.dispatch(Command("RETR", ("1",)))
    assert isinstance(small, Reply)
    assert small.data.endswith(b"\r\n..dot\r\nbody\r\n.\r\n") and h.counters.retr == 1 and h.last == 1
    # outside UTF-8 mode the first chunk is read before the +OK (RFC 6856 §2.1: its headers must be ASCII)
    pending = h.dispatch(Command("RETR", ("2",)))
    assert isinstance(pending, Pending)
    big = clock.run_until_complete(pending.awaitable)
    assert isinstance(big, Stream) and big.index == 1 and big.lines is None
    assert big.header == b"+OK %d octets\r\n" % h.messages[1].size
    h.utf8 = True  # in UTF-8 mode the message goes as stored: a Stream at once
    top = h.dispatch(Command("TOP", ("2", "3")))
    assert isinstance(top, Stream) and top.lines == 3
    clock.run_until_complete(big.chunks.aclose())  # type: ignore[attr-defined]
    clock.run_until_complete(top.chunks.aclose())  # type: ignore[attr-defined]


def test_a_read_too_much_for_the_loop_is_awaited_instead(clock: ClockLoop) -> None:
    """ReadLater from read_small (a Maildir message renamed meanwhile, in a huge directory) is no failure:
    the reply waits for `read`, which the driver runs off the loop."""
    h = logged_in(clock)
    storage_of(h).errors["read"] = ReadLater("renamed meanwhile, in a large directory")
    pending = h.dispatch(Command("RETR", ("1",)))
    assert isinstance(pending, Pending)
    reply = clock.run_until_complete(pending.awaitable)
    assert isinstance(reply, Reply) and reply.data.endswith(b"\r\n..dot\r\nbody\r\n.\r\n")
    assert h.counters.retr == 1


def test_password_checks_are_pending_and_move_the_state(clock: ClockLoop) -> None:
    h = handler()
    assert h.state is State.AUTHORIZATION
    assert h.dispatch(Command("USER", ("alice",))).data == b"+OK send PASS\r\n"  # type: ignore[union-attr]
    pending = h.dispatch(Command("PASS", ("wonderland",)))
    assert isinstance(pending, Pending) and h.state is State.AUTHORIZATION  # nothing happens until awaited
    reply = resolve(clock, pending)
    assert isinstance(reply, Reply) and state_of(h) is State.TRANSACTION and h.drop is not None


def test_failed_login_keeps_authorization(clock: ClockLoop) -> None:
    h = handler()
    h.dispatch(Command("USER", ("alice",)))
    reply = resolve(clock, h.dispatch(Command("PASS", ("nope",))))
    assert reply.data == b"-ERR [AUTH] authentication failed\r\n" and h.state is State.AUTHORIZATION
    assert h.dispatch(Command("PASS", ("wonderland",))).data == b"-ERR USER first\r\n"  # type: ignore[union-attr]


def test_in_use_maildrop(clock: ClockLoop) -> None:
    h = handler()
    storage_of(h).locked.add("alice")
    h.dispatch(Command("USER", ("alice",)))
    reply = resolve(clock, h.dispatch(Command("PASS", ("wonderland",))))
    assert reply.data.startswith(b"-ERR [IN-USE]") and h.state is State.AUTHORIZATION


def test_quit_results(clock: ClockLoop) -> None:
    h = handler()
    r = h.dispatch(Command("QUIT", ()))
    assert isinstance(r, Reply) and r.close and r.reason == "QUIT" and h.state is State.CLOSED
    h = logged_in(clock)
    h.dispatch(Command("DELE", ("2",)))
    pending = h.dispatch(Command("QUIT", ()))
    assert h.state is State.UPDATE  # RFC 1939 §6: UPDATE as soon as QUIT is accepted
    r = resolve(clock, pending)
    assert isinstance(r, Reply) and r.close and r.reason == "QUIT" and state_of(h) is State.CLOSED
    assert r.data == b"+OK pop3d signing off (1 message left)\r\n"
    assert [c.deleted for c in storage_of(h).commits] == [{1}]


def test_expire_zero_deletes_retrieved_messages(clock: ClockLoop) -> None:
    h = logged_in(clock, session={"expire": "0"})
    h.dispatch(Command("RETR", ("1",)))
    resolve(clock, h.dispatch(Command("QUIT", ())))
    assert [c.deleted for c in storage_of(h).commits] == [{0}]


def test_stls_and_sasl_results() -> None:
    h = handler(with_tls=True, auth={"mechanisms": ["PLAIN", "LOGIN"]})
    h.dispatch(Command("USER", ("alice",)))
    r = h.dispatch(Command("STLS", ()))
    assert isinstance(r, StartTLS) and r.data == b"+OK Begin TLS negotiation\r\n"
    assert h.user_name is None  # RFC 2595 §4: nothing from before the handshake carries over
    h.tls_established(None)
    assert h.dispatch(Command("STLS", ())).data == b"-ERR already using TLS\r\n"  # type: ignore[union-attr]
    c = h.dispatch(Command("AUTH", ("LOGIN",)))
    assert isinstance(c, Challenge) and c.data == b"+ VXNlcm5hbWU6\r\n" and c.mechanism.name == "LOGIN"
    c2 = h.sasl_line(c.mechanism, b"YWxpY2U=")
    assert isinstance(c2, Challenge) and c2.data == b"+ UGFzc3dvcmQ6\r\n"
    cancelled = h.sasl_line(c2.mechanism, b"*")
    assert isinstance(cancelled, Reply) and cancelled.data == b"-ERR [AUTH] authentication cancelled\r\n"


def test_sasl_login_completes(clock: ClockLoop) -> None:
    h = handler(auth={"mechanisms": ["PLAIN"]})
    r = h.dispatch(Command("AUTH", ("PLAIN", "AGFsaWNlAHdvbmRlcmxhbmQ=")))  # \0alice\0wonderland
    reply = resolve(clock, r)
    assert isinstance(reply, Reply) and reply.data.startswith(b"+OK alice has") and h.state is State.TRANSACTION


def test_abort_releases_without_commit(clock: ClockLoop) -> None:
    h = logged_in(clock)
    h.dispatch(Command("DELE", ("1",)))
    clock.run_until_complete(h.abort())
    assert h.state is State.CLOSED and storage_of(h).commits == [] and storage_of(h).locked == set()


# ---- MAX_ARG_LEN is gone on purpose -----------------------------------------------------------------------


def test_arguments_longer_than_rfc_1939_forty_characters_are_accepted(clock: ClockLoop) -> None:
    assert not hasattr(protocol, "MAX_ARG_LEN")
    name = "a.very.long.mailbox.name.for.testing@subdomain.example.org"  # 58 characters
    password = "correct horse battery staple " * 3
    parser = CommandParser()
    assert parser.parse(b"USER " + name.encode(), State.AUTHORIZATION) == Command("USER", (name,))
    assert parser.parse(b"PASS " + password.encode(), State.AUTHORIZATION) == Command("PASS", (password,))
    ctx = make_context(FakeAuth({name: password}), stored({name: messages(5)}))
    c = Connection(clock, ctx)
    c.send(b"USER %s\r\nPASS %s\r\n" % (name.encode(), password.encode()))
    assert c.lines()[-1].startswith(b"+OK " + name.encode() + b" has 1 message ")


def test_protocol_state_is_the_state_module_one() -> None:
    assert protocol.State is State


# ---- the state table --------------------------------------------------------------------------------------


def test_illegal_transitions_raise() -> None:
    with pytest.raises(IllegalTransition):
        next_state(State.TRANSACTION, SessionEvent.LOGIN_OK)
    with pytest.raises(IllegalTransition):
        next_state(State.UPDATE, SessionEvent.DISCONNECT)  # a commit is never interrupted
    with pytest.raises(IllegalTransition):
        next_state(State.CLOSED, SessionEvent.QUIT)


#: How each state may be entered (RFC 1939 §3-6): from which state, by which event.
ENTRY = {
    State.TRANSACTION: {(State.AUTHORIZATION, SessionEvent.LOGIN_OK)},
    State.UPDATE: {(State.TRANSACTION, SessionEvent.QUIT)},
}


@given(st.lists(st.sampled_from(list(SessionEvent)), max_size=30))
def test_random_event_sequences_never_reach_an_illegal_state(events: list[SessionEvent]) -> None:
    state = State.AUTHORIZATION
    seen_update = False
    for event in events:
        try:
            new = next_state(state, event)
        except IllegalTransition:
            assert (state, event) not in TRANSITIONS
            continue
        assert new in State
        if new is not state and new in ENTRY:
            assert (state, event) in ENTRY[new]
        if state is State.CLOSED:
            assert new is State.CLOSED  # the end is final
        if new is State.TRANSACTION:
            assert state is State.AUTHORIZATION and not seen_update  # no second login, none after UPDATE
        seen_update |= new is State.UPDATE
        state = new


VOCABULARY = [
    b"USER alice",
    b"USER bob",
    b"PASS wonderland",
    b"PASS builder pass",
    b"PASS x",
    b"STAT",
    b"LIST",
    b"LIST 2",
    b"UIDL",
    b"RETR 1",
    b"RETR 3",
    b"TOP 2 1",
    b"DELE 1",
    b"DELE 2",
    b"RSET",
    b"NOOP",
    b"LAST",
    b"CAPA",
    b"QUIT",
    b"AUTH PLAIN",
    b"AGFsaWNlAHdvbmRlcmxhbmQ=",
    b"*",
    b"APOP alice " + b"0" * 32,
    b"BOGUS",
    b"",
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=6), max_size=8), st.booleans())
def test_random_pipelined_sessions_follow_the_table(segments: list[list[bytes]], hang_up: bool) -> None:
    """Whatever a client sends, however it pipelines it: no internal error, the handler only ever holds a
    state of the table, deletions happen only through QUIT from TRANSACTION, and the lock is released."""
    loop = ClockLoop()
    try:
        storage = stored({"alice": messages(50, 60, 70), "bob": messages(10)})
        ctx = make_context(FakeAuth(), storage, auth={"mechanisms": ["PLAIN"]}, session={"max_bad_commands": 100})
        c = Connection(loop, ctx)
        states = [c.handler.state]
        for segment in segments:
            if c.transport.is_closing():
                break
            c.send(b"".join(line + b"\r\n" for line in segment))
            states.append(c.handler.state)
        if hang_up and not c.transport.is_closing():
            c.hang_up()
        elif not c.transport.is_closing():
            c.send(b"*\r\nQUIT\r\n")  # "*" ends a SASL exchange left open, else it is one more bad command
        loop.settle()
        out = c.transport.data
        assert b"internal server error" not in out
        assert all(s in (State.AUTHORIZATION, State.TRANSACTION, State.CLOSED) for s in states)
        assert c.handler.state is State.CLOSED and c.session not in ctx.sessions
        assert storage.locked == set()
        # the only way to a commit: QUIT accepted in TRANSACTION, answered by the UPDATE state's reply
        assert len(storage.commits) == out.count(b"+OK pop3d signing off (") <= 1
        deleted = storage.commits[0].deleted if storage.commits else set()
        assert len(storage.boxes["alice"]) + len(storage.boxes["bob"]) == 4 - len(deleted)
    finally:
        loop.close()


def test_pending_result_is_not_a_task(clock: ClockLoop) -> None:
    """A Pending wraps a coroutine; nothing is scheduled until the session decides to run it."""
    h = handler()
    h.dispatch(Command("USER", ("alice",)))
    r = h.dispatch(Command("PASS", ("wonderland",)))
    assert isinstance(r, Pending) and asyncio.iscoroutine(r.awaitable)
    assert cast(FakeAuth, h.ctx.auth).calls == []
    r.awaitable.close()


def test_rejected_lines_never_reach_the_handler() -> None:
    assert isinstance(CommandParser().parse(b"STAT", State.AUTHORIZATION), Rejected)
    assert isinstance(CommandParser().parse(b"USER alice", State.CLOSED), Rejected)
