"""The brute-force penalty and the LOGIN-DELAY history survive a restart, kept under server.state_dir;
hostile or corrupt state files are ignored with a warning, never a failed start."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import struct
from pathlib import Path

import pytest
from conftest import USERS, Raw
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import free_port, start, write_config

from pop3d.auth.login_delay import SharedLoginDelays
from pop3d.auth.penalty import MAX_DUMP_SIZE, SharedPenalty, SharedTable
from pop3d.runtime import shared as shared_mod
from pop3d.runtime.shared import PENALTY_FILE, load_penalty, share_between_workers

WALL, MONO = 1_800_000_000.0, 5_000.0


def test_table_round_trip_across_a_reboot() -> None:
    table = SharedTable(slots=64)  # one address per table: two could share a slot (the older is replaced)
    p = SharedPenalty(2.0, 15.0, table)
    for _ in range(3):
        p.fail("192.0.2.1", MONO - 10)  # ten seconds before the dump
    data = table.dump(WALL, MONO)
    after = SharedTable(slots=128)  # another size: entries are placed again
    # one minute later, after a reboot: the monotonic clock started again near zero
    assert after.restore(data, WALL + 60, 30.0) == 1
    q = SharedPenalty(2.0, 15.0, after)
    assert q.failures("192.0.2.1", 30.0) == 3
    # an hour after the last failure it is forgotten, as without a restart
    assert q.failures("192.0.2.1", 30.0 + 3600) == 0
    assert q.fail("192.0.2.1", 30.0) == 15.0  # the fourth consecutive failure: 2, 4, 8, then 15 (capped)
    idle = SharedTable(slots=64)
    SharedPenalty(2.0, 15.0, idle).fail("2001:db8::1", MONO - 7200)  # idle two hours at the dump
    assert SharedTable(slots=64).restore(idle.dump(WALL, MONO), WALL + 60, 30.0) == 0  # forgotten


def test_restore_with_the_clock_set_back_counts_as_now() -> None:
    table = SharedTable(slots=16)
    SharedPenalty(1, 8, table).fail("192.0.2.5", MONO)
    after = SharedTable(slots=16)
    assert after.restore(table.dump(WALL, MONO), WALL - 86400, 10.0) == 1
    assert SharedPenalty(1, 8, after).failures("192.0.2.5", 10.0) == 1


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"pop3d-penalty 1\n",
        b"pop3d-penalty 2\n" + bytes(40),
        b"pop3d-penalty 1\n" + struct.pack("<16sIdd", bytes(16), 4, WALL, MONO) + bytes(4 * 24 - 1),
        b"pop3d-penalty 1\n" + struct.pack("<16sIdd", bytes(16), 0, WALL, MONO),
        b"pop3d-penalty 1\n" + struct.pack("<16sIdd", bytes(16), 2**31, WALL, MONO),
        b"pop3d-penalty 1\n" + struct.pack("<16sIdd", bytes(16), 1, float("nan"), MONO) + bytes(24),
    ],
)
def test_restore_refuses_what_is_not_a_dump(data: bytes) -> None:
    with pytest.raises(ValueError):
        SharedTable(slots=8).restore(data, WALL, MONO)


@given(st.binary(max_size=200), st.integers(1, 8))
@settings(max_examples=200, deadline=None)
def test_restore_never_crashes(tail: bytes, slots: int) -> None:
    head = b"pop3d-penalty 1\n" + struct.pack("<16sIdd", bytes(16), slots, WALL, MONO)
    for data in (tail, head + tail):
        with contextlib.suppress(ValueError):
            SharedTable(slots=8).restore(data, WALL, MONO)


def _penalty_file(env) -> Path:  # type: ignore[no-untyped-def]
    return env.settings().server.state_dir / PENALTY_FILE


def test_rebuilt_share_keeps_penalty_and_login_delay(env) -> None:  # type: ignore[no-untyped-def]
    settings_ = env.settings(auth={"failure_delay": 2.0, "failure_delay_max": 15.0}, session={"login_delay": 300})
    share = share_between_workers(settings_)
    import time

    now = time.monotonic()
    try:
        share.state.penalty.fail("198.51.100.20", now)
        share.state.penalty.fail("198.51.100.20", now)
        share.state.login_delays.record("alice", 300, time.time())
    finally:
        share.remove()  # the supervisor's exit: the table is saved
    path = _penalty_file(env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.joinpath("login-delay").stat().st_mode) == 0o700
    again = share_between_workers(settings_)
    try:
        assert again.state.penalty.failures("198.51.100.20", time.monotonic()) == 2
        assert again.state.penalty.delay("198.51.100.20", time.monotonic()) == 8.0
        assert again.state.login_delays.too_soon("alice", 300, time.time())
    finally:
        again.remove()


def test_periodic_save(env) -> None:  # type: ignore[no-untyped-def]
    share = share_between_workers(env.settings())
    try:
        assert share.keeper is not None
        share.keeper.last = -1e9  # long ago: the next tick saves
        share.state.penalty.fail("198.51.100.21", 1.0)
        share.tick()
        assert _penalty_file(env).exists()
        before = _penalty_file(env).stat().st_mtime_ns
        share.tick()  # not due again yet
        assert _penalty_file(env).stat().st_mtime_ns == before
    finally:
        share.remove()


def test_corrupt_penalty_file_is_ignored(env, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    path = _penalty_file(env)
    path.parent.mkdir(mode=0o700, parents=True)
    path.write_bytes(b"garbage")
    share = share_between_workers(env.settings())
    share.remove()
    assert "ignored" in caplog.text
    assert path.read_bytes().startswith(b"pop3d-penalty 1\n")  # replaced by a good one at exit


def test_penalty_file_hostile_forms_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = SharedTable(slots=8)
    SharedPenalty(1, 8, table).fail("192.0.2.9", 1e9)
    good = table.dump(1e9, 1e9)
    target = tmp_path / "elsewhere"
    target.write_bytes(good)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert load_penalty(SharedTable(), link, 3600) == 0  # a link is not followed
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert load_penalty(SharedTable(), fifo, 3600) == 0  # no blocking open
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(MAX_DUMP_SIZE + 1)
    assert load_penalty(SharedTable(), big, 3600) == 0  # never read
    loose = tmp_path / "loose"
    loose.write_bytes(good)
    loose.chmod(0o644)
    load_penalty(SharedTable(), loose, 3600)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.write_bytes(good)
        os.chown(foreign, 65534, 65534)
        assert load_penalty(SharedTable(), foreign, 3600) == 0  # someone else's file
    assert caplog.text.count("ignored") >= 3


def test_unusable_state_dir_falls_back(env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    share = share_between_workers(env.settings(server={"state_dir": str(blocker)}))
    try:
        assert share.own_login_delay_dir and share.keeper is not None and share.keeper.path is None
    finally:
        share.remove()
    assert not os.path.exists(share.login_delay_dir)  # a temporary directory, removed at exit
    assert "will not survive a restart" in caplog.text


def test_login_delay_dir_that_is_a_link_is_refused(env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    state = env.settings().server.state_dir
    state.mkdir(mode=0o700)
    (tmp_path / "victim").mkdir()
    (state / "login-delay").symlink_to(tmp_path / "victim")
    share = share_between_workers(env.settings())
    try:
        assert share.own_login_delay_dir and share.login_delay_dir != str(state / "login-delay")
    finally:
        share.remove()
    assert "LOGIN-DELAY directory" in caplog.text


def test_prune_keeps_only_recent_records(tmp_path: Path) -> None:
    store = SharedLoginDelays(str(tmp_path))
    store.record("old", 60, 1000.0)
    store.record("new", 60, 1990.0)
    (tmp_path / "planted").write_text("x")
    (tmp_path / "a-dir").mkdir()
    assert store.prune(60, 2000.0) == 2  # "old" and the foreign file
    assert store.too_soon("new", 60, 2000.0) and not store.too_soon("old", 60, 2000.0)
    assert (tmp_path / "a-dir").is_dir()


# ---- a real restart ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_restart_keeps_login_delay_and_penalty(env, workers: int) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    state = env.root / "state"
    cfg = write_config(env, port)
    cfg.write_text(
        cfg.read_text().replace("[server]\n", f'[server]\nworkers = {workers}\nstate_dir = "{state}"\n', 1)
        + "[session]\nlogin_delay = 3600\n"
    )

    def session(password: str) -> bytes:
        c = Raw(port)
        try:
            assert c.cmd(b"USER alice").startswith(b"+OK")
            reply = c.cmd(b"PASS " + password.encode())
            c.cmd(b"QUIT")
            return reply
        finally:
            c.close()

    proc = start(cfg, port)
    try:
        assert session(USERS["alice"]).startswith(b"+OK")
        for _ in range(2):
            assert session("wrong").startswith(b"-ERR [AUTH]")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    table = SharedTable()
    import time

    assert load_penalty(table, state / PENALTY_FILE, 3600) == 1
    assert SharedPenalty(0, 0, table).failures("127.0.0.1", time.monotonic()) == 2
    proc = start(cfg, port)
    try:
        assert session(USERS["alice"]).startswith(b"-ERR [LOGIN-DELAY]")  # RFC 2449 §8.1.2, across the restart
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert shared_mod.LOGIN_DELAY_DIR in os.listdir(state)
