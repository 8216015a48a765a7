"""Pop3Session without sockets: pipelining, ordering, flow control, STLS, SASL routing, timers, the end.

Everything runs on tests/fakes.py: a FakeTransport that records each write call, in-memory auth and storage,
and a ClockLoop whose time only moves when a test advances it (no sleeps, no timing asserts).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
from typing import Any

import pytest
from fakes import ClockLoop, Connection, FakeAuth, FakeMaildrop, FakeTransport, make_context, messages, stored

from pop3d import wire
from pop3d.config import ConfigError
from pop3d.net.limits import LocalCounts, Policy, SharedCounts, Verdict, address_key, process_capacity
from pop3d.pop3.context import OPENS_IN_FLIGHT
from pop3d.pop3.state import State
from pop3d.storage.base import TemporaryError


def connect(
    clock: ClockLoop, boxes: dict[str, Any] | None = None, fake_auth: FakeAuth | None = None, **kw: Any
) -> Connection:
    """A connection from loopback (a secure network: cleartext passwords allowed) to alice's two messages."""
    storage = stored(boxes if boxes is not None else {"alice": [b"Subject: one\n\nbody 1\n", 300]})
    ctx = make_context(fake_auth, storage, **kw)
    return Connection(clock, ctx)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# ---- pipelining -------------------------------------------------------------------------------------------


def test_greeting_is_one_write(clock: ClockLoop) -> None:
    c = connect(clock)
    assert len(c.transport.writes) == 1
    assert c.transport.writes[0].startswith(b"+OK pop3d ready <") and c.transport.writes[0].endswith(b">\r\n")


def test_pipelined_burst_is_answered_in_one_write_without_a_task(clock: ClockLoop) -> None:
    c = connect(clock)
    c.login()
    before = len(c.transport.writes)
    c.loop.inside(c.session.data_received, b"STAT\r\nLIST\r\nUIDL 2\r\nDELE 1\r\nSTAT\r\nLIST 1\r\nNOOP\r\nLAST\r\n")
    assert c.session._task is None  # synchronous all the way: no Task was needed
    assert len(c.transport.writes) == before + 1
    c.loop.settle()
    assert len(c.transport.writes) == before + 1
    size2 = c.handler.messages[1].size
    total = size2 + c.handler.messages[0].size
    assert c.lines(before) == [
        f"+OK 2 {total}".encode(),
        f"+OK 2 messages ({total} octets)".encode(),
        f"1 {c.handler.messages[0].size}".encode(),
        f"2 {size2}".encode(),
        b".",
        b"+OK 2 " + c.handler.messages[1].uid.encode(),
        b"+OK message 1 deleted",
        f"+OK 1 {size2}".encode(),
        b"-ERR message 1 already deleted",
        b"+OK",
        b"+OK 0",
    ]
    # the login's PASS ended without waiting (pop3d.pop3.eager): reading was never paused
    assert c.transport.reading_calls.count("pause") == 0


def test_a_driver_that_needs_a_task_gets_one(clock: ClockLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio.timeout needs the current Task: with a driver that is not `task_free` (one whose code may
    enter it before it first waits), PASS and QUIT run as Tasks (reading paused meanwhile), never as a
    first step outside any Task."""
    c = connect(clock)
    c.storage.task_free = False
    real_open = FakeMaildrop.open
    tasks: list[object] = []

    async def open_in_a_task(self: FakeMaildrop) -> None:
        tasks.append(asyncio.current_task())  # None when run as an eager first step
        async with asyncio.timeout(5):
            await real_open(self)

    monkeypatch.setattr(FakeMaildrop, "open", open_in_a_task)
    c.login()
    assert tasks and tasks[0] is not None
    assert c.transport.reading_calls.count("pause") == 1  # the PASS paused reading until it was done
    c.send(b"QUIT\r\n")
    assert c.lines()[-1].startswith(b"+OK") and c.transport.closed


def test_lines_split_across_segments_are_answered_once_complete(clock: ClockLoop) -> None:
    c = connect(clock)
    c.login()
    before = len(c.transport.writes)
    c.send(b"ST")
    c.send(b"AT\r\nNO")
    assert c.lines(before) == [b"+OK 2 " + str(sum(m.size for m in c.handler.messages)).encode()]
    c.send(b"OP\r\n")
    assert c.lines(before)[-1] == b"+OK"


def test_async_reply_keeps_pipelined_order_and_pauses_reading(clock: ClockLoop) -> None:
    auth = FakeAuth()
    auth.gate = asyncio.Event()
    c = connect(clock, fake_auth=auth)
    c.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nNOOP\r\n")
    # USER's reply went out before PASS suspended; STAT waits behind PASS, and reading is paused meanwhile
    assert c.lines(1) == [b"+OK send PASS"]
    assert c.transport.reading_calls == ["pause"] and not c.transport.reading
    c.send(b"LIST 1\r\n")  # a segment that arrives anyway (already in flight) queues behind
    assert c.lines(1) == [b"+OK send PASS"]
    auth.gate.set()
    c.loop.settle()
    lines = c.lines(1)
    assert lines[1].startswith(b"+OK alice has 2 messages")
    assert lines[2].startswith(b"+OK 2 ") and lines[3] == b"+OK" and lines[4].startswith(b"+OK 1 ")
    assert c.transport.reading_calls == ["pause", "resume"] and c.transport.reading
    assert c.handler.state is State.TRANSACTION


def test_state_change_by_an_earlier_pipelined_line_governs_the_next(clock: ClockLoop) -> None:
    c = connect(clock)
    c.send(b"STAT\r\nUSER alice\r\nPASS wonderland\r\nSTAT\r\n")
    lines = c.lines(1)
    assert lines[0] == b"-ERR STAT not allowed before login"
    assert lines[3].startswith(b"+OK 2 ")


# ---- flow control of big bodies ---------------------------------------------------------------------------


def test_big_retr_waits_for_resume_writing(clock: ClockLoop) -> None:
    big = 700 * 1024
    c = connect(clock, {"alice": [big]}, server={"write_buffer": 16 * 1024})
    c.login()
    raw = c.storage.boxes["alice"][0]
    t = c.transport
    t.peer_reading = False
    before = len(t.writes)
    c.send(b"RETR 1\r\nSTAT\r\n")
    assert t.write_paused and len(t.writes) == before + 1  # header + first chunk, then it waits
    assert t.writes[before].startswith(b"+OK %d octets\r\n" % c.handler.messages[0].size)
    assert t.reading_calls[-1] == "pause"
    clock.advance(30)  # waiting is not idleness of the client's making, but nothing moves either
    assert len(t.writes) == before + 1
    rounds = 0
    while t.write_paused:
        t.drain()
        clock.settle()
        rounds += 1
    assert rounds >= 2  # 700 KiB in 256 KiB chunks: it paused after each of the first ones
    body = b"".join(t.writes[before:])
    _header, _, rest = body.partition(b"\r\n")
    assert rest.startswith(wire.encode(raw))
    assert rest[len(wire.encode(raw)) :].startswith(b"+OK 1 ")  # STAT waited for the whole body
    assert t.reading_calls[-1] == "resume"
    assert c.handler.counters.retr == 1 and c.handler.last == 1


def test_storage_error_before_the_first_chunk_is_an_err_line(clock: ClockLoop) -> None:
    c = connect(clock, {"alice": [300 * 1024]})
    c.login()
    c.storage.errors["chunks"] = TemporaryError("disk gone")
    before = len(c.transport.writes)
    c.send(b"RETR 1\r\nNOOP\r\n")
    assert c.lines(before) == [b"-ERR [SYS/TEMP] message 1 cannot be read now", b"+OK"]


# ---- flow control of pipelined replies ---------------------------------------------------------------------


def test_pipelined_replies_stop_at_the_write_buffer_and_resume_when_it_drains(clock: ClockLoop) -> None:
    c = connect(clock, {"alice": [4000]}, server={"write_buffer": 16 * 1024})
    c.login()
    t = c.transport
    t.peer_reading = False
    size = c.handler.messages[0].size
    reply = size + 64  # one RETR reply: "+OK n octets", the body, "."
    before = len(t.writes)
    c.send(b"RETR 1\r\n" * 100 + b"NOOP\r\n")
    assert len(t.writes) == before + 1  # one batch, one write, then the transport paused us
    assert t.write_paused and 16 * 1024 < t.buffered <= 16 * 1024 + reply
    assert t.reading_calls[-1] == "pause" and not t.reading and c.session._task is None
    c.send(b"NOOP\r\n" * 50)  # in flight already: queued, not answered while paused
    assert len(t.writes) == before + 1
    rounds = 0
    while not t.reading:
        t.drain()  # the peer reads: resume_writing answers the next batch
        clock.settle()
        assert t.buffered <= 16 * 1024 + reply
        rounds += 1
    assert rounds >= 20  # 100 replies of ~4 KiB, at most ~5 per 16 KiB batch
    lines = c.lines(before)
    assert sum(1 for ln in lines if ln == b"+OK %d octets" % size) == 100
    assert lines[-51:] == [b"+OK"] * 51  # the NOOPs after them, in order
    assert c.handler.counters.retr == 100


def test_unread_output_before_login_disconnects(clock: ClockLoop, caplog: pytest.LogCaptureFixture) -> None:
    c = connect(clock, session={"max_unsent_before_login": 4096})
    t = c.transport
    t.peer_reading = False
    c.send(b"CAPA\r\n" * 10)  # a client that reads nothing back: fine while it is small
    assert not t.is_closing() and t.buffered <= 4096 + 512
    with caplog.at_level(logging.INFO, logger="pop3d"):
        c.send(b"CAPA\r\n" * 1000)
    assert t.aborted and c.handler.end_reason == "output not read before login"
    assert t.buffered <= 4096 + 512  # one reply past the cap at most
    assert "max_unsent_before_login" in caplog.text


def test_pipelining_client_that_reads_is_not_cut_before_login(clock: ClockLoop) -> None:
    c = connect(clock, session={"max_unsent_before_login": 4096})
    c.send(b"CAPA\r\n" * 200 + b"USER alice\r\nPASS wonderland\r\nSTAT\r\n")
    assert not c.transport.is_closing() and c.lines()[-1].startswith(b"+OK 2 ")


# ---- connection limits ------------------------------------------------------------------------------------


def test_per_address_limit_refuses_before_the_greeting(clock: ClockLoop) -> None:
    ctx = make_context(None, stored({"alice": [10]}), server={"max_connections_per_ip": 2, "limit_exempt": []})
    a, b = (Connection(clock, ctx, peer=("192.0.2.7", 5000 + i)) for i in range(2))
    refused = Connection(clock, ctx, peer=("192.0.2.7", 5002))
    assert refused.transport.data == b"-ERR [SYS/TEMP] too many connections from your address, try again later\r\n"
    assert refused.transport.closed and refused.handler is None and refused.session not in ctx.sessions
    other = Connection(clock, ctx, peer=("192.0.2.8", 5000))  # another address is not affected
    assert other.transport.data.startswith(b"+OK pop3d ready")
    a.hang_up()
    again = Connection(clock, ctx, peer=("192.0.2.7", 5003))  # a slot came free
    assert again.transport.data.startswith(b"+OK pop3d ready") and not b.transport.is_closing()


def test_loopback_is_exempt_from_the_per_address_limit_by_default(clock: ClockLoop) -> None:
    ctx = make_context(None, stored({"alice": [10]}), server={"max_connections_per_ip": 1})
    conns = [Connection(clock, ctx) for _ in range(3)]
    assert all(c.transport.data.startswith(b"+OK pop3d ready") for c in conns)


def test_oldest_unauthenticated_is_evicted_never_a_logged_in_one(clock: ClockLoop) -> None:
    ctx = make_context(None, stored({"alice": [10]}), server={"max_unauthenticated": 2})
    alice = Connection(clock, ctx)
    alice.login()
    first, second = Connection(clock, ctx), Connection(clock, ctx)
    third = Connection(clock, ctx)  # full: the oldest waiting login goes
    assert first.transport.closed and first.lines()[-1] == b"-ERR [SYS/TEMP] too many connections, try again later"
    assert first.handler.end_reason == "evicted: too many connections"
    assert not second.transport.is_closing() and not third.transport.is_closing()
    Connection(clock, ctx)
    assert second.transport.closed and not third.transport.is_closing()
    alice.send(b"NOOP\r\n")
    assert alice.lines()[-1] == b"+OK" and not alice.transport.is_closing()
    assert ctx.limits.unauthenticated == 2


def test_full_server_of_logged_in_sessions_refuses(clock: ClockLoop) -> None:
    ctx = make_context(None, stored({"alice": [10], "bob": [10]}), server={"max_connections": 2})
    a, b = Connection(clock, ctx), Connection(clock, ctx)
    a.login()
    b.login("bob")
    refused = Connection(clock, ctx)
    assert refused.transport.data == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
    assert not a.transport.is_closing() and not b.transport.is_closing()


# ---- STLS -------------------------------------------------------------------------------------------------


def test_bytes_after_stls_are_never_executed(clock: ClockLoop) -> None:
    auth = FakeAuth()
    c = connect(clock, fake_auth=auth, with_tls=True)
    raw = c.transport
    c.send(b"STLS\r\nUSER alice\r\nPASS wonderland\r\n")  # injected after STLS, in the same segment
    assert c.lines(1) == [b"+OK Begin TLS negotiation"]
    assert len(clock.tls_calls) == 1 and clock.tls_calls[0][0] is raw
    c.send(b"QUIT\r\n")  # plaintext during the handshake: discarded too
    assert c.lines(1) == [b"+OK Begin TLS negotiation"] and not raw.is_closing()
    secure = FakeTransport(c.session, clock, ("127.0.0.1", 40000))
    clock.finish_handshake(secure)
    assert c.session.transport is secure and c.handler.tls
    assert auth.calls == []  # the injected PASS never reached the user database
    c.loop.inside(c.session.data_received, b"CAPA\r\nPASS wonderland\r\n")
    clock.settle()
    lines = b"".join(secure.writes).split(b"\r\n")
    assert b"STLS" not in lines and lines[-2] == b"-ERR USER first"  # no USER survived the handshake
    c.loop.inside(c.session.data_received, b"STLS\r\n")
    clock.settle()
    assert b"".join(secure.writes).endswith(b"-ERR already using TLS\r\n")


def test_failed_handshake_ends_the_session(clock: ClockLoop, caplog: pytest.LogCaptureFixture) -> None:
    c = connect(clock, with_tls=True)
    c.send(b"STLS\r\n")
    with caplog.at_level(logging.INFO, logger="pop3d"):
        clock.finish_handshake(ssl.SSLError("bad record"))
        clock.settle()
    assert c.transport.aborted
    assert c.session not in c.ctx.sessions
    assert c.handler.end_reason == "TLS handshake failed"
    assert any(getattr(r, "fields", {}).get("reason") == "TLS handshake failed" for r in caplog.records)


# ---- SASL -------------------------------------------------------------------------------------------------


def test_line_after_a_challenge_goes_to_the_mechanism_not_the_parser(clock: ClockLoop) -> None:
    c = connect(clock, auth={"mechanisms": ["PLAIN", "LOGIN"]})
    c.send(b"AUTH LOGIN\r\nQUIT\r\n")  # "QUIT" is a (base64) user name here, not a command
    assert c.lines(1) == [b"+ " + b64(b"Username:"), b"+ " + b64(b"Password:")]
    assert not c.transport.is_closing()
    c.send(b"*\r\nCAPA\r\n")  # RFC 5034 §4: "*" cancels; the next line is a command again
    lines = c.lines(1)
    assert lines[2] == b"-ERR [AUTH] authentication cancelled"
    assert lines[3] == b"+OK Capability list follows"


def test_pipelined_sasl_exchange_then_commands(clock: ClockLoop) -> None:
    c = connect(clock, auth={"mechanisms": ["PLAIN"]})
    c.send(b"AUTH PLAIN\r\n" + b64(b"\0alice\0wonderland") + b"\r\nSTAT\r\n")
    lines = c.lines(1)
    assert lines[0] == b"+ "
    assert lines[1].startswith(b"+OK alice has 2 messages") and lines[2].startswith(b"+OK 2 ")


def test_bad_sasl_response_ends_the_exchange_only(clock: ClockLoop) -> None:
    c = connect(clock, auth={"mechanisms": ["PLAIN"]})
    c.send(b"AUTH PLAIN\r\n!!!\r\nNOOP\r\n")
    assert c.lines(1) == [
        b"+ ",
        b"-ERR [AUTH] SASL response is not valid base64",
        b"-ERR NOOP not allowed before login",
    ]


# ---- timers -----------------------------------------------------------------------------------------------


def test_login_deadline_holds_whatever_the_client_sends(clock: ClockLoop) -> None:
    c = connect(clock, session={"timeout_authorization": 60})
    for octet in b"CAPA\r\nNOOP\r\nCAPA\r\nUSER alice\r\n"[:19]:  # slowloris: a byte every 3 s
        c.send(bytes([octet]))
        clock.advance(3)
    assert clock.time() == 1000 + 57 and not c.transport.is_closing()
    clock.advance(2.5)
    assert not c.transport.is_closing()
    c.send(b"x")
    clock.advance(0.5)  # 60 s after connect, 0.5 s after the last byte
    assert c.lines()[-1] == b"-ERR login timeout: log in sooner"
    assert c.transport.closed and c.session not in c.ctx.sessions
    assert c.handler.end_reason == "login timeout"


def test_login_trades_the_deadline_for_the_idle_autologout(clock: ClockLoop) -> None:
    c = connect(clock, session={"timeout_authorization": 60, "timeout": 600})
    clock.advance(50)
    c.login()
    clock.advance(500)
    c.send(b"NOOP\r\n")  # activity restarts the RFC 1939 §3 idle time once logged in
    clock.advance(599)
    assert not c.transport.is_closing()
    clock.advance(1)
    assert c.lines()[-1] == b"-ERR autologout: idle for too long" and c.handler.end_reason == "autologout"


def test_autologout_in_transaction_deletes_nothing(clock: ClockLoop) -> None:
    c = connect(clock, session={"timeout_authorization": 30, "timeout": 600})
    c.login()
    c.send(b"DELE 1\r\n")
    clock.advance(599)  # RFC 1939 §3: at least ten minutes once logged in, not the AUTHORIZATION limit
    assert not c.transport.is_closing()
    clock.advance(1)
    assert c.lines()[-1] == b"-ERR autologout: idle for too long" and c.transport.closed
    assert c.storage.commits == [] and len(c.storage.boxes["alice"]) == 2
    assert c.storage.locked == set() and c.handler.state is State.CLOSED


def test_configured_longer_timeout_is_honoured(clock: ClockLoop) -> None:
    c = connect(clock, session={"timeout": 1800})
    c.login()
    clock.advance(1799)
    assert not c.transport.is_closing()
    clock.advance(1)
    assert c.transport.closed


def test_timeout_below_ten_minutes_is_refused() -> None:
    with pytest.raises(ConfigError):
        make_context(session={"timeout": 599})  # RFC 1939 §3: the autologout timer MUST be >= 10 minutes


def test_failure_penalty_waits_on_the_loop_clock(clock: ClockLoop) -> None:
    c = connect(clock, auth={"failure_delay": 2, "failure_delay_max": 4}, session={"timeout_authorization": 60})
    c.send(b"USER alice\r\nPASS wrong\r\n")
    assert c.lines(1) == [b"+OK send PASS"]
    clock.advance(1.5)
    assert c.lines(1) == [b"+OK send PASS"]
    clock.advance(0.5)
    assert c.lines(1)[-1] == b"-ERR [AUTH] authentication failed"


# ---- the end ----------------------------------------------------------------------------------------------


def test_quit_commits_in_update(clock: ClockLoop) -> None:
    c = connect(clock)
    c.login()
    before = len(c.transport.writes)
    c.send(b"DELE 1\r\nQUIT\r\nSTAT\r\n")
    assert c.lines(before) == [b"+OK message 1 deleted", b"+OK pop3d signing off (1 message left)"]
    storage = c.storage
    assert [(x.user, x.deleted, x.seen) for x in storage.commits] == [("alice", {0}, set())]
    assert len(storage.boxes["alice"]) == 1 and storage.locked == set()
    assert c.transport.closed and c.handler.state is State.CLOSED
    assert c.handler.end_reason == "QUIT" and c.session not in c.ctx.sessions


def test_quit_commit_failure_is_reported(clock: ClockLoop) -> None:
    c = connect(clock)
    c.login()
    c.storage.errors["commit"] = TemporaryError("rename failed")
    c.send(b"DELE 2\r\nQUIT\r\n")
    assert c.lines()[-1] == b"-ERR [SYS/TEMP] some deleted messages were not removed"
    assert c.transport.closed and c.handler.end_reason == "QUIT, commit failed"
    assert c.storage.locked == set()


def test_quit_in_authorization_touches_nothing(clock: ClockLoop) -> None:
    c = connect(clock)
    c.send(b"QUIT\r\nUSER alice\r\n")
    assert c.lines(1) == [b"+OK pop3d signing off"]
    assert c.transport.closed and c.handler.state is State.CLOSED and c.storage.commits == []


def test_dropped_connection_deletes_nothing(clock: ClockLoop) -> None:
    c = connect(clock)
    c.login()
    c.send(b"DELE 1\r\nDELE 2\r\nRETR 1\r\n")
    c.hang_up()
    storage = c.storage
    assert storage.commits == [] and len(storage.boxes["alice"]) == 2
    assert storage.locked == set() and storage.closes == 1
    assert c.session not in c.ctx.sessions and c.handler.end_reason == "disconnected"
    assert c.handler.state is State.CLOSED


def test_drop_while_login_pending_cancels_it(clock: ClockLoop) -> None:
    auth = FakeAuth()
    auth.gate = asyncio.Event()
    c = connect(clock, fake_auth=auth)
    c.send(b"USER alice\r\nPASS wonderland\r\n")
    c.hang_up()
    auth.gate.set()
    clock.settle()
    assert c.storage.locked == set() and c.session not in c.ctx.sessions
    assert c.handler.state is State.CLOSED and c.handler.drop is None


def test_drop_during_commit_does_not_interrupt_it(clock: ClockLoop) -> None:
    c = connect(clock)
    c.login()
    storage = c.storage
    storage.commit_gate = asyncio.Event()
    c.send(b"DELE 1\r\nQUIT\r\n")
    c.hang_up()
    assert c.session in c.ctx.sessions and storage.commits == []  # still committing
    storage.commit_gate.set()
    clock.settle()
    assert [x.deleted for x in storage.commits] == [{0}] and len(storage.boxes["alice"]) == 1
    assert c.session not in c.ctx.sessions and storage.locked == set()
    assert c.handler.end_reason == "QUIT"


def test_half_close_answers_everything_first(clock: ClockLoop) -> None:
    c = connect(clock)
    c.loop.inside(c.session.data_received, b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nQUIT\r\n")
    c.loop.inside(c.session.eof_received)
    clock.settle()
    assert c.lines()[-1] == b"+OK pop3d signing off (1 message left)"
    assert c.transport.closed and len(c.storage.boxes["alice"]) == 1


def test_too_many_bad_commands_closes(clock: ClockLoop) -> None:
    c = connect(clock, session={"max_bad_commands": 3})
    c.send(b"FOO\r\nBAR\r\nCAPA\r\nX\r\nY\r\n")  # a good command resets the count
    assert not c.transport.is_closing()
    before = len(c.transport.writes)
    c.send(b"Z\r\nNOOP\r\n")
    assert len(c.transport.writes) == before + 1
    assert c.lines(before) == [b"-ERR unknown command", b"-ERR too many bad commands, closing connection"]
    assert c.transport.closed and c.handler.end_reason == "too many bad commands"


def test_shutdown_cuts_and_deletes_nothing(clock: ClockLoop) -> None:
    c = connect(clock)
    c.login()
    c.send(b"DELE 1\r\n")
    c.session.shutdown()
    clock.settle()
    assert c.lines()[-1] == b"-ERR [SYS/TEMP] server shutting down"
    assert c.storage.commits == [] and c.handler.end_reason == "server shutdown"


def test_session_end_log_line(clock: ClockLoop, caplog: pytest.LogCaptureFixture) -> None:
    c = connect(clock)
    c.login()
    with caplog.at_level(logging.INFO, logger="pop3d"):
        c.send(b"RETR 1\r\nTOP 2 0\r\nDELE 2\r\nQUIT\r\n")
        clock.settle()
    fields = [
        r.__dict__["fields"] for r in caplog.records if r.__dict__.get("fields", {}).get("event") == "session_end"
    ]
    assert len(fields) == 1
    f = fields[0]
    assert f["user"] == "alice" and f["reason"] == "QUIT" and f["retr"] == 1 and f["top"] == 1
    assert f["del"] == 1 and f["messages"] == 2


@pytest.mark.parametrize("eager", [True, False])
def test_a_session_end_that_waits_is_kept_alive(
    clock: ClockLoop, caplog: pytest.LogCaptureFixture, eager: bool
) -> None:
    """asyncio keeps Tasks only weakly: a session end whose release waits on a future nobody else holds
    (a driver's own waiter) must still be reachable, finish once that future is done and log its end.
    Both ways a session ends: run at once until it waits (eager), or in a Task from the start."""
    import gc
    import weakref

    waiting: list[weakref.ref[asyncio.Future[None]]] = []

    class SlowClose(FakeMaildrop):
        async def close(self) -> None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(weakref.ref(fut))  # the test must not keep it alive
            await fut
            await super().close()

    ctx = make_context(None, stored({"alice": messages(10)}))
    ctx.storage.maildrop = lambda user: SlowClose(ctx.storage, user.name)  # type: ignore[method-assign]
    ctx.storage.task_free = eager
    c = Connection(clock, ctx)
    c.login()
    gc.collect()  # what earlier tests left pending is destroyed now, and its complaints are not ours
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pop3d"):
        c.hang_up()
        gc.collect()
        fut = waiting[0]()
        assert fut is not None, "the session end was garbage-collected while it waited"
        fut.set_result(None)
        clock.settle()
    assert c.session not in ctx.sessions and "Task was destroyed" not in caplog.text
    assert [r for r in caplog.records if r.__dict__.get("fields", {}).get("event") == "session_end"]


def test_plaintext_refused_on_insecure_peer(clock: ClockLoop) -> None:
    ctx = make_context(None, stored({"alice": messages(10)}))
    c = Connection(clock, ctx, peer=("192.0.2.7", 5555))
    c.send(b"USER alice\r\n")
    assert c.lines(1)[0].startswith(b"-ERR [AUTH] plaintext authentication disallowed")


# ---- connection limits: the policy and its counts, without a session --------------------------------------


def test_limits_policy_decisions() -> None:
    p = Policy(per_ip=2, connections=10, process_connections=8, unauthenticated=3)
    assert p.decide(1, 5, 5, 2, can_evict=True) is Verdict.ADMIT
    assert p.decide(2, 5, 5, 0, can_evict=True) is Verdict.PER_IP  # refused, never evicting for it
    assert p.decide(None, 5, 5, 0, can_evict=True) is Verdict.ADMIT  # exempt address
    assert p.decide(0, 5, 5, 3, can_evict=True) is Verdict.EVICT
    assert p.decide(0, 10, 5, 0, can_evict=True) is Verdict.EVICT  # full: a waiting login makes room
    assert p.decide(0, 10, 5, 0, can_evict=False) is Verdict.FULL  # full of logged-in sessions
    assert p.decide(0, 5, 8, 0, can_evict=False) is Verdict.FULL  # this process's descriptors
    assert Policy(0, 0, 0, 0).decide(10**6, 10**6, 10**6, 10**6, can_evict=False) is Verdict.ADMIT  # 0: no limit


def test_limits_address_keys() -> None:
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"  # dual-stack listener: the IPv4 client
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert process_capacity(20000) == (20000 - 128) // 2


@pytest.mark.parametrize("shared", [False, True])
def test_limits_counts_match_a_model(shared: bool) -> None:
    import random

    counts: Any = SharedCounts(regions=3, entries=64) if shared else LocalCounts()
    model: dict[str, int] = {}
    rng = random.Random(7)
    open_: list[tuple[str | None, bool]] = []
    for _ in range(3000):
        if open_ and rng.random() < 0.45:
            key, auth = open_.pop(rng.randrange(len(open_)))
            counts.remove(key, auth)
            if key is not None:
                model[key] -= 1
        elif open_ and rng.random() < 0.1:
            i = rng.randrange(len(open_))
            if not open_[i][1]:
                counts.logged_in()
                open_[i] = (open_[i][0], True)
        elif len(open_) < 30:
            key = None if rng.random() < 0.1 else f"198.51.100.{rng.randrange(40)}"
            counts.add(key)
            open_.append((key, False))
            if key is not None:
                model[key] = model.get(key, 0) + 1
        for key in ("198.51.100.1", "198.51.100.2", f"198.51.100.{rng.randrange(40)}"):
            assert counts.of(key) == model.get(key, 0)
        assert counts.totals() == (len(open_), sum(1 for _, a in open_ if not a))
    if shared:  # deletion leaves no stale entries behind
        assert counts.addresses() == sum(1 for v in model.values() if v)


def test_shared_counts_add_up_workers_and_forget_a_dead_one() -> None:
    counts = SharedCounts(regions=3, entries=64)  # made before fork, as pop3d.runtime.shared does
    counts.add("192.0.2.1")
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: counts into its own region, then waits to be told to die
        try:
            counts.add("192.0.2.1")
            counts.add("192.0.2.9")
            os.write(ready_w, b"r")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    assert counts.of("192.0.2.1") == 2 and counts.of("192.0.2.9") == 1 and counts.totals() == (3, 3)
    os.write(done_w, b"x")
    os.waitpid(pid, 0)
    counts.reclaim(pid)  # the supervisor reaped it: its connections are gone
    assert counts.of("192.0.2.1") == 1 and counts.of("192.0.2.9") == 0 and counts.totals() == (1, 1)
    for fd in (ready_r, ready_w, done_r, done_w):
        os.close(fd)


class _DatabaseDown(FakeAuth):
    async def lookup(self, name: str) -> Any:
        raise ConnectionError("users table: connection refused")

    async def verify(self, name: str, password: str) -> Any:
        raise ConnectionError("users table: connection refused")


def test_unreachable_user_database_is_sys_temp_with_one_log_line(clock: ClockLoop, caplog: Any) -> None:
    """A user database that cannot be reached (PostgreSQL restarting) is the server's trouble, said as such
    (RFC 3206 SYS/TEMP: try later) and logged as one warning, not as an internal error with a traceback."""
    c = connect(clock, fake_auth=_DatabaseDown())
    with caplog.at_level(logging.WARNING):
        c.send(b"USER alice\r\nPASS secret\r\n")
    assert c.lines()[-1].startswith(b"-ERR [SYS/TEMP]")
    warnings = [r for r in caplog.records if "user database unavailable" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert not any(r.exc_info for r in caplog.records)
    c.send(b"QUIT\r\n")
    assert c.lines()[-1].startswith(b"+OK")


def test_a_login_burst_opens_a_bounded_number_of_maildrops_at_once(clock: ClockLoop) -> None:
    """10x OPENS_IN_FLIGHT clients log in at the same instant while the storage is slow: at most
    OPENS_IN_FLIGHT opens run at once (the others wait at the gate holding one small future), and every
    login completes once the storage answers."""
    n = OPENS_IN_FLIGHT * 10
    users = {f"u{i}": f"pw{i}" for i in range(n)}
    storage = stored({name: [b"Subject: x\n\nbody\n"] for name in users})
    storage.open_gate = asyncio.Event()
    ctx = make_context(FakeAuth(users), storage)
    conns = [Connection(clock, ctx) for _ in range(n)]
    for i, c in enumerate(conns):
        c.send(b"USER u%d\r\nPASS pw%d\r\n" % (i, i))
    assert storage.opening == OPENS_IN_FLIGHT
    storage.open_gate.set()
    clock.settle()
    assert storage.most_opening == OPENS_IN_FLIGHT
    assert all(c.lines()[-1].startswith(b"+OK u") for c in conns)
