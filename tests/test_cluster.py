"""Two pop3d nodes behind a real HAProxy (PROXY v2), on one throwaway PostgreSQL database, with LMTP.

What docs/CLUSTER.md promises, performed: logins through HAProxy land on both nodes; a session on one node
makes a login on the other answer [IN-USE]; kill -9 of a node in the middle of a session deletes nothing and
frees the maildrop for the other node within seconds; LMTP deliveries racing DELE/QUIT sessions on both nodes
lose, duplicate and resurrect nothing (every message is counted).

Each node names itself in its greeting (`server.hostname`), so the test knows which one answered.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from attackkit import Pop3dProcess, free_port
from tooling import needs_tool, which

HAPROXY = which("haproxy")
ROOT = Path(__file__).resolve().parent.parent
USERS = {"ann": "ann-secret-1", "ben": "ben-secret-2", "cat": "cat-secret-3"}


@dataclass
class Node:
    name: str
    proc: Pop3dProcess
    lmtp: int

    @property
    def port(self) -> int:
        return self.proc.port


@dataclass
class Cluster:
    nodes: list[Node]
    front: int  # HAProxy's POP3 port
    haproxy: subprocess.Popen[bytes]
    dsn: str
    config: Path
    seen: list[str] = field(default_factory=list)


def _pop3d(*args: str, config: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pop3d", *args, "--config", str(config)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


def _wait_port(port: int, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < end, f"nothing listens on {port}"
            time.sleep(0.05)


@pytest.fixture
def cluster(pg_dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    config = tmp_path / "admin.toml"
    config.write_text(f'[storage]\ndriver = "postgres"\ndsn = "{pg_dsn}"\n[auth]\ndriver = "postgres"\n')
    done = _pop3d("db", "init", config=config)
    assert done.returncode == 0, done.stderr
    for name, password in USERS.items():
        done = _pop3d("user", "add", name, "--scheme", "PLAIN", "--password-stdin", config=config, stdin=password)
        assert done.returncode == 0, done.stderr
    nodes: list[Node] = []
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        for name in ("node-a", "node-b"):
            (tmp_path / name).mkdir()
            lmtp = free_port()
            proc = Pop3dProcess(tmp_path / name, {
                "server": {"workers": 2, "hostname": f"{name}.test", "proxy_protocol": True,
                           "proxy_trusted": ["127.0.0.1/32"], "state_dir": str(tmp_path / name)},
                "storage": {"driver": "postgres", "dsn": pg_dsn, "pool_size": 3},
                "auth": {"driver": "postgres", "failure_delay": 0},
                "lmtp": {"listen": [f"127.0.0.1:{lmtp}"]},
            }, name=name)  # fmt: skip
            proc.start()
            _wait_port(lmtp)
            nodes.append(Node(name, proc, lmtp))
        front = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"""
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend pop3
    bind 127.0.0.1:{front}
    default_backend nodes
backend nodes
    balance roundrobin
    server a 127.0.0.1:{nodes[0].port} send-proxy-v2
    server b 127.0.0.1:{nodes[1].port} send-proxy-v2
""")
        haproxy = subprocess.Popen([str(HAPROXY), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)  # fmt: skip
        _wait_port(front)
        yield Cluster(nodes, front, haproxy, pg_dsn, config)
    finally:
        if haproxy is not None:
            haproxy.kill()
            haproxy.wait()
        for node in nodes:
            if node.proc.alive():
                node.proc.terminate()


class Client(poplib.POP3):
    """A POP3 client that may first send a PROXY v1 header (a trusted peer talking to a node directly, as
    HAProxy would), and that remembers which node greeted it."""

    def __init__(self, port: int, *, proxy: bool) -> None:
        self._proxy = proxy
        super().__init__("127.0.0.1", port, timeout=30)
        self.node = re.search(rb"@([\w-]+)\.test>", self.welcome).group(1).decode()  # type: ignore[union-attr]

    def _create_socket(self, timeout: float) -> socket.socket:  # type: ignore[override]
        sock = socket.create_connection((self.host, self.port), timeout)
        if self._proxy:
            sock.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 110\r\n")
        return sock


def via_haproxy(c: Cluster) -> Client:
    return Client(c.front, proxy=False)


def direct(node: Node) -> Client:
    return Client(node.port, proxy=True)


def login(client: Client, user: str) -> Client:
    client.user(user)
    client.pass_(USERS[user])
    return client


def deliver(node: Node, user: str, body: bytes) -> None:
    with smtplib.LMTP("127.0.0.1", node.lmtp, timeout=30) as lmtp:
        lmtp.sendmail("sender@example.org", [f"{user}@example.org"], body)


def seq_of(client: Client, number: int) -> int:
    """The X-Seq header of message `number` (TOP n 0: the headers only)."""
    for line in client.top(number, 0)[1]:
        if line.startswith(b"X-Seq: "):
            return int(line[7:])
    raise AssertionError(f"message {number} has no X-Seq")


@needs_tool("haproxy", "haproxy")
def test_logins_land_on_both_nodes_and_in_use_holds_across_them(cluster: Cluster) -> None:
    seen = set()
    for _ in range(6):
        client = login(via_haproxy(cluster), "ann")
        seen.add(client.node)
        assert client.stat() == (0, 0)
        client.quit()
    assert seen == {"node-a", "node-b"}  # round robin through HAProxy, each node answering for the same user

    a, b = cluster.nodes
    holder = login(direct(a), "ann")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(direct(b), "ann")  # RFC 1939 §8 lock, held in PostgreSQL for the whole cluster
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(direct(a), "ann")  # and on its own node
    for _ in range(2):  # through HAProxy too, whichever node it picks
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            login(via_haproxy(cluster), "ann")
    holder.quit()
    login(direct(b), "ann").quit()  # released at QUIT


@needs_tool("haproxy", "haproxy")
def test_kill_9_of_a_node_mid_session_loses_nothing_and_frees_the_user(cluster: Cluster) -> None:
    a, b = cluster.nodes
    for n in range(3):
        deliver(b, "ben", b"Subject: %d\r\nX-Seq: %d\r\n\r\nbody %d\r\n" % (n, n, n))
    client = login(direct(a), "ben")
    assert client.stat()[0] == 3
    client.dele(1)
    client.retr(2)
    os.killpg(a.proc.pid, signal.SIGKILL)  # the supervisor and its workers, like a power cut of the process
    a.proc.proc.wait(10)  # type: ignore[union-attr]
    with contextlib.suppress(OSError):
        client.sock.close()

    deadline = time.monotonic() + 15
    while True:
        try:
            again = login(direct(b), "ben")
            break
        except poplib.error_proto as exc:
            assert b"IN-USE" in exc.args[0] and time.monotonic() < deadline, exc
            time.sleep(0.2)
    assert again.stat()[0] == 3  # the DELE of the dead session was never committed
    assert sorted(seq_of(again, n) for n in (1, 2, 3)) == [0, 1, 2]
    again.quit()


@needs_tool("haproxy", "haproxy")
def test_lmtp_racing_dele_quit_on_both_nodes_loses_duplicates_and_resurrects_nothing(cluster: Cluster) -> None:
    nodes = cluster.nodes
    per_deliverer, deliverers = 25, 2
    delivered: list[int] = []
    deleted: list[int] = []  # seqs whose DELE was committed by a QUIT that answered +OK
    seen_after_delete: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def deliverer(k: int) -> None:
        try:
            for i in range(per_deliverer):
                seq = k * 1000 + i
                deliver(nodes[(k + i) % 2], "cat", b"Subject: race\r\nX-Seq: %d\r\n\r\nrace %d\r\n" % (seq, seq))
                with lock:
                    delivered.append(seq)
        except BaseException as exc:
            errors.append(exc)

    def session(node: Node) -> None:
        """Log in (retrying [IN-USE]), read every message's seq, delete them all, QUIT."""
        try:
            client = login(direct(node), "cat")
        except poplib.error_proto as exc:
            if b"IN-USE" in exc.args[0]:
                return
            raise
        count = client.stat()[0]
        seqs = [seq_of(client, n) for n in range(1, count + 1)]
        assert len(set(seqs)) == len(seqs), f"a message twice in one maildrop: {seqs}"
        uidls = [line.split()[1] for line in client.uidl()[1]]
        assert len(set(uidls)) == len(uidls)
        with lock:
            seen_after_delete.extend(s for s in seqs if s in deleted)
        for n in range(1, count + 1):
            client.dele(n)
        client.quit()  # raises on -ERR: then nothing counts as deleted
        with lock:
            deleted.extend(seqs)

    def reader(k: int) -> None:
        try:
            while not stop.is_set():
                session(nodes[k % 2])
                k += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliverer, args=(k,)) for k in range(deliverers)]
    readers = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    for t in threads + readers:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    for t in readers:
        t.join(60)
    assert not errors, errors
    session(nodes[0])  # what is left after the race
    assert len(delivered) == per_deliverer * deliverers
    assert sorted(deleted) == sorted(delivered)  # nothing lost, nothing deleted twice
    assert seen_after_delete == []  # nothing deleted came back
    final = login(direct(nodes[1]), "cat")
    assert final.stat() == (0, 0)
    final.quit()
