"""End to end over loopback with the stdlib client (poplib) and a raw socket client: one test per rule."""

from __future__ import annotations

import hashlib
import poplib
import re
import socket
import threading
import time

import pytest
from conftest import Raw, deliver, pop3_from

from pop3d import wire

MSG1 = b"From: a@example.org\nSubject: one\n\nline 1\n.dotted\n..two dots\nend\n"
MSG2 = b"From: b@example.org\nSubject: two\r\n\r\nstored CRLF\r\nno final newline"
MSG3 = b"Subject: three\n\nbare\rCR and 8-bit \xe9\xff\n"


def body_lines(raw: bytes) -> list[bytes]:
    return wire.to_network(raw).split(b"\r\n")[:-1]


@pytest.fixture
def alice(env):
    md = env.maildir("alice")
    for m in (MSG1, MSG2, MSG3):
        deliver(md, m)
    return md


def login(server, user="alice", password="wonderland") -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", server.port, timeout=10)
    p.user(user)
    p.pass_(password)
    return p


# -- greeting and authorization ------------------------------------------------------------------


def test_greeting_has_unique_apop_timestamp(server):
    stamps = set()
    for _ in range(5):
        p = poplib.POP3("127.0.0.1", server.port, timeout=10)
        m = re.search(rb"<\d+\.\d+\.\d+@test\.invalid>", p.getwelcome())
        assert p.getwelcome().startswith(b"+OK") and m
        stamps.add(m.group())
        p.quit()
    assert len(stamps) == 5


def test_user_pass_and_stat(server, alice):
    p = login(server)
    sizes = [wire.network_size(m) for m in (MSG1, MSG2, MSG3)]
    assert p.stat() == (3, sum(sizes))
    p.quit()


def test_password_with_spaces(server, env):
    p = login(server, "bob", "builder pass")
    assert p.stat() == (0, 0)
    p.quit()


def test_unknown_user_and_wrong_password_look_the_same(server, alice):
    replies = []
    for user, pw in [("alice", "nope"), ("nobody", "nope")]:
        p = poplib.POP3("127.0.0.1", server.port, timeout=10)
        assert p.user(user).startswith(b"+OK")  # USER never reveals whether the user exists
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(pw)
        replies.append(e.value.args[0])
        p.quit()
    assert replies[0] == replies[1]
    assert replies[0].startswith(b"-ERR [AUTH]")


def test_failed_pass_needs_new_user_and_session_goes_on(server, alice):
    r = Raw(server.port)
    assert r.cmd(b"PASS x").startswith(b"-ERR")
    assert r.cmd(b"USER alice").startswith(b"+OK")
    assert r.cmd(b"PASS wrong").startswith(b"-ERR [AUTH]")
    assert r.cmd(b"PASS wonderland").startswith(b"-ERR")  # USER forgotten after a failure
    assert r.cmd(b"USER alice").startswith(b"+OK")
    assert r.cmd(b"PASS wonderland").startswith(b"+OK")
    assert r.cmd(b"QUIT").startswith(b"+OK")


def test_apop(server, alice):
    p = poplib.POP3("127.0.0.1", server.port, timeout=10)
    assert p.apop("alice", "wonderland").startswith(b"+OK")
    assert p.stat()[0] == 3
    p.quit()
    p = poplib.POP3("127.0.0.1", server.port, timeout=10)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.apop("alice", "wrong")
    p.quit()


def test_apop_digest_is_bound_to_this_greeting(server, alice):
    """A digest computed for another connection's timestamp is refused (no replay)."""
    first = poplib.POP3("127.0.0.1", server.port, timeout=10)
    stamp = re.search(rb"<[^>]+>", first.getwelcome()).group()
    digest = hashlib.md5(stamp + b"wonderland").hexdigest()
    second = Raw(server.port)
    assert second.cmd(b"APOP alice " + digest.encode()).startswith(b"-ERR [AUTH]")
    assert first._shortcmd(f"APOP alice {digest}").startswith(b"+OK")
    first.quit()
    second.close()


def test_apop_refused_for_hashed_secret(env, start_server, alice):
    from pop3d.auth.schemes import hash_password

    env.passwd.write_text(f"alice:{hash_password('SHA512-CRYPT', 'wonderland')}\n")
    srv = start_server()
    p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.apop("alice", "wonderland")
    p.user("alice")
    assert p.pass_("wonderland").startswith(b"+OK")  # the hash itself works with PASS
    p.quit()


def test_rpop_refused_session_goes_on(server, alice):
    p = poplib.POP3("127.0.0.1", server.port, timeout=10)
    with pytest.raises(poplib.error_proto, match="RPOP"):
        p.rpop("alice")
    p.user("alice")
    assert p.pass_("wonderland").startswith(b"+OK")
    p.quit()


def test_capa(server, alice):
    p = poplib.POP3("127.0.0.1", server.port, timeout=10)
    caps = p.capa()
    for cap in ["TOP", "USER", "UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"]:
        assert cap in caps
    assert caps["EXPIRE"] == ["NEVER"]
    assert caps["LOGIN-DELAY"] == ["0"]
    assert caps["IMPLEMENTATION"][0].startswith("pop3d-")
    p.user("alice")
    p.pass_("wonderland")
    assert p.capa() == caps  # RFC 2449 §5: what AUTHORIZATION announces is announced in both states
    p.quit()


def test_commands_case_insensitive(server, alice):
    r = Raw(server.port)
    assert r.cmd(b"user alice").startswith(b"+OK")
    assert r.cmd(b"pAsS wonderland").startswith(b"+OK")
    assert r.cmd(b"stat").startswith(b"+OK 3 ")
    assert r.cmd(b"Quit").startswith(b"+OK")


# -- transaction ---------------------------------------------------------------------------------


def test_list_uidl_retr_top(server, alice):
    p = login(server)
    resp, listing, _ = p.list()
    sizes = [wire.network_size(m) for m in (MSG1, MSG2, MSG3)]
    assert listing == [f"{i + 1} {s}".encode() for i, s in enumerate(sizes)]
    assert p.list(2) == f"+OK 2 {sizes[1]}".encode()
    _, uids, _ = p.uidl()
    ids = [u.split()[1] for u in uids]
    assert len(set(ids)) == 3 and all(re.fullmatch(rb"[\x21-\x7e]{1,70}", u) for u in ids)
    for i, raw in enumerate((MSG1, MSG2, MSG3), 1):
        resp, lines, octets = p.retr(i)
        assert resp == f"+OK {sizes[i - 1]} octets".encode()
        assert lines == body_lines(raw)
        assert octets == sizes[i - 1]  # the advertised size is what was sent, before stuffing
    _, lines, _ = p.top(1, 1)
    assert lines == [b"From: a@example.org", b"Subject: one", b"", b"line 1"]
    _, lines, _ = p.top(1, 0)
    assert lines == [b"From: a@example.org", b"Subject: one", b""]
    p.quit()


def test_dele_invisible_then_quit_deletes(server, alice):
    p = login(server)
    uid2 = p.uidl(2).split()[2]
    assert p.dele(2).startswith(b"+OK")
    assert p.stat() == (2, wire.network_size(MSG1) + wire.network_size(MSG3))
    for call in (lambda: p.dele(2), lambda: p.retr(2), lambda: p.list(2), lambda: p.uidl(2), lambda: p.top(2, 0)):
        with pytest.raises(poplib.error_proto):
            call()
    assert [ln.split()[0] for ln in p.list()[1]] == [b"1", b"3"]  # numbers never change
    assert p.quit().startswith(b"+OK")
    server.wait_idle()
    p = login(server)
    assert p.stat()[0] == 2
    assert uid2 not in [u.split()[1] for u in p.uidl()[1]]
    p.quit()


def test_rset_undeletes(server, alice):
    p = login(server)
    p.dele(1)
    p.dele(3)
    assert p.rset().startswith(b"+OK")
    assert p.stat()[0] == 3
    p.quit()
    server.wait_idle()
    assert login(server).stat()[0] == 3


def test_dropped_connection_deletes_nothing(server, alice):
    r = Raw(server.port)
    r.cmd(b"USER alice")
    r.cmd(b"PASS wonderland")
    assert r.cmd(b"DELE 1").startswith(b"+OK")
    r.close()
    server.wait_idle()
    p = login(server)
    assert p.stat()[0] == 3
    p.quit()


def test_no_such_message_errors(server, alice):
    r = Raw(server.port)
    r.cmd(b"USER alice")
    r.cmd(b"PASS wonderland")
    assert r.cmd(b"RETR 4").startswith(b"-ERR")
    assert r.cmd(b"RETR 0").startswith(b"-ERR")
    assert r.cmd(b"LIST abc").startswith(b"-ERR")
    assert r.cmd(b"TOP 1").startswith(b"-ERR")
    assert r.cmd(b"USER bob").startswith(b"-ERR")  # wrong state
    assert r.cmd(b"NOOP").startswith(b"+OK")  # session intact
    assert r.cmd(b"QUIT").startswith(b"+OK")


def test_last(server, alice):
    r = Raw(server.port)
    r.cmd(b"USER alice")
    r.cmd(b"PASS wonderland")
    assert r.cmd(b"LAST") == b"+OK 0"
    assert r.cmd(b"TOP 2 0").startswith(b"+OK")
    r.multi()
    assert r.cmd(b"LAST") == b"+OK 2"
    assert r.cmd(b"RETR 1").startswith(b"+OK")
    r.multi()
    assert r.cmd(b"LAST") == b"+OK 2"  # the highest, not the latest
    assert r.cmd(b"RSET").startswith(b"+OK")
    assert r.cmd(b"LAST") == b"+OK 0"
    r.cmd(b"QUIT")


def test_in_use(server, alice):
    p = login(server)
    q = poplib.POP3("127.0.0.1", server.port, timeout=10)
    q.user("alice")
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[IN-USE\]"):
        q.pass_("wonderland")
    p.quit()  # the lock is released before the QUIT reply is sent
    q.user("alice")
    assert q.pass_("wonderland").startswith(b"+OK")
    q.quit()


def test_mail_delivered_during_session_appears_next_time(server, alice):
    p = login(server)
    deliver(alice, b"Subject: late\n\nlate\n")
    assert p.stat()[0] == 3
    p.quit()
    server.wait_idle()
    p = login(server)
    assert p.stat()[0] == 4
    p.quit()


def test_vanished_message_only_that_one_fails(server, alice):
    p = login(server)
    for f in (alice / "new").iterdir():
        if f.read_bytes() == MSG2:
            f.unlink()
    with pytest.raises(poplib.error_proto):
        p.retr(2)
    assert p.retr(3)[1] == body_lines(MSG3)
    p.quit()


def test_retr_marks_seen_and_keeps_uidl(server, alice):
    p = login(server)
    before = p.uidl()[1]
    p.retr(1)
    p.quit()
    server.wait_idle()
    assert any(f.name.endswith(":2,S") for f in (alice / "cur").iterdir())
    p = login(server)
    assert p.uidl()[1] == before
    p.quit()


def test_storage_unreadable_gives_sys_perm(env, start_server):
    (env.mail / "alice").write_text("not a directory")
    srv = start_server()
    p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    p.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
        p.pass_("wonderland")
    p.quit()


# -- limits, pipelining, flow control, timers ----------------------------------------------------


def test_long_line_rejected_session_intact(server, alice):
    r = Raw(server.port)
    assert r.cmd(b"USER " + b"a" * 300).startswith(b"-ERR")
    r.send(b"X" * 100_000)  # a flood without CRLF is dropped as it comes
    assert r.cmd(b"").startswith(b"-ERR")  # its end: one -ERR
    assert r.cmd(b"USER alice").startswith(b"+OK")
    assert r.cmd(b"PASS wonderland").startswith(b"+OK")
    r.cmd(b"QUIT")


def test_too_many_bad_commands_closes(start_server):
    srv = start_server(session={"max_bad_commands": 3})
    r = Raw(srv.port)
    r.send(b"A\r\nB\r\nC\r\nD\r\n")
    lines = [r.line() for _ in range(4)]
    assert lines[-1].startswith(b"-ERR too many")
    assert r.closed()


PIPELINE = b"USER alice\r\nPASS wonderland\r\nSTAT\r\nLIST\r\nUIDL 1\r\nRETR 1\r\nDELE 1\r\nNOOP\r\nRSET\r\nQUIT\r\n"


def _read_pipeline(r: Raw) -> list[bytes]:
    out = [r.line(), r.line(), r.line()]  # USER, PASS, STAT
    out.append(r.line())  # LIST
    out += r.multi()
    out.append(r.line())  # UIDL 1
    out.append(r.line())  # RETR 1
    out += r.multi()
    out += [r.line(), r.line(), r.line(), r.line()]  # DELE, NOOP, RSET, QUIT
    return out


def test_pipelining_one_segment_and_byte_by_byte(server, alice):
    r = Raw(server.port)
    r.send(PIPELINE)
    whole = _read_pipeline(r)
    assert whole[2].startswith(b"+OK 3 ")
    assert whole[-4].startswith(b"+OK message 1") and whole[-3] == b"+OK" and whole[-2].startswith(b"+OK")
    assert whole[-1].startswith(b"+OK")
    assert body_lines(MSG1) == whole[-4 - len(body_lines(MSG1)) : -4]
    server.wait_idle()
    r2 = Raw(server.port)
    for b in PIPELINE:
        r2.send(bytes([b]))
    assert _read_pipeline(r2) == whole


def test_replies_are_batched(server, alice):
    """Pipelined fast commands get their replies in few segments (one write per batch)."""
    r = Raw(server.port)
    r.cmd(b"USER alice")
    r.cmd(b"PASS wonderland")
    r.send(b"NOOP\r\n" * 50)
    time.sleep(0.2)
    first = r.sock.recv(65536)
    assert first.count(b"+OK") == 50  # all fifty arrived in the first read: one write
    r.cmd(b"QUIT")


def test_big_retr_to_non_reader_is_bounded_and_others_stay_responsive(env, start_server):
    md = env.maildir("alice")
    line = b"x" * 1000 + b"\n"
    deliver(md, b"Subject: big\n\n" + line * (50 * 1024))  # ~50 MiB
    srv = start_server()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(b"USER alice\r\nPASS wonderland\r\nRETR 1\r\n")
    time.sleep(1.0)  # the server fills the socket and our unread buffers, then must pause
    sess = next(iter(srv.ctx.sessions))
    buffered = srv.call(_buffered(sess))
    assert buffered <= 1024 * 1024, buffered
    # another session is served meanwhile
    p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    p.user("bob")
    p.pass_("builder pass")
    assert p.stat() == (0, 0)
    p.quit()
    # and the slow reader still gets the whole message when it reads
    total = 0
    s.settimeout(30)
    data = b""
    while not data.endswith(b"\r\n.\r\n"):
        chunk = s.recv(1 << 20)
        assert chunk
        total += len(chunk)
        data = data[-10:] + chunk
    assert total > 50 * 1024 * 1001
    s.close()


async def _buffered(sess) -> int:
    return sess.transport.get_write_buffer_size()


def test_authorization_timeout(start_server):
    srv = start_server(session={"timeout_authorization": 0.3})
    r = Raw(srv.port)
    time.sleep(1.0)
    assert r.line().startswith(b"-ERR")
    assert r.closed()


def test_transaction_timeout_deletes_nothing(env, start_server, alice):
    srv = start_server()
    srv.ctx.settings.session.__dict__["timeout"] = 0.3  # below the RFC minimum on purpose, tests only
    r = Raw(srv.port)
    r.cmd(b"USER alice")
    r.cmd(b"PASS wonderland")
    assert r.cmd(b"DELE 1").startswith(b"+OK")
    time.sleep(1.0)
    assert r.line().startswith(b"-ERR")
    srv.wait_idle()
    assert len(list((alice / "new").iterdir())) == 3


def test_config_refuses_transaction_timeout_below_rfc_minimum(env):
    from pop3d.config import ConfigError

    with pytest.raises(ConfigError, match=r"session\.timeout"):
        env.settings(session={"timeout": 60})


def test_failed_login_delay_does_not_slow_others(start_server, alice):
    srv = start_server(auth={"failure_delay": 1.5})
    order: list[str] = []

    def bad() -> None:
        p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        p.user("alice")
        with pytest.raises(poplib.error_proto):
            p.pass_("wrong")
        order.append("failure answered")

    t = threading.Thread(target=bad)
    t.start()
    time.sleep(0.2)
    p = pop3_from(srv.port, "127.0.0.2")  # another address: the penalty is per address, and holds every answer
    p.user("bob")
    p.pass_("builder pass")
    p.stat()
    p.quit()
    order.append("other session done")
    t.join()
    assert order == ["other session done", "failure answered"]


def test_login_delay(start_server, alice):
    srv = start_server(session={"login_delay": 300})
    p = login(srv)
    assert p.capa()["LOGIN-DELAY"] == ["300"]
    p.quit()
    srv.wait_idle()
    q = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    q.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        q.pass_("wonderland")
    q.quit()
    login(srv, "bob", "builder pass").quit()  # per user


def test_expire_zero_deletes_retrieved(start_server, alice):
    srv = start_server(session={"expire": "0"})
    p = login(srv)
    assert p.capa()["EXPIRE"] == ["0"]
    p.retr(1)
    p.top(2, 0)
    p.quit()
    srv.wait_idle()
    p = login(srv)
    assert p.stat()[0] == 2  # RETR'd one gone, TOP'd one kept
    p.quit()


def test_passwd_file_change_picked_up(env, server, alice):
    env.passwd.write_text("alice:{PLAIN}changed\n")
    time.sleep(1.1)  # the file is stat()ed at most once a second
    p = poplib.POP3("127.0.0.1", server.port, timeout=10)
    p.user("alice")
    assert p.pass_("changed").startswith(b"+OK")
    p.quit()


def test_half_closed_scripted_client_gets_every_reply_and_quit_commits(server, alice):
    """`printf 'USER..PASS..DELE 1..QUIT' | nc`: the client shuts its write side right after sending."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nQUIT\r\n")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    lines = data.split(b"\r\n")
    assert [ln[:3] for ln in lines[:5]] == [b"+OK"] * 5, data
    server.wait_idle()
    assert len(list((alice / "new").iterdir())) + len(list((alice / "cur").iterdir())) == 2
