"""SIGHUP: re-read the configuration, apply what can change live, keep every session, name what cannot.

Live keys take effect for new sessions and, where sessions read the shared context each time (timeouts,
limits), for running ones too: sessions hold `ctx`, never a copy of the settings. Keys that only matter
when sockets are bound or processes forked keep their running value, and the log says a restart is
needed, so `ctx.settings` always tells what is in effect. Unknown (newly added) keys are treated as
"restart needed" until they are listed here: the safe default.
A configuration that fails to load or validate changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pop3d.config import ConfigError, Settings

if TYPE_CHECKING:
    from pop3d.pop3.context import ServerContext

log = logging.getLogger("pop3d")

#: section → keys applied live ("*" = the whole section)
LIVE: dict[str, set[str]] = {
    "server": {"hostname", "shutdown_grace", "write_buffer", "proxy_protocol", "proxy_trusted"},
    "session": {"*"},
    "auth": {"*"},
    "storage": {"location", "mark_seen", "expire_days"},
    "log": {"*"},
    "tls": {"*"},  # re-read by TlsManager.reload for new handshakes; sessions keep theirs
    "poppassd": {"timeout"},
}


@dataclass
class Plan:
    """The outcome of comparing the running and the new configuration."""

    settings: Settings  # the new configuration with restart-only keys kept at their running values
    live: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)


def _is_live(section: str, key: str, before: Any, after: Any, tls_listeners: bool = False) -> bool:
    if "listen" in key:
        return False  # sockets are bound once (server.listen, server.tls_listen, metrics.listen)
    if key in ("driver", "dsn", "pool_size"):
        return False  # drivers and database connections are made once per worker
    if section == "tls" and key in ("cert", "key") and (before is None) != (after is None):
        return False  # turning TLS on or off changes listeners and the STLS verb
    if section == "auth" and key == "cache_size":
        return False  # the credentials cache is shared memory, sized before the workers fork
    if section == "server" and key == "proxy_protocol" and tls_listeners:
        return False  # implicit-TLS listeners pick their accept path (pop3d.net.proxy_tls) when they are made
    keys = LIVE.get(section, set())
    return "*" in keys or key in keys


def plan(old: Settings, new: Settings) -> Plan:
    """Which dotted keys changed, split into live and restart-needed; pure, for testing without signals."""
    result = Plan(new)
    updates: dict[str, Any] = {}
    for section in type(new).model_fields:
        o, n = getattr(old, section), getattr(new, section)
        keep: dict[str, Any] = {}
        for key in type(n).model_fields:
            before, after = getattr(o, key, None), getattr(n, key)
            if before == after:
                continue
            name = f"{section}.{key}"
            if _is_live(section, key, before, after, bool(old.server.tls_listen)):
                result.live.append(name)
            else:
                result.restart.append(name)
                keep[key] = before
        if keep:
            updates[section] = n.model_copy(update=keep)
    if updates:
        result.settings = new.model_copy(update=updates)
    return result


def apply(ctx: ServerContext, new: Settings) -> Plan:
    """Swap the context's settings (and what hangs off them) for `new`; returns what changed."""
    from pop3d.ops import logfmt

    old = ctx.settings
    p = plan(old, new)
    s = p.settings
    for hook in list(ctx.reload_hooks):  # first: a hook that refuses leaves everything unchanged
        hook(old, s)
    tls = ctx.tls
    if tls is not None:  # re-read the certificate files even when the paths did not change (renewals)
        previous, tls.settings = tls.settings, s.tls
        if not tls.reload():
            tls.settings = previous
            raise ConfigError("tls: the certificates do not load (see above); nothing changed")
    if old.auth.passwd_file != s.auth.passwd_file and s.auth.driver == "passwd-file":
        from pop3d.auth import build_auth

        ctx.auth = build_auth(s.auth, ctx.auth_secret, generation=ctx.auth_generation)
    else:
        ctx.auth.reload_soon()  # re-read users now, even if the mtime did not move
    if (old.storage.location, old.storage.mark_seen, old.storage.expire_days) != (
        s.storage.location,
        s.storage.mark_seen,
        s.storage.expire_days,
    ):
        from pop3d.storage import build_storage

        ctx.storage = build_storage(s.storage)  # running sessions keep their open maildrop
    if (old.auth.failure_delay, old.auth.failure_delay_max) != (s.auth.failure_delay, s.auth.failure_delay_max):
        ctx.penalty.base = s.auth.failure_delay  # the penalty keeps its per-address history
        ctx.penalty.maximum = max(s.auth.failure_delay, s.auth.failure_delay_max)
    ctx.settings = s
    ctx.hostname = s.server.hostname
    if old.log != s.log:
        logfmt.configure(s.log)
    return p


def _load(load: Callable[[], Settings]) -> Settings:
    new = load()
    try:
        if new.auth.driver == "passwd-file":
            with open(new.auth.passwd_file, "rb"):
                pass
    except OSError as exc:
        raise ConfigError(f"auth.passwd_file: cannot read {new.auth.passwd_file}: {exc.strerror}") from None
    return new


def _log_outcome(p: Plan, quiet: bool) -> None:
    log.log(
        logging.DEBUG if quiet else logging.INFO,
        "configuration reloaded: %s",
        ", ".join(p.live) if p.live else "no live setting changed",
    )
    if p.restart:
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "changed but needs a restart to take effect: %s",
            ", ".join(p.restart),
        )


def check(current: Settings, load: Callable[[], Settings]) -> Plan | None:
    """A supervisor's view of its workers' reload: load, check and log what changes, apply nothing.
    Returns the plan (its `settings` are what the workers will run), or None if the configuration does not
    load."""
    try:
        p = plan(current, _load(load))
    except Exception as exc:
        log.error("reload failed, configuration unchanged: %s", exc)
        return None
    _log_outcome(p, quiet=False)
    return p


def reload(ctx: ServerContext, load: Callable[[], Settings], quiet: bool = False) -> Plan | None:
    """Load with `load`, apply, log the outcome; on any load error keep running as before (returns None).

    `quiet`: a supervisor's worker, whose supervisor has loaded the same file and logged the outcome
    (`check`): the outcome and a configuration that does not load go to DEBUG here. A failure to apply
    (a certificate that does not load in this process) is logged as an error all the same."""
    try:
        new = _load(load)
    except Exception as exc:  # a reload must never take the running server down
        log.log(logging.DEBUG if quiet else logging.ERROR, "reload failed, configuration unchanged: %s", exc)
        return None
    try:
        p = apply(ctx, new)
    except Exception as exc:  # ConfigError, or a hook refusing (a certificate that does not load)
        log.error("reload failed, configuration unchanged: %s", exc)
        return None
    _log_outcome(p, quiet)
    return p
