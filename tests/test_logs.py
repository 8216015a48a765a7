"""Log output: text and JSON formats, the session-end line, and no secret ever reaching the log."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import logging.handlers
import os
import poplib
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import Raw, deliver
from hypothesis import given
from hypothesis import strategies as st
from tls_helpers import Pki

from pop3d.config import LogSettings
from pop3d.ops import logfmt


def _record(msg: str, *args: object, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("pop3d", logging.INFO, __file__, 1, msg, args, None)
    if fields:
        rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_json_formatter():
    out = json.loads(logfmt.JsonFormatter().format(_record("session end user=%s", "älice", user="älice", retr=2)))
    assert out["msg"] == "session end user=älice" and out["user"] == "älice" and out["retr"] == 2
    assert out["level"] == "INFO" and out["logger"] == "pop3d" and out["ts"].endswith("Z")
    assert out["pid"] == os.getpid()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord("pop3d", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "RuntimeError: boom" in json.loads(logfmt.JsonFormatter().format(rec))["exc"]


def test_configure_is_idempotent_and_switches_format():
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        logfmt.configure(LogSettings(level="WARNING", format="json"))
        logfmt.configure(LogSettings(level="DEBUG", format="text"))
        ours = [h for h in root.handlers if h.get_name() == "pop3d-stdout"]
        assert len(ours) == 1 and not isinstance(ours[0].formatter, logfmt.JsonFormatter)
        assert root.level == logging.DEBUG
    finally:
        for h in [h for h in root.handlers if h.get_name() == "pop3d-stdout"]:
            root.removeHandler(h)
        root.setLevel(before[1])


@pytest.fixture
def pki(tmp_path):
    return Pki.make(tmp_path)


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    """The JSON objects of the records that are event `name`, as `log.format = "json"` prints them."""
    js = logfmt.JsonFormatter()
    out = [json.loads(js.format(r)) for r in caplog.records]
    return [o for o in out if o.get("event") == name]


def test_session_end_line_fields(server, env, caplog):
    caplog.set_level(logging.INFO, logger="pop3d")
    deliver(env.maildir("alice"), b"Subject: x\r\n\r\nbody\r\n")
    r = Raw(server.port)
    r.cmd(b"USER alice")
    r.cmd(b"PASS wonderland")
    r.cmd(b"RETR 1")
    r.multi()
    r.cmd(b"DELE 1")
    r.cmd(b"QUIT")
    r.close()
    server.wait_idle()
    (rec,) = [x for x in caplog.records if x.getMessage().startswith("session end")]
    text = rec.getMessage()
    assert text.startswith("session end user=alice rip=127.0.0.1 reason=QUIT top=0/0, retr=1/23, del=1/1, size=20 ")
    assert re.search(
        rf" session=[a-z2-7]{{7,}} lip=127\.0\.0\.1:{server.port} tls=no mech=USER duration=\d+\.\d{{3}}$", text
    )
    assert "health_check" not in text
    (out,) = _events(caplog, "session_end")
    assert out["retr_bytes"] == 23 and out["del"] == 1 and out["rip"] == "127.0.0.1" and out["user"] == "alice"
    assert out["mech"] == "USER" and out["tls"] is False and out["lip"] == f"127.0.0.1:{server.port}"
    assert out["pid"] == os.getpid() and isinstance(out["duration"], float) and out["health_check"] is False


def test_session_ids_follow_one_session_in_text_and_json(start_server, env, caplog):
    """Two sessions interleaved: every line about one carries its id, and only its id; JSON has the events
    with their fields (mechanism, TLS, local address, duration) rather than bare strings."""
    caplog.set_level(logging.INFO, logger="pop3d")
    st = start_server(auth={"failure_delay": 0})
    deliver(env.maildir("alice"), b"Subject: x\r\n\r\nbody\r\n")
    a, b = Raw(st.port), Raw(st.port)
    assert a.cmd(b"USER alice").startswith(b"+OK") and a.cmd(b"PASS nope").startswith(b"-ERR [AUTH]")
    assert a.cmd(b"APOP alice " + b"0" * 32).startswith(b"-ERR [AUTH]")
    assert b.cmd(b"USER alice").startswith(b"+OK") and b.cmd(b"PASS wonderland").startswith(b"+OK")
    assert a.cmd(b"USER alice").startswith(b"+OK") and a.cmd(b"PASS wonderland").startswith(b"-ERR [IN-USE]")
    a.cmd(b"QUIT")
    b.cmd(b"QUIT")
    a.close()
    b.close()
    st.wait_idle()

    (login,) = _events(caplog, "login")
    failed = _events(caplog, "auth_failed")
    (in_use,) = _events(caplog, "in_use")
    ends = _events(caplog, "session_end")
    sid_b = login["session"]
    sid_a = in_use["session"]
    assert isinstance(sid_a, str) and isinstance(sid_b, str) and sid_a != sid_b and len(sid_a) <= 12
    assert [f["session"] for f in failed] == [sid_a, sid_a]
    assert [f["mech"] for f in failed] == ["USER", "APOP"] and [f["failures"] for f in failed] == [1, 2]
    assert all(f["user"] == "alice" and f["rip"] == "127.0.0.1" and f["tls"] is False for f in failed)
    assert login["mech"] == "USER" and login["user"] == "alice" and login["messages"] == 1
    assert in_use["user"] == "alice" and in_use["mech"] == "USER"
    for event in (login, in_use, *failed, *ends):
        assert event["lip"] == f"127.0.0.1:{st.port}" and isinstance(event["duration"], float), event
        assert event["pid"] == os.getpid()
    end_a = next(e for e in ends if e["session"] == sid_a)
    # never logged in: the user it tried, how often it failed, why it ended
    assert end_a["user"] == "-" and end_a["tried"] == "alice" and end_a["auth_failures"] == 2
    assert end_a["reason"] == "QUIT before login" and end_a["health_check"] is False
    assert "top" not in end_a
    # the text lines: grep the id, get that session's lines and nothing else
    lines = [r.getMessage() for r in caplog.records]
    of_a = [ln for ln in lines if f"session={sid_a} " in ln]
    assert len(of_a) == 4  # two auth failures, in use, the end
    assert not any(f"session={sid_b} " in ln for ln in of_a)
    assert any(ln.startswith("session end user=- rip=127.0.0.1 reason=QUIT before login tried=alice") for ln in of_a)
    assert any(ln.startswith("auth failed user='alice' rip=127.0.0.1") and " mech=APOP " in ln for ln in of_a)


def test_session_ids_are_short_and_unique_per_process(env):
    from pop3d.runtime.server import build_context

    ctx = build_context(env.settings())
    ids = [ctx.session_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[a-z2-7]{7,9}", i) for i in ids)
    assert len({i[:6] for i in ids}) == 1  # one random prefix per process, then a counter
    ctx._sid_pid = -1  # as after a fork: a new process draws its own prefix, and counts from 1 again
    after = ctx.session_id()
    assert after[6:] == ids[0][6:] == "b" and after != ids[0]


def test_tls_sessions_say_so(start_server, pki, caplog):
    caplog.set_level(logging.INFO, logger="pop3d")
    st = start_server(tls=pki.tls_section(False))
    p = poplib.POP3("127.0.0.1", st.port, timeout=10)
    p.stls(pki.client_context())
    p.user("alice")
    p.pass_("wonderland")
    p.quit()
    st.wait_idle()
    (login,) = _events(caplog, "login")
    (end,) = _events(caplog, "session_end")
    assert login["tls"] is True and end["tls"] is True and login["session"] == end["session"]


def test_values_from_the_wire_cannot_forge_a_line():
    assert logfmt.text_value("alice") == "alice"
    assert logfmt.text_value('a\nb c"') == '"a\\nb c\\""'
    assert logfmt.text_value(None) == "-" and logfmt.text_value(True) == "yes" and logfmt.text_value(0.5) == "0.500"


# -- health checks ---------------------------------------------------------------------------------


def _probe(port: int) -> None:
    """What `pop3d health` does: read the greeting, QUIT at once."""
    r = Raw(port)
    assert r.cmd(b"QUIT").startswith(b"+OK")
    r.close()


@pytest.mark.parametrize("logged", [True, False])
def test_health_checks_are_recognisable_and_can_be_left_out(start_server, caplog, logged):
    caplog.set_level(logging.DEBUG, logger="pop3d")
    st = start_server(log={"health_checks": logged})
    _probe(st.port)
    tcp = socket.create_connection(("127.0.0.1", st.port), timeout=10)  # a load balancer's TCP check
    tcp.recv(100)
    tcp.close()
    r = Raw(st.port)  # not a health check: it tried to log in
    r.cmd(b"USER nobody")
    r.cmd(b"QUIT")
    r.close()
    st.wait_idle()
    ends = [x for x in caplog.records if getattr(x, "fields", {}).get("event") == "session_end"]
    assert len(ends) == 3
    probes = [x for x in ends if x.fields["health_check"]]
    assert sorted(x.fields["reason"] for x in probes) == ["QUIT before login", "disconnected"]
    assert all("health_check=yes" in x.getMessage() for x in probes)
    assert {x.levelno for x in probes} == {logging.INFO if logged else logging.DEBUG}
    (real,) = [x for x in ends if not x.fields["health_check"]]
    assert real.levelno == logging.INFO and real.fields["tried"] == "nobody"


# -- supervisor and workers ------------------------------------------------------------------------


def test_supervisor_logs_start_up_and_reload_once(env):
    """workers = 2, JSON: the start-up and reload outcome lines appear once, from the supervisor's pid."""
    from test_cli import free_port, start, write_config

    port = free_port()
    cfg = write_config(env, port, log='[log]\nformat = "json"')
    cfg.write_text(cfg.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1))
    proc = start(cfg, port)
    try:
        _probe(port)
        # both pending at once: the supervisor takes SIGHUP first (sigtimedwait: lowest number first)
        proc.send_signal(signal.SIGHUP)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    recs = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert recs, out
    sup = proc.pid
    listening = [r for r in recs if "listening on" in r["msg"]]
    assert [(r["msg"].startswith("2 workers listening on"), r["pid"]) for r in listening] == [(True, sup)], out
    reloaded = [r for r in recs if r["msg"].startswith("configuration reloaded")]
    assert [r["pid"] for r in reloaded] == [sup], out
    assert [r["pid"] for r in recs if r["msg"].startswith("SIGHUP: re-reading")] == [sup]
    ends = [r for r in recs if r.get("event") == "session_end"]  # ours, and start()'s wait for the port
    assert ends and all(e["pid"] != sup and e["health_check"] is True and e["session"] for e in ends), out


def test_no_password_or_auth_payload_in_logs(start_server, caplog):
    """Every way a secret can arrive (USER/PASS, APOP, SASL initial responses and continuation lines, good
    and bad), at DEBUG, rendered by both formatters."""
    caplog.set_level(logging.DEBUG)
    st = start_server(log={"level": "DEBUG"}, auth={"max_failures_per_connection": 10})  # 3 failures, then in
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    plain_bad, plain_good = b64(b"\0alice\0Wr0ng-Plain!"), b64(b"\0alice\0wonderland")
    login_pw = b64(b"Wr0ng-Login!")
    secrets = [
        "wonderland",
        "Wr0ng-Secret!",
        "Wr0ng-Plain!",
        "Wr0ng-Login!",
        "builder pass",
        plain_bad,
        plain_good,
        login_pw,
    ]
    r = Raw(st.port)
    assert r.cmd(b"USER alice").startswith(b"+OK")
    assert r.cmd(b"PASS Wr0ng-Secret!").startswith(b"-ERR [AUTH]")  # logged, never with the password
    assert r.cmd(b"AUTH PLAIN " + plain_bad.encode()).startswith(b"-ERR [AUTH]")
    assert r.cmd(b"AUTH LOGIN").startswith(b"+ ")
    assert r.cmd(b64(b"alice").encode()).startswith(b"+ ")
    assert r.cmd(login_pw.encode()).startswith(b"-ERR [AUTH]")
    assert r.cmd(b"AUTH PLAIN").startswith(b"+")
    assert r.cmd(plain_good.encode()).startswith(b"+OK")  # the payload as a continuation line
    assert r.cmd(b"QUIT").startswith(b"+OK")
    r.close()
    st.wait_idle()
    r = Raw(st.port)
    ts = r.greeting.decode().split()[-1]
    digest = hashlib.md5((ts + "wonderland").encode()).hexdigest()
    secrets.append(digest)
    assert r.cmd(f"APOP alice {digest}".encode()).startswith(b"+OK")
    r.cmd(b"QUIT")
    r.close()
    r = Raw(st.port)
    r.cmd(b"USER bob")
    assert r.cmd(b"PASS builder pass").startswith(b"+OK")
    r.cmd(b"QUIT")
    r.close()
    st.wait_idle()
    messages = [x.getMessage() for x in caplog.records]
    assert sum("login user=alice" in m for m in messages) == 2 and any("auth failed" in m for m in messages)
    text, js = logging.Formatter(logfmt.TEXT_FORMAT), logfmt.JsonFormatter()
    rendered = "\n".join(text.format(x) + js.format(x) for x in caplog.records)
    for s in secrets:
        assert s not in rendered, f"secret {s!r} reached the log"


@given(st.text())
def test_text_values_never_break_the_line_or_the_pairs(value):
    """Whatever a client makes us log (a user name, a tried name), the value stays one token: no space, quote,
    `=` or control character unquoted, and the quoted form decodes back to the value."""
    out = logfmt.text_value(value)
    if out.startswith('"'):
        assert json.loads(out) == value and "\n" not in out and "\r" not in out
    else:
        assert out == value and value.isprintable() and not set(value) & set(' "=\\')


class _Writes(io.StringIO):
    """A stream that records each write: the handler's point is how many there are."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def _batched() -> tuple[logging.Logger, _Writes, logfmt.LoopBatchedHandler]:
    stream = _Writes()
    handler = logfmt.LoopBatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"pop3d.test.batched.{id(stream)}")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    return logger, stream, handler


def test_lines_of_one_loop_iteration_leave_in_one_write_in_order():
    logger, stream, _ = _batched()

    async def main() -> list[str]:
        for i in range(3):
            logger.info("line %d", i)
        assert stream.writes == []  # not yet: the loop writes them once this callback returns
        await asyncio.sleep(0)
        after_first = list(stream.writes)
        logger.info("line 3")
        await asyncio.sleep(0)
        return after_first

    assert asyncio.run(main()) == ["line 0\nline 1\nline 2\n"]
    assert stream.writes == ["line 0\nline 1\nline 2\n", "line 3\n"]


def test_without_a_loop_lines_are_written_at_once_after_what_is_pending():
    logger, stream, _ = _batched()
    logger.info("now")
    assert stream.writes == ["now\n"]

    async def pend() -> None:
        logger.info("pending")  # the loop stops before its write callback runs

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(pend())
    finally:
        loop.close()  # the callback never ran: the line waits for the next write or flush
    logger.info("later")
    assert stream.getvalue() == "now\npending\nlater\n"


def test_flush_writes_pending_lines_so_an_exit_loses_none():
    logger, stream, handler = _batched()

    async def main() -> None:
        logger.info("last words")
        handler.flush()  # what logging.shutdown() does on every exit path of a worker
        assert stream.getvalue() == "last words\n"

    asyncio.run(main())
    assert stream.writes == ["last words\n"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_fork_writes_pending_lines_once(tmp_path):
    """The workers are forked: a line pending in the parent must not be inherited and written twice."""
    out = tmp_path / "log"
    with open(out, "w") as f:
        handler = logfmt.LoopBatchedHandler(f)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("pop3d.test.batched.fork")
        logger.propagate, logger.level = False, logging.INFO
        logger.addHandler(handler)

        async def main() -> int:
            logger.info("before fork")
            pid = os.fork()
            if pid == 0:
                handler.flush()
                os._exit(0)
            return pid

        pid = asyncio.run(main())
        os.waitpid(pid, 0)
        handler.flush()
        logger.removeHandler(handler)
    assert out.read_text() == "before fork\n"


_FIELD_VALUES = st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False))


@given(
    fields=st.dictionaries(st.sampled_from(["user", "rip", "retr", "size", "reason"]), _FIELD_VALUES, max_size=5),
    text=st.text(max_size=20),
    fmt=st.sampled_from(["text", "json"]),
    level=st.sampled_from([logging.INFO, logging.WARNING]),
)
def test_event_lines_made_without_a_record_are_those_the_record_makes(
    fields: dict[str, object], text: str, fmt: str, level: int
) -> None:
    """`event` skips the LogRecord when pop3d's handler is the only one its line reaches
    (LoopBatchedHandler.emit_direct): what it writes must be what the record would have made."""
    logger, stream, handler = _batched()
    handler.setFormatter(logfmt.make_formatter(fmt))
    assert handler.takes(logger, level)
    real_time, at = time.time, 1_764_547_200.125  # one instant for both lines
    time.time = lambda: at  # type: ignore[assignment]
    try:
        with _direct(handler):
            logfmt.event(logger, level, "login", text, fields)
        with _direct(None):
            logfmt.event(logger, level, "login", text, fields)
    finally:
        time.time = real_time  # type: ignore[assignment]
    direct, recorded = stream.writes
    assert direct == recorded


def test_event_lines_reach_every_handler_when_ours_is_not_alone() -> None:
    """Another handler (a test's capture, an operator's extra one) or a filter on the way: the record path."""
    logger, stream, handler = _batched()
    handler.setFormatter(logfmt.make_formatter("text"))
    other = logging.handlers.BufferingHandler(10)
    assert handler.takes(logger, logging.INFO)
    logger.addHandler(other)
    assert not handler.takes(logger, logging.INFO)
    with _direct(handler):
        logfmt.event(logger, logging.INFO, "login", "login", {"user": "u"})
    assert len(stream.writes) == 1 and stream.writes[0].endswith(f" INFO {logger.name}[{os.getpid()}]: login user=u\n")
    assert other.buffer[0].getMessage() == "login user=u"
    logger.removeHandler(other)
    logger.addFilter(lambda record: False)
    assert not handler.takes(logger, logging.INFO)
    with _direct(handler):
        logfmt.event(logger, logging.INFO, "login", "login", {"user": "u"})
    assert len(stream.writes) == 1  # the filter dropped it, as it would a record
    logger.filters.clear()
    assert handler.takes(logger, logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))  # not one of ours: it may show anything
    assert not handler.takes(logger, logging.INFO)


@contextlib.contextmanager
def _direct(handler: logfmt.LoopBatchedHandler | None) -> Iterator[None]:
    before = logfmt._direct
    logfmt._direct = handler
    try:
        yield
    finally:
        logfmt._direct = before
