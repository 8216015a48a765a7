"""What the worker processes of one server share, made by their supervisor before it forks.

It is made after the supervisor dropped root (pop3d.runtime.privileges), so the directories and files
below belong to the user the workers run as.

A client may land on any worker, so three things must hold across them (pop3d.pop3.context.SharedState):
the brute-force penalty per address (an anonymous shared-memory table, inherited by fork), RFC 2449
LOGIN-DELAY (one directory, a file per user) and the Prometheus counters (one totals file per worker in one
directory, summed by the supervisor's endpoint: pop3d.ops.metrics). Everything is made
here, once, and handed down explicitly. The verified-credentials cache (pop3d.auth.cred_cache) is one more
anonymous shared-memory table, so a password proved on one worker is remembered on all of them, and its
HMAC key is drawn here too. A single-process server needs none of it (the context then keeps
process-local equivalents), except what must survive a restart.

Survives a restart, under `server.state_dir` (0700, pop3d's user): the penalty table (`penalty`, 0600,
written by `PenaltyKeeper` at shutdown and every SAVE_INTERVAL seconds, read back at start) and the
LOGIN-DELAY records (`login-delay/`, one file per user). A state file that is a link, someone else's,
the wrong size or not a dump is ignored with a warning: start-up never fails for it, the history is then
simply empty. When state_dir cannot be used, both fall back to what they were before: a temporary
directory removed at exit and a table that lives as long as the server. The credentials cache is never
written anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pop3d.auth import state_secret
from pop3d.auth.cred_cache import CredCache
from pop3d.auth.generation import Generation
from pop3d.auth.login_delay import SharedLoginDelays
from pop3d.auth.penalty import DEFAULT_FORGET_AFTER, MAX_DUMP_SIZE, SharedPenalty, SharedTable
from pop3d.config import Settings
from pop3d.net.limits import ConnectionLimits
from pop3d.ops import metrics
from pop3d.pop3.context import SharedState
from pop3d.pop3.protocol import VERBS
from pop3d.storage.atomic import create_temp, install
from pop3d.storage.safefile import open_regular, read_upto

log = logging.getLogger("pop3d")

PENALTY_FILE = "penalty"
LOGIN_DELAY_DIR = "login-delay"
#: seconds between two saves of the penalty table by a running supervisor (a crash loses at most this much)
SAVE_INTERVAL = 60.0

#: prometheus-client's name for a metrics directory; honoured as the place for ours (`_claim_metrics_dir`)
PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class PenaltyKeeper:
    """Writes the shared penalty table to `path` (None: not kept) at shutdown and now and then."""

    table: SharedTable
    path: Path | None
    last: float = field(default_factory=time.monotonic)

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self.last >= SAVE_INTERVAL:
            self.save(now)

    def save(self, now: float | None = None) -> None:
        """Atomic replace (exclusive temporary file, rename), 0600; a failure is a warning."""
        self.last = time.monotonic() if now is None else now
        if self.path is None:
            return
        try:
            fd, tmp = create_temp(str(self.path))
            try:
                os.write(fd, self.table.dump(time.time(), time.monotonic()))
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            install(fd, tmp, str(self.path))
        except OSError as exc:
            log.warning("cannot save the login penalty table to %s: %s", self.path, exc.strerror or exc)


def _check_ours(st: os.stat_result, what: str, want_dir: bool) -> None:
    """A state file or directory must be pop3d's own: not a link, of the right type, this uid's."""
    kind = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not kind:
        raise ValueError(f"{what} is not a {'directory' if want_dir else 'regular file'}")
    if st.st_uid != os.geteuid():
        raise ValueError(f"{what} is owned by uid {st.st_uid}, not by pop3d's uid {os.geteuid()}")


def _state_dir(settings: Settings) -> Path | None:
    directory = settings.server.state_dir
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_ours(os.stat(directory, follow_symlinks=False), str(directory), want_dir=True)
    except (OSError, ValueError) as exc:
        log.warning("server.state_dir %s unusable (%s): login penalties and LOGIN-DELAY will not survive a "
                    "restart", directory, getattr(exc, "strerror", None) or exc)  # fmt: skip
        return None
    return directory


def load_penalty(table: SharedTable, path: Path, forget_after: float) -> int:
    """Restore the table from `path` if it is a usable dump; entries kept (0: none, or the file ignored)."""
    cap = MAX_DUMP_SIZE  # a larger file is not a dump: never read
    try:
        fd, st = open_regular(str(path))
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("penalty table %s ignored: %s", path, exc.strerror or exc)
        return 0
    try:
        _check_ours(st, str(path), want_dir=False)
        if st.st_size > cap:
            raise ValueError(f"{path} is larger than {cap} octets")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        kept = table.restore(read_upto(fd, st.st_size), time.time(), time.monotonic(), forget_after)
    except (OSError, ValueError) as exc:
        log.warning("penalty table %s ignored: %s", path, getattr(exc, "strerror", None) or exc)
        return 0
    finally:
        os.close(fd)
    if kept:
        log.info("login penalty: %d address(es) carried over from %s", kept, path)
    return kept


def login_delay_directory(state: Path | None, keep: float) -> tuple[str, bool]:
    """(directory of the LOGIN-DELAY records, whether it is a temporary one to remove at exit). Under
    state_dir when usable (made 0700; stale records older than `keep` seconds pruned), else a tempdir."""
    if state is not None:
        path = state / LOGIN_DELAY_DIR
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            _check_ours(os.stat(path, follow_symlinks=False), str(path), want_dir=True)
            os.chmod(path, 0o700, follow_symlinks=False)
        except (OSError, ValueError) as exc:
            log.warning("LOGIN-DELAY directory %s unusable (%s): the history will not survive a restart",
                        path, getattr(exc, "strerror", None) or exc)  # fmt: skip
        else:
            SharedLoginDelays(str(path)).prune(keep, time.time())
            return str(path), False
    return tempfile.mkdtemp(prefix="pop3d-login-delay-"), True


def persistent_local(settings: Settings, base: SharedState) -> tuple[SharedState, PenaltyKeeper, str, bool]:
    """A single-process server's state with the penalty and LOGIN-DELAY kept under state_dir, like a
    supervisor's: (state, keeper to save at exit, login-delay directory, whether to remove it at exit)."""
    a = settings.auth
    state = _state_dir(settings)
    table = SharedTable()
    if state is not None:
        load_penalty(table, state / PENALTY_FILE, DEFAULT_FORGET_AFTER)
    keeper = PenaltyKeeper(table, None if state is None else state / PENALTY_FILE)
    directory, own = login_delay_directory(state, settings.session.login_delay)
    penalty = SharedPenalty(a.failure_delay, a.failure_delay_max, table)
    return dataclasses.replace(base, penalty=penalty, login_delays=SharedLoginDelays(directory)), keeper, directory, own


@dataclass(frozen=True, slots=True)
class WorkerShare:
    """The shared state plus the files behind it, which the supervisor removes after its last worker."""

    state: SharedState
    login_delay_dir: str
    metrics_dir: str | None  # None: metrics off
    own_metrics_dir: bool  # made by us (removed at the end), not given by the operator
    keeper: PenaltyKeeper | None = None  # saves the penalty table under state_dir
    own_login_delay_dir: bool = True  # a temporary directory (state_dir unusable): removed at the end

    def worker_died(self, pid: int) -> None:
        """The supervisor reaped worker `pid`: its connections no longer count against the connection limits
        (their counts live in shared memory too, pop3d.net.limits.SharedCounts)."""
        if self.state.limits is not None:
            self.state.limits.reclaim(pid)

    def tick(self) -> None:
        """Called by the supervisor's loop about once a second: saves the penalty table now and then."""
        if self.keeper is not None:
            self.keeper.tick()

    def remove(self) -> None:
        if self.keeper is not None:
            self.keeper.save()
        if self.own_login_delay_dir:
            shutil.rmtree(self.login_delay_dir, ignore_errors=True)
        if self.metrics_dir is not None and self.own_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def share_between_workers(settings: Settings) -> WorkerShare:
    """Build the state every worker inherits; call in the supervisor, before the first fork."""
    a = settings.auth
    state = _state_dir(settings)
    table = SharedTable()
    if state is not None:
        load_penalty(table, state / PENALTY_FILE, DEFAULT_FORGET_AFTER)
    penalty = SharedPenalty(a.failure_delay, a.failure_delay_max, table)
    login_delay_dir, own_delay_dir = login_delay_directory(state, settings.session.login_delay)
    metrics_dir, own = None, False
    if settings.metrics.listen:
        metrics_dir, own = _claim_metrics_dir()
        metrics.prepare_directory(metrics_dir)
    shared = SharedState(
        penalty,
        SharedLoginDelays(login_delay_dir),
        metrics.build(settings.metrics.listen, VERBS, metrics_dir),
        ConnectionLimits.from_settings(settings, shared=True),
        state_secret.load_or_create(settings.server.state_dir),
        cred_cache=CredCache(a.cache_size, shared=True) if a.cache_size else None,
        auth_generation=Generation(shared=True),
    )
    keeper = PenaltyKeeper(table, None if state is None else state / PENALTY_FILE)
    return WorkerShare(shared, login_delay_dir, metrics_dir, own, keeper, own_delay_dir)


def _claim_metrics_dir() -> tuple[str, bool]:
    """The directory the workers write their metrics to (pop3d.ops.metrics), and whether we made it. An
    operator who set PROMETHEUS_MULTIPROC_DIR (a tmpfs, say) keeps that directory; we never set it."""
    preset = os.environ.get(PROMETHEUS_DIR_ENV)
    directory = preset or tempfile.mkdtemp(prefix="pop3d-metrics-")
    return directory, not preset
