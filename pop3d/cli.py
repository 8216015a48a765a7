"""The `pop3d` command: serve, check-config, passwd, bench, mkmaildrops.

Exit status 2 with one line on stderr for every configuration or usage problem; no tracebacks for those.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pop3d import __version__
from pop3d.config import ConfigError, Settings, load_settings, target_address

log = logging.getLogger("pop3d")


def _setup_logging(settings: Settings) -> None:
    from pop3d.ops import logfmt

    logfmt.configure(settings.log)


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _check_runtime(settings: Settings) -> None:
    """What validation cannot see: the passwd-file must be readable at start."""
    path = settings.auth.passwd_file
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"auth.passwd_file: cannot read {path}: {exc.strerror}") from None
    if settings.tls.cert is not None:  # load the PEM files now: a bad key must not wait for the first client
        import ssl

        from pop3d.net.tls import build_context

        try:
            build_context(settings.tls)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            raise ConfigError(f"tls.cert/tls.key/tls.client_ca: cannot load: {reason}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from pop3d.runtime.privileges import PrivilegeError
    from pop3d.runtime.server import serve_forever
    from pop3d.runtime.systemd import ActivationError

    if args.demo:
        from pop3d import demo

        settings = demo.prepare(Path(args.demo_dir))
    else:
        settings = _load(args)
    _check_runtime(settings)
    _setup_logging(settings)

    def ready(addresses: list[str]) -> None:
        if args.demo:
            from pop3d import demo

            print(demo.banner(addresses), flush=True)

    load = None if args.demo else (lambda: _load(args))
    try:
        return serve_forever(settings, ready, load)
    except ActivationError as exc:
        print(f"pop3d: socket activation: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. address in use, permission denied on a low port
        print(f"pop3d: cannot listen: {exc}", file=sys.stderr)
        return 1
    except PrivilegeError as exc:
        print(f"pop3d: {exc}", file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    _check_runtime(settings)
    tls = ""
    if settings.tls.cert is not None:
        implicit = f", implicit TLS on {', '.join(settings.server.tls_listen)}" if settings.server.tls_listen else ""
        tls = f" (STLS offered{implicit})"
    print(
        f"configuration OK: listening on {', '.join(settings.server.listen)}{tls}, "
        f"storage {settings.storage.driver} at {settings.storage.location}, "
        f"SASL {' '.join(settings.auth.mechanisms) or 'off'}"
    )
    return _report_privileges(settings)


def _report_privileges(settings: Settings) -> int:
    """Who `serve` would run as, and whether that user reaches the passwd-file and the mail location.
    Exit 2 (with one line on stderr) when it does not: `serve` would fail at the first login."""
    from pop3d.runtime import access, privileges

    target = privileges.resolve(settings.server)
    if target is not None:
        print(f"privileges: serves as {target.describe()}")
    elif os.geteuid() == 0:
        print(f"privileges: {privileges.ROOT_WARNING}")
    who, checks, notes = access.check(settings, target)
    for c in checks:
        print(c.line(who))
    for note in notes:
        print(note)
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"pop3d: {failed[0].what}: not {failed[0].need} by {who}", file=sys.stderr)
        return 2
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from pop3d.ops import health

    if args.address is None:
        probe = health.from_config(args.config, proxy=args.proxy, tls=args.tls)
    elif args.config is not None:
        raise ConfigError("health: give HOST:PORT or --config, not both")
    else:
        host, port = target_address(args.address, "address")
        probe = health.Probe(host, port, args.proxy, args.tls)
    ok, message = health.run(probe, args.timeout)
    if not args.quiet:
        print(message, file=sys.stdout if ok else sys.stderr)
    return health.HEALTHY if ok else health.UNHEALTHY


def cmd_passwd(args: argparse.Namespace) -> int:
    from pop3d.auth import schemes

    scheme = args.scheme.upper()
    if scheme not in schemes.SCHEMES:
        raise ConfigError(f"--scheme: unknown scheme {args.scheme!r} (choose from {', '.join(schemes.SCHEMES)})")
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat: ") != password:
            raise ConfigError("passwords do not match")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigError("empty password")
    entry = schemes.hash_password(scheme, password)
    print(f"{args.user}:{entry}" if args.user else entry)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pop3d.auth.schemes import DEFAULT_SCHEME

    p = argparse.ArgumentParser(prog="pop3d", description="POP3 server (RFC 1939) for Maildir maildrops.")
    p.add_argument("--version", action="version", version=f"pop3d {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    s.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=os.environ.get("POP3D_CONFIG_FILE") or None,
        help="TOML configuration file (default: $POP3D_CONFIG_FILE, else none: defaults + env)",
    )
    s.add_argument("--demo", action="store_true", help="create a demo user and Maildir and listen on 127.0.0.1:8110")
    s.add_argument(
        "--demo-dir", default="pop3d-demo", metavar="DIR", help="where --demo keeps its files (default: ./pop3d-demo)"
    )
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a configuration file and exit")
    c.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=os.environ.get("POP3D_CONFIG_FILE") or None,
        help="TOML configuration file (default: $POP3D_CONFIG_FILE)",
    )
    c.set_defaults(func=cmd_check_config)

    h = sub.add_parser(
        "health",
        help="exit 0 only if pop3d greets with +OK (its first configured listener, or HOST:PORT)",
        description="Connect the way a client would and pass only on a +OK greeting, then say QUIT. Without "
        "HOST:PORT: the first of server.listen, else of server.tls_listen (over TLS), with a PROXY header when "
        "server.proxy_protocol is on; a wildcard address is checked on loopback.",
        epilog="exit status: 0 healthy; 1 unhealthy (no +OK greeting within --timeout: refused, closed, "
        "-ERR, TLS failure); 2 usage or configuration error (bad HOST:PORT, configuration does not load, "
        "no listener to check)",
    )
    h.add_argument(
        "address", nargs="?", metavar="HOST:PORT", help="check this address instead of the configured listener"
    )
    h.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=None,
        help="TOML configuration file to take the listener from (default: $POP3D_CONFIG_FILE, else defaults + env)",
    )
    h.add_argument("--timeout", type=float, default=5.0, help="seconds for connect + greeting (default 5)")
    h.add_argument(
        "--proxy",
        action="store_true",
        help="send a PROXY v1 UNKNOWN header first (implied by server.proxy_protocol without HOST:PORT)",
    )
    h.add_argument(
        "--tls",
        action="store_true",
        help="implicit TLS first, unverified (implied for a server.tls_listen port without HOST:PORT)",
    )
    h.add_argument(
        "--quiet", "-q", action="store_true", help="no output for healthy or unhealthy: the exit status tells"
    )
    h.set_defaults(func=cmd_health)

    w = sub.add_parser("passwd", help="print a passwd-file entry with a strong hash (password on stdin)")
    w.add_argument("user", nargs="?", help="user name to prefix the entry with")
    w.add_argument("--scheme", default=DEFAULT_SCHEME, help=f"hash scheme (default {DEFAULT_SCHEME})")
    w.set_defaults(func=cmd_passwd)

    from pop3d.bench.cli import add_parsers as add_bench_parsers

    add_bench_parsers(sub)  # bench, mkmaildrops
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pop3d: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
