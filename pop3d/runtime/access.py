"""`pop3d check-config`: can the user pop3d serves as read the passwd-file and reach the mail location?

The checks run in a forked child that switches to that user exactly as `pop3d serve` does
(pop3d.runtime.privileges.drop) and asks the kernel with access(2). Reimplementing the check from modes
and owners would miss ACLs, supplementary groups, the search permission of every parent directory and
capabilities; a forked child leaves this process's own identity untouched. Without root the check runs
as the current user (a switch to another user is impossible, and `serve` would refuse it anyway).

For a location template only the fixed directory before the first placeholder is checked
(`/var/mail/{user}` → `/var/mail`); per-user parts (`{home}/Maildir`) exist only per login.
"""

from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass

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
    st = settings.storage
    base = fixed_dir(st.location)
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
        else:
            out.append(Check(what, need, False, "permission denied"))
    return out


def check(settings: Settings, target: Target | None) -> tuple[str, list[Check], list[str]]:
    """(who was checked, results, notes). Switches to `target` in a child when this process is root."""
    items = _plan(settings)
    notes = []
    if not fixed_dir(settings.storage.location):
        notes.append(
            f"access: storage.location {settings.storage.location}: every part depends on the login; not checked"
        )
    if target is None or os.geteuid() != 0:
        if target is not None and target.uid != os.geteuid():
            notes.append(f"access: cannot switch to {target.user} without root; checked as the current user")
        return _current_user(), _evaluate(items), notes
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(read_fd)
            drop(target)
            results = [(c.ok, c.reason) for c in _evaluate(items)]
            os.write(write_fd, json.dumps(results).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError(f"could not switch to {target.user} to check access")
    results = json.loads(data)
    checks = [Check(what, need, ok, reason) for (what, need, _, _), (ok, reason) in zip(items, results, strict=True)]
    return target.user, checks, notes


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
