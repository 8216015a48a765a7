"""Arguments and main functions of `pop3d bench` and `pop3d mkmaildrops` (registered by pop3d.cli)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from pop3d.config import ConfigError, target_address


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("bench", help="load-test a POP3 server (pop3d or any other)")
    b.add_argument("target", metavar="HOST:PORT", help="server to test ([v6]:port for IPv6)")
    b.add_argument("--users", required=True, metavar="FILE", help="user:password lines, one per client")
    b.add_argument(
        "--scenario",
        default="poll",
        choices=("poll", "download", "download-delete", "idle", "pipelined"),
        help="poll: USER PASS STAT QUIT; download: + UIDL, RETR all; download-delete: + DELE; "
        "idle: hold sessions, NOOP periodically; pipelined: a session in one write",
    )
    b.add_argument("--concurrency", "-c", type=int, default=10, metavar="N", help="concurrent clients")
    b.add_argument("--duration", "-d", type=float, default=10.0, metavar="S", help="seconds to run")
    b.add_argument("--procs", "-p", type=int, default=1, metavar="P", help="generator processes")
    b.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        metavar="S",
        help="closed loop: start the clients evenly over S seconds instead of all at once",
    )
    b.add_argument(
        "--rate", type=float, metavar="R", help="open loop: R new sessions per second (default: closed loop)"
    )
    tls = b.add_mutually_exclusive_group()
    tls.add_argument("--tls", action="store_true", help="implicit TLS (port 995 style)")
    tls.add_argument("--stls", action="store_true", help="STLS after the greeting (RFC 2595)")
    b.add_argument(
        "--cafile",
        metavar="FILE",
        help="verify the server certificate against this CA (default: TLS without verification)",
    )
    b.add_argument("--servername", metavar="NAME", help="TLS server name (default: HOST)")
    b.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per-command timeout")
    b.add_argument("--noop-interval", type=float, default=5.0, metavar="S", help="idle: seconds between NOOPs")
    b.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="local server process (its children included) whose memory to report per session",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("mkmaildrops", help="create synthetic users and maildrops (for benchmarks and tests)")
    m.add_argument("directory", metavar="DIR")
    m.add_argument("--users", type=int, default=100, metavar="N")
    m.add_argument("--messages", type=int, default=10, metavar="M", help="messages per user")
    m.add_argument("--size", default="4k", metavar="S", help="octets per message (4096, 4k, 1M)")
    m.add_argument("--format", default="maildir", choices=("maildir", "mbox"))
    m.set_defaults(func=cmd_mkmaildrops)


def cmd_mkmaildrops(args: argparse.Namespace) -> int:
    from pop3d.bench import mkmaildrops

    try:
        size = mkmaildrops.parse_size(args.size)
        users_file = mkmaildrops.make(args.directory, args.users, args.messages, size, args.format)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(
        f"{args.users} users x {args.messages} messages of {size} octets ({args.format}) in {args.directory}\n"
        f"users file: {users_file}\nserve with: pop3d serve --config {users_file.parent / 'pop3d.toml'}"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pop3d.bench import report, runner
    from pop3d.bench.scenarios import RunConfig

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
    )
    try:
        plan = runner.Plan(
            rc,
            runner.read_users(args.users),
            args.concurrency,
            args.duration,
            args.procs,
            args.rate,
            args.cafile,
            args.ramp,
        )
        runner.check(plan)
    except runner.UsageError as exc:
        raise ConfigError(str(exc)) from None

    line = report.ProgressLine()
    memory: dict[str, Any] = {}
    if args.server_pid:
        memory = {"baseline_kib": runner.server_rss_kib(args.server_pid), "peak_kib": 0, "sessions": 0}

    def progress(snap: dict[str, Any]) -> None:
        line(snap)
        if memory and snap["held"] >= memory["sessions"] and snap["held"]:
            memory["sessions"] = snap["held"]
            memory["peak_kib"] = runner.server_rss_kib(args.server_pid)

    t0 = time.monotonic()
    stats, elapsed = runner.run(plan, progress)
    line.finish()
    meta = {
        "scenario": args.scenario,
        "target": args.target,
        "concurrency": args.concurrency,
        "procs": args.procs,
        "duration_s": args.duration,
        "rate": args.rate,
        "ramp_s": args.ramp,
        "tls": mode,
    }
    out = report.result(stats, elapsed or time.monotonic() - t0, meta)
    if memory:
        if not memory["sessions"]:  # not an idle run: memory after the run, per concurrent client
            memory["peak_kib"], memory["sessions"] = runner.server_rss_kib(args.server_pid), args.concurrency
        memory["kib_per_session"] = round((memory["peak_kib"] - memory["baseline_kib"]) / memory["sessions"], 3)
        out["server_memory"] = memory
    if args.json:
        print(json.dumps(out))
    else:
        report.table(out)
    return 0 if stats.sessions or stats.logins else 1
