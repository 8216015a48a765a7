"""Arguments and main functions of `pop3d bench` and `pop3d mkmaildrops` (registered by pop3d.cli)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Iterable
from typing import Any

from pop3d.bench.units import duration
from pop3d.config import ConfigError, target_address

#: `pop3d bench` exit statuses (also in its --help and in README's "Load testing")
EXIT_OK, EXIT_THRESHOLD, EXIT_USAGE, EXIT_NOTHING = 0, 1, 2, 3


def _epilog(scalars: Iterable[str], keys: Iterable[str]) -> str:
    wrap = textwrap.TextWrapper(width=100, initial_indent="  ", subsequent_indent="       ")
    return f"""\
thresholds (--fail-if EXPR, repeatable): the run fails (exit 1) when a condition holds
  NAME OP NUMBER             errors>0  error_rate>1%  sessions_per_s<500  not_started>0
  FUNC(KEY) OP NUMBER UNIT   p99(PASS)>50ms  p99.9(session)>2s  max(RETR)>1s  mean(AUTH)>20ms
  count(KEY) OP NUMBER       count(PASS-failed)>0
  errors(TEXT) OP NUMBER     errors(IN-USE)>0  (failures whose kind contains TEXT)
  OP is one of > >= < <= == !=; FUNC is pN (p50, p99, p99.9, ...), mean, max or min; latencies need a unit,
  ms or s; error_rate is a percentage of sessions.
{wrap.fill("NAME: " + " ".join(scalars))}
{wrap.fill("KEY:  " + " ".join(keys) + ", each also as KEY-failed (commands answered -ERR)")}
  A latency with no samples cannot be checked and fails the run; a KEY-failed one passes (nothing failed).

exit status:
  0  the run completed and no --fail-if condition holds (without --fail-if the condition is errors>0)
  1  a --fail-if condition holds (--report-only: never)
  2  usage error: bad arguments, users file or --fail-if expression
  3  no session completed at all (server down, every login refused)
"""


def add_parsers(sub: Any) -> None:
    from pop3d.bench.names import LOGINS, SCENARIOS
    from pop3d.bench.stats import LATENCY_KEYS
    from pop3d.bench.thresholds import SCALARS

    b = sub.add_parser(
        "bench",
        help="load-test a POP3 server (pop3d or any other)",
        description="Load-test a POP3 server: closed loop (-c clients, each starting its next session when one "
        "ends) or open loop (--rate sessions per second). Durations take units: 500ms, 10s, 2m.",
        epilog=_epilog(SCALARS, LATENCY_KEYS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("target", metavar="HOST:PORT", help="server to test ([v6]:port for IPv6)")
    b.add_argument("--users", required=True, metavar="FILE", help="user:password lines, one per client")
    b.add_argument(
        "--scenario",
        default="poll",
        choices=SCENARIOS,
        help="poll: login STAT QUIT; download: + UIDL, RETR all; download-delete: + DELE all, which EMPTIES "
        "the maildrops (the messages left are counted at the end); top-list: LIST, TOP n 0 for each message; "
        "idle: hold sessions, NOOP periodically; pipelined: a session in one write (default: %(default)s)",
    )
    b.add_argument(
        "--login",
        default="user",
        choices=LOGINS,
        help="user: USER/PASS; apop: APOP (needs {PLAIN} secrets); plain: AUTH PLAIN; scram: AUTH SCRAM-SHA-256 "
        "(needs {PLAIN} or {SCRAM-SHA-256} secrets, and the mechanism enabled) (default: %(default)s)",
    )
    b.add_argument(
        "--concurrency", "-c", type=int, default=10, metavar="N", help="concurrent clients (default: %(default)s)"
    )
    b.add_argument(
        "--duration", "-d", type=duration, default="10s", metavar="T", help="how long to run (default: %(default)s)"
    )
    b.add_argument("--procs", "-p", type=int, default=1, metavar="P", help="generator processes (default: %(default)s)")
    b.add_argument(
        "--ramp",
        type=duration,
        default="0s",
        metavar="T",
        help="closed loop: start the clients evenly over T instead of all at once (default: %(default)s)",
    )
    b.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="open loop: R new sessions per second, on schedule whether or not the server keeps up; latency "
        "counts from the scheduled arrival (default: closed loop)",
    )
    b.add_argument(
        "--interval",
        type=duration,
        metavar="T",
        help="print a line every T: sessions, errors and latency during that interval (default: none)",
    )
    b.add_argument(
        "--fail-if",
        action="append",
        default=[],
        metavar="EXPR",
        help="exit 1 when EXPR holds, e.g. 'p99(PASS)>50ms' (repeatable; grammar below; default: errors>0)",
    )
    b.add_argument(
        "--report-only",
        action="store_true",
        help="report failed sessions and crossed conditions but exit 0 (comparison scripts that read the JSON)",
    )
    tls = b.add_mutually_exclusive_group()
    tls.add_argument("--tls", action="store_true", help="implicit TLS (port 995 style)")
    tls.add_argument("--stls", action="store_true", help="STLS after the greeting (RFC 2595)")
    b.add_argument(
        "--resume",
        action="store_true",
        help="with --tls or --stls: each client resumes its previous TLS session (TLS 1.3 ticket), as mail "
        "clients do; the count of resumed handshakes is reported (default: a full handshake per session)",
    )
    b.add_argument(
        "--cafile",
        metavar="FILE",
        help="verify the server certificate against this CA (default: TLS without verification)",
    )
    b.add_argument("--servername", metavar="NAME", help="TLS server name (default: HOST)")
    b.add_argument(
        "--timeout", type=duration, default="30s", metavar="T", help="per-command timeout (default: %(default)s)"
    )
    b.add_argument(
        "--noop-interval",
        type=duration,
        default="5s",
        metavar="T",
        help="idle: time between NOOPs (default: %(default)s)",
    )
    b.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="local server process (its children included) whose memory to report per session",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser(
        "mkmaildrops",
        help="create synthetic users and maildrops (for benchmarks and tests)",
        description="Write DIR/passwd, DIR/users.txt (for pop3d bench --users), maildrops under DIR/mail and "
        "DIR/pop3d.toml serving them on 127.0.0.1:1110.",
    )
    m.add_argument("directory", metavar="DIR")
    m.add_argument("--users", type=int, default=100, metavar="N", help="(default: %(default)s)")
    m.add_argument("--messages", type=int, default=10, metavar="M", help="messages per user (default: %(default)s)")
    m.add_argument("--size", default="4k", metavar="S", help="octets per message: 4096, 4k, 1M (default: %(default)s)")
    m.add_argument("--format", default="maildir", choices=("maildir", "mbox"), help="(default: %(default)s)")
    m.add_argument(
        "--scheme",
        default="PLAIN",
        metavar="SCHEME",
        help="how the passwd-file stores each password: PLAIN (no hashing cost; every login method works) or "
        "any scheme of `pop3d passwd`, e.g. ARGON2ID, SHA512-CRYPT, BLF-CRYPT, SCRAM-SHA-256, to measure what a "
        "real password hash costs the server (default: %(default)s)",
    )
    m.set_defaults(func=cmd_mkmaildrops)


def cmd_mkmaildrops(args: argparse.Namespace) -> int:
    from pop3d.bench import mkmaildrops

    try:
        size = mkmaildrops.parse_size(args.size)
        users_file = mkmaildrops.make(args.directory, args.users, args.messages, size, args.format, args.scheme)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    scheme = args.scheme.upper()
    print(
        f"{args.users} users x {args.messages} messages of {size} octets ({args.format}) in {args.directory}\n"
        f"passwords: {{{scheme}}}; pop3d bench --login {' / '.join(mkmaildrops.logins_for(scheme))}\n"
        f"users file: {users_file}\nserve with: pop3d serve --config {users_file.parent / 'pop3d.toml'}"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pop3d.bench import report, runner, thresholds
    from pop3d.bench.commands import RunConfig

    host, port = target_address(args.target, "HOST:PORT")
    mode = "tls" if args.tls else "stls" if args.stls else None
    rc = RunConfig(
        host=host,
        port=port,
        scenario=args.scenario,
        timeout=args.timeout,
        tls=mode,
        server_hostname=args.servername or host,
        noop_interval=args.noop_interval,
        login=args.login,
        resume=args.resume,
    )
    try:
        # a gate by default: a run in which sessions failed is a failed run unless the caller says otherwise
        conditions = [thresholds.parse(text) for text in (args.fail_if or ["errors>0"])]
        plan = runner.Plan(
            rc,
            runner.read_users(args.users),
            args.concurrency,
            args.duration,
            args.procs,
            args.rate,
            args.cafile,
            args.ramp,
            args.interval,
        )
        runner.check(plan)
    except (runner.UsageError, thresholds.ThresholdError) as exc:
        raise ConfigError(str(exc)) from None
    if args.scenario == "download-delete":
        print(
            "pop3d bench: download-delete deletes every message it downloads: the maildrops of these users are "
            "empty after one session each (pop3d mkmaildrops makes new ones)",
            file=sys.stderr,
        )

    line = report.ProgressLine() if args.interval is None else None
    intervals = None
    if args.interval is not None:
        intervals = report.Intervals(
            sys.stderr if args.json else sys.stdout, idle=args.scenario == "idle", open_loop=args.rate is not None
        )
    memory: dict[str, Any] = {}
    if args.server_pid:
        memory = {"baseline_kib": runner.server_rss_kib(args.server_pid), "peak_kib": 0, "sessions": 0}

    def progress(snap: dict[str, Any]) -> None:
        if line is not None:
            line(snap)
        if intervals is not None:
            intervals(snap)
        if memory and snap["held"] >= memory["sessions"] and snap["held"]:
            memory["sessions"] = snap["held"]
            memory["peak_kib"] = runner.server_rss_kib(args.server_pid)

    t0 = time.monotonic()
    stats, elapsed = runner.run(plan, progress)
    if line is not None:
        line.finish()
    meta = {
        "scenario": args.scenario,
        "login": args.login,
        "target": args.target,
        "concurrency": args.concurrency,
        "procs": args.procs,
        "duration_s": args.duration,
        "rate": args.rate,
        "ramp_s": args.ramp,
        "interval_s": args.interval,
        "tls": mode,
        "resume": args.resume,
    }
    out = report.result(stats, elapsed or time.monotonic() - t0, meta, intervals.records if intervals else None)
    if memory:
        if not memory["sessions"]:  # not an idle run: memory after the run, per concurrent client
            memory["peak_kib"], memory["sessions"] = runner.server_rss_kib(args.server_pid), args.concurrency
        memory["kib_per_session"] = round((memory["peak_kib"] - memory["baseline_kib"]) / memory["sessions"], 3)
        out["server_memory"] = memory
    if args.scenario == "download-delete":
        out["maildrops_left"] = runner.messages_left(plan)
    verdicts = thresholds.evaluate(conditions, stats, out)
    out["thresholds"] = [
        {"condition": v.threshold.text, "value": v.value, "crossed": v.crossed, "result": v.describe()}
        for v in verdicts
    ]
    if not (stats.sessions or stats.logins):
        status = EXIT_NOTHING
    elif any(v.crossed for v in verdicts) and not args.report_only:
        status = EXIT_THRESHOLD
    else:
        status = EXIT_OK
    out["exit_status"] = status
    if args.json:
        print(json.dumps(out))
    else:
        report.table(out)
    if status == EXIT_THRESHOLD:
        crossed = ", ".join(v.threshold.text for v in verdicts if v.crossed)
        print(f"pop3d bench: failed: {crossed}", file=sys.stderr)
    elif status == EXIT_NOTHING:
        print("pop3d bench: no session completed", file=sys.stderr)
    return status
