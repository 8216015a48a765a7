"""`pop3d check-config`: can the user pop3d serves as read the passwd-file and reach the mail location?

The checks run in a forked child that switches to that user exactly as `pop3d serve` does
(pop3d.runtime.privileges.drop) and asks the kernel with access(2). Reimplementing the check from modes
and owners would miss ACLs, supplementary groups, the search permission of every parent directory and
capabilities; a forked child leaves this process's own identity untouched. Without root the check runs
as the current user (a switch to another user is impossible, and `serve` would refuse it anyway).

For a location template only the fixed directory before the first placeholder is checked
(`/var/mail/{user}` → `/var/mail`); per-user parts (`{home}/Maildir`) exist only per login.

Under systemd, `ExecReload=` and `ExecStartPre=` run check-config inside the unit's sandbox, where
ProtectSystem=strict makes every path read-only that ReadWritePaths= or StateDirectory= do not open again,
and ProtectHome= hides /home. So check-config also warns (without failing: `serve` starts, but
cannot delete mail or keep its state) when a place pop3d writes to lies on a read-only mount here
(statvfs ST_RDONLY, which a sandbox's read-only bind mounts set) or is not writable by the user, and names
the unit setting that opens it: the fixed part of storage.location, the directories of the homes in the
passwd-file for a `{home}` location, `storage.mbox_index_dir` and `server.state_dir`.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pop3d.config import Settings
from pop3d.runtime.privileges import Target, drop


@dataclass(frozen=True, slots=True)
class Check:
    what: str  # "auth.passwd_file /etc/pop3d/passwd"
    need: str  # "readable"
    ok: bool
    reason: str = ""

    def line(self, who: str) -> str:
        verdict = f"{self.need} by {who}" if self.ok else f"NOT {self.need} by {who}: {self.reason}"
        return f"access: {self.what}: {verdict}"


def fixed_dir(template: str) -> str:
    """The directory part of `template` before its first placeholder ("" when it starts with one)."""
    head = template.split("{", 1)[0]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def _plan(settings: Settings) -> list[tuple[str, str, str, int]]:
    """(what, need, path, access mode) to check."""
    items = [(f"auth.passwd_file {settings.auth.passwd_file}", "readable", str(settings.auth.passwd_file), os.R_OK)]
    if settings.auth.driver != "passwd-file":
        items = []  # users live in the database
    st = settings.storage
    base = fixed_dir(st.location) if st.driver != "postgres" else ""
    if base:
        # Maildir: search the mail root to reach each user's directory. mbox spools: dot-locks are files
        # created beside the spool, so the spool directory must be writable too.
        dotlock = st.driver == "mbox" and "dotlock" in (*st.mbox_lock_read, *st.mbox_lock_write)
        need, mode = ("writable", os.W_OK | os.X_OK) if dotlock else ("searchable", os.X_OK)
        items.append((f"storage.location {base} (fixed part of {st.location})", need, base, mode))
    return items


def _evaluate(items: list[tuple[str, str, str, int]]) -> list[Check]:
    out = []
    for what, need, path, mode in items:
        if not os.path.exists(path):
            out.append(Check(what, need, False, "does not exist (or a parent directory is not searchable)"))
        elif os.access(path, mode, effective_ids=True):
            out.append(Check(what, need, True))
        elif mode & os.W_OK and _read_only(path):
            out.append(Check(what, need, False, f"read-only file system ({_unit_hint(path)})"))
        else:
            out.append(Check(what, need, False, "permission denied"))
    return out


# -- places pop3d writes to: warnings, for the sandbox of a systemd unit -----------------------------------

#: where ProtectHome= acts: made inaccessible (yes), read-only (read-only) or an empty tmpfs (tmpfs)
_HOME_ROOTS: Final = ("/home", "/root", "/run/user")
_STATE_DIRECTORY: Final = "/var/lib/pop3d"  # StateDirectory=pop3d in contrib/systemd/pop3d.service
_MAX_HOME_DIRS: Final = 16


@dataclass(frozen=True, slots=True)
class _Writes:
    what: str  # "server.state_dir /var/lib/pop3d"
    path: str
    effect: str  # what goes wrong when pop3d cannot write there
    mount_only: bool = False  # only a read-only mount matters (the writable parts are per user, below it)


def _write_plan(settings: Settings) -> list[_Writes]:
    st = settings.storage
    plan = []
    base = fixed_dir(st.location) if st.driver != "postgres" else ""
    if base:
        what = f"storage.location {base} (fixed part of {st.location})"
        plan.append(_Writes(what, base, "sessions cannot delete mail", mount_only=True))
    elif st.location.startswith("{home}") and st.driver != "postgres" and settings.auth.driver == "passwd-file":
        for home_dir in _home_dirs(settings.auth.passwd_file):
            what = f"storage.location {st.location} (homes in {home_dir})"
            plan.append(_Writes(what, home_dir, "sessions cannot delete mail", mount_only=True))
    if st.driver == "mbox" and st.mbox_index_dir:
        effect = "mbox logins fail: no index, session lock or commit journal"
        plan.append(_Writes(f"storage.mbox_index_dir {st.mbox_index_dir}", st.mbox_index_dir, effect))
    effect = "the auth secret is not kept, so decoy SCRAM salts change at every start"
    plan.append(_Writes(f"server.state_dir {settings.server.state_dir}", str(settings.server.state_dir), effect))
    return plan


def _home_dirs(passwd_file: Path) -> list[str]:
    """The directories holding the homes of the passwd-file (field 6), e.g. ["/home"]; at most a few."""
    dirs: list[str] = []
    try:
        with open(passwd_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if line.startswith("#") or len(fields) < 6 or not fields[5].startswith("/"):
                    continue
                parent = os.path.dirname(os.path.normpath(fields[5]))
                if parent not in dirs:
                    dirs.append(parent)
                    if len(dirs) >= _MAX_HOME_DIRS:
                        break
    except OSError:  # reported by the readable check of auth.passwd_file
        return []
    return dirs


def _existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists (where a missing directory would be created)."""
    while not os.path.exists(path) and path not in ("/", ""):
        path = os.path.dirname(path)
    return path or "/"


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _probe(item: _Writes) -> tuple[str, str] | None:
    """(problem, existing path) where pop3d could not write: "read-only" or "denied"; None when fine."""
    if item.mount_only and not os.path.exists(item.path):
        return None  # the readable/searchable check says it does not exist
    path = _existing(item.path)
    if _read_only(path):
        return "read-only", path
    if not item.mount_only and not os.access(path, os.W_OK | os.X_OK, effective_ids=True):
        return "denied", path
    return None


def _unit_hint(path: str) -> str:
    """The setting of contrib/systemd/pop3d.service that makes `path` writable."""
    if any(path == root or path.startswith(root + "/") for root in _HOME_ROOTS):
        return f"under systemd: ProtectHome=no and ReadWritePaths=-{path} in pop3d.service"
    if path == _STATE_DIRECTORY or path.startswith(_STATE_DIRECTORY + "/"):
        return f"under systemd: StateDirectory=pop3d in pop3d.service, or ReadWritePaths=-{path}"
    return f"under systemd: ReadWritePaths=-{path} in pop3d.service"


def _warning(item: _Writes, problem: str, existing: str, who: str) -> str:
    if problem == "read-only":
        where = "" if existing == item.path else f" ({existing}, where it would be created)"
        why = f"on a read-only file system here{where}"
    elif existing == item.path:
        why = f"not writable by {who}"
    else:
        why = f"cannot be created by {who}: {existing} is not writable"
    return f"access: {item.what}: WARNING {why}; {item.effect} ({_unit_hint(item.path)})"


def _evaluate_all(
    items: list[tuple[str, str, str, int]], writes: list[_Writes]
) -> tuple[list[Check], list[tuple[str, str] | None]]:
    return _evaluate(items), [_probe(w) for w in writes]


def check(settings: Settings, target: Target | None) -> tuple[str, list[Check], list[str]]:
    """(who was checked, results, notes). Switches to `target` in a child when this process is root."""
    items = _plan(settings)
    writes = _write_plan(settings)
    notes = []
    location = settings.storage.location
    if not fixed_dir(location):
        homes = [w.path for w in writes if w.what.startswith("storage.location")]
        scope = f"only the mounts of {', '.join(homes)} (homes in auth.passwd_file)" if homes else "not"
        notes.append(f"access: storage.location {location}: every part depends on the login; {scope} checked")
    if target is None or os.geteuid() != 0:
        if target is not None and target.uid != os.geteuid():
            notes.append(f"access: cannot switch to {target.user} without root; checked as the current user")
        who = _current_user()
        checks, probes = _evaluate_all(items, writes)
        return who, checks, notes + _warnings(writes, probes, who)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(read_fd)
            drop(target)
            checked, probes = _evaluate_all(items, writes)
            results = [(c.ok, c.reason) for c in checked]
            os.write(write_fd, json.dumps([results, probes]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError(f"could not switch to {target.user} to check access")
    results, probes = json.loads(data)
    checks = [Check(what, need, ok, reason) for (what, need, _, _), (ok, reason) in zip(items, results, strict=True)]
    return target.user, checks, notes + _warnings(writes, probes, target.user)


def _warnings(writes: list[_Writes], probes: Sequence[Sequence[str] | None], who: str) -> list[str]:
    """One line per place pop3d cannot write to; `probes` from _probe (lists once they crossed JSON)."""
    return [_warning(item, p[0], p[1], who) for item, p in zip(writes, probes, strict=True) if p is not None]


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
