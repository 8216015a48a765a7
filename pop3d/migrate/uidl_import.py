"""`pop3d uidl import`: serve the UIDLs the old server gave, so clients that leave mail on the server do not
download every message again after the move (RFC 1939 §7: a UIDL is how a client recognises a message).

For each user (one, or every user the configured Authenticator lists) whose Maildir exists, the maildrop is
opened as a session would (the exclusive lock is held meanwhile, so no session changes it underneath; a
user logged in now is reported `in use` and can be retried), the old server's ids are read from the Maildir
(`dovecot-uidlist`, `courierpop3dsizelist`, or each message's `X-UIDL:` header) and matched by base name,
and the result is `.pop3d.uidlist` (pop3d.storage.maildir.uidlist). Messages the old server did not know
keep pop3d's own UIDL, as will new mail. An id that RFC 1939 §7 forbids (empty, over 70 characters,
outside 0x21-0x7E) or that two messages share is refused and reported; the message keeps its own UIDL.

Dry run by default: each change is printed as `own uid: served now -> imported`; `--apply` writes. The
map is rebuilt from the source every time, so running it again changes nothing (idempotent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from pop3d.auth import build_auth
from pop3d.auth.base import Authenticator, User
from pop3d.config import ConfigError, Settings, add_config_option, load_settings
from pop3d.migrate import sources
from pop3d.storage.base import InUse, StorageError
from pop3d.storage.maildir.drop import MaildirDrop, MaildirStorage
from pop3d.storage.maildir.names import split_name
from pop3d.storage.maildir.uidlist import load, save, valid_uidl
from pop3d.storage.safefile import DIR_FLAGS, open_regular, read_capped, read_upto

#: the old servers' own files are read at most this large (a list of 100,000 messages is a few MiB)
MAX_SOURCE = 64 * 1024 * 1024
SOURCES = ("dovecot", "courier", "xuidl")
SOURCE_FILES = {"dovecot": "dovecot-uidlist", "courier": "courierpop3dsizelist"}

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


@dataclass
class UserReport:
    """The outcome for one maildrop."""

    name: str
    messages: int = 0
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (own uid, served now, imported)
    unknown: int = 0  # messages the old server did not list: they keep pop3d's own UIDL
    refused: list[str] = field(default_factory=list)  # ids RFC 1939 §7 forbids, duplicates
    skipped: str = ""  # why nothing was done (no maildir, nothing to import from)
    failed: str = ""  # why it could not be done (in use, unreadable)
    written: bool = False


def _old_ids(source: str, root_fd: int, drop: MaildirDrop, fmt: str) -> dict[str, str] | None:
    """base name -> old UIDL, or None when the maildir has no file of that server."""
    if source == "xuidl":
        out: dict[str, str] = {}
        for m in drop.messages:
            base = split_name(m.key.partition("/")[2])[0]
            try:
                fd, st = open_regular(m.key, dir_fd=root_fd)
            except OSError:
                continue
            try:
                drop.owner.check(st, m.key)
                found = sources.find_xuidl(read_upto(fd, min(st.st_size, sources.XUIDL_HEAD)))
            except OSError:
                continue
            finally:
                os.close(fd)
            if found is not None:
                out[base] = found
        return out
    try:
        data = read_capped(SOURCE_FILES[source], MAX_SOURCE, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    if source == "dovecot":
        return sources.dovecot_uidls(data, fmt)
    return sources.courier_uidls(data)


def plan(report: UserReport, drop: MaildirDrop, old: dict[str, str], current: dict[str, str]) -> dict[str, str]:
    """The new `.pop3d.uidlist` (own uid -> imported UIDL) for the snapshot `drop.messages`; fills `report`."""
    wanted: dict[str, str] = {}
    own_uids = {drop.own_uid(m) for m in drop.messages}
    for m in drop.messages:
        own = drop.own_uid(m)
        uidl = old.get(split_name(m.key.partition("/")[2])[0])
        if uidl is None:
            report.unknown += 1
        elif not valid_uidl(uidl):
            report.refused.append(f"{own}: {uidl[:80]!r} is not 1-70 characters in 0x21-0x7E (RFC 1939 §7)")
        elif uidl != own and uidl in own_uids:
            report.refused.append(f"{own}: {uidl} is pop3d's own UIDL of another message")
        else:
            wanted[own] = uidl
    twice = {u for u, n in Counter(wanted.values()).items() if n > 1}
    for own in [o for o, u in wanted.items() if u in twice]:
        report.refused.append(f"{own}: {wanted.pop(own)} is given to another message too (RFC 1939 §7: unique)")
    new = {own: uidl for own, uidl in wanted.items() if uidl != own}  # the own uid needs no entry
    for m in drop.messages:
        own = drop.own_uid(m)
        before, after = current.get(own, own), new.get(own, own)
        if before != after:
            report.changes.append((own, before, after))
    return new


async def import_user(storage: MaildirStorage, user: User, source: str, fmt: str, write: bool) -> UserReport:
    report = UserReport(user.name)
    path = storage.path_for(user)
    if not os.path.isdir(path):  # noqa: ASYNC240 - a command-line tool: nothing else runs on this loop
        report.skipped = f"no maildir at {path}"
        return report
    drop = storage.maildrop(user)
    assert isinstance(drop, MaildirDrop)
    try:
        await drop.open()  # the session lock: no session changes the maildir while we read and write
    except InUse:
        report.failed = "in use (a session holds the maildrop lock); try again"
        return report
    except StorageError as exc:
        report.failed = str(exc)
        return report
    try:
        report.messages = len(drop.messages)
        root_fd = os.open(path, DIR_FLAGS)
        try:
            try:
                old = _old_ids(source, root_fd, drop, fmt)
            except ValueError as exc:
                report.failed = f"{SOURCE_FILES.get(source, source)}: {exc}"
                return report
            except OSError as exc:
                report.failed = f"{SOURCE_FILES.get(source, source)}: {exc.strerror or exc}"
                return report
            if old is None:
                report.skipped = f"no {SOURCE_FILES[source]} in {path}"
                return report
            current = load(root_fd, drop.owner, f"maildir {path}")
            new = plan(report, drop, old, current)
            if write and new != current:
                save(new, root_fd, drop.owner)
                report.written = True
        finally:
            os.close(root_fd)
    finally:
        await drop.close()
    return report


async def _users(auth: Authenticator, names: list[str]) -> list[User | str]:
    out: list[User | str] = []
    for name in names:
        creds = await auth.lookup(name)
        out.append(creds.user if creds is not None else name)
    return out


def print_report(r: UserReport, out: TextIO, verbose: bool = True) -> None:
    if r.failed:
        print(f"{r.name}: FAILED: {r.failed}", file=out)
        return
    if r.skipped:
        print(f"{r.name}: skipped: {r.skipped}", file=out)
        return
    state = "written" if r.written else ("unchanged" if not r.changes else "to change")
    print(
        f"{r.name}: {r.messages} messages, {len(r.changes)} {state}, {r.unknown} unknown to the old server "
        f"(keep pop3d's UIDL), {len(r.refused)} refused",
        file=out,
    )
    for own, before, after in r.changes if verbose else ():
        print(f"  {own}: {before} -> {after}", file=out)
    for why in r.refused:
        print(f"  refused {why}", file=out)


async def run_import(settings: Settings, source: str, user: str | None, fmt: str, write: bool,
                     out: TextIO, auth_factory: Callable[[], Authenticator] | None = None) -> int:  # fmt: skip
    if settings.storage.driver != "maildir" and source == "xuidl":
        print("mbox spools need no import: pop3d serves a valid, unique X-UIDL header as the UIDL whenever it "
              "indexes a message (pop3d.storage.mbox)", file=out)  # fmt: skip
        return EXIT_OK
    if settings.storage.driver != "maildir":
        raise ConfigError(
            "pop3d uidl import: --from dovecot and --from courier read Maildir files; storage.driver is mbox"
        )
    if source == "dovecot":
        try:
            sources.check_format(fmt)
        except ValueError as exc:
            raise ConfigError(f"--dovecot-format: {exc}") from None
    auth = auth_factory() if auth_factory is not None else build_auth(settings.auth)
    storage = MaildirStorage(settings.storage.location, mark_seen=settings.storage.mark_seen)
    names = [user] if user is not None else await auth.user_names()
    status = EXIT_OK
    for entry in await _users(auth, names):
        if isinstance(entry, str):
            print(f"{entry}: FAILED: no such user in {settings.auth.passwd_file}", file=out)
            status = EXIT_FAILURE
            continue
        try:
            report = await import_user(storage, entry, source, fmt, write)
        except StorageError as exc:
            report = UserReport(entry.name, failed=str(exc))
        except OSError as exc:
            report = UserReport(entry.name, failed=f"{exc.filename or ''} {exc.strerror or exc}".strip())
        print_report(report, out)
        if report.failed:
            status = EXIT_FAILURE
    if not write:
        print("dry run: nothing written (add --apply to write .pop3d.uidlist)", file=out)
    return status


def cmd_uidl_import(args: argparse.Namespace) -> int:
    import sys

    settings = load_settings(args.config)
    return asyncio.run(run_import(settings, args.source, args.user, args.dovecot_format, args.apply, sys.stdout))


def add_parsers(sub: Any) -> None:
    """`pop3d uidl import ...` (one line in pop3d.cli.build_parser)."""
    u = sub.add_parser("uidl", help="UIDL maintenance: import the ids another POP3 server gave")
    usub = u.add_subparsers(dest="uidl_command", required=True)
    i = usub.add_parser(
        "import",
        help="serve the UIDLs Dovecot, Courier or qpopper gave, so clients do not download mail again",
        description="Read the old server's ids from each Maildir and write .pop3d.uidlist. Dry run by default: "
        "prints what would change (own uid: served now -> imported).",
        epilog="exit status: 0 done; 1 some maildrop failed (in use, unreadable or broken source file); "
        "2 usage or configuration error",
    )
    add_config_option(i)
    i.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the old server's ids")
    i.add_argument("--user", metavar="NAME", help="only this user (default: every user of auth.passwd_file)")
    i.add_argument(
        "--dovecot-format",
        default=sources.DOVECOT_DEFAULT_FORMAT,
        metavar="FMT",
        help=f"the old Dovecot's pop3_uidl_format (default {sources.DOVECOT_DEFAULT_FORMAT}; %%u %%v %%f %%g)",
    )
    i.add_argument("--apply", action="store_true", help="write the result (default: dry run)")
    i.set_defaults(func=cmd_uidl_import)
