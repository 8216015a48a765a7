"""Attacks on authentication: brute force under the failure penalty, user enumeration by timing, very long
passwords, and fake SCRAM parameters that change at restart.

Timing is measured from the client side over loopback against a `python -m pop3d` subprocess, so the
client's own work never shares the server's interpreter. Each attack
succeeded against the server before its fix.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import argon2
import pytest
import scramp  # type: ignore[import-untyped]
from attackkit import Line, Pop3dProcess, apop_stamp, median_ms
from conftest import USERS

from pop3d.auth import schemes

pytestmark = pytest.mark.timeout(90)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# -- brute force under the penalty ------------------------------------------------------------------------------


def send_guess(port: int, how: str, password: str) -> Line:
    """Open a connection and send one guess for alice, without waiting for its answer."""
    c = Line(port)
    if how == "PASS":
        assert c.cmd(b"USER alice").startswith(b"+OK")
        c.send(b"PASS " + password.encode() + b"\r\n")
    else:
        c.send(b"AUTH PLAIN " + b64(b"\0alice\0" + password.encode()) + b"\r\n")
    return c


@pytest.mark.parametrize("how", ["PASS", "AUTH PLAIN"])
def test_parallel_guessing_learns_nothing_from_early_answers(start_server: Any, how: str) -> None:
    """Attack: the penalty only delays *failures*, so guess on a fresh connection each time and give up on
    it after 0.3 s: a late answer means "wrong", an early `+OK` means the guess was right.

    Required: while an address is under penalty every authentication answer to it waits the penalty,
    success included, so no answer comes early.
    """
    srv = start_server(auth={"failure_delay": 2, "failure_delay_max": 4})
    guesses = [f"guess{i}" for i in range(5)] + [USERS["alice"]]
    early: list[tuple[str, bytes]] = []
    for password in guesses:
        c = send_guess(srv.port, how, password)
        with contextlib.suppress(socket.timeout, ConnectionError):
            early.append((password, c.line(timeout=0.3)))
        c.close()
    hits = [pw for pw, line in early if line.startswith(b"+OK")]
    assert not hits, f"the attacker learned the password from an early +OK: {hits}"


def test_closing_connections_neither_cancels_nor_resets_the_penalty(start_server: Any) -> None:
    """Attack: send a wrong password and hang up at once, three times, hoping the penalty is tied to the
    connection; then try the right password.

    Required: closing the connection neither cancels nor resets the penalty: the fourth answer (a success)
    still waits at least what two consecutive failures earn (here 2 x 0.5 s; three earn 2 s).
    """
    srv = start_server(auth={"failure_delay": 0.5, "failure_delay_max": 8})
    for i in range(3):
        send_guess(srv.port, "PASS", f"wrong{i}").close()
        time.sleep(0.1)
    c = Line(srv.port)
    assert c.cmd(b"USER alice").startswith(b"+OK")
    t0 = time.monotonic()
    reply = c.cmd(b"PASS " + USERS["alice"].encode(), timeout=10)
    waited = time.monotonic() - t0
    c.close()
    assert reply.startswith(b"+OK"), reply
    assert waited >= 0.9, f"answered after {waited:.2f} s: the penalty of three failures was lost"


def fail_once(c: Line, how: str) -> bytes:
    if how == "PASS":
        assert c.cmd(b"USER alice").startswith(b"+OK")
        return c.cmd(b"PASS nope")
    return c.cmd(b"AUTH PLAIN " + b64(b"\0alice\0nope"))


def test_connection_closed_after_three_failures_by_default(start_server: Any) -> None:
    """Attack: try password after password on one connection (no reconnect cost at all).

    Required: after `auth.max_failures_per_connection` failures (default 3, USER/PASS and SASL alike) the
    server closes the connection.
    """
    srv = start_server()
    c = Line(srv.port)
    assert fail_once(c, "PASS").startswith(b"-ERR [AUTH]")
    assert fail_once(c, "AUTH PLAIN").startswith(b"-ERR [AUTH]")
    assert c.cmd(b"CAPA").startswith(b"+OK"), "closed before the third failure"
    c.multi()
    assert fail_once(c, "PASS").startswith(b"-ERR [AUTH]")
    assert c.closed_within(2), "still open after three failed logins"
    c.close()


def test_max_failures_per_connection_is_configurable(start_server: Any) -> None:
    """Attack: as above, with the operator's `auth.max_failures_per_connection = 2`."""
    srv = start_server(auth={"max_failures_per_connection": 2})
    c = Line(srv.port)
    assert fail_once(c, "AUTH PLAIN").startswith(b"-ERR [AUTH]")
    assert fail_once(c, "PASS").startswith(b"-ERR [AUTH]")
    assert c.closed_within(2), "still open after two failed logins"
    c.close()


# -- user enumeration by timing -----------------------------------------------------------------------------------

MECHANISMS = ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN"]
UNKNOWN = "nosuchuser"
TRIES = 40


def _low_argon2id(password: str) -> str:
    """An ARGON2ID entry with cheap parameters (t=1, 8 MiB), as another tool may have written it."""
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1, type=argon2.Type.ID)
    return "{ARGON2ID}" + hasher.hash(password)


def _passwd(variant: str) -> str:
    def sha(pw: str) -> str:
        return schemes.hash_password("SHA512-CRYPT", pw)

    if variant == "sha512":  # every account hashed the same way
        return f"alice:{sha(USERS['alice'])}\nbob:{sha(USERS['bob'])}\n"
    if variant == "sha512-among-plain":  # a file in migration: most entries still {PLAIN}
        return f"alice:{sha(USERS['alice'])}\nbob:{{PLAIN}}{USERS['bob']}\ncarol:{{PLAIN}}sea shells\n"
    if variant == "argon2id-low":
        return f"alice:{_low_argon2id(USERS['alice'])}\nbob:{_low_argon2id(USERS['bob'])}\n"
    raise AssertionError(variant)


@pytest.fixture(scope="module")
def timing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Pop3dProcess]]:
    """timing_server(variant) -> a pop3d subprocess over that passwd-file, penalty off; one per variant."""
    started: dict[str, Pop3dProcess] = {}

    def get(variant: str) -> Pop3dProcess:
        if variant not in started:
            root = tmp_path_factory.mktemp(f"timing-{variant}")
            (root / "passwd").write_text(_passwd(variant))
            (root / "mail").mkdir()
            sections: dict[str, dict[str, Any]] = {
                "auth": {"passwd_file": str(root / "passwd"), "failure_delay": 0, "mechanisms": MECHANISMS},
                "storage": {"location": str(root / "mail" / "{user}" / "Maildir")},
            }
            started[variant] = Pop3dProcess(root, sections).start()
        return started[variant]

    yield get
    for p in started.values():
        p.kill()


def _answer(c: Line, data: bytes) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    line = c.cmd(data)
    return time.perf_counter() - t0, line


def try_userpass(port: int, user: str) -> float:
    c = Line(port)
    assert c.cmd(b"USER " + user.encode()).startswith(b"+OK")
    t, line = _answer(c, b"PASS not-the-password")
    c.close()
    assert line.startswith(b"-ERR [AUTH]"), line
    return t


def try_apop(port: int, user: str) -> float:
    c = Line(port)
    digest = hashlib.md5(apop_stamp(c.greeting) + b"not-the-password").hexdigest()
    t, line = _answer(c, f"APOP {user} {digest}".encode())
    c.close()
    assert line.startswith(b"-ERR [AUTH]"), line
    return t


def try_plain(port: int, user: str) -> float:
    c = Line(port)
    t, line = _answer(c, b"AUTH PLAIN " + b64(f"\0{user}\0not-the-password".encode()))
    c.close()
    assert line.startswith(b"-ERR [AUTH]"), line
    return t


def try_cram(port: int, user: str) -> float:
    c = Line(port)
    ch = c.cmd(b"AUTH CRAM-MD5")
    assert ch.startswith(b"+ "), ch
    digest = hmac.new(b"not-the-password", base64.b64decode(ch[2:]), hashlib.md5).hexdigest()
    t, line = _answer(c, b64(f"{user} {digest}".encode()))
    c.close()
    assert line.startswith(b"-ERR [AUTH]"), line
    return t


def try_scram(port: int, user: str) -> float:
    """Server time of both SCRAM steps: client-first -> server-first (the lookup), client-final -> -ERR."""
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, "not-the-password")
    c = Line(port)
    t1, first = _answer(c, b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first().encode()))
    assert first.startswith(b"+ "), first
    client.set_server_first(base64.b64decode(first[2:]).decode())
    final = b64(client.get_client_final().encode())  # the client's PBKDF2, not timed
    t2, line = _answer(c, final)
    c.close()
    assert line.startswith(b"-ERR [AUTH]"), line
    return t1 + t2


TRY: dict[str, Callable[[int, str], float]] = {
    "USER/PASS": try_userpass,
    "APOP": try_apop,
    "PLAIN": try_plain,
    "SCRAM-SHA-256": try_scram,
    "CRAM-MD5": try_cram,
}


def enumeration_gap(port: int, mechanism: str) -> tuple[float, float]:
    """(median ms for an unknown user, median ms for a wrong password of alice), tries interleaved.

    Measured in rounds of 10; stops early only when the medians already differ threefold (far beyond
    the 25 % allowed), so a server that leaks does not cost 40 slow tries per side.
    """
    fn = TRY[mechanism]
    unknown: list[float] = []
    known: list[float] = []
    fn(port, UNKNOWN), fn(port, "alice")  # first use of each path (dummy hash made, pool started)
    while len(known) < TRIES:
        for i in range(10):  # alternate which goes first, so neither side pays for the other's aftermath
            if i % 2:
                known.append(fn(port, "alice"))
                unknown.append(fn(port, UNKNOWN))
            else:
                unknown.append(fn(port, UNKNOWN))
                known.append(fn(port, "alice"))
        a, b = median_ms(unknown), median_ms(known)
        if max(a, b) > 3 * min(a, b) + 1:
            break
    return median_ms(unknown), median_ms(known)


TIMING_CASES = [
    *[pytest.param("sha512", m, id=f"sha512-{m}") for m in TRY],
    *[pytest.param("sha512-among-plain", m, id=f"sha512-among-plain-{m}") for m in TRY],
    *[pytest.param("argon2id-low", m, id=f"argon2id-low-{m}") for m in TRY],
]


@pytest.mark.parametrize(("variant", "mechanism"), TIMING_CASES)
def test_unknown_user_and_wrong_password_take_the_same_time(
    timing_server: Callable[[str], Pop3dProcess], variant: str, mechanism: str
) -> None:
    """Attack: tell which accounts exist by how long a failed login takes (penalty off, as behind a proxy
    that hides addresses): unknown user vs wrong password for alice, whose entry is {SHA512-CRYPT}
    (alone, or among {PLAIN} entries) or a cheap {ARGON2ID}.

    Required: medians of 40 tries within 25 % of each other (plus 0.3 ms for loopback jitter on
    sub-millisecond paths) for USER/PASS, APOP, SASL PLAIN, SCRAM-SHA-256 and CRAM-MD5. The machine may be
    busy with other work, so a gap is measured a second time before it counts: a real leak shows every time.
    """
    srv = timing_server(variant)
    seen = []
    for _ in range(2):
        unknown, known = enumeration_gap(srv.port, mechanism)
        seen.append(f"unknown user {unknown:.2f} ms, wrong password {known:.2f} ms")
        if abs(unknown - known) <= 0.25 * max(unknown, known) + 0.3:
            return
    pytest.fail(f"{mechanism}: " + "; then ".join(seen))


def _plain_two_steps(port: int, user: str, password: bytes) -> tuple[float, bytes]:
    """AUTH PLAIN with the response on its own line (an AUTH command line is limited to 255 octets)."""
    c = Line(port)
    assert c.cmd(b"AUTH PLAIN") == b"+ "
    t, line = _answer(c, b64(b"\0" + user.encode() + b"\0" + password))
    c.close()
    return t, line


def test_very_long_password_is_refused_without_hashing(timing_server: Callable[[str], Pop3dProcess]) -> None:
    """Attack: send 4,000-byte passwords; SHA-crypt's cost grows with the password length, so each try costs
    the server ~25 times a normal check (a cheap CPU exhaustion), and unknown vs known users may differ.

    Required: such a password fails like a wrong password (`-ERR [AUTH]`) without being hashed: answered
    far faster than a real hash of it (under half), for a real user as for an unknown one.
    """
    srv = timing_server("sha512")
    long_pw = b"x" * 4000
    stored = schemes.split_scheme(_entry(srv, "alice"))[1]
    ref = statistics.median(_timed_verify(stored, long_pw.decode()) for _ in range(3)) * 1000
    short = statistics.median(_timed_verify(stored, "wrong") for _ in range(3)) * 1000
    assert ref > 5 * short, f"a 4,000-byte hash ({ref:.1f} ms) is not dearer than a short one ({short:.1f} ms)"
    known: list[float] = []
    unknown: list[float] = []
    for _ in range(10):
        for user, out in (("alice", known), (UNKNOWN, unknown)):
            t, line = _plain_two_steps(srv.port, user, long_pw)
            assert line.startswith(b"-ERR [AUTH]"), line
            out.append(t)
    k, u = median_ms(known), median_ms(unknown)
    assert k < ref / 2, f"alice + 4,000-byte password answered in {k:.1f} ms; hashing it takes {ref:.1f} ms"
    assert u < ref / 2, f"unknown + 4,000-byte password answered in {u:.1f} ms; hashing it takes {ref:.1f} ms"
    assert abs(k - u) <= 0.25 * max(k, u) + 0.3, f"alice {k:.2f} ms, unknown user {u:.2f} ms"


def _entry(srv: Pop3dProcess, user: str) -> str:
    for line in Path(srv.sections["auth"]["passwd_file"]).read_text().splitlines():
        name, _, stored = line.partition(":")
        if name == user:
            return stored.split(":", 1)[0]
    raise AssertionError(f"{user} not in the passwd-file")


def _timed_verify(stored: str, password: str) -> float:
    t0 = time.perf_counter()
    assert not schemes.verify("SHA512-CRYPT", stored, password)
    return time.perf_counter() - t0


# -- fake SCRAM parameters ---------------------------------------------------------------------------------------

_SALT = re.compile(r"(?:^|,)s=([^,]+)")
_ITER = re.compile(r"(?:^|,)i=([0-9]+)")


def scram_params(port: int, user: str) -> tuple[str, str]:
    """(salt, iterations) the server offers `user` in its server-first message."""
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, "whatever")
    c = Line(port)
    first = c.cmd(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first().encode()))
    c.cmd(b"*")
    c.close()
    assert first.startswith(b"+ "), first
    text = base64.b64decode(first[2:]).decode()
    s, i = _SALT.search(text), _ITER.search(text)
    assert s and i, text
    return s.group(1), i.group(1)


def test_fake_scram_salt_is_stable_across_restart(tmp_path: Path) -> None:
    """Attack: ask for SCRAM parameters of a name, restart-watch (or wait for a deploy), ask again: a real
    user's stored salt never changes, a made-up one that changes at restart reveals an unknown user.

    Required: fake salts and iteration counts for an unknown user are stable across a restart of the server
    with the same `server.state_dir`, and differ between names.
    """
    (tmp_path / "passwd").write_text(f"alice:{{PLAIN}}{USERS['alice']}\n")
    (tmp_path / "mail").mkdir()
    sections: dict[str, dict[str, Any]] = {
        "server": {"state_dir": str(tmp_path / "state")},
        "auth": {"passwd_file": str(tmp_path / "passwd"), "failure_delay": 0, "mechanisms": MECHANISMS},
        "storage": {"location": str(tmp_path / "mail" / "{user}" / "Maildir")},
    }
    os.makedirs(tmp_path / "state", exist_ok=True)
    first = Pop3dProcess(tmp_path, sections, name="first").start()
    try:
        ghost = scram_params(first.port, "ghost")
        assert scram_params(first.port, "ghost") == ghost
        phantom = scram_params(first.port, "phantom")
    finally:
        first.terminate()
    assert phantom[0] != ghost[0], "every unknown user gets the same salt: that alone marks them unknown"
    second = Pop3dProcess(tmp_path, sections, name="second").start()
    try:
        assert scram_params(second.port, "ghost") == ghost, "the fake salt of 'ghost' changed at restart"
        assert scram_params(second.port, "phantom") == phantom
    finally:
        second.kill()
