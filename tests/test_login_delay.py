"""LOGIN-DELAY bookkeeping (RFC 2449 §6.5), private and shared between worker processes."""

from __future__ import annotations

import pytest

from pop3d.auth.login_delay import LoginDelays, SharedLoginDelays


@pytest.fixture(params=["private", "shared"])
def delays(request, tmp_path):
    return LoginDelays() if request.param == "private" else SharedLoginDelays(str(tmp_path))


def test_delay_per_user(delays):
    now = 1_800_000_000.0
    assert not delays.too_soon("alice", 300, now)
    delays.record("alice", 300, now)
    assert delays.too_soon("alice", 300, now + 299)
    assert not delays.too_soon("alice", 300, now + 300)
    assert not delays.too_soon("bob", 300, now + 1)  # per user
    assert not delays.too_soon("alice", 0, now + 1)  # 0 disables


def test_nothing_recorded_when_disabled(delays):
    delays.record("alice", 0, 1_800_000_000.0)
    assert not delays.too_soon("alice", 300, 1_800_000_001.0)


def test_shared_directory_is_seen_by_another_process_view(tmp_path):
    a, b = SharedLoginDelays(str(tmp_path)), SharedLoginDelays(str(tmp_path))
    a.record("user/with:odd\u00e9chars", 60, 1_800_000_000.0)
    assert b.too_soon("user/with:odd\u00e9chars", 60, 1_800_000_030.0)
    assert len(list(tmp_path.iterdir())) == 1


def test_shared_directory_gone_fails_open(tmp_path):
    d = SharedLoginDelays(str(tmp_path / "missing"))
    d.record("alice", 60, 1_800_000_000.0)  # no exception
    assert not d.too_soon("alice", 60, 1_800_000_001.0)


def test_context_keeps_its_own_unless_handed_a_shared_store(env, tmp_path):
    """The store comes in through the context's constructor; no environment variable decides."""
    from pop3d.pop3.context import SharedState, process_local
    from pop3d.runtime.server import build_context

    settings = env.settings()
    assert isinstance(build_context(settings).login_delays, LoginDelays)
    shared = SharedLoginDelays(str(tmp_path))
    state = SharedState(process_local(settings).penalty, shared, process_local(settings).metrics)
    assert build_context(settings, state).login_delays is shared


def test_supervisor_share_is_one_directory(env):
    from pop3d.runtime.shared import share_between_workers

    share = share_between_workers(env.settings())
    try:
        store = share.state.login_delays
        assert isinstance(store, SharedLoginDelays) and store.directory == share.login_delay_dir
        store.record("alice", 60, 1_800_000_000.0)
        assert SharedLoginDelays(share.login_delay_dir).too_soon("alice", 60, 1_800_000_001.0)
    finally:
        share.remove()
    # kept under server.state_dir: the history survives the server (tests/test_state_persistence.py)
    assert share.login_delay_dir == str(env.settings().server.state_dir / "login-delay")
    assert SharedLoginDelays(share.login_delay_dir).too_soon("alice", 60, 1_800_000_001.0)
