"""Several worker processes, one uvloop event loop each (docs/DESIGN.md performance rule 4).

`server.workers = 1` never forks: the server runs in the calling process (pop3d.runtime.server.serve).
With more workers a small synchronous supervisor (this module) stays in the parent:

* it binds, before it forks and while it may still be root (pop3d.runtime.startup), one set of SO_REUSEPORT
  sockets per worker slot, all listening (pop3d.runtime.listeners: a probe first refuses an address that
  another process already serves). That reports "address in use" before anything forks, turns a
  configured port 0 into one concrete port that every worker shares, and keeps a slot's accept queue
  across a restart of its worker: connections queued while it was down are served by the next one;
* then it drops root (pop3d.runtime.privileges) and forks the workers; each runs its own loop on its own
  slot's sockets, so the kernel spreads new connections over the workers' accept queues (no thundering
  herd, no shared accept lock);
* a worker that dies is logged with its exit status and replaced (at most one restart per second per
  slot, so a worker that crashes at start cannot fork-bomb the machine);
* SIGTERM/SIGINT are forwarded as SIGTERM (each worker drains for `server.shutdown_grace`, then cuts its
  sessions), SIGHUP is forwarded as is (workers re-read the user database at once). The parent exits when
  every worker has;
* workers ask the kernel for SIGKILL when the parent dies (PR_SET_PDEATHSIG), so a `kill -9` of the
  supervisor never leaves orphans holding ports and maildrop locks;
* under systemd the supervisor is the main process: it takes socket-activated sockets (then every worker
  accepts on those same inherited sockets), sends READY/RELOADING/STOPPING and the watchdog pings; workers
  do not talk to the manager. READY=1 after a reload waits until every worker has finished it
  (pop3d.runtime.reload_rounds; at most RELOAD_TIMEOUT seconds), and a worker restarted after a reload runs
  the settings in force, not the ones the server started with (what it inherits ready-made from before the
  fork, the TLS certificates and the penalty's base delay, stays as loaded at start until its next SIGHUP).
  With WatchdogSec= each worker beats from its event loop into a shared slot (pop3d.runtime.heartbeat) and
  WATCHDOG=1 goes out only while every worker has beaten within the ping interval: a stuck or stopped
  worker stops the pings, and systemd restarts the service. With `metrics.listen` it serves the metrics
  summed over the workers (pop3d.ops.metrics: one totals file per worker) and tells the collector when a
  worker died;
* what the workers must agree on (login penalties, LOGIN-DELAY, metrics) is built before the first fork
  (pop3d.runtime.shared) and handed to each worker, never looked up from globals or the environment.

Maildrop locks are OFD fcntl locks (storage/locking.py): they exclude sessions in other workers too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from pop3d.config import Settings
from pop3d.pop3.context import SharedState
from pop3d.runtime import systemd
from pop3d.runtime.heartbeat import Heartbeat, HeartbeatTable
from pop3d.runtime.reload_rounds import ReloadAck, ReloadRounds, wait_for_workers
from pop3d.runtime.shared import share_between_workers
from pop3d.runtime.startup import Bound, Prepared

log = logging.getLogger("pop3d")

_PR_SET_PDEATHSIG = 1
_RESTART_INTERVAL = 1.0
_FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM, signal.SIGHUP: signal.SIGHUP}
_WATCHED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
#: seconds READY=1 waits after a forwarded SIGHUP for a worker that has not finished its reload (a stopped or
#: stuck one); then it goes out all the same, with an error naming the worker (the watchdog deals with it)
RELOAD_TIMEOUT = 30.0


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit: every connection is a file descriptor. Returns (soft, hard)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. RLIM_INFINITY refused on some systems
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the parent dies. Elsewhere a no-op (orphans then exit on SIGTERM)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # pragma: no cover - no libc found
        pass


@dataclass(frozen=True)
class WorkerLinks:
    """How one worker answers its supervisor: `ready_fd` gets a byte once it listens (-1: nobody waits),
    `heartbeat` (None: no watchdog) is beaten from its loop every `heartbeat.period` seconds, and each
    SIGHUP's reload runs inside `reload.answering()`."""

    ready_fd: int
    heartbeat: Heartbeat | None
    reload: ReloadAck


#: worker_main(its sockets and TLS state, shared state, links to the supervisor): runs one worker until it
#: should exit
WorkerMain = Callable[[Bound, SharedState, WorkerLinks], None]


class Supervisor:
    """Forks `settings.server.workers` workers and keeps that many alive until told to stop."""

    def __init__(self, settings: Settings, worker_main: WorkerMain, prepared: Prepared) -> None:
        """`worker_main(bound, shared, links)` runs one worker, answering through `links` (WorkerLinks), and
        returns when the worker should exit.
        `prepared`: the sockets (one set per worker slot), TLS state and metrics port, made before privileges
        were dropped; from here on the supervisor owns them."""
        self.settings = settings
        self.count = settings.server.workers
        self.worker_main = worker_main
        self.prepared = prepared
        self.addresses = prepared.addresses
        # penalties, LOGIN-DELAY and metrics must hold whichever worker a client lands on; made after the
        # privilege drop, so the files belong to the user the workers run as
        try:
            self.share = share_between_workers(settings)
        except BaseException:
            prepared.close()
            raise
        self.metrics_endpoint = prepared.metrics
        if self.metrics_endpoint is not None:
            from pop3d.ops import metrics

            self.metrics_endpoint.start(metrics.exposition_registry(None, self.share.metrics_dir))
        #: run on SIGHUP before it is forwarded: checks and logs the new configuration once (pop3d.runtime.server)
        self.on_hup: Callable[[], None] = lambda: None
        self.pids: dict[int, int] = {}  # pid -> slot
        self.started: dict[int, float] = {}  # slot -> monotonic time of its last start
        self.stopping = False
        interval = systemd.watchdog_interval()  # read before the fork: WATCHDOG_PID names this process
        self.heartbeats = HeartbeatTable(self.count, interval) if interval is not None else None
        self.withheld = False  # a watchdog ping is being held back for a worker that does not answer
        self.next_ping = 0.0  # monotonic time of the next look at the heartbeats
        self.reloads = ReloadRounds(self.count)

    def addresses_text(self) -> list[str]:
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p, _ in self.addresses]

    def _spawn(self, slot: int, ready_w: int | None) -> int:
        parent = os.getpid()
        heartbeat = None
        if self.heartbeats is not None:
            self.heartbeats.stamp(slot)  # a new worker has one interval to start beating
            heartbeat = self.heartbeats.beat_for(slot)
        self.reloads.finish(slot, self.reloads.asked())  # it starts with the settings in force (see the module)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                # Signals stay blocked until the worker's loop has its handlers (server.serve unblocks
                # them): a SIGHUP or SIGTERM forwarded during start-up is then handled, not fatal.
                for sig in _WATCHED:
                    signal.signal(sig, signal.SIG_DFL)
                _die_with_parent()
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os._exit(1)
                for other, sockets in enumerate(self.prepared.slots):  # the other slots' queues are not ours
                    if other != slot and not self.prepared.activated:
                        for inh in sockets:
                            inh.sock.close()
                for other, sockets in enumerate(self.prepared.lmtp):  # LMTP (pop3d.lmtp.service): the same
                    if other != slot:
                        for inh in sockets:
                            inh.sock.close()
                if self.metrics_endpoint is not None:
                    self.metrics_endpoint.close_socket()
                for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # the supervisor speaks
                    os.environ.pop(var, None)
                links = WorkerLinks(-1 if ready_w is None else ready_w, heartbeat, self.reloads.for_slot(slot))
                self.worker_main(self.prepared.for_slot(slot), self.share.state, links)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # report anything and exit non-zero; the parent restarts us
                log.exception("worker %d crashed", slot)
                code = 1
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pids[pid] = slot
        self.started[slot] = time.monotonic()
        return pid

    def run(self, on_ready: Callable[[Supervisor], None] | None = None) -> int:
        """Start the workers, supervise them until SIGTERM/SIGINT, return the exit status."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        ready_r, ready_w = os.pipe()
        try:
            for slot in range(self.count):
                self._spawn(slot, ready_w)
            os.close(ready_w)
            if not self._wait_ready(ready_r):
                self._stop_all(signal.SIGTERM)
                self._reap_all()
                self._release()
                return 1
        finally:
            os.close(ready_r)
        log.info("%d workers listening on %s", self.count, ", ".join(self.addresses_text()))
        if on_ready is not None:
            on_ready(self)
        systemd.notify("READY=1", self._status())
        return self._supervise()

    def _wait_ready(self, ready_r: int) -> bool:
        """Every worker wrote its ready byte; False (and logged) if one died first or it took too long."""
        import select

        got = 0
        deadline = time.monotonic() + 60
        while got < self.count:
            if time.monotonic() > deadline:
                log.error("workers did not start within 60 s")
                return False
            eof = False
            if select.select([ready_r], [], [], 0.1)[0]:
                data = os.read(ready_r, self.count - got)
                got += len(data)
                eof = not data  # every worker closed its end: they all exited before saying they were ready
            if got >= self.count:
                break
            pid, status = os.waitpid(-1, 0 if eof else os.WNOHANG)
            if pid:
                self.pids.pop(pid, None)
                log.error("a worker %s during start-up", _describe_status(status))
                return False
        return True

    def _supervise(self) -> int:
        self.next_ping = time.monotonic()
        while self.pids:
            wait = 1.0
            if self.heartbeats is not None:
                self._ping_if_due(self.heartbeats)
                wait = min(wait, max(0.001, self.next_ping - time.monotonic()))
            info = signal.sigtimedwait(_WATCHED, wait)
            if info is not None and info.si_signo in _FORWARDED:
                if info.si_signo == signal.SIGHUP:
                    self._reload()
                elif not self.stopping:
                    log.info("signal %d: stopping workers", info.si_signo)
                    self.stopping = True
                    systemd.notify("STOPPING=1", "STATUS=draining sessions")
                if self.stopping:
                    self._stop_all(signal.SIGTERM)
                    # our copies would keep the draining workers' queues open: new clients must be refused
                    self.prepared.close_listeners()
            self._reap()
            self.share.tick()  # the penalty table, saved under state_dir now and then
        self._release()
        log.info("all workers stopped")
        return 0

    def _reload(self) -> None:
        """SIGHUP: check and log the configuration once (`on_hup`), forward the signal, and say READY=1 only
        when every worker has finished its reload (RELOAD_TIMEOUT at most), reaping and pinging meanwhile."""
        log.info("SIGHUP: forwarding to workers")
        systemd.notify(*systemd.reloading_states())
        self.on_hup()
        round_ = self.reloads.ask()
        self._stop_all(signal.SIGHUP)
        late = wait_for_workers(self.reloads, round_, lambda: self.pids, RELOAD_TIMEOUT, self._between_looks)
        if not self._stop_pending():
            for slot, pid in late:
                log.error("worker %d (pid %d) has not finished the reload within %.0f s", slot, pid, RELOAD_TIMEOUT)
        systemd.notify("READY=1", self._status())

    def _between_looks(self) -> bool:
        """While a reload is waited for: reap, ping; True (stop waiting) once SIGTERM/SIGINT is pending."""
        self._reap()
        if self.heartbeats is not None:
            self._ping_if_due(self.heartbeats)
        return self._stop_pending()

    @staticmethod
    def _stop_pending() -> bool:
        return bool(signal.sigpending() & {signal.SIGTERM, signal.SIGINT})

    def _ping_if_due(self, heartbeats: HeartbeatTable) -> None:
        if time.monotonic() >= self.next_ping:
            self.next_ping = self._watchdog(heartbeats)

    def _watchdog(self, heartbeats: HeartbeatTable) -> float:
        """WATCHDOG=1 when every worker beat within the interval; else hold it back and say why in STATUS=
        (systemctl status shows it). Returns when to look again."""
        stale = heartbeats.stale(self.pids)
        now = time.monotonic()
        if not stale:
            if self.withheld:
                self.withheld = False
                log.info("every worker answers again: watchdog pings resume")
                systemd.notify("WATCHDOG=1", "STATUS=draining sessions" if self.stopping else self._status())
            else:
                systemd.notify("WATCHDOG=1")
            return now + heartbeats.interval
        slot, pid, age = stale[0]
        what = f"worker {slot} (pid {pid}) has not answered for {age:.1f} s"
        if not self.withheld:
            self.withheld = True
            log.error("%s: withholding the watchdog ping (WatchdogSec= restarts the service if it stays so)", what)
        systemd.notify(f"STATUS={what}; watchdog ping withheld")
        return now + heartbeats.interval / 4  # look again soon: a worker that recovers must not miss WatchdogSec=

    def _release(self) -> None:
        """After the last worker: the listening sockets, the metrics endpoint, the shared files."""
        self.prepared.close()
        self.share.remove()
        self.reloads.close()
        if self.heartbeats is not None:
            self.heartbeats.close()

    def _status(self) -> str:
        return f"STATUS=listening on {', '.join(self.addresses_text())}"

    def _stop_all(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.pids.clear()
                return
            if pid == 0:
                return
            slot = self.pids.pop(pid, None)
            if slot is None:
                continue
            self.share.worker_died(pid)
            if self.share.metrics_dir is not None:
                from pop3d.ops import metrics

                metrics.process_dead(pid, self.share.metrics_dir)
            if self.stopping:
                continue
            log.error("worker %d (pid %d) %s; restarting it", slot, pid, _describe_status(status))
            wait = self.started[slot] + _RESTART_INTERVAL - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._spawn(slot, None)

    def _reap_all(self) -> None:
        for pid in list(self.pids):
            os.waitpid(pid, 0)
        self.pids.clear()


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
