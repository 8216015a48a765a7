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
process-local equivalents).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from pop3d.auth import state_secret
from pop3d.auth.cred_cache import CredCache
from pop3d.auth.login_delay import SharedLoginDelays
from pop3d.auth.penalty import SharedPenalty, SharedTable
from pop3d.config import Settings
from pop3d.net.limits import ConnectionLimits
from pop3d.ops import metrics
from pop3d.pop3.context import SharedState
from pop3d.pop3.protocol import VERBS

#: prometheus-client's name for a metrics directory; honoured as the place for ours (`_claim_metrics_dir`)
PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True, slots=True)
class WorkerShare:
    """The shared state plus the files behind it, which the supervisor removes after its last worker."""

    state: SharedState
    login_delay_dir: str
    metrics_dir: str | None  # None: metrics off
    own_metrics_dir: bool  # made by us (removed at the end), not given by the operator

    def worker_died(self, pid: int) -> None:
        """The supervisor reaped worker `pid`: its connections no longer count against the connection limits
        (their counts live in shared memory too, pop3d.net.limits.SharedCounts)."""
        if self.state.limits is not None:
            self.state.limits.reclaim(pid)

    def remove(self) -> None:
        shutil.rmtree(self.login_delay_dir, ignore_errors=True)
        if self.metrics_dir is not None and self.own_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def share_between_workers(settings: Settings) -> WorkerShare:
    """Build the state every worker inherits; call in the supervisor, before the first fork."""
    a = settings.auth
    penalty = SharedPenalty(a.failure_delay, a.failure_delay_max, SharedTable())
    login_delay_dir = tempfile.mkdtemp(prefix="pop3d-login-delay-")
    metrics_dir, own = None, False
    if settings.metrics.listen:
        metrics_dir, own = _claim_metrics_dir()
        metrics.prepare_directory(metrics_dir)
    state = SharedState(
        penalty,
        SharedLoginDelays(login_delay_dir),
        metrics.build(settings.metrics.listen, VERBS, metrics_dir),
        ConnectionLimits.from_settings(settings, shared=True),
        state_secret.load_or_create(settings.server.state_dir),
        cred_cache=CredCache(a.cache_size, shared=True) if a.cache_size else None,
    )
    return WorkerShare(state, login_delay_dir, metrics_dir, own)


def _claim_metrics_dir() -> tuple[str, bool]:
    """The directory the workers write their metrics to (pop3d.ops.metrics), and whether we made it. An
    operator who set PROMETHEUS_MULTIPROC_DIR (a tmpfs, say) keeps that directory; we never set it."""
    preset = os.environ.get(PROMETHEUS_DIR_ENV)
    directory = preset or tempfile.mkdtemp(prefix="pop3d-metrics-")
    return directory, not preset
