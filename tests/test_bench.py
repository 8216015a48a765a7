"""`pop3d bench` and `pop3d mkmaildrops`: histogram and reply parsing (pure), then real runs on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Raw, ServerThread
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import free_port, wait_port

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
        assert stats.messages == 0 and set(stats.latency) == {"connect", "USER", "PASS", "STAT", "QUIT", "session"}
        assert stats.latency["session"].count == stats.sessions
    elif scenario == "download":
        assert stats.messages == 3 * stats.sessions and stats.octets == per * stats.messages
    else:  # the first session of each user learns the count; the rest fetch everything in one write
        assert stats.messages == 3 * (stats.sessions - 3) and stats.octets == per * stats.messages


def test_download_delete_empties_the_maildrops(drops):
    srv, users_file, root = drops
    plan = _plan(srv, users_file, "download-delete", concurrency=2)
    assert runner.messages_left(plan) == 6
    stats, _ = runner.run(plan)
    assert runner.messages_left(plan) == 0
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
    # 20 arrivals in one second, each one accounted for exactly once (no timing assert beyond the schedule)
    assert stats.arrivals == 20
    assert stats.sessions + sum(stats.errors.values()) + stats.unfinished + stats.not_started == 20
    assert stats.latency["start-lag"].count == 20 - stats.not_started


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


# ---- gating: durations, thresholds, exit status ------------------------------------------------------------


def test_durations_take_units():
    from pop3d.bench.units import format_duration, parse_duration

    assert parse_duration("10s") == 10.0 and parse_duration("2m") == 120.0 and parse_duration("1h") == 3600.0
    assert parse_duration("250ms") == 0.25 and parse_duration("1.5") == 1.5 and parse_duration(" 3 s ") == 3.0
    for bad in ("", "ten", "5 minutes", "-1s", "1d"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    assert [format_duration(x) for x in (10.0, 120.0, 0.25)] == ["10s", "2m", "250ms"]
    from pop3d.cli import build_parser

    args = build_parser().parse_args(["bench", "h:1", "--users", "u", "-d", "2m", "--interval", "500ms"])
    assert args.duration == 120.0 and args.interval == 0.5 and args.timeout == 30.0 and args.ramp == 0.0


def _stats_with(**latencies: list[float]):
    from pop3d.bench.stats import Stats

    stats = Stats(sessions=90)
    stats.errors["-ERR PASS [AUTH]"] = 10
    for key, samples in latencies.items():
        for s in samples:
            stats.record(key, s)
    return stats


def test_threshold_grammar_and_verdicts():
    from pop3d.bench import report, thresholds

    stats = _stats_with(PASS=[0.001] * 98 + [0.2, 0.3], **{"PASS-failed": [2.0]})
    result = report.result(stats, 1.0, {})
    cases = {
        "errors>0": (10, True),
        "errors >= 11": (10, False),
        "error_rate>5%": (10.0, True),
        "error_rate>10": (10.0, False),
        "sessions<100": (90, True),
        "sessions_per_s!=90": (90.0, False),
        "p99(PASS)>50ms": (0.2, True),
        "p50(pass) > 0.5 s": (0.001, False),
        "p99.9(PASS)>0.25s": (0.3, True),
        "max(PASS-failed)>=2s": (2.0, True),
        "mean(PASS)<1ms": (sum([0.001] * 98 + [0.2, 0.3]) / 100, False),
        "count(PASS-failed)>0": (1, True),
        "errors(AUTH)==10": (10, True),
        "errors(IN-USE)>0": (0, False),
        "p99(RETR-failed)>1ms": (None, False),  # nothing failed: the good case
        "p99(RETR)>1ms": (None, True),  # nothing measured: cannot pass a gate
    }
    verdicts = thresholds.evaluate([thresholds.parse(c) for c in cases], stats, result)
    for v in verdicts:
        value, crossed = cases[v.threshold.text]
        assert v.crossed == crossed, v.describe()
        assert v.value == pytest.approx(value, rel=0.02) if value is not None else v.value is None
    assert "p99(PASS) = " in verdicts[6].describe() and " ms" in verdicts[6].describe()
    assert "cannot check" in verdicts[-1].describe()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p99(PASS)>50", "needs a unit"),
        ("p99(PASSS)>50ms", "unknown latency"),
        ("p101(PASS)>1ms", "unknown function"),
        ("errors>5ms", "takes no unit"),
        ("sessions>5%", "takes no unit"),
        ("bogus>1", "unknown metric"),
        ("__import__('os').system('true')>0", "expected METRIC OP NUMBER"),
        ("errors>0 or 1", "expected METRIC OP NUMBER"),
        ("errors=0", "expected METRIC OP NUMBER"),
        ("count(PASS)>1ms", "takes no unit"),
    ],
)
def test_threshold_errors_name_the_problem(text, message):
    from pop3d.bench import thresholds

    with pytest.raises(thresholds.ThresholdError, match=message):
        thresholds.parse(text)


def _bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*POP3D, "bench", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_exit_status_follows_the_thresholds(drops, tmp_path):
    srv, users_file, _ = drops
    users = runner.read_users(users_file)
    mixed = tmp_path / "mixed"  # one user in four with a wrong password: 25 % failed logins
    mixed.write_text("".join(f"{u}:{p if i else 'wrong'}\n" for i, (u, p) in enumerate(users[:4])))
    target = f"127.0.0.1:{srv.port}"
    r = _bench(target, "--users", str(mixed), "-c", "4", "-d", "300ms", "--json")
    out = json.loads(r.stdout)  # no --fail-if: errors>0 is the gate, so 25 % failed logins fail the run
    assert r.returncode == 1 and out["errors"]["-ERR PASS [AUTH]"] > 0 and out["exit_status"] == 1
    assert "failed: errors>0" in r.stderr

    r = _bench(target, "--users", str(mixed), "-c", "4", "-d", "300ms", "--report-only", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["exit_status"] == 0 and out["thresholds"][0]["crossed"]
    assert out["latency_ms"]["PASS-failed"]["count"] == out["errors"]["-ERR PASS [AUTH]"]
    assert out["latency_ms"]["PASS"]["count"] == out["logins"]  # failed and successful PASS kept apart

    r = _bench(target, "--users", str(mixed), "-c", "4", "-d", "300ms", "--fail-if", "errors>0", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["exit_status"] == 1
    assert out["thresholds"][0]["crossed"] and out["thresholds"][0]["condition"] == "errors>0"

    r = _bench(
        target,
        "--users",
        str(users_file),
        "-c",
        "2",
        "-d",
        "300ms",
        "--fail-if",
        "errors>0",
        "--fail-if",
        "count(PASS-failed)>0",
        "--fail-if",
        "p99(session)>10s",
    )
    assert r.returncode == 0 and "fail-if" in r.stdout and "CROSSED" not in r.stdout, r.stdout
    r = _bench(target, "--users", str(users_file), "-c", "2", "-d", "300ms", "--fail-if", "sessions>=0")
    assert r.returncode == 1 and "CROSSED  sessions>=0: sessions = " in r.stdout

    r = _bench(target, "--users", str(users_file), "--fail-if", "p99(PASS)>50")
    assert r.returncode == 2 and "needs a unit" in r.stderr and "Traceback" not in r.stderr
    r = _bench(target, "--users", str(users_file), "-d", "ten")
    assert r.returncode == 2 and "not a duration" in r.stderr

    srv.stop()  # nothing can complete: 3, whatever the thresholds say
    r = _bench(target, "--users", str(users_file), "-c", "1", "-d", "200ms", "--fail-if", "errors>1000")
    assert r.returncode == 3 and "no session completed" in r.stderr


def test_help_shows_defaults_and_exit_codes():
    r = subprocess.run([*POP3D, "bench", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for expected in (
        "(default: 10s)",
        "(default: 30s)",
        "(default: poll)",
        "(default: 10)",
        "exit status",
        "3 no session completed",
        "p99(PASS)>50ms",
        "EMPTIES the maildrops",
    ):
        assert expected in text, expected


def test_interval_lines_add_up_to_the_run(drops):
    srv, users_file, _ = drops
    target = f"127.0.0.1:{srv.port}"
    r = _bench(target, "--users", str(users_file), "-c", "2", "-d", "1s", "--interval", "250ms", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    records = out["intervals"]
    assert len(records) >= 4 and records[0]["start_s"] == 0.0
    assert all(a["end_s"] == b["start_s"] for a, b in itertools.pairwise(records))
    assert sum(rec["sessions"] for rec in records) == out["sessions"]  # each session in exactly one interval
    assert sum(rec["latency_ms"].get("session", {}).get("count", 0) for rec in records) == out["sessions"]
    lines = [line for line in r.stderr.splitlines() if "sessions" in line and "session p50" in line]
    assert len(lines) >= 3  # with --json the lines go to stderr, stdout stays one JSON object
    r = _bench(target, "--users", str(users_file), "-c", "2", "-d", "600ms", "--interval", "200ms")
    assert (
        r.returncode == 0
        and r.stdout.count("session p50") >= 2
        and r.stdout.index("session p50") < r.stdout.index("latency")
    )


# ---- open loop: what the generator could not start -------------------------------------------------------


def test_open_loop_against_a_stalling_server_counts_late_and_not_started(tmp_path):
    """A server that accepts connections and never greets: 2 clients, 10 arrivals per second, 0.3 s timeout.

    Each session ties a client up for the timeout, so arrivals wait (late) and the last ones never start;
    none of that may show up as a server error, and every arrival is accounted for exactly once."""
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(64)  # the kernel completes the handshakes; nobody ever accepts, nothing is ever sent
    try:
        rc = RunConfig("127.0.0.1", stalled.getsockname()[1], "poll", timeout=0.3)
        plan = runner.Plan(rc, [("a", "1"), ("b", "2")], concurrency=2, duration=1.5, rate=10)
        stats, _ = runner.run(plan)
    finally:
        stalled.close()
    assert stats.arrivals == 15 and stats.sessions == 0
    assert set(stats.errors) == {"timeout greeting"}
    assert stats.late >= 1 and stats.not_started >= 1
    started = stats.arrivals - stats.not_started
    assert sum(stats.errors.values()) + stats.unfinished == started
    assert stats.latency["start-lag"].count == started


def test_open_loop_latency_runs_from_the_scheduled_arrival(drops):
    """A session due 5 s ago and started now is 5 s late for its client: connect and session say so."""

    from pop3d.bench.scenarios import BY_NAME, one_session
    from pop3d.bench.stats import Stats

    srv, users_file, _ = drops
    user, password = runner.read_users(users_file)[0]
    stats = Stats()
    rc = RunConfig("127.0.0.1", srv.port, "poll")
    asyncio.run(one_session(BY_NAME["poll"], stats, rc, user, password, scheduled=time.perf_counter() - 5.0))
    assert stats.sessions == 1
    assert stats.latency["connect"].min >= 5.0 and stats.latency["session"].min >= 5.0
    assert stats.latency["STAT"].max < 5.0  # later commands: from their own write


# ---- logins, TOP/LIST, hashed fixtures ----------------------------------------------------------------------


@pytest.mark.parametrize(("login", "verb"), [("apop", "APOP"), ("plain", "AUTH"), ("scram", "AUTH")])
def test_logins_against_a_real_server(drops, login, verb):
    srv, users_file, _ = drops
    plan = _plan(srv, users_file, "poll", concurrency=2, duration=0.4)
    plan.rc.login = login
    stats, _ = runner.run(plan)
    assert not stats.errors and stats.sessions > 0 and stats.logins == stats.sessions
    assert stats.latency[verb].count == stats.logins and "PASS" not in stats.latency


@pytest.mark.parametrize("login", ["apop", "plain"])
def test_pipelined_with_one_line_logins(drops, login):
    srv, users_file, _ = drops
    plan = _plan(srv, users_file, "pipelined", concurrency=2, duration=0.4)
    plan.rc.login = login
    stats, _ = runner.run(plan)
    assert not stats.errors and stats.sessions > 2 and stats.messages == 3 * (stats.sessions - 2)
    plan.rc.login = "scram"
    with pytest.raises(runner.UsageError, match="one-line login"):
        runner.check(plan)


def test_top_list_fetches_headers_only(drops):
    srv, users_file, _ = drops
    stats, _ = runner.run(_plan(srv, users_file, "top-list", concurrency=2, duration=0.4))
    assert not stats.errors and stats.sessions > 0 and stats.messages == 3 * stats.sessions
    assert stats.latency["LIST"].count == stats.sessions and stats.latency["TOP"].count == stats.messages
    head = mkmaildrops.message("user00001", 1, 2000).split(b"\n\n", 1)[0] + b"\n\n"
    assert stats.octets == (len(wire.encode(head)) - 3) * stats.messages  # headers and the blank line, as sent


@pytest.mark.parametrize(
    ("scheme", "prefix", "login"),
    [
        ("SHA512-CRYPT", "{SHA512-CRYPT}$6$", "user"),
        ("ARGON2ID", "{ARGON2ID}$argon2id$", "plain"),
        ("SCRAM-SHA-256", "{SCRAM-SHA-256}4096,", "scram"),
    ],
)
def test_mkmaildrops_hashed_secrets_log_in(tmp_path, scheme, prefix, login):
    users_file = mkmaildrops.make(tmp_path / "h", users=2, messages=1, size=300, scheme=scheme)
    users = runner.read_users(users_file)
    entries = (tmp_path / "h" / "passwd").read_text().splitlines()
    assert [e.split(":", 1)[0] for e in entries] == [u for u, _ in users]
    assert all(e.split(":", 1)[1].startswith(prefix) for e in entries)
    assert not any(p in "".join(entries) for _, p in users)  # no clear password in the passwd-file
    settings = load_settings(
        tmp_path / "h" / "pop3d.toml", server={"listen": ["127.0.0.1:0"], "hostname": "t.invalid", "workers": 1}
    )
    srv = ServerThread(settings).start()
    try:
        rc = RunConfig("127.0.0.1", srv.port, "download", login=login)
        stats, _ = runner.run(runner.Plan(rc, users, 2, 0.5))
        assert not stats.errors and stats.sessions > 0 and stats.messages == stats.sessions
        if scheme != "SCRAM-SHA-256":  # APOP needs the clear secret: a hash cannot answer it
            rc = RunConfig("127.0.0.1", srv.port, "poll", login="apop")
            stats, _ = runner.run(runner.Plan(rc, users, 1, 0.2))
            assert stats.sessions == 0 and set(stats.errors) == {"-ERR APOP [AUTH]"}
            assert "APOP-failed" in stats.latency
    finally:
        srv.stop()
    assert (
        mkmaildrops.logins_for(scheme)
        == {
            "SHA512-CRYPT": ("user", "plain"),
            "ARGON2ID": ("user", "plain"),
            "SCRAM-SHA-256": ("user", "plain", "scram"),
        }[scheme]
    )


def test_mkmaildrops_cli_scheme(tmp_path):
    r = subprocess.run(
        [*POP3D, "mkmaildrops", str(tmp_path / "m"), "--users", "2", "--messages", "1", "--scheme", "sha256-crypt"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "{SHA256-CRYPT}" in r.stdout and "--login user / plain" in r.stdout
    assert (tmp_path / "m" / "passwd").read_text().count(":{SHA256-CRYPT}$5$") == 2
    r = subprocess.run(
        [*POP3D, "mkmaildrops", str(tmp_path / "n"), "--users", "2", "--scheme", "ROT13"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and "unknown scheme 'ROT13'" in r.stderr and "ARGON2ID" in r.stderr
    assert not (tmp_path / "n").exists()  # nothing written for a scheme that cannot hash


def test_download_delete_says_so_and_counts_what_is_left(drops):
    srv, users_file, _ = drops
    r = _bench(
        f"127.0.0.1:{srv.port}",
        "--users",
        str(users_file),
        "--scenario",
        "download-delete",
        "-c",
        "2",
        "-d",
        "300ms",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "empty after one session" in r.stderr
    assert out["messages"] == 6 and out["maildrops_left"] == 0


@pytest.mark.parametrize("procs", ["0", "1"])
def test_bare_responder_serves_what_bench_sends(tmp_path, procs):
    """benchmarks/bare_responder.py, compare.sh's ceiling (and instructions.sh's BARE, one process): the
    scenarios it is measured with complete, with the same octets per message as pop3d sends."""
    users_file = mkmaildrops.make(tmp_path / "b", users=3, messages=3, size=2000)
    port = free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bare_responder.py"), "--passwd", str(tmp_path / "b" / "passwd")]
    cmd += ["--location", str(tmp_path / "b" / "mail" / "{user}" / "Maildir"), "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen([*cmd, "--procs", procs])
    try:
        wait_port(port, proc)
        for scenario in ("poll", "download"):
            plan = runner.Plan(RunConfig("127.0.0.1", port, scenario), runner.read_users(users_file), 2, 0.4)
            stats, _ = runner.run(plan)
            assert not stats.errors and stats.sessions > 2
            if scenario == "download":
                assert stats.octets == _octets_per_message(tmp_path / "b") * stats.messages > 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
