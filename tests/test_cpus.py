"""The default worker count: the CPUs the cgroup quota and the affinity mask leave, not the host's CPU count."""

from __future__ import annotations

import pytest

from pop3d.config import load_settings
from pop3d.runtime import cpus


@pytest.mark.parametrize(
    "text,expect",
    [
        ("max 100000\n", None),
        ("150000 100000\n", 1.5),
        ("200000 100000", 2.0),
        ("50000 100000", 0.5),
        ("garbage", None),
        ("", None),
    ],
)
def test_cpu_max(text, expect):
    assert cpus.quota_v2(text) == expect


@pytest.mark.parametrize(
    "quota,period,expect", [("-1\n", "100000\n", None), ("150000\n", "100000\n", 1.5), ("0", "100000", None)]
)
def test_cfs_quota(quota, period, expect):
    assert cpus.quota_v1(quota, period) == expect


@pytest.mark.parametrize(
    "quota,affinity,count,expect",
    [
        (None, None, 8, 8),  # nothing limits: the CPU count
        (1.5, None, 8, 2),  # "150000 100000": a fractional quota rounds up
        (0.5, None, 8, 1),
        (4.0, {0, 1}, 8, 2),  # the affinity mask is smaller than the quota
        (2.0, {0, 1, 2, 3, 4, 5}, 64, 2),  # the quota is smaller than the mask
        (None, {3}, 64, 1),
        (None, None, None, 1),  # os.cpu_count() may say None
    ],
)
def test_usable_cpus(quota, affinity, count, expect):
    assert cpus.usable_cpus(quota, affinity, count) == expect


def _reader(files: dict[str, str]):
    return files.get


def test_cgroup_v2_in_a_container_namespace():
    files = {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/cpu.max": "150000 100000\n"}
    assert cpus.detect(_reader(files), lambda: set(range(16))) == 2


def test_cgroup_v2_the_smallest_ancestor_quota_counts():
    files = {
        "/proc/self/cgroup": "0::/system.slice/pop3d.service\n",
        "/sys/fs/cgroup/system.slice/pop3d.service/cpu.max": "max 100000\n",
        "/sys/fs/cgroup/system.slice/cpu.max": "300000 100000\n",  # CPUQuota=300% on the slice
    }
    assert cpus.cgroup_limit(files["/proc/self/cgroup"], _reader(files)) == 3.0
    assert cpus.detect(_reader(files), lambda: set(range(8))) == 3
    files["/sys/fs/cgroup/system.slice/pop3d.service/cpu.max"] = "100000 100000\n"
    assert cpus.detect(_reader(files), lambda: set(range(8))) == 1


def test_cgroup_v2_without_a_quota_uses_the_affinity_mask():
    files = {"/proc/self/cgroup": "0::/user.slice\n", "/sys/fs/cgroup/user.slice/cpu.max": "max 100000\n"}
    assert cpus.detect(_reader(files), lambda: {0, 2, 4}) == 3


def test_cgroup_v1_cfs_quota():
    files = {
        "/proc/self/cgroup": "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
        "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
        "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    assert cpus.cgroup_paths(files["/proc/self/cgroup"]) == (None, "/docker/abc")
    assert cpus.detect(_reader(files), lambda: set(range(32))) == 3


def test_cgroup_v1_inside_the_container_namespace():
    # the host path is not mounted inside the container: the container's own cgroup is the mount's root
    files = {
        "/proc/self/cgroup": "4:cpu,cpuacct:/docker/abc\n",
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "100000\n",
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
    }
    assert cpus.detect(_reader(files), lambda: set(range(32))) == 1


def test_no_cgroup_files_at_all():
    assert cpus.detect(_reader({}), lambda: None) >= 1
    assert cpus.detect(_reader({}), lambda: {0, 1}) == 2


def test_hybrid_hierarchy_falls_back_to_v1():
    # systemd's hybrid mode: a v2 line without cpu.max, the cpu controller on v1
    files = {
        "/proc/self/cgroup": "0::/init.scope\n3:cpu,cpuacct:/\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    assert cpus.detect(_reader(files), lambda: set(range(8))) == 2


def test_the_real_machine():
    assert cpus.detect() >= 1


def test_workers_default_resolved_at_start_and_on_reload():
    """`server.workers = 0` (the default) becomes the usable CPU count; an explicit number stays."""
    assert load_settings(None).server.workers == 0
    settings, load = cpus.resolve_workers(load_settings(None), lambda: load_settings(None), cpus=lambda: 3)
    assert settings.server.workers == 3
    assert load is not None and load().server.workers == 3  # a reload compares 3 with 3: no restart warning
    explicit = load_settings(None, server={"workers": 1})
    assert cpus.resolve_workers(explicit, None, cpus=lambda: 3) == (explicit, None)
    many, _ = cpus.resolve_workers(load_settings(None), None, cpus=lambda: 4096)
    assert many.server.workers == cpus.MAX_WORKERS
