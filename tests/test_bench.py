"""`pop3d bench` and `pop3d mkmaildrops`: histogram and reply parsing (pure), then real runs on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Raw, ServerThread
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d import wire
from pop3d.bench import mkmaildrops, runner
from pop3d.bench.client import ClientProtocol
from pop3d.bench.hist import Histogram
from pop3d.bench.scenarios import RunConfig
from pop3d.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
POP3D = [sys.executable, "-m", "pop3d"]


# ---- pure ------------------------------------------------------------------------------------------------


@given(
    st.lists(st.floats(min_value=1e-6, max_value=60.0), min_size=1, max_size=300), st.sampled_from([50, 95, 99, 100])
)
def test_percentile_is_an_upper_bound_within_one_bucket(samples, p):
    h = Histogram()
    for s in samples:
        h.add(s)
    true = sorted(samples)[max(1, math.ceil(len(samples) * p / 100)) - 1]
    got = h.percentile(p)
    assert true * (1 - 1e-9) <= got <= true * 2 ** (1 / 64) * (1 + 1e-9) + 1e-6
    merged = Histogram()
    merged.merge(Histogram.from_state(json.loads(json.dumps(h.to_state()))))
    assert merged.percentile(p) == got and merged.count == len(samples)


class _Transport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=6), st.data())
def test_client_matches_replies_across_any_chunking(lines, data):
    body = wire.encode(b"\n".join(lines) + b"\n" if lines else b"")
    stream = (
        b"+OK hello\r\n" + b"+OK 2 20\r\n" + b"+OK follows\r\n" + body + b"-ERR [IN-USE] busy\r\n" + b"+OK\r\n.\r\n"
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))

    async def go() -> list:
        proto = ClientProtocol(asyncio.get_running_loop())
        proto.connection_made(_Transport())  # type: ignore[arg-type]
        futs = proto.send([(b"STAT", False), (b"RETR 1", True), (b"PASS x", False), (b"UIDL", True)])
        prev = 0
        for c in [*cuts, len(stream)]:
            proto.data_received(stream[prev:c])
            prev = c
        return [await proto.greeting, *[await f for f in futs]]

    greet, stat, retr, err, uidl = asyncio.run(go())
    assert greet.status == b"+OK hello" and stat.ok and stat.status == b"+OK 2 20"
    assert retr.ok and retr.octets == len(body) - 3
    assert not err.ok and err.status == b"-ERR [IN-USE] busy"
    assert uidl.ok and uidl.octets == 0


def test_parse_size():
    assert mkmaildrops.parse_size("4096") == 4096
    assert mkmaildrops.parse_size("4k") == 4096
    assert mkmaildrops.parse_size("1M") == 1 << 20
    with pytest.raises(ValueError):
        mkmaildrops.parse_size("lots")


def test_read_users_and_checks(tmp_path):
    f = tmp_path / "u"
    f.write_text("# comment\nalice:pw:with:colons\n\nbob:x\n")
    assert runner.read_users(f) == [("alice", "pw:with:colons"), ("bob", "x")]
    f.write_text("nocolon\n")
    with pytest.raises(runner.UsageError, match="line 1"):
        runner.read_users(f)
    plan = runner.Plan(RunConfig("127.0.0.1", 1, "poll"), [("a", "1"), ("b", "2")], concurrency=3, duration=1)
    with pytest.raises(runner.UsageError, match="distinct users"):
        runner.check(plan)


def test_mkmaildrops_maildir(tmp_path):
    users_file = mkmaildrops.make(tmp_path, users=3, messages=4, size=1000)
    users = runner.read_users(users_file)
    assert [u for u, _ in users] == ["user00001", "user00002", "user00003"]
    passwd = (tmp_path / "passwd").read_text().splitlines()
    assert passwd[0] == f"user00001:{{PLAIN}}{users[0][1]}"
    files = sorted((tmp_path / "mail" / "user00002" / "Maildir" / "new").iterdir())
    assert len(files) == 4 and all(f.stat().st_size == 1000 for f in files)
    assert any(line.startswith(b".") for line in files[0].read_bytes().splitlines())
    s = load_settings(tmp_path / "pop3d.toml")
    assert s.auth.passwd_file == tmp_path / "passwd"


def test_mkmaildrops_mbox(tmp_path):
    mkmaildrops.make(tmp_path, users=1, messages=3, size=300, fmt="mbox")
    text = (tmp_path / "mail" / "user00001").read_bytes()
    assert text.count(b"\nFrom sender@bench.invalid ") + text.startswith(b"From ") == 3


# ---- against a real pop3d ----------------------------------------------------------------------------------


@pytest.fixture
def drops(tmp_path):
    """5 users x 3 messages of 2000 octets, and a pop3d serving them in a thread."""
    users_file = mkmaildrops.make(tmp_path / "b", users=5, messages=3, size=2000)
    settings = load_settings(
        tmp_path / "b" / "pop3d.toml", server={"listen": ["127.0.0.1:0"], "hostname": "t.invalid", "workers": 1}
    )
    srv = ServerThread(settings).start()
    yield srv, users_file, tmp_path / "b"
    srv.stop()


def _plan(srv, users_file, scenario, concurrency=3, duration=0.6, **kw):
    return runner.Plan(
        RunConfig("127.0.0.1", srv.port, scenario, noop_interval=0.2),
        runner.read_users(users_file),
        concurrency,
        duration,
        **kw,
    )


def _octets_per_message(root: Path) -> int:
    any_msg = next((root / "mail" / "user00001" / "Maildir" / "new").iterdir()).read_bytes()
    return len(wire.encode(any_msg)) - 3  # without the ".\r\n" terminator line


@pytest.mark.parametrize("scenario", ["poll", "download", "pipelined"])
def test_scenarios_count_what_happened(drops, scenario):
    srv, users_file, root = drops
    per = _octets_per_message(root)
    stats, elapsed = runner.run(_plan(srv, users_file, scenario))
    assert not stats.errors and stats.sessions > 3 and elapsed > 0
    assert stats.logins == stats.sessions == stats.latency["QUIT"].count
    if scenario == "poll":
        assert stats.messages == 0 and set(stats.latency) == {"connect", "USER", "PASS", "STAT", "QUIT"}
    elif scenario == "download":
        assert stats.messages == 3 * stats.sessions and stats.octets == per * stats.messages
    else:  # the first session of each user learns the count; the rest fetch everything in one write
        assert stats.messages == 3 * (stats.sessions - 3) and stats.octets == per * stats.messages


def test_download_delete_empties_the_maildrops(drops):
    srv, users_file, root = drops
    stats, _ = runner.run(_plan(srv, users_file, "download-delete", concurrency=2))
    assert not stats.errors and stats.messages == 6 and stats.latency["DELE"].count == 6
    for user in ("user00001", "user00002"):
        md = root / "mail" / user / "Maildir"
        assert not list((md / "new").iterdir()) and not list((md / "cur").iterdir())
    assert len(list((root / "mail" / "user00003" / "Maildir" / "new").iterdir())) == 3


def test_idle_holds_every_session_and_noops(drops):
    srv, users_file, _ = drops
    stats, _ = runner.run(_plan(srv, users_file, "idle", concurrency=5, duration=1.0))
    assert not stats.errors
    assert stats.held_max == 5 and stats.sessions == 5
    assert stats.latency["NOOP"].count + stats.latency.get("NOOP-ramp", Histogram()).count >= 5


def test_open_loop_rate(drops):
    srv, users_file, _ = drops
    stats, _ = runner.run(_plan(srv, users_file, "poll", concurrency=5, duration=1.0, rate=20))
    # 20 arrivals in one second, all served by a fast server (no timing assert beyond the schedule itself)
    assert stats.sessions + sum(stats.errors.values()) == 20


def test_errors_are_counted_by_kind(drops, tmp_path):
    srv, users_file, _ = drops
    users = runner.read_users(users_file)
    holder = Raw(srv.port)  # hold user00001's lock: the bench's sessions for it must fail [IN-USE]
    holder.cmd(b"USER " + users[0][0].encode())
    assert holder.cmd(b"PASS " + users[0][1].encode()).startswith(b"+OK")
    bad = tmp_path / "bad"
    bad.write_text(f"{users[0][0]}:{users[0][1]}\n{users[1][0]}:wrong\n")
    stats, _ = runner.run(runner.Plan(RunConfig("127.0.0.1", srv.port, "poll"), runner.read_users(bad), 2, 0.3))
    assert stats.sessions == 0
    assert set(stats.errors) == {"-ERR PASS [IN-USE]", "-ERR PASS [AUTH]"}
    holder.close()
    port = srv.port
    srv.stop()
    stats, _ = runner.run(runner.Plan(RunConfig("127.0.0.1", port, "poll"), runner.read_users(bad), 1, 0.2))
    assert stats.sessions == 0 and set(stats.errors) == {"connect ECONNREFUSED"}


def test_cli_json_with_two_processes(drops):
    srv, users_file, _ = drops
    r = subprocess.run(
        [
            *POP3D,
            "bench",
            f"127.0.0.1:{srv.port}",
            "--users",
            str(users_file),
            "--scenario",
            "download",
            "--concurrency",
            "4",
            "--procs",
            "2",
            "--duration",
            "0.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["errors"] == {} and out["sessions"] > 0 and out["messages"] == 3 * out["sessions"]
    assert out["sessions_per_s"] > 0 and out["mb_per_s"] > 0
    for verb in ("connect", "USER", "PASS", "STAT", "UIDL", "RETR", "QUIT"):
        assert set(out["latency_ms"][verb]) >= {"p50", "p95", "p99"}


def test_cli_table_and_usage_errors(drops, tmp_path):
    srv, users_file, _ = drops
    r = subprocess.run(
        [*POP3D, "bench", f"127.0.0.1:{srv.port}", "--users", str(users_file), "-c", "2", "-d", "0.3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0 and "sessions/s" not in r.stdout and "/s" in r.stdout and "p99 ms" in r.stdout
    r = subprocess.run(
        [*POP3D, "bench", f"127.0.0.1:{srv.port}", "--users", str(users_file), "-c", "50"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and "distinct users" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [*POP3D, "mkmaildrops", str(tmp_path / "m"), "--users", "2", "--messages", "1", "--size", "1k"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0 and (tmp_path / "m" / "users.txt").read_text().count("\n") == 2


@pytest.mark.parametrize("mode", ["tls", "stls"])
def test_tls_and_stls_verified_against_the_ca(tmp_path, mode):
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    users_file = mkmaildrops.make(tmp_path / "b", users=2, messages=2, size=500)
    settings = load_settings(
        tmp_path / "b" / "pop3d.toml",
        server={"listen": ["127.0.0.1:0"], "tls_listen": ["127.0.0.1:0"], "hostname": "t.invalid", "workers": 1},
        tls=pki.tls_section(),
    )
    srv = ServerThread(settings).start()
    try:
        port = srv.server.tls_addresses()[0][1] if mode == "tls" else srv.port
        rc = RunConfig("127.0.0.1", port, "download", tls=mode, server_hostname="localhost")
        stats, _ = runner.run(runner.Plan(rc, runner.read_users(users_file), 2, 0.5, cafile=str(pki.cafile)))
        assert not stats.errors and stats.sessions > 0 and stats.messages == 2 * stats.sessions
        assert ("STLS" in stats.latency) == (mode == "stls")
        # a CA that did not sign the server certificate: every session fails as a TLS error, none counts
        other = Pki.make(tmp_path, "other")
        stats, _ = runner.run(runner.Plan(rc, runner.read_users(users_file), 1, 0.3, cafile=str(other.cafile)))
        assert stats.sessions == 0 and list(stats.errors) == ["tls CERTIFICATE_VERIFY_FAILED"]
    finally:
        srv.stop()


def test_ramp_starts_clients_gradually(drops):
    srv, users_file, _ = drops
    seen: list[int] = []
    plan = _plan(srv, users_file, "idle", concurrency=5, duration=3.0)
    plan.ramp = 2.5  # clients start at 0, 0.5, 1, 1.5 and 2 s
    stats, _ = runner.run(plan, lambda snap: seen.append(snap["held"]))
    assert not stats.errors and stats.held_max == 5
    assert seen and seen[0] < 5  # the first progress tick (0.5 s) comes before the last start (2 s)
    plan.ramp = 3.0
    with pytest.raises(runner.UsageError, match="ramp"):
        runner.check(plan)


def test_mkmaildrops_mbox_is_served_exactly(tmp_path):
    """The mbox fixture is what the mbox driver reads back: same count, same octets as the messages."""
    users_file = mkmaildrops.make(tmp_path / "m", users=2, messages=3, size=700, fmt="mbox")
    settings = load_settings(
        tmp_path / "m" / "pop3d.toml", server={"listen": ["127.0.0.1:0"], "hostname": "t.invalid", "workers": 1}
    )
    srv = ServerThread(settings).start()
    try:
        stats, _ = runner.run(
            runner.Plan(RunConfig("127.0.0.1", srv.port, "download"), runner.read_users(users_file), 2, 0.4)
        )
    finally:
        srv.stop()
    assert not stats.errors and stats.sessions > 0 and stats.messages == 3 * stats.sessions
    per = len(wire.encode(mkmaildrops.message("user00001", 1, 700))) - 3
    assert stats.octets == per * stats.messages


def test_progress_line_only_on_a_terminal():
    import io

    from pop3d.bench.report import ProgressLine

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for out in (tty, pipe):
        line = ProgressLine(out)
        line({"elapsed": 1.0, "sessions": 120, "logins": 120, "octets": 0, "errors": 2, "held": 0})
        line.finish()
    assert tty.getvalue().startswith("\r") and "120" in tty.getvalue() and "errors      2" in tty.getvalue()
    assert pipe.getvalue() == ""
