"""TLS end to end on loopback: STLS (RFC 2595), implicit TLS (RFC 8314), the injection case, reload,
the cleartext policy, and every SASL mechanism (RFC 5034) with a real client implementation."""

from __future__ import annotations

import base64
import contextlib
import hmac
import poplib
import shutil
import socket
import ssl
import subprocess

import pytest
import scramp
from conftest import deliver, pop3_from
from tls_helpers import Pki, TlsRaw, challenge
from tooling import needs_tool, which

from pop3d.auth import schemes

MSG = b"From: a@example.org\nSubject: hi\n\nhello\n"


@pytest.fixture
def pki(tmp_path):
    return Pki.make(tmp_path)


@pytest.fixture
def alice(env):
    deliver(env.maildir("alice"), MSG)


def tls_server(start_server, pki, *, client_ca=False, implicit=True, **sections):
    server = {"tls_listen": ["127.0.0.1:0"]} if implicit else {}
    server.update(sections.pop("server", {}))
    tls = {**pki.tls_section(client_ca), **sections.pop("tls", {})}
    return start_server(server=server, tls=tls, **sections)


def tls_port(srv) -> int:
    return srv.server.tls_addresses()[0][1]


# -- STLS and implicit TLS with the stdlib client --------------------------------------------------


def test_poplib_stls_then_login(start_server, pki, alice):
    srv = tls_server(start_server, pki, implicit=False)
    p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    assert "STLS" in p.capa()
    p.stls(pki.client_context())
    assert p.sock.version() in ("TLSv1.2", "TLSv1.3")
    caps = p.capa()
    assert "STLS" not in caps  # RFC 2595 §4: not offered again
    assert caps["SASL"] == ["PLAIN", "LOGIN"]
    p.user("alice")
    p.pass_("wonderland")
    assert p.stat()[0] == 1
    assert b"hello" in b"\n".join(p.retr(1)[1])
    p.quit()


def test_poplib_pop3_ssl_implicit(start_server, pki, alice):
    srv = tls_server(start_server, pki)
    p = poplib.POP3_SSL("127.0.0.1", tls_port(srv), context=pki.client_context(), timeout=10)
    assert p.getwelcome().startswith(b"+OK")
    assert "STLS" not in p.capa()
    p.user("alice")
    p.pass_("wonderland")
    assert p.stat()[0] == 1
    p.quit()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_below_1_2_refused(start_server, pki):
    srv = tls_server(start_server, pki)
    ctx = pki.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TlsRaw(tls_port(srv), ctx)
    r = TlsRaw(tls_port(srv), pki.client_context())  # the listener survives and serves the next client
    assert r.greeting.startswith(b"+OK")


def test_stls_pipelined_commands_are_discarded(start_server, pki, alice):
    """The STARTTLS injection case: CAPA sent with STLS in one segment is answered neither in plaintext
    nor after the handshake."""
    srv = tls_server(start_server, pki, implicit=False)
    r = TlsRaw(srv.port)
    r.send(b"STLS\r\nCAPA\r\n")
    assert r.line().startswith(b"+OK")
    r.starttls(pki.client_context())  # would fail if a plaintext CAPA reply followed the +OK
    # the first reply under TLS belongs to the first command sent under TLS
    assert r.cmd(b"NOOP") == b"-ERR NOOP not allowed before login"
    caps = r.capa()
    assert b"STLS" not in caps and b"USER" in caps
    assert r.cmd(b"STLS").startswith(b"-ERR")  # only once
    assert r.cmd(b"USER alice").startswith(b"+OK")
    assert r.cmd(b"PASS wonderland").startswith(b"+OK")
    r.cmd(b"QUIT")


def test_user_before_stls_is_forgotten(start_server, pki, alice):
    srv = tls_server(start_server, pki, implicit=False)
    r = TlsRaw(srv.port)
    assert r.cmd(b"USER alice").startswith(b"+OK")
    assert r.cmd(b"STLS").startswith(b"+OK")
    r.starttls(pki.client_context())
    assert r.cmd(b"PASS wonderland").startswith(b"-ERR")  # RFC 2595 §4: start over after TLS


def test_stls_unknown_without_tls(server):
    r = TlsRaw(server.port)
    assert r.cmd(b"STLS") == b"-ERR unknown command"
    assert not any(c.startswith(b"STLS") for c in r.capa())


def test_handshake_garbage_closes_only_that_session(start_server, pki, alice):
    srv = tls_server(start_server, pki, implicit=False)
    r = TlsRaw(srv.port)
    assert r.cmd(b"STLS").startswith(b"+OK")
    r.send(b"USER alice\r\nPASS wonderland\r\n")  # plaintext where a ClientHello belongs
    assert r.closed() or r.closed()
    srv.wait_idle()
    p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    p.stls(pki.client_context())
    p.user("alice")
    p.pass_("wonderland")
    p.quit()


# -- certificate reload ----------------------------------------------------------------------------


def test_reload_keeps_live_session_and_serves_new_cert(start_server, pki, tmp_path, alice):
    srv = tls_server(start_server, pki)
    old = TlsRaw(tls_port(srv), pki.client_context())
    assert old.cmd(b"USER alice").startswith(b"+OK")
    assert old.cmd(b"PASS wonderland").startswith(b"+OK")

    new_pki = Pki.make(tmp_path, "new")
    shutil.copy(new_pki.server_pem, pki.server_pem)  # the operator renews the certificate in place
    assert srv.call(_reload(srv))

    assert old.cmd(b"STAT").startswith(b"+OK 1 ")  # the live session goes on with its old keys
    with pytest.raises(ssl.SSLCertVerificationError):
        TlsRaw(tls_port(srv), pki.client_context())  # new handshakes present the new certificate...
    fresh = TlsRaw(tls_port(srv), new_pki.client_context())  # ...which the new CA verifies
    assert fresh.greeting.startswith(b"+OK")
    assert old.cmd(b"QUIT").startswith(b"+OK")

    pki.server_pem.write_text("garbage")  # a broken renewal keeps the working certificate
    assert not srv.call(_reload(srv))
    assert TlsRaw(tls_port(srv), new_pki.client_context()).greeting.startswith(b"+OK")


async def _reload(srv):
    return srv.ctx.tls.reload()


# -- cleartext policy ------------------------------------------------------------------------------


def test_cleartext_refused_on_insecure_connection(start_server, pki, alice):
    srv = tls_server(
        start_server,
        pki,
        implicit=False,
        auth={"secure_networks": [], "mechanisms": ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]},
    )
    r = TlsRaw(srv.port)
    caps = r.capa()
    assert b"USER" not in caps
    assert b"SASL SCRAM-SHA-256 CRAM-MD5" in caps and b"STLS" in caps
    for cmd in (b"USER alice", b"PASS wonderland", b"AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=", b"AUTH LOGIN"):
        reply = r.cmd(cmd)
        assert reply.startswith(b"-ERR [AUTH] plaintext authentication disallowed"), reply
    assert r.cmd(b"AUTH").startswith(b"+OK")
    assert r.multi() == [b"SCRAM-SHA-256", b"CRAM-MD5"]
    assert r.cmd(b"STLS").startswith(b"+OK")
    r.starttls(pki.client_context())
    caps = r.capa()
    assert b"USER" in caps and b"SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN" in caps
    assert r.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland")).startswith(b"+OK")


def test_cleartext_allowed_when_policy_off(start_server, alice):
    srv = start_server(auth={"secure_networks": [], "disable_plaintext_auth": False})
    p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    assert "USER" in p.capa()
    p.user("alice")
    p.pass_("wonderland")
    p.quit()


# -- SASL over TLS with real client implementations -------------------------------------------------

ALL = {"mechanisms": ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "EXTERNAL"]}


@pytest.fixture
def sasl_srv(start_server, pki, env, alice):
    with env.passwd.open("a") as f:
        f.write(f"carol:{schemes.hash_password('CRAM-MD5', 'c4rol pw')}\n")
        f.write(f"dave:{schemes.hash_password('SCRAM-SHA-256', 'dav€ pw')}\n")
        f.write(f"erin:{schemes.hash_password('ARGON2ID', 'erin pw')}\n")
        f.write("frank:{PLAIN}" + "p" * 300 + "\n")
    for u in ("carol", "dave", "erin", "frank"):
        deliver(env.maildir(u), MSG)
    return tls_server(start_server, pki, client_ca=True, auth=ALL)


@pytest.mark.parametrize("user,password", [("alice", "wonderland"), ("dave", "dav€ pw")])
def test_scram_with_scramp_client(sasl_srv, pki, user, password):
    r = TlsRaw(tls_port(sasl_srv), pki.client_context())
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    server_first = challenge(r.cmd(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.get_client_first().encode())))
    client.set_server_first(server_first.decode())
    server_final = challenge(r.respond(client.get_client_final().encode()))
    client.set_server_final(server_final.decode())  # raises unless the server proved it knows the keys
    assert r.cmd(b"").startswith(b"+OK " + user.encode())
    assert r.cmd(b"QUIT").startswith(b"+OK")


@pytest.mark.parametrize("user,password", [("alice", "nope"), ("nobody", "nope"), ("erin", "erin pw")])
def test_scram_failures_look_alike(sasl_srv, pki, user, password):
    r = TlsRaw(tls_port(sasl_srv), pki.client_context())
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    assert r.cmd(b"AUTH SCRAM-SHA-256") == b"+ "
    server_first = challenge(r.respond(client.get_client_first().encode()))
    client.set_server_first(server_first.decode())
    assert r.respond(client.get_client_final().encode()) == b"-ERR [AUTH] authentication failed"
    assert r.cmd(b"USER alice").startswith(b"+OK")  # the session goes on


@pytest.mark.parametrize("user,password", [("alice", "wonderland"), ("carol", "c4rol pw")])
def test_cram_md5(sasl_srv, pki, user, password):
    r = TlsRaw(tls_port(sasl_srv), pki.client_context())
    ch = challenge(r.cmd(b"AUTH CRAM-MD5"))
    assert ch.startswith(b"<") and ch.endswith(b">")
    digest = hmac.new(password.encode(), ch, "md5").hexdigest()
    assert r.respond(f"{user} {digest}".encode()).startswith(b"+OK")


def test_cram_md5_wrong_and_unusable_secret(sasl_srv, pki):
    r = TlsRaw(tls_port(sasl_srv), pki.client_context())
    for user, pw in [("alice", "bad"), ("erin", "erin pw"), ("nobody", "x")]:
        ch = challenge(r.cmd(b"AUTH CRAM-MD5"))
        digest = hmac.new(pw.encode(), ch, "md5").hexdigest()
        assert r.respond(f"{user} {digest}".encode()) == b"-ERR [AUTH] authentication failed"


def test_plain_login_and_long_sasl_response(sasl_srv, pki):
    r = TlsRaw(tls_port(sasl_srv), pki.client_context())
    assert r.cmd(b"AUTH PLAIN") == b"+ "
    assert r.respond(b"\0erin\0erin pw").startswith(b"+OK erin")
    r.cmd(b"QUIT")
    # RFC 5034 §4: responses inside the exchange may exceed the 255-octet command limit
    r = TlsRaw(tls_port(sasl_srv), pki.client_context())
    assert challenge(r.cmd(b"AUTH LOGIN " + base64.b64encode(b"frank"))) == b"Password:"
    line = base64.b64encode(b"p" * 300)
    assert len(line) > 255
    assert r.respond(b"p" * 300).startswith(b"+OK frank")


def test_oversized_sasl_response_rejected_session_intact(sasl_srv, pki):
    r = TlsRaw(tls_port(sasl_srv), pki.client_context())
    assert r.cmd(b"AUTH PLAIN") == b"+ "
    assert r.cmd(b"A" * 20_000) == b"-ERR [AUTH] SASL response too long (limit 8192 octets)"
    assert r.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland")).startswith(b"+OK")


def test_sasl_protocol_errors_keep_session(sasl_srv, pki):
    r = TlsRaw(tls_port(sasl_srv), pki.client_context())
    assert r.cmd(b"AUTH") == b"+OK SASL mechanisms follow"
    assert r.multi() == [b"SCRAM-SHA-256", b"CRAM-MD5", b"PLAIN", b"LOGIN"]  # no client cert: no EXTERNAL
    assert r.cmd(b"AUTH PLAIN") == b"+ "
    assert r.cmd(b"*") == b"-ERR [AUTH] authentication cancelled"
    assert r.cmd(b"AUTH LOGIN") == b"+ " + base64.b64encode(b"Username:")
    assert r.cmd(b"!!notbase64!!") == b"-ERR [AUTH] SASL response is not valid base64"
    assert r.cmd(b"AUTH PLAIN !!") == b"-ERR [AUTH] AUTH: initial response is not base64"
    assert r.cmd(b"AUTH PL@IN") == b"-ERR [AUTH] AUTH: invalid mechanism name"
    assert r.cmd(b"AUTH KERBEROS_V4") == b"-ERR [AUTH] unsupported authentication mechanism KERBEROS_V4"
    assert r.cmd(b"AUTH EXTERNAL") == b"-ERR [AUTH] EXTERNAL needs a verified TLS client certificate"
    assert r.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0nope")) == b"-ERR [AUTH] authentication failed"
    assert r.cmd(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0wonderland")).startswith(b"-ERR [AUTH]")
    # pipelined: the command after an AUTH response line is parsed as a command again, in order
    r.send(b"AUTH PLAIN\r\n" + base64.b64encode(b"\0alice\0wonderland") + b"\r\nSTAT\r\n")
    assert r.line() == b"+ "
    assert r.line().startswith(b"+OK alice")
    assert r.line().startswith(b"+OK 1 ")
    assert r.cmd(b"AUTH PLAIN =").startswith(b"-ERR AUTH not allowed after login")


def test_external_with_client_certificate(sasl_srv, pki):
    cert = pki.client_cert("alice.pem", "alice@example.org", common_name="alice")
    r = TlsRaw(tls_port(sasl_srv), pki.client_context(cert))
    assert b"SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN EXTERNAL" in r.capa()
    assert r.cmd(b"AUTH EXTERNAL " + base64.b64encode(b"bob")) == b"-ERR [AUTH] authentication failed"
    assert r.cmd(b"AUTH EXTERNAL =").startswith(b"+OK alice")
    r.cmd(b"QUIT")
    stranger = pki.client_cert("zed.pem", common_name="zed")  # signed by the CA, but no such user
    r = TlsRaw(tls_port(sasl_srv), pki.client_context(stranger))
    assert r.cmd(b"AUTH EXTERNAL") == b"+ "
    assert r.cmd(b"") == b"-ERR [AUTH] authentication failed"


def test_external_after_stls(sasl_srv, pki):
    cert = pki.client_cert("alice-stls.pem", common_name="alice")
    r = TlsRaw(sasl_srv.port)
    assert b"EXTERNAL" not in b" ".join(r.capa())
    assert r.cmd(b"STLS").startswith(b"+OK")
    r.starttls(pki.client_context(cert))
    assert b"EXTERNAL" in b" ".join(r.capa())
    assert r.cmd(b"AUTH EXTERNAL").startswith(b"+ ")
    assert r.cmd(b"").startswith(b"+OK alice")


def test_external_email_localpart_mapping(start_server, pki, alice):
    srv = tls_server(
        start_server, pki, client_ca=True, auth={"mechanisms": ["EXTERNAL"]}, tls={"client_identity": "email-localpart"}
    )
    cert = pki.client_cert("a.pem", "alice@example.org", common_name="somebody else")
    r = TlsRaw(tls_port(srv), pki.client_context(cert))
    assert r.cmd(b"AUTH EXTERNAL =").startswith(b"+OK alice")


def test_client_cert_from_unknown_ca_fails_handshake(sasl_srv, pki, tmp_path):
    other = Pki.make(tmp_path, "other")
    cert = other.client_cert("x.pem", common_name="alice")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        r = TlsRaw(tls_port(sasl_srv), pki.client_context(cert))
        r.cmd(b"CAPA")  # TLS 1.3 reports the rejected certificate on the first read


# -- penalty ---------------------------------------------------------------------------------------


def test_penalty_grows_resets_and_blocks_no_one(start_server, alice):
    srv = start_server(auth={"failure_delay": 30, "failure_delay_max": 60})
    slow = TlsRaw(srv.port)
    slow.send(b"USER alice\r\nPASS wrong\r\n")
    assert slow.line().startswith(b"+OK")  # USER; the PASS reply is held back 30 s
    # meanwhile a client from another address is served at once (its socket timeout is 10 s, far below the
    # penalty); one from the penalised address would wait too, right password or not (tests/test_attack_auth.py)
    p = pop3_from(srv.port, "127.0.0.2")
    p.user("alice")
    p.pass_("wonderland")
    p.quit()
    slow.close()
    penalty = srv.ctx.penalty
    assert [penalty.delay_for(n) for n in (1, 2, 3)] == [30, 60, 60]


def test_penalty_counts_consecutive_failures(start_server, alice):
    srv = start_server(auth={"failure_delay": 0.001, "failure_delay_max": 0.004, "max_failures_per_connection": 4})
    r = TlsRaw(srv.port)
    for _ in range(3):
        r.cmd(b"USER alice")
        assert r.cmd(b"PASS wrong") == b"-ERR [AUTH] authentication failed"
    assert srv.ctx.penalty.failures("127.0.0.1", _now()) == 3
    r.cmd(b"USER alice")
    assert r.cmd(b"PASS wonderland").startswith(b"+OK")
    assert srv.ctx.penalty.failures("127.0.0.1", _now()) == 0


def _now() -> float:
    import time

    return time.monotonic()


# -- curl, a real client with its own TLS and SASL code -----------------------------------------------

CURL = which("curl")
needs_curl = needs_tool("curl", "curl")


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30)


@needs_curl
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl_stls_ssl_reqd(sasl_srv, pki, mech):
    port = sasl_srv.port
    out = curl(
        "--ssl-reqd",
        "--cacert",
        str(pki.cafile),
        "--login-options",
        f"AUTH={mech}",
        "-u",
        "alice:wonderland",
        f"pop3://127.0.0.1:{port}/1",
    )
    assert out.returncode == 0, out.stderr
    assert "hello" in out.stdout


@needs_curl
def test_curl_pop3s_and_external(sasl_srv, pki):
    port = tls_port(sasl_srv)
    out = curl(
        "--cacert", str(pki.cafile), "--login-options", "AUTH=PLAIN", "-u", "dave:dav€ pw", f"pop3s://127.0.0.1:{port}/"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 ")
    cert = pki.client_cert("alice-curl.pem", common_name="alice")
    out = curl(
        "--cacert",
        str(pki.cafile),
        "--cert",
        str(cert),
        "--login-options",
        "AUTH=EXTERNAL",
        "-u",
        "alice:",
        f"pop3s://127.0.0.1:{port}/1",
    )
    assert out.returncode == 0, out.stderr
    assert "hello" in out.stdout


@needs_curl
def test_curl_refuses_server_without_stls(server, pki, alice):
    out = curl("--ssl-reqd", "--cacert", str(pki.cafile), "-u", "alice:wonderland", f"pop3://127.0.0.1:{server.port}/")
    assert out.returncode != 0  # --ssl-reqd and no STLS: curl never sends the password


def test_socket_closed_mid_handshake_cleans_up(start_server, pki):
    srv = tls_server(start_server, pki)
    s = socket.create_connection(("127.0.0.1", tls_port(srv)), timeout=10)
    s.close()
    srv.wait_idle()
