"""Dropping root for good after start-up (`server.user`, `server.group`).

Started as root, pop3d first does what needs root (binds the listen and metrics ports, takes systemd's
sockets, reads the TLS key), then switches every process to the configured user before it accepts a single
connection: supplementary groups (initgroups), then the group, then the user, in that order, because after
setuid() the process may no longer change its groups. As root, setgid()/setuid() set the real, effective
and saved ids alike, so no saved uid 0 is left to return to; `drop` verifies that, and that setuid(0)
now fails, and refuses to go on otherwise. Workers are forked after the drop and inherit it.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass

from pop3d.config import ConfigError, ServerSettings

log = logging.getLogger("pop3d")

ROOT_WARNING = (
    "running as root: every session reads maildrops with root's rights; set server.user (see README, Privileges)"
)


class PrivilegeError(RuntimeError):
    """The switch did not happen as required; the process must not serve."""


@dataclass(frozen=True, slots=True)
class Target:
    """The unprivileged identity to run as."""

    user: str
    uid: int
    gid: int
    group: str

    def describe(self) -> str:
        return f"{self.user} (uid {self.uid}, gid {self.gid} {self.group})"


def resolve(cfg: ServerSettings) -> Target | None:
    """`server.user`/`server.group` looked up now, at start; None when no user is configured.

    A user or group that does not exist is a configuration error (exit 2), as is root itself: that would be
    "no drop" dressed up as one.
    """
    if not cfg.user:
        if cfg.group:
            raise ConfigError("server.group: needs server.user")
        return None
    try:
        pw = pwd.getpwnam(cfg.user)
    except KeyError:
        raise ConfigError(f"server.user: no such user {cfg.user!r}") from None
    if pw.pw_uid == 0:
        raise ConfigError(f"server.user: {cfg.user!r} is root; leave server.user empty to run as root")
    gid = pw.pw_gid
    if cfg.group:
        try:
            gid = grp.getgrnam(cfg.group).gr_gid
        except KeyError:
            raise ConfigError(f"server.group: no such group {cfg.group!r}") from None
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:  # a primary gid without a group entry is legal
        group = str(gid)
    return Target(pw.pw_name, pw.pw_uid, gid, group)


def check_start(target: Target | None) -> bool:
    """Before binding: True when `drop(target)` is due later. Logs the root warning; refuses a user switch
    a non-root process cannot make."""
    if os.geteuid() == 0:
        if target is None:
            log.warning(ROOT_WARNING)
            return False
        return True
    if target is not None and target.uid != os.geteuid():
        raise ConfigError(
            f"server.user: cannot switch to {target.user!r} when not started as root (running as uid {os.geteuid()})"
        )
    return False


#: modules the serving processes import lazily, loaded before the drop (see `preload`)
_PRELOAD = (
    "select",
    "resource",
    "ssl",
    "json",
    "uvloop",
    "prometheus_client",
    "prometheus_client.values",
    "prometheus_client.multiprocess",
    "prometheus_client.exposition",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.idna",
)


def preload() -> None:
    """Import the server's code while still root: the unprivileged user then needs no read access to the
    Python installation or to pop3d's own files (an interpreter under /root, say), and no module can be
    loaded later from a path that user could influence."""
    import importlib
    import pkgutil

    import pop3d

    names = list(_PRELOAD)
    names += [
        m.name
        for m in pkgutil.walk_packages(pop3d.__path__, "pop3d.")
        if not m.name.startswith(("pop3d.bench", "pop3d.demo", "pop3d.__main__"))
    ]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # optional (uvloop), or not installed: serving falls back or fails as before
            continue


def drop(target: Target) -> None:
    """Become `target` for good: groups, gid, uid; then prove there is no way back."""
    os.initgroups(target.user, target.gid)  # supplementary groups from /etc/group (setgroups)
    os.setgid(target.gid)
    os.setuid(target.uid)
    verify(target)
    log.info("running as %s", target.describe())


def verify(target: Target) -> None:
    """Real, effective and saved ids are the target's, and root cannot be regained."""
    if os.getresuid() != (target.uid,) * 3 or os.getresgid() != (target.gid,) * 3:
        raise PrivilegeError(f"privilege drop incomplete: uids {os.getresuid()}, gids {os.getresgid()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("privilege drop failed: setuid(0) succeeded afterwards")
