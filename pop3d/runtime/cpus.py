"""How many CPUs this process may really use: the default for `server.workers` (0 = one worker per CPU).

`os.cpu_count()` counts the host's CPUs. A container started with `--cpus 1.5` on a 32-core host, or a
systemd unit with `CPUQuota=200%`, would get 32 workers contending for a quota of one or two CPUs: more
processes than run-time, more context switches, and more memory (docs/DESIGN.md performance rule 4: one
loop per core). What limits the process is the smallest of:

* the CFS bandwidth quota of its cgroup and of every ancestor: cgroup v2 `cpu.max` ("QUOTA PERIOD", or
  "max PERIOD" for none), cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 for none). A fractional
  quota is rounded up: 1.5 CPUs keep two workers busy part of the time, one would leave half a CPU idle;
* the affinity mask (`taskset`, `docker run --cpuset-cpus`, systemd `CPUAffinity=`).

The parsing is pure (file contents in, numbers out) so the tests feed it the files of any cgroup layout;
`detect` reads the real ones. The configuration cannot call this (it is the lowest layer, and a default
computed there would read /proc and /sys on every load): `server.workers = 0` means "ask here", and
`resolve_workers` turns it into a number when the server starts and on every reload.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection
from pathlib import PurePosixPath

from pop3d.config import Settings

#: where cgroup v2 (the unified hierarchy) is mounted, and where v1 mounts its cpu controller
CGROUP2_ROOT = "/sys/fs/cgroup"
CGROUP1_CPU_ROOTS = ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu")

#: the most `server.workers` accepts (pop3d.config)
MAX_WORKERS = 1024

#: reads a file's text, or None when it does not exist or cannot be read
Reader = Callable[[str], str | None]


def quota_v2(cpu_max: str) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("150000 100000" -> 1.5); None: no limit ("max 100000")."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def quota_v1(cfs_quota_us: str, cfs_period_us: str) -> float | None:
    """CPUs allowed by cgroup v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`; None: no limit (quota -1)."""
    return _ratio(cfs_quota_us.strip(), cfs_period_us.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # unreadable: not a limit we can honour
    return q / p if q > 0 and p > 0 else None


def cgroup_paths(proc_self_cgroup: str) -> tuple[str | None, str | None]:
    """(cgroup v2 path, cgroup v1 path of the cpu controller) from /proc/self/cgroup; None where absent.

    Lines are "ID:CONTROLLERS:PATH": v2 is "0::/system.slice/pop3d.service", v1 names its controllers,
    e.g. "4:cpu,cpuacct:/docker/3f2a...".
    """
    v2 = v1 = None
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ident, controllers, path = parts
        if ident == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: str, path: str) -> list[str]:
    """`root`+`path` and each of its parents up to `root` itself: a parent's quota limits its children.

    In a container with its own cgroup namespace the path is "/" and `root` is the container's own
    cgroup; when the path names a host cgroup that is not mounted here, the directories that do not
    exist are simply not found, and `root` still is."""
    out: list[str] = []
    p = PurePosixPath("/") / path.lstrip("/")
    while True:
        out.append(root + (str(p) if str(p) != "/" else ""))
        if p == p.parent:
            return out
        p = p.parent


def cgroup_limit(proc_self_cgroup: str, read: Reader) -> float | None:
    """The smallest CPU quota over this process's cgroup and its ancestors (v2, else v1); None: no quota."""
    v2, v1 = cgroup_paths(proc_self_cgroup)
    limits: list[float] = []
    if v2 is not None:
        for d in _ancestors(CGROUP2_ROOT, v2):
            text = read(f"{d}/cpu.max")
            q = quota_v2(text) if text is not None else None
            if q is not None:
                limits.append(q)
    if v1 is not None and not limits:
        for root in CGROUP1_CPU_ROOTS:
            for d in _ancestors(root, v1):
                quota, period = read(f"{d}/cpu.cfs_quota_us"), read(f"{d}/cpu.cfs_period_us")
                q = quota_v1(quota, period) if quota is not None and period is not None else None
                if q is not None:
                    limits.append(q)
            if limits:
                break
    return min(limits) if limits else None


def usable_cpus(quota: float | None, affinity: Collection[int] | None, cpu_count: int | None) -> int:
    """CPUs the process may use: the affinity mask (else the CPU count), capped by the quota rounded up."""
    n = len(affinity) if affinity else (cpu_count or 1)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _affinity() -> Collection[int] | None:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not on this platform
        return None


def detect(read: Reader = _read, affinity: Callable[[], Collection[int] | None] = _affinity) -> int:
    """The CPUs this process may use, read from /proc/self/cgroup, the cgroup files and the affinity mask."""
    proc = read("/proc/self/cgroup")
    quota = cgroup_limit(proc, read) if proc is not None else None
    return usable_cpus(quota, affinity(), os.cpu_count())


def resolve_workers(
    settings: Settings, load: Callable[[], Settings] | None, cpus: Callable[[], int] = detect
) -> tuple[Settings, Callable[[], Settings] | None]:
    """`settings` with `server.workers = 0` replaced by the usable CPU count, and `load` (the reload
    function) doing the same, so a reload compares numbers with numbers: a reload after the quota changed
    (`docker update --cpus`) reports `server.workers` as needing a restart, like any other count change."""

    def resolved(s: Settings) -> Settings:
        if s.server.workers != 0:
            return s
        count = min(cpus(), MAX_WORKERS)
        return s.model_copy(update={"server": s.server.model_copy(update={"workers": count})})

    if load is None:
        return resolved(settings), None
    reload = load
    return resolved(settings), lambda: resolved(reload())
