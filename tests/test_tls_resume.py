"""TLS 1.3 session resumption (RFC 8446 §2.2) across the workers of one server, before and after a reload."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import time

import pytest
from test_workers import tls_workers
from tls_helpers import Pki


def _connect(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[int, bool, ssl.SSLSession]:
    """One implicit-TLS connection: (the worker pid in the greeting, resumed?, the newest session)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            greeting += s.recv(512)  # reading after the handshake also takes in the NewSessionTicket
        m = re.search(rb"<(\d+)\.", greeting)
        assert m, greeting
        s.sendall(b"QUIT\r\n")
        s.recv(512)
        assert s.session is not None
        return int(m[1]), s.session_reused, s.session


def _reload_new_certificate(proc, pki: Pki, port: int, ctx: ssl.SSLContext) -> None:  # type: ignore[no-untyped-def]
    """Write a new server certificate, SIGHUP, and wait until both workers hand it out on full handshakes."""
    cert = pki.ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(pki.server_pem))
    fresh = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    proc.send_signal(signal.SIGHUP)
    renewed: set[int] = set()
    deadline = time.monotonic() + 30
    while len(renewed) < 2:
        assert time.monotonic() < deadline, f"only workers {renewed} reloaded"
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            m = re.search(rb"<(\d+)\.", s.recv(512))
            assert m
            if s.getpeercert(binary_form=True) == fresh:
                renewed.add(int(m[1]))


def _resume_many(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession, tries: int = 200) -> set[int]:
    """Reconnect with `session` until both workers served a resumed connection; every one must resume."""
    served: set[int] = set()
    for _ in range(tries):
        pid, reused, session = _connect(port, ctx, session)
        assert reused, f"worker {pid} did not resume the session"
        served.add(pid)
        if len(served) == 2:
            break
    return served


@pytest.mark.parametrize("client_ca", [False, True])
def test_any_worker_resumes_a_session_another_one_issued(env, tmp_path, client_ca):
    pki, proc, port, _plain = tls_workers(env, tmp_path, client_ca)
    try:
        ctx = pki.client_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        _pid, reused, session = _connect(port, ctx, None)
        assert not reused
        assert len(_resume_many(port, ctx, session)) == 2
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_sessions_resume_on_every_worker_after_a_certificate_reload(env, tmp_path):
    """SIGHUP re-reads the certificate in every worker; the ticket keys stay the ones made before the fork."""
    pki, proc, port, _plain = tls_workers(env, tmp_path)
    try:
        ctx = pki.client_context()
        _pid, _reused, session = _connect(port, ctx, None)
        _reload_new_certificate(proc, pki, port, ctx)
        assert len(_resume_many(port, ctx, session)) == 2
        # and a session issued after the reload, by either worker, too
        _pid, _reused, session = _connect(port, ctx, None)
        assert len(_resume_many(port, ctx, session)) == 2
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def _stls(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[int, bool, ssl.SSLSession]:
    """One STLS (RFC 2595 §4) connection: (worker pid, resumed?, the newest session)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = raw.makefile("rb")
    m = re.search(rb"<(\d+)\.", f.readline())
    assert m
    raw.sendall(b"STLS\r\n")
    assert f.readline().startswith(b"+OK")
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        s.sendall(b"NOOP\r\n")
        s.recv(512)
        s.sendall(b"QUIT\r\n")
        s.recv(512)
        assert s.session is not None
        return int(m[1]), s.session_reused, s.session


def test_stls_sessions_resume_on_every_worker_before_and_after_a_reload(env, tmp_path):
    pki, proc, tls_port, port = tls_workers(env, tmp_path)
    try:
        ctx = pki.client_context()
        for reload in (False, True):
            if reload:
                _reload_new_certificate(proc, pki, tls_port, ctx)
            _pid, _reused, session = _stls(port, ctx, None)
            served: set[int] = set()
            for _ in range(200):
                pid, reused, session = _stls(port, ctx, session)
                assert reused, f"worker {pid} did not resume (after reload: {reload})"
                served.add(pid)
                if len(served) == 2:
                    break
            assert len(served) == 2
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
