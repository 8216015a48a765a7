"""Prometheus metrics: what a real session produces, the HTTP endpoint, and sums across worker processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
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
    assert v("pop3d_messages_retrieved_total") == 1 and v("pop3d_messages_deleted_total") == 0
    assert v("pop3d_session_duration_seconds_count") == 3
    assert v("pop3d_session_duration_seconds_bucket", le="+Inf") == 3 and v("pop3d_session_duration_seconds_sum") > 0
    assert v("pop3d_tls_handshakes_total", result="ok") == 0


def test_exposition_adds_build_and_process_metrics_and_deletions(start_server, env):
    """What GET /metrics of a one-process server shows besides the session counters."""
    from prometheus_client import generate_latest

    from pop3d import __version__
    from pop3d.ops.metrics import exposition_registry

    st = start_server(metrics={"listen": "127.0.0.1:0"})
    box = env.maildir("alice")
    deliver(box, b"Subject: 1\r\n\r\none\r\n")
    deliver(box, b"Subject: 2\r\n\r\ntwo\r\n")
    a = Raw(st.port)
    assert a.cmd(b"USER alice").startswith(b"+OK") and a.cmd(b"PASS wonderland").startswith(b"+OK")
    a.cmd(b"DELE 1")
    a.cmd(b"DELE 2")
    assert a.cmd(b"QUIT").startswith(b"+OK")
    a.close()
    st.wait_idle()
    st.call(_flush(st.ctx.metrics))
    body = generate_latest(exposition_registry(st.ctx.metrics)).decode()
    assert 'pop3d_build_info{python="' in body and f'version="{__version__}"' in body
    assert "pop3d_messages_deleted_total 2.0" in body
    pid = os.getpid()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert f'{name}{{pid="{pid}",role="main"}}' in body, name
    assert "# TYPE pop3d_session_duration_seconds histogram" in body


async def _flush(m) -> None:
    m.flush()


def test_tls_handshakes_counted(start_server, tmp_path):
    """STLS (counted by the session) and implicit TLS (counted where asyncio runs the handshake)."""
    import poplib
    import socket
    import ssl

    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    st = start_server(
        metrics={"listen": "127.0.0.1:0"}, server={"tls_listen": ["127.0.0.1:0"]}, tls=pki.tls_section(False)
    )
    tls_port = st.server.tls_addresses()[0][1]
    p = poplib.POP3("127.0.0.1", st.port, timeout=10)
    p.stls(pki.client_context())
    p.quit()
    p = poplib.POP3_SSL("127.0.0.1", tls_port, context=pki.client_context(), timeout=10)
    p.quit()
    s = socket.create_connection(("127.0.0.1", tls_port), timeout=10)  # not TLS at all
    s.sendall(b"USER alice\r\n" * 20)
    with contextlib.suppress(OSError):
        s.recv(100)
    s.close()
    bad = ssl.create_default_context()  # does not trust the test CA: the client aborts the handshake
    with contextlib.suppress(ssl.SSLError):
        bad.wrap_socket(socket.create_connection(("127.0.0.1", tls_port), timeout=10), server_hostname="localhost")
    st.wait_idle()
    reg = st.ctx.metrics.registry
    end = time.monotonic() + 10
    while reg.get_sample_value("pop3d_tls_handshakes_total", {"result": "failed"}) < 2 and time.monotonic() < end:
        time.sleep(0.02)  # the server notices the aborted handshakes on its own loop
    assert reg.get_sample_value("pop3d_tls_handshakes_total", {"result": "ok"}) == 2
    assert reg.get_sample_value("pop3d_tls_handshakes_total", {"result": "failed"}) == 2


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


def test_endpoint_thread_takes_no_signals():
    """A supervisor takes SIGTERM/SIGHUP with sigtimedwait in its main thread; the kernel may hand a signal
    sent to the process to any thread that does not block it, and the endpoint thread taking a SIGTERM
    killed the server (exit -15, nothing drained). The thread blocks them all."""
    import signal
    import threading

    server = start_endpoint("127.0.0.1:0", Metrics().registry)
    try:
        (thread,) = [t for t in threading.enumerate() if t.name == "pop3d-metrics"]
        status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
        blocked = int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            assert blocked & (1 << (sig - 1)), sig
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # ours is unchanged
    finally:
        server.shutdown()


# A "supervisor" starts the endpoint, three forked "workers" count into one directory, the endpoint sums
# them over HTTP. Run in a fresh interpreter: it forks.
WORKERS = r"""
import os, sys, urllib.request
from pop3d.ops import metrics
directory = sys.argv[1]
metrics.prepare_directory(directory)
endpoint = metrics.start_endpoint("127.0.0.1:0", metrics.exposition_registry(None, directory))
url = f"http://127.0.0.1:{endpoint.server_port}/metrics"
m = metrics.Metrics(verbs=["STAT"], directory=directory)  # made before the fork, as pop3d.runtime.shared does
pids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        for _ in range(5):
            m.session_opened(); m.login("ok"); m.command("STAT", 0.002)
        m.session_closed(100, 2.0, 1, 1)
        m.flush()
        if len(pids) == 2:  # the last one stays alive until told: its process metrics are served
            os.read(0, 1)
        os._exit(0)
    pids.append(pid)
for p in pids[:2]:
    os.waitpid(p, 0)
print(urllib.request.urlopen(url, timeout=10).read().decode())
print("LIVE", pids[2])
os.close(0)
os.waitpid(pids[2], 0)
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
        input="",  # the live worker's stdin: EOF once the parent closes its own copy
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
    assert "pop3d_messages_retrieved_total 3.0" in before and "pop3d_messages_deleted_total 3.0" in before
    assert "pop3d_session_duration_seconds_count 3.0" in before
    assert "pop3d_build_info{" in before
    live = int(before.split("LIVE ")[1].split()[0])
    assert f'process_cpu_seconds_total{{pid="{live}",role="worker"}}' in before
    assert 'role="supervisor"' in before
    assert "pop3d_sessions_open 8.0" in after  # a dead worker's open sessions no longer count
    assert 'pop3d_logins_total{result="ok"} 15.0' in after  # counters keep what dead workers counted
