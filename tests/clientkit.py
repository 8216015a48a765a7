"""Helpers for the real-client interoperability tests (tests/test_clients.py).

Each client delivers what it fetched into a directory through a tiny MDA script, one file per message;
the tests compare those files with the maildrop, message by message. Clients deliver with LF line ends,
so the expected form is the network form (what RETR sent, unstuffed) with CRLF turned into LF.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

from tooling import require_tool

from pop3d import wire

#: The edge cases a POP3 server must carry intact: dots at line starts, no final newline,
#: stored CRLF, 8-bit bytes, a 5,000-octet line, and messages large enough to be streamed in slices.
EDGE_MESSAGES: list[bytes] = [
    b"From: a@example.org\nTo: alice@example.org\nSubject: plain\nMessage-ID: <1@test>\n\nHello.\n",
    b"From: a@example.org\nSubject: dots\nMessage-ID: <2@test>\n\n.one dot\n..two dots\n.\nx.\n...\nend\n",
    b"From: a@example.org\nSubject: no final newline\nMessage-ID: <3@test>\n\nlast line has no newline",
    b"From: a@example.org\r\nSubject: stored CRLF\r\nMessage-ID: <4@test>\r\n\r\nline one\r\nline two\r\n",
    "From: a@example.org\nSubject: 8-bit\nMessage-ID: <5@test>\nContent-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: 8bit\n\nGrüße, café, naïve, 日本語\n".encode()
    + b"raw latin-1 \xe9\xff\n",
    b"From: a@example.org\nSubject: long line\nMessage-ID: <6@test>\n\n" + b"L" * 5000 + b"\nafter\n",
    b"From: a@example.org\nSubject: long message\nMessage-ID: <7@test>\n\n"
    + b"".join(b".%06d line of a long message that is streamed in slices\n" % i for i in range(6000)),
]


def expected_lf(raw: bytes) -> bytes:
    """What a client that stores LF line ends should have delivered for stored message `raw`."""
    return wire.to_network(raw).replace(b"\r\n", b"\n")


#: Debian package of each client program, where the names differ
CLIENT_PACKAGES = {"getmail": "getmail6"}


def need(program: str) -> str:
    """Path of a client program. Missing: fail under CI (it installs them), skip loudly elsewhere."""
    return require_tool(program, CLIENT_PACKAGES.get(program, program))


def run(
    cmd: list[str],
    *,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a client, bounded in time; on failure show everything it said."""
    proc = subprocess.run(
        cmd,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input if input is not None else b"",
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd[0]} exited {proc.returncode}\nstdout:\n{proc.stdout.decode(errors='replace')}\n"
            f"stderr:\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


class Inbox:
    """A directory a client delivers into through `mda` (one numbered file per message, in order)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "inbox"
        self.dir.mkdir(parents=True)
        self.mda = root / "mda.sh"
        self.mda.write_text(
            textwrap.dedent(f"""\
            #!/bin/sh
            n=$(ls '{self.dir}' | wc -l)
            exec cat > '{self.dir}'/$(printf '%05d' "$n")
        """)
        )
        self.mda.chmod(0o755)

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.iterdir())]

    def clear(self) -> None:
        for p in self.dir.iterdir():
            p.unlink()


def strip_added_headers(msg: bytes, names: tuple[bytes, ...]) -> bytes:
    """Drop header lines a client prepends (documented client behaviour, not server output)."""
    while True:
        head = msg.split(b"\n", 1)[0]
        if any(head.lower().startswith(n.lower() + b":") for n in names):
            msg = msg.split(b"\n", 1)[1]
        else:
            return msg


def assert_same(delivered: list[bytes], stored: list[bytes], added: tuple[bytes, ...] = ()) -> None:
    """Every stored message delivered once, in order, byte for byte (LF form)."""
    got = [strip_added_headers(m, added) for m in delivered]
    assert len(got) == len(stored), f"{len(got)} delivered, {len(stored)} in the maildrop"
    for i, (g, raw) in enumerate(zip(got, stored, strict=True), 1):
        want = expected_lf(raw)
        assert g == want, f"message {i} differs: got {g[:200]!r}... want {want[:200]!r}..."
