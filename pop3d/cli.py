"""The `pop3d` command: serve, check-config, health, passwd, bench, mkmaildrops, db, user, import, uidl.

Every failure ends in one line on stderr and one of these exit statuses (README "Exit status"), never a
traceback for a mistake the operator can fix:

- 0: done (serve: stopped by SIGTERM/SIGINT after draining);
- 1: the command ran and failed (cannot listen, cannot switch user, not healthy, an OS error while working);
- 2: usage or configuration error (a bad argument, key or POP3D_* variable; a named file missing or unreadable);
- 130: interrupted by Ctrl-C before it finished.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pop3d import __version__
from pop3d.config import ConfigError, Settings, add_config_option, load_settings, target_address

log = logging.getLogger("pop3d")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit 2), like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _setup_logging(settings: Settings) -> None:
    from pop3d.ops import logfmt

    logfmt.configure(settings.log)


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _check_runtime(settings: Settings) -> None:
    """What validation cannot see: the passwd-file must be readable at start (when it is the user database)."""
    path = settings.auth.passwd_file
    try:
        if settings.auth.driver == "passwd-file":
            with open(path, "rb"):
                pass
    except OSError as exc:
        raise ConfigError(f"auth.passwd_file: cannot read {path}: {exc.strerror}") from None
    if settings.poppassd.listen:  # new passwords are hashed with it: an unusable scheme must not wait for one
        from pop3d.auth import schemes

        entry = schemes.REGISTRY.entry(settings.auth.default_scheme)
        if entry is None or entry.hash is None:
            raise ConfigError(
                f"auth.default_scheme: {settings.auth.default_scheme} cannot hash new passwords "
                f"(choose from {', '.join(schemes.SCHEMES)})"
            )
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

    if args.listen and not args.demo:
        raise ConfigError("--listen is for --demo; set server.listen in the configuration file")
    if args.demo:
        from pop3d import demo

        for item in args.listen or ():
            target_address(item, "--listen")  # ConfigError naming the option, not server.listen
        settings = demo.prepare(Path(args.demo_dir), args.listen)
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
        return EXIT_USAGE
    except OSError as exc:  # e.g. address in use, permission denied on a low port
        print(f"pop3d: cannot listen: {_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except PrivilegeError as exc:
        print(f"pop3d: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    _check_runtime(settings)
    tls = ""
    if settings.tls.cert is not None:
        implicit = f", implicit TLS on {', '.join(settings.server.tls_listen)}" if settings.server.tls_listen else ""
        tls = f" (STLS offered{implicit})"
    print(
        f"configuration OK: listening on {', '.join(settings.server.listen)}{tls}, "
        f"storage {settings.storage.driver}"
        f"{'' if settings.storage.driver == 'postgres' else ' at ' + settings.storage.location}, "
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
        return EXIT_USAGE
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    from pop3d.ops import health

    if args.address is None:
        probe = health.from_config(args.config, proxy=args.proxy, tls=args.tls)
    elif args.config is not None:
        raise ConfigError("health: give HOST:PORT or --config, not both")
    else:
        host, port = target_address(args.address, "address")
        probe = health.Probe(host, port, args.proxy, args.tls)
    if not args.timeout > 0:
        raise ConfigError(f"--timeout: {args.timeout:g} is not a positive number of seconds")
    ok, message = health.run(probe, args.timeout)
    if not args.quiet:
        print(message, file=sys.stdout if ok else sys.stderr)
    return health.HEALTHY if ok else health.UNHEALTHY


def cmd_passwd(args: argparse.Namespace) -> int:
    from pop3d.auth import schemes

    scheme = args.scheme.upper()
    if scheme not in schemes.SCHEMES:
        raise ConfigError(f"--scheme: unknown scheme {args.scheme!r} (choose from {', '.join(schemes.SCHEMES)})")
    if args.user is not None and (not args.user or any(c == ":" or not c.isprintable() for c in args.user)):
        raise ConfigError(f"user name {args.user!r}: must be non-empty, without ':' or control characters")
    from pop3d.admin.prompt import read_password

    password = read_password()
    try:
        entry = schemes.hash_password(scheme, password)
    except ValueError as exc:  # the scheme refuses this password (e.g. BLF-CRYPT over 72 bytes)
        raise ConfigError(f"password refused: {exc} (or choose another --scheme)") from None
    print(f"{args.user}:{entry}" if args.user else entry)
    return EXIT_OK


#: login methods a stored secret allows beyond USER/PASS, SASL PLAIN and SASL LOGIN (which verify the password
#: the client sends against any scheme): APOP and the challenge-response SASL mechanisms need the password itself
#: or the scheme's own precomputed keys (README "Users")
_EXTRA_METHODS = {
    "PLAIN": "APOP, AUTH CRAM-MD5, AUTH SCRAM-SHA-256",
    "CRAM-MD5": "AUTH CRAM-MD5",
    "SCRAM-SHA-256": "AUTH SCRAM-SHA-256",
}


def _passwd_epilog() -> str:
    from pop3d.auth.schemes import DEFAULT_SCHEME, SCHEMES

    width = max(len(s) for s in SCHEMES) + 2
    rows = []
    for name in SCHEMES:
        extra = _EXTRA_METHODS.get(name)
        methods = "USER/PASS, AUTH PLAIN, AUTH LOGIN" + (f", {extra}" if extra else "")
        rows.append(f"  {name:<{width}}{methods}{'  (default)' if name == DEFAULT_SCHEME else ''}")
    return (
        "schemes, and the login methods (USER/PASS, APOP, AUTH <SASL mechanism>) each allows:\n"
        + "\n".join(rows)
        + "\nAUTH EXTERNAL (client certificates) works for any user in the file. {PLAIN} and {CRAM-MD5} are\n"
        "password-equivalent: protect the file. BLF-CRYPT takes passwords of at most 72 bytes.\n"
        "The password is asked twice on a terminal, else read from the first line of stdin."
    )


def build_parser() -> argparse.ArgumentParser:
    from pop3d.auth.schemes import DEFAULT_SCHEME, SCHEMES

    p = _Parser(
        prog="pop3d",
        description="POP3 server (RFC 1939) for Maildir and mbox maildrops.",
        epilog="exit status: 0 ok, 1 failure while running, 2 usage or configuration error, 130 interrupted",
    )
    p.add_argument("--version", action="version", version=f"pop3d {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    add_config_option(s, "TOML configuration file (default: $POP3D_CONFIG_FILE, else none: defaults + env)")
    s.add_argument("--demo", action="store_true", help="create a demo user and Maildir and listen on 127.0.0.1:8110")
    s.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="with --demo: listen here instead (repeatable; default 127.0.0.1:8110, or $POP3D_SERVER__LISTEN)",
    )
    s.add_argument(
        "--demo-dir", default="pop3d-demo", metavar="DIR", help="where --demo keeps its files (default: ./pop3d-demo)"
    )
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a configuration file and exit")
    add_config_option(c)
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

    w = sub.add_parser(
        "passwd",
        help="print a passwd-file entry with a strong hash (password on stdin)",
        description="Print a passwd-file entry: USER:{SCHEME}secret, or only {SCHEME}secret without USER.",
        epilog=_passwd_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("user", nargs="?", help="user name to prefix the entry with")
    w.add_argument(
        "--scheme", default=DEFAULT_SCHEME, help=f"hash scheme: {', '.join(SCHEMES)} (default {DEFAULT_SCHEME})"
    )
    w.set_defaults(func=cmd_passwd)

    from pop3d.bench.cli import add_parsers as add_bench_parsers

    add_bench_parsers(sub)  # bench, mkmaildrops
    from pop3d.migrate.uidl_import import add_parsers as add_uidl_parsers

    add_uidl_parsers(sub)  # uidl import
    from pop3d.admin.cli import add_parsers as add_admin_parsers

    add_admin_parsers(sub)  # db, user, import
    return p


def _os_error(exc: OSError) -> str:
    """'path: reason' without the errno noise; the reason alone when no file is involved."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pop3d: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # creating files (--demo-dir, mkmaildrops), writing to a closed pipe, ...
        print(f"pop3d {args.command}: {_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
