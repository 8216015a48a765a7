"""`pop3d bench` over TLS: implicit TLS and STLS on the generator's own TLS layer, `--resume`, failures."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerThread
from tls_helpers import Pki

from pop3d.bench import mkmaildrops, runner
from pop3d.bench.scenarios import RunConfig
from pop3d.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ServerThread, Pki, Path]]:
    pki = Pki.make(tmp_path)
    users_file = mkmaildrops.make(tmp_path / "b", users=3, messages=2, size=500)
    settings = load_settings(
        tmp_path / "b" / "pop3d.toml",
        server={"listen": ["127.0.0.1:0"], "tls_listen": ["127.0.0.1:0"], "hostname": "t.invalid", "workers": 1},
        tls=pki.tls_section(),
    )
    srv = ServerThread(settings).start()
    try:
        yield srv, pki, users_file
    finally:
        srv.stop()


def _port(srv: ServerThread, mode: str) -> int:
    return srv.server.tls_addresses()[0][1] if mode == "tls" else srv.port


@pytest.mark.parametrize("mode", ["tls", "stls"])
def test_tls_and_stls_verified_against_the_ca(tls_server, tmp_path, mode):
    srv, pki, users_file = tls_server
    rc = RunConfig("127.0.0.1", _port(srv, mode), "download", tls=mode, server_hostname="localhost")
    stats, _ = runner.run(runner.Plan(rc, runner.read_users(users_file), 2, 0.5, cafile=str(pki.cafile)))
    assert not stats.errors and stats.sessions > 0 and stats.messages == 2 * stats.sessions
    assert ("STLS" in stats.latency) == (mode == "stls")
    # a CA that did not sign the server certificate: every session fails as a TLS error, none counts
    other = Pki.make(tmp_path, "other")
    stats, _ = runner.run(runner.Plan(rc, runner.read_users(users_file), 1, 0.3, cafile=str(other.cafile)))
    assert stats.sessions == 0 and list(stats.errors) == ["tls CERTIFICATE_VERIFY_FAILED"]


@pytest.mark.parametrize("mode", ["tls", "stls"])
def test_resume_resumes_every_session_after_each_clients_first(tls_server, mode):
    srv, pki, users_file = tls_server
    rc = RunConfig("127.0.0.1", _port(srv, mode), "download", tls=mode, server_hostname="localhost", resume=True)
    stats, _ = runner.run(runner.Plan(rc, runner.read_users(users_file), 2, 0.6, cafile=str(pki.cafile)))
    assert not stats.errors and stats.sessions > 2 and stats.messages == 2 * stats.sessions
    assert stats.tls_resumed == stats.sessions - 2  # the first session of each client is a full handshake
    rc = RunConfig("127.0.0.1", _port(srv, mode), "poll", tls=mode, server_hostname="localhost")
    stats, _ = runner.run(runner.Plan(rc, runner.read_users(users_file), 2, 0.3, cafile=str(pki.cafile)))
    assert not stats.errors and stats.sessions > 0 and stats.tls_resumed == 0


def test_resume_needs_tls(tmp_path):
    rc = RunConfig("127.0.0.1", 1, "poll", resume=True)
    with pytest.raises(runner.UsageError, match="--resume needs --tls or --stls"):
        runner.check(runner.Plan(rc, [("a", "b")], 1, 1.0))


def test_tls_to_a_cleartext_port_is_a_tls_error_per_session(tls_server):
    srv, _pki, users_file = tls_server
    rc = RunConfig("127.0.0.1", srv.port, "poll", tls="tls", server_hostname="localhost")
    stats, _ = runner.run(runner.Plan(rc, runner.read_users(users_file), 1, 0.2))
    assert stats.sessions == 0 and stats.errors and all(k.startswith("tls ") for k in stats.errors)


def test_cli_reports_resumed_handshakes(tls_server):
    srv, pki, users_file = tls_server
    r = subprocess.run(
        [sys.executable, "-m", "pop3d", "bench", f"127.0.0.1:{_port(srv, 'tls')}", "--users", str(users_file),
         "--tls", "--resume", "--cafile", str(pki.cafile), "--servername", "localhost", "-c", "1", "-d", "0.4",
         "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tls"] == "tls" and out["resume"] is True and out["tls_resumed"] == out["sessions"] - 1
    r = subprocess.run(
        [sys.executable, "-m", "pop3d", "bench", "127.0.0.1:1", "--users", str(users_file), "-c", "1", "--resume"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2 and "--resume needs --tls or --stls" in r.stderr
