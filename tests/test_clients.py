"""Real mail clients fetch from pop3d over loopback; what each delivered must equal the maildrop.

Clients: fetchmail, mpop, getmail6, curl (Debian packages, installed by .ci/run) and Python's poplib.
Each run is bounded in time. A missing client fails under CI and skips loudly elsewhere (clientkit.need).
"""

from __future__ import annotations

import poplib
import re
from pathlib import Path

import pytest
from clientkit import EDGE_MESSAGES, Inbox, assert_same, expected_lf, need, run
from conftest import USERS, deliver

PASSWORD = USERS["alice"]


@pytest.fixture
def drop(env) -> Path:
    md = env.maildir("alice")
    for m in EDGE_MESSAGES:
        deliver(md, m)
    return md


@pytest.fixture
def srv(start_server, drop):
    return start_server()


def remaining(md: Path) -> int:
    return sum(1 for d in ("new", "cur") for _ in (md / d).iterdir())


# -- fetchmail -----------------------------------------------------------------------------------


def fetchmail(
    tmp: Path,
    port: int,
    inbox: Inbox,
    *,
    proto: str = "POP3",
    extra: str = "",
    server_opts: str = "",
    tls: str = "sslproto ''",
    options: list[str] | None = None,
) -> str:
    """One fetchmail poll. fetchmail 6.4 tries STLS even when CAPA does not offer it: `sslproto ''`
    turns that off for the plain-text runs."""
    exe = need("fetchmail")
    home = tmp / "fetchmail-home"
    home.mkdir(mode=0o700, exist_ok=True)
    rc = tmp / "fetchmailrc"
    rc.write_text(
        f"set no syslog\n"
        f"poll 127.0.0.1 protocol {proto} port {port} timeout 30 {server_opts}\n"
        f'  user "alice" there password "{PASSWORD}" is "root" here\n'
        f"  {extra} {tls}\n"
        f'  mda "{inbox.mda}"\n'
    )
    rc.chmod(0o600)
    proc = run(
        [exe, "-f", str(rc), "-N", "-d0", "-v", "--invisible", "--norewrite", *(options or [])],
        env={"FETCHMAILHOME": str(home), "HOME": str(home)},
        check=False,
    )
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    # 0: mail fetched; 1: no new mail (both fine; the tests check what was delivered)
    assert proc.returncode in (0, 1), out
    return out


def test_fetchmail_user_pass(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    out = fetchmail(tmp_path, srv.port, inbox, extra="keep fetchall")
    assert "USER alice" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)
    assert remaining(drop) == len(EDGE_MESSAGES)


def test_fetchmail_apop(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    out = fetchmail(tmp_path, srv.port, inbox, proto="APOP", extra="keep fetchall")
    assert "APOP alice" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)


def test_fetchmail_uidl_only_new_across_runs(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    out = fetchmail(tmp_path, srv.port, inbox, extra="keep", server_opts="uidl")
    assert "UIDL" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)
    srv.wait_idle()
    late = b"From: late@example.org\nSubject: delivered between runs\n\nnew\n"
    deliver(drop, late)
    inbox.clear()
    fetchmail(tmp_path, srv.port, inbox, extra="keep", server_opts="uidl")
    assert_same(inbox.messages(), [late])  # only the new one


def test_fetchmail_delete_run(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    fetchmail(tmp_path, srv.port, inbox, extra="nokeep fetchall")
    assert_same(inbox.messages(), EDGE_MESSAGES)
    srv.wait_idle()
    assert remaining(drop) == 0


# -- mpop ----------------------------------------------------------------------------------------


def mpop(
    tmp: Path,
    port: int,
    inbox: Inbox,
    *,
    auth: str = "user",
    tls: str = "tls off",
    keep: str = "on",
    only_new: str = "off",
) -> str:
    exe = need("mpop")
    rc = tmp / "mpoprc"
    rc.write_text(
        f"account alice\nhost 127.0.0.1\nport {port}\nuser alice\npassword {PASSWORD}\nauth {auth}\n"
        f"{tls}\nkeep {keep}\nonly_new {only_new}\nreceived_header off\ntimeout 30\n"
        f"delivery mda {inbox.mda}\nuidls_file {tmp / 'mpop-uidls'}\n"
    )
    rc.chmod(0o600)
    proc = run([exe, "-C", str(rc), "--debug", "alice"])
    return (proc.stdout + proc.stderr).decode(errors="replace")


def test_mpop_user_pass_pipelined(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    out = mpop(tmp_path, srv.port, inbox)
    assert "--> USER alice" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)


def test_mpop_apop(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    out = mpop(tmp_path, srv.port, inbox, auth="apop")
    assert "--> APOP alice" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)


def test_mpop_only_new_and_delete(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    mpop(tmp_path, srv.port, inbox, only_new="on")
    assert_same(inbox.messages(), EDGE_MESSAGES)
    srv.wait_idle()
    inbox.clear()
    mpop(tmp_path, srv.port, inbox, only_new="on", keep="off")
    assert inbox.messages() == []  # nothing new: UIDLs were remembered
    srv.wait_idle()
    assert remaining(drop) == 0  # keep off deletes what was already fetched


# -- getmail6 ------------------------------------------------------------------------------------


def getmail(tmp: Path, port: int, inbox: Inbox, *, retriever: str = "SimplePOP3Retriever", extra: str = "") -> None:
    exe = need("getmail")
    gdir = tmp / "getmail"
    gdir.mkdir(exist_ok=True)
    (gdir / "getmailrc").write_text(
        f"[retriever]\ntype = {retriever}\nserver = 127.0.0.1\nport = {port}\nusername = alice\n"
        f"password = {PASSWORD}\n{extra}\n"
        f"[destination]\ntype = MDA_external\npath = {inbox.mda}\nallow_root_commands = true\n\n"
        "[options]\nread_all = false\ndelete = false\ndelivered_to = false\nreceived = false\nverbose = 0\n"
    )
    run([exe, "--getmaildir", str(gdir), "--rcfile", "getmailrc"])


# getmail's external-MDA destination prepends a Return-Path header of its own
GETMAIL_ADDS = (b"Return-Path",)


def test_getmail_plain_uses_uidl(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    getmail(tmp_path, srv.port, inbox)
    assert_same(inbox.messages(), EDGE_MESSAGES, GETMAIL_ADDS)
    srv.wait_idle()
    inbox.clear()
    getmail(tmp_path, srv.port, inbox)  # read_all = false: UIDL says there is nothing new
    assert inbox.messages() == []


def test_getmail_apop(tmp_path, srv, drop):
    inbox = Inbox(tmp_path)
    getmail(tmp_path, srv.port, inbox, extra="use_apop = true")
    assert_same(inbox.messages(), EDGE_MESSAGES, GETMAIL_ADDS)


# -- curl ----------------------------------------------------------------------------------------


def curl(*args: str) -> bytes:
    exe = need("curl")
    return run([exe, "-sS", "--max-time", "30", *args]).stdout


def test_curl_list_retr_uidl_top(srv, drop):
    base = f"pop3://127.0.0.1:{srv.port}"
    cred = ["-u", f"alice:{PASSWORD}"]
    listing = curl(f"{base}/", *cred).decode().split("\r\n")
    assert len([ln for ln in listing if ln]) == len(EDGE_MESSAGES)
    for i, raw in enumerate(EDGE_MESSAGES, 1):
        got = curl(f"{base}/{i}", *cred)
        assert got == wire_form(raw), f"message {i}"
        size = int(listing[i - 1].split()[1])
        assert size == len(got)  # LIST's size is what RETR delivered
    uidl = curl(f"{base}/", *cred, "-X", "UIDL").decode().split("\r\n")
    assert len({ln.split()[1] for ln in uidl if ln}) == len(EDGE_MESSAGES)
    top = curl(f"{base}/", *cred, "-X", "TOP 1 0")
    assert top == wire_form(EDGE_MESSAGES[0]).split(b"\r\n\r\n")[0] + b"\r\n\r\n"


def test_curl_apop(srv, drop):
    got = curl(f"pop3://127.0.0.1:{srv.port}/3", "-u", f"alice:{PASSWORD}", "--login-options", "AUTH=+APOP")
    assert got == wire_form(EDGE_MESSAGES[2])


def wire_form(raw: bytes) -> bytes:
    """curl writes the unstuffed body with CRLF as sent."""
    return expected_lf(raw).replace(b"\n", b"\r\n")


# -- poplib --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _poplib_long_lines(monkeypatch):
    """poplib refuses lines over 2,048 octets (its own guard, not an RFC limit); the maildrop has a
    5,000-octet line, so let the stdlib client read it."""
    monkeypatch.setattr(poplib, "_MAXLINE", 64 * 1024)


def poplib_fetch(p: poplib.POP3) -> list[bytes]:
    count, _ = p.stat()
    return [b"\n".join(p.retr(i)[1]) + b"\n" for i in range(1, count + 1)]


def test_poplib_plain(srv, drop):
    p = poplib.POP3("127.0.0.1", srv.port, timeout=30)
    p.user("alice")
    p.pass_(PASSWORD)
    assert_same(poplib_fetch(p), EDGE_MESSAGES)
    p.quit()


def test_poplib_apop(srv, drop):
    p = poplib.POP3("127.0.0.1", srv.port, timeout=30)
    assert re.search(rb"<.+@.+>", p.getwelcome())
    p.apop("alice", PASSWORD)
    assert_same(poplib_fetch(p), EDGE_MESSAGES)
    p.quit()


# -- TLS and SASL ----------------------------------------------------------------------------------
# Loopback is made *insecure* here (auth.secure_networks = []), so every cleartext mechanism must go
# through STLS or implicit TLS, exactly as for a remote client.

SASL_ALL = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]


@pytest.fixture
def pki(tmp_path):
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    # fetchmail 6.4 wants the host name in the subject CN as well as in subjectAltName
    pki.ca.issue_cert("localhost", "127.0.0.1", common_name="localhost").private_key_and_cert_chain_pem.write_to_path(
        str(pki.server_pem)
    )
    return pki


@pytest.fixture
def tls_srv(start_server, drop, pki):
    return start_server(
        tls=pki.tls_section(),
        server={"tls_listen": ["127.0.0.1:0"]},
        auth={"mechanisms": SASL_ALL, "secure_networks": []},
    )


def tls_port(srv) -> int:
    return srv.server.tls_addresses()[0][1]


def test_fetchmail_cram_md5(tmp_path, tls_srv, drop):
    inbox = Inbox(tmp_path)
    out = fetchmail(tmp_path, tls_srv.port, inbox, extra="keep fetchall", server_opts="auth cram-md5")
    assert "AUTH CRAM-MD5" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)


def test_fetchmail_stls(tmp_path, tls_srv, drop, pki):
    inbox = Inbox(tmp_path)
    out = fetchmail(
        tmp_path,
        tls_srv.port,
        inbox,
        extra="keep fetchall",
        server_opts="auth password",
        tls=f"sslproto 'TLS1.2+' sslcertck sslcertfile '{pki.cafile}' sslcommonname localhost",
    )
    assert "STLS" in out and "USER alice" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)


def test_fetchmail_implicit_tls(tmp_path, tls_srv, drop, pki):
    inbox = Inbox(tmp_path)
    fetchmail(
        tmp_path,
        tls_port(tls_srv),
        inbox,
        extra="keep fetchall",
        tls=f"ssl sslcertck sslcertfile '{pki.cafile}' sslcommonname localhost",
    )
    assert_same(inbox.messages(), EDGE_MESSAGES)


@pytest.mark.parametrize("auth", ["plain", "cram-md5"])
def test_mpop_sasl_over_stls(tmp_path, tls_srv, drop, pki, auth):
    inbox = Inbox(tmp_path)
    out = mpop(tmp_path, tls_srv.port, inbox, auth=auth, tls=f"tls on\ntls_starttls on\ntls_trust_file {pki.cafile}")
    assert "--> STLS" in out and f"--> AUTH {auth.upper()}" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)


def test_mpop_cram_md5_without_tls(tmp_path, tls_srv, drop):
    inbox = Inbox(tmp_path)
    out = mpop(tmp_path, tls_srv.port, inbox, auth="cram-md5")
    assert "--> AUTH CRAM-MD5" in out
    assert_same(inbox.messages(), EDGE_MESSAGES)


def test_mpop_implicit_tls(tmp_path, tls_srv, drop, pki):
    inbox = Inbox(tmp_path)
    mpop(tmp_path, tls_port(tls_srv), inbox, auth="user", tls=f"tls on\ntls_starttls off\ntls_trust_file {pki.cafile}")
    assert_same(inbox.messages(), EDGE_MESSAGES)


def test_getmail_implicit_tls(tmp_path, tls_srv, drop, pki):
    inbox = Inbox(tmp_path)
    getmail(tmp_path, tls_port(tls_srv), inbox, retriever="SimplePOP3SSLRetriever", extra=f"ca_certs = {pki.cafile}")
    assert_same(inbox.messages(), EDGE_MESSAGES, GETMAIL_ADDS)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl_sasl_over_stls(tls_srv, drop, pki, mech):
    got = curl(
        f"pop3://127.0.0.1:{tls_srv.port}/2",
        "--ssl-reqd",
        "--cacert",
        str(pki.cafile),
        "-u",
        f"alice:{PASSWORD}",
        "--login-options",
        f"AUTH={mech}",
    )
    assert got == wire_form(EDGE_MESSAGES[1])


def test_curl_pop3s_uidl_and_top(tls_srv, drop, pki):
    base = f"pop3s://127.0.0.1:{tls_port(tls_srv)}/"
    cred = ["--cacert", str(pki.cafile), "-u", f"alice:{PASSWORD}"]
    uidl = curl(base, *cred, "-X", "UIDL").decode().split("\r\n")
    assert len([ln for ln in uidl if ln]) == len(EDGE_MESSAGES)
    top = curl(base, *cred, "-X", "TOP 3 0")
    assert top == wire_form(EDGE_MESSAGES[2]).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert curl(base + "7", *cred) == wire_form(EDGE_MESSAGES[6])


def test_poplib_stls(tls_srv, drop, pki):
    p = poplib.POP3("127.0.0.1", tls_srv.port, timeout=30)
    p.stls(pki.client_context())
    p.user("alice")
    p.pass_(PASSWORD)
    assert_same(poplib_fetch(p), EDGE_MESSAGES)
    p.quit()


def test_poplib_pop3_ssl(tls_srv, drop, pki):
    p = poplib.POP3_SSL("127.0.0.1", tls_port(tls_srv), context=pki.client_context(), timeout=30)
    p.user("alice")
    p.pass_(PASSWORD)
    assert_same(poplib_fetch(p), EDGE_MESSAGES)
    p.quit()
