"""Log output: text and JSON formats, the session-end line, and no secret ever reaching the log."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sys

from conftest import Raw, deliver

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
    assert rec.getMessage() == ("session end user=alice rip=127.0.0.1 reason=QUIT top=0/0, retr=1/23, del=1/1, size=20")
    out = json.loads(logfmt.JsonFormatter().format(rec))
    assert out["event"] == "session_end" and out["retr_bytes"] == 23 and out["del"] == 1 and out["rip"] == "127.0.0.1"


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
