"""Prometheus metrics: what a real session produces, the HTTP endpoint, and sums across worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import Raw, deliver

from pop3d.ops.metrics import Metrics, NullMetrics, start_endpoint

ROOT = Path(__file__).resolve().parent.parent


def test_off_by_default(server):
    assert type(server.ctx.metrics) is NullMetrics and not server.ctx.metrics.enabled


def test_session_counters(start_server, env):
    st = start_server(metrics={"listen": "127.0.0.1:0"})
    m = st.ctx.metrics
    assert isinstance(m, Metrics)
    reg = m.registry

    def v(name: str, **labels: str) -> float:
        value = reg.get_sample_value(name, labels)
        return 0.0 if value is None else value

    box = env.maildir("alice")
    deliver(box, b"Subject: 1\r\n\r\none\r\n")
    doomed = deliver(box, b"Subject: 2\r\n\r\ntwo\r\n")

    a = Raw(st.port)
    assert a.cmd(b"USER alice").startswith(b"+OK") and a.cmd(b"PASS wonderland").startswith(b"+OK")
    assert v("pop3d_sessions_open") == 1
    b = Raw(st.port)  # same user, maildrop locked
    assert b.cmd(b"USER alice").startswith(b"+OK") and b.cmd(b"PASS wonderland").startswith(b"-ERR [IN-USE]")
    c = Raw(st.port)
    assert c.cmd(b"USER alice").startswith(b"+OK") and c.cmd(b"PASS nope").startswith(b"-ERR [AUTH]")
    a.cmd(b"STAT")
    a.cmd(b"STAT")
    assert a.cmd(b"RETR 1").startswith(b"+OK")
    a.multi()
    doomed.unlink()  # gone behind our back: RETR 2 is a storage read error
    assert a.cmd(b"RETR 2").startswith(b"-ERR [SYS/TEMP]")
    assert a.cmd(b"QUIT").startswith(b"+OK")
    for r in (a, b, c):
        r.close()
    st.wait_idle()
    assert v("pop3d_commands_total", verb="STAT") == 0  # accumulated in the loop, not yet flushed

    async def flush() -> None:
        m.flush()

    st.call(flush())

    assert v("pop3d_logins_total", result="ok") == 1
    assert v("pop3d_logins_total", result="in_use") == 1
    assert v("pop3d_logins_total", result="failed") == 1
    assert v("pop3d_auth_failures_total") == 1
    assert v("pop3d_lock_conflicts_total") == 1
    assert v("pop3d_storage_errors_total", operation="read") == 1
    assert v("pop3d_commands_total", verb="STAT") == 2
    assert v("pop3d_commands_total", verb="PASS") == 3
    assert v("pop3d_command_duration_seconds_count", verb="RETR") == 2
    assert v("pop3d_command_duration_seconds_count", verb="PASS") == 3  # async replies are timed too
    assert v("pop3d_sessions_total") == 3 and v("pop3d_sessions_open") == 0
    assert v("pop3d_sent_bytes_total") > len(b"Subject: 1\r\n\r\none\r\n") + 3 * len(a.greeting)


def test_latency_buckets_match_observe():
    """The batched flush must produce exactly the series Histogram.observe() would have."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.utils import floatToGoString

    from pop3d.ops.metrics import LATENCY_BUCKETS

    m = Metrics()
    ref_reg = CollectorRegistry()
    ref = Histogram("ref", "reference", buckets=LATENCY_BUCKETS, registry=ref_reg)
    samples = [0.0, 1e-9, 0.0001, 0.00010001, 0.003, 0.5, 1.0, 29.9, 30.0, 31.0, *LATENCY_BUCKETS]
    for x in samples:
        m.command("RETR", x)
        ref.observe(x)
    m.flush()
    m.flush()  # idempotent: nothing is counted twice
    for bound in [*LATENCY_BUCKETS, float("inf")]:
        le = floatToGoString(bound)
        got = m.registry.get_sample_value("pop3d_command_duration_seconds_bucket", {"verb": "RETR", "le": le})
        assert got == ref_reg.get_sample_value("ref_bucket", {"le": le}), le
    assert m.registry.get_sample_value(
        "pop3d_command_duration_seconds_sum", {"verb": "RETR"}
    ) == ref_reg.get_sample_value("ref_sum")
    assert m.registry.get_sample_value("pop3d_command_duration_seconds_count", {"verb": "RETR"}) == len(samples)
    assert m.registry.get_sample_value("pop3d_commands_total", {"verb": "RETR"}) == len(samples)


def test_http_endpoint():
    m = Metrics()
    m.login("ok")
    server = start_endpoint("127.0.0.1:0", m.registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
    assert 'pop3d_logins_total{result="ok"} 1.0' in body
    assert "# TYPE pop3d_command_duration_seconds histogram" in body


# A "supervisor" starts the endpoint, three forked "workers" count into one directory, the endpoint sums
# them over HTTP. Run in a fresh interpreter because multiprocess mode is process-wide.
WORKERS = r"""
import os, sys, urllib.request
from pop3d.ops import metrics
directory = sys.argv[1]
os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # as pop3d.runtime.shared does: the library reads it
metrics.enable_multiprocess(directory)
endpoint = metrics.start_endpoint("127.0.0.1:0", metrics.exposition_registry(None, directory))
url = f"http://127.0.0.1:{endpoint.server_port}/metrics"
pids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        m = metrics.Metrics(verbs=["STAT"])
        for _ in range(5):
            m.session_opened(); m.login("ok"); m.command("STAT", 0.002)
        m.session_closed(100)
        m.flush()
        os._exit(0)
    pids.append(pid)
for p in pids:
    os.waitpid(p, 0)
print(urllib.request.urlopen(url, timeout=10).read().decode())
metrics.process_dead(pids[0], directory)
print("AFTER")
print(urllib.request.urlopen(url, timeout=10).read().decode())
endpoint.shutdown()
"""


def test_multiprocess_sums_across_workers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", WORKERS, str(tmp_path / "prom")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    before, after = out.split("AFTER")
    assert 'pop3d_logins_total{result="ok"} 15.0' in before
    assert 'pop3d_commands_total{verb="STAT"} 15.0' in before
    assert 'pop3d_command_duration_seconds_count{verb="STAT"} 15.0' in before
    assert "pop3d_sent_bytes_total 300.0" in before
    assert "pop3d_sessions_open 12.0" in before  # 3 workers x (5 opened - 1 closed)
    assert "pop3d_sessions_open 8.0" in after  # a dead worker's open sessions no longer count
    assert 'pop3d_logins_total{result="ok"} 15.0' in after  # counters keep what dead workers counted
