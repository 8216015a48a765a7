"""TLS and SASL as a sysadmin meets them: SIGHUP in a real process, check-config, `pop3d passwd --scheme`."""

from __future__ import annotations

import base64
import hmac
import shutil
import signal
import ssl
import subprocess
import time

import pytest
import scramp
from conftest import deliver
from test_cli import POP3D, free_port, start, write_config
from tls_helpers import Pki, TlsRaw, challenge


def make_config(env, pki: Pki, port: int, tls_port: int):
    cfg = write_config(env, port)
    text = cfg.read_text().replace("[auth]", f'tls_listen = ["127.0.0.1:{tls_port}"]\n[auth]')
    text += f'[tls]\ncert = "{pki.server_pem}"\nkey = "{pki.server_pem}"\n'
    cfg.write_text(text)
    return cfg


def test_sighup_reloads_certificate_without_dropping_sessions(env, tmp_path):
    deliver(env.maildir("alice"), b"Subject: x\n\nx\n")
    pki = Pki.make(tmp_path, "old")
    port, tport = free_port(), free_port()
    proc = start(make_config(env, pki, port, tport), port)
    try:
        live = TlsRaw(port)
        assert live.cmd(b"STLS").startswith(b"+OK")
        live.starttls(pki.client_context())
        live.cmd(b"USER alice")
        assert live.cmd(b"PASS wonderland").startswith(b"+OK")

        new = Pki.make(tmp_path, "new")
        shutil.copy(new.server_pem, pki.server_pem)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15  # wait (bounded) until new handshakes present the new certificate
        while True:
            try:
                assert TlsRaw(tport, new.client_context()).greeting.startswith(b"+OK")
                break
            except ssl.SSLCertVerificationError:
                assert time.monotonic() < deadline, "SIGHUP did not reload the certificate"
                time.sleep(0.05)
        r = TlsRaw(port)  # STLS on the plain port uses the new certificate too
        assert r.cmd(b"STLS").startswith(b"+OK")
        r.starttls(new.client_context())
        assert live.cmd(b"STAT").startswith(b"+OK 1 ")  # the session from before the reload is intact
        assert live.cmd(b"QUIT").startswith(b"+OK")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert "TLS certificates reloaded" in out


def test_check_config_reports_bad_tls_files(env, tmp_path):
    pki = Pki.make(tmp_path)
    cfg = make_config(env, pki, free_port(), free_port())
    ok = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "STLS offered, implicit TLS on 127.0.0.1:" in ok.stdout
    pki.server_pem.write_text("not a pem\n")
    bad = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("pop3d: tls.cert") and len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "bad,msg",
    [
        ('[server]\ntls_listen = [":995"]\n', "server.tls_listen needs tls.cert"),
        ('[auth]\nmechanisms = ["GSSAPI"]\n', "auth.mechanisms"),
        ('[auth]\nmechanisms = ["EXTERNAL"]\n', "EXTERNAL needs tls.client_ca"),
        ('[auth]\nsecure_networks = ["10.0.0.300/8"]\n', "auth.secure_networks"),
    ],
)
def test_bad_tls_and_auth_config(tmp_path, bad, msg):
    cfg = tmp_path / "c.toml"
    cfg.write_text(bad)
    r = subprocess.run([*POP3D, "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


@pytest.mark.parametrize("scheme", ["CRAM-MD5", "SCRAM-SHA-256"])
def test_passwd_sasl_schemes_work_with_their_mechanism(env, start_server, scheme):
    r = subprocess.run(
        [*POP3D, "passwd", "carol", "--scheme", scheme], input="c4rol pw\n", capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("carol:{" + scheme + "}")
    env.passwd.write_text(r.stdout)
    deliver(env.maildir("carol"), b"Subject: x\n\nx\n")
    srv = start_server(auth={"mechanisms": [scheme]})
    raw = TlsRaw(srv.port)
    if scheme == "CRAM-MD5":
        ch = challenge(raw.cmd(b"AUTH CRAM-MD5"))
        reply = raw.respond(b"carol " + hmac.new(b"c4rol pw", ch, "md5").hexdigest().encode())
    else:
        client = scramp.ScramClient(["SCRAM-SHA-256"], "carol", "c4rol pw")
        line = raw.cmd(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.get_client_first().encode()))
        client.set_server_first(challenge(line).decode())
        client.set_server_final(challenge(raw.respond(client.get_client_final().encode())).decode())
        reply = raw.cmd(b"")
    assert reply.startswith(b"+OK carol")
    raw.cmd(b"QUIT")
    raw = TlsRaw(srv.port)  # the same entry also serves USER/PASS
    raw.cmd(b"USER carol")
    assert raw.cmd(b"PASS c4rol pw").startswith(b"+OK")
