"""SIGHUP reload: which keys apply live, which wait for a restart, sessions kept, bad configs change nothing."""

from __future__ import annotations

import logging
from typing import Any

from conftest import Raw

from pop3d.config import ConfigError, Settings
from pop3d.runtime.reload import plan, reload


def test_plan_splits_live_and_restart(env):
    old = env.settings()
    new = env.settings(
        server={"listen": ["127.0.0.1:2"], "backlog": 7, "proxy_protocol": True},
        session={"login_delay": 30},
        log={"level": "DEBUG"},
        storage={"mark_seen": False},
        metrics={"listen": "127.0.0.1:9"},
    )
    p = plan(old, new)
    assert sorted(p.live) == ["log.level", "server.proxy_protocol", "session.login_delay", "storage.mark_seen"]
    assert sorted(p.restart) == ["metrics.listen", "server.backlog", "server.listen"]
    # what needs a restart keeps its running value, so ctx.settings tells what is in effect
    assert p.settings.server.listen == old.server.listen and p.settings.server.backlog == old.server.backlog
    assert p.settings.metrics.listen is None
    assert p.settings.server.proxy_protocol is True and p.settings.session.login_delay == 30


def test_plan_no_change(env):
    p = plan(env.settings(), env.settings())
    assert p.live == [] and p.restart == []


def _reload(st: Any, load: Any) -> Any:
    async def go() -> Any:
        return reload(st.ctx, load)

    return st.call(go())


def test_live_reload_keeps_sessions_and_applies(start_server, env, caplog):
    caplog.set_level(logging.INFO, logger="pop3d")
    st = start_server()
    old = Raw(st.port)
    assert old.cmd(b"USER alice").startswith(b"+OK")
    assert old.cmd(b"PASS wonderland").startswith(b"+OK")

    users2 = env.root / "passwd2"
    users2.write_text("carol:{PLAIN}c4rol\n")
    new: Settings = env.settings(
        auth={"passwd_file": str(users2)},
        session={"login_delay": 0, "max_bad_commands": 2},
        server={"listen": ["127.0.0.1:1"]},
    )
    p = _reload(st, lambda: new)
    assert p is not None and "auth.passwd_file" in p.live and p.restart == ["server.listen"]
    assert "needs a restart to take effect: server.listen" in caplog.text

    assert old.cmd(b"STAT").startswith(b"+OK")  # the running session is untouched
    c = Raw(st.port)
    assert c.cmd(b"USER carol").startswith(b"+OK") and c.cmd(b"PASS c4rol").startswith(b"+OK carol")
    d = Raw(st.port)  # alice is gone from the new user database
    assert d.cmd(b"USER alice").startswith(b"+OK") and d.cmd(b"PASS wonderland").startswith(b"-ERR [AUTH]")
    # a new limit applies to new commands: two bad ones now close the connection
    d.cmd(b"BOGUS")
    assert d.cmd(b"BOGUS").startswith(b"-ERR")
    assert d.line().startswith(b"-ERR too many bad commands")
    for r in (old, c, d):
        r.close()


def test_bad_config_changes_nothing(start_server, env, caplog):
    caplog.set_level(logging.INFO, logger="pop3d")
    st = start_server()
    before = st.ctx.settings

    def broken() -> Settings:
        raise ConfigError("session.timeout: Input should be greater than or equal to 600")

    assert _reload(st, broken) is None
    assert st.ctx.settings is before
    assert "reload failed, configuration unchanged: session.timeout" in caplog.text

    missing = env.settings(auth={"passwd_file": str(env.root / "nope")})
    assert _reload(st, lambda: missing) is None
    assert st.ctx.settings is before and "cannot read" in caplog.text

    def refuse(old: Settings, new: Settings) -> None:
        raise ValueError("certificate does not match key")

    st.ctx.reload_hooks.append(refuse)
    assert _reload(st, lambda: env.settings(session={"login_delay": 5})) is None
    assert st.ctx.settings is before and "certificate does not match key" in caplog.text


def test_proxy_protocol_switches_live(start_server, env):
    import socket

    from pop3d.net.proxy import encode_v1

    st = start_server()
    before = Raw(st.port)  # a session from before the switch is not asked for a header
    assert before.greeting.startswith(b"+OK")
    p = _reload(st, lambda: env.settings(server={"proxy_protocol": True}))
    assert p is not None and p.live == ["server.proxy_protocol"]
    s = socket.create_connection(("127.0.0.1", st.port), timeout=10)
    s.sendall(encode_v1(("198.51.100.9", 1), ("127.0.0.1", st.port)))
    assert s.makefile("rb").readline().startswith(b"+OK pop3d ready")
    assert "198.51.100.9" in {x.handler.peer for x in st.ctx.sessions}
    assert before.cmd(b"NOOP").startswith(b"-ERR")  # still alive (NOOP is not legal before login)
    s.close()
    before.close()


def test_plan_tls_on_off_needs_restart_but_new_files_are_live(env, tmp_path):
    from tls_helpers import Pki

    a, b = Pki.make(tmp_path, "a"), Pki.make(tmp_path, "b")
    off = env.settings()
    on_a = env.settings(tls=a.tls_section())
    on_b = env.settings(tls=b.tls_section(), server={"tls_listen": ["127.0.0.1:0"]})
    assert sorted(plan(off, on_a).restart) == ["tls.cert", "tls.key"]
    p = plan(on_a, on_b)
    assert sorted(p.live) == ["tls.cert", "tls.key"] and p.restart == ["server.tls_listen"]


def test_bad_certificate_on_reload_changes_nothing(start_server, env, tmp_path, caplog):
    from tls_helpers import Pki

    caplog.set_level(logging.INFO)
    pki = Pki.make(tmp_path)
    st = start_server(tls=pki.tls_section())
    before, context = st.ctx.settings, st.ctx.tls.current
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate\n")
    assert (
        _reload(st, lambda: env.settings(tls={"cert": str(broken), "key": str(broken)}, session={"login_delay": 9}))
        is None
    )
    assert st.ctx.settings is before and st.ctx.tls.current is context
    assert st.ctx.tls.settings.cert == pki.server_pem
    assert "TLS reload failed" in caplog.text and "reload failed, configuration unchanged: tls" in caplog.text
    fresh = Pki.make(tmp_path, "fresh")
    p = _reload(st, lambda: env.settings(tls=fresh.tls_section()))
    assert p is not None and st.ctx.tls.current is not context and st.ctx.tls.settings.cert == fresh.server_pem


# --- supervisor and workers: READY=1 after every worker has reloaded (pop3d.runtime.reload_rounds) ---------


def test_a_worker_answers_the_round_asked_before_it_read_the_configuration():
    from pop3d.runtime.reload_rounds import ReloadRounds

    rounds = ReloadRounds(2)
    ack = rounds.for_slot(1)
    first = rounds.ask()
    with ack.answering():
        second = rounds.ask()  # asked while this worker was reading: its SIGHUP is still to come
    assert rounds.finished(1) == first < second
    assert rounds.behind({100: 0, 101: 1}, second) == [(0, 100), (1, 101)]
    try:
        with ack.answering():  # the next reload answers the latest round asked, and is refused
            raise ConfigError("does not load")
    except ConfigError:
        pass
    assert rounds.finished(1) == second  # a refused reload has finished all the same
    assert rounds.behind({100: 0, 101: 1}, second) == [(0, 100)]


def test_waiting_for_workers_ends_when_all_finished_or_at_the_timeout():
    from pop3d.runtime.reload_rounds import ReloadRounds, wait_for_workers

    rounds = ReloadRounds(2)
    now = [0.0]
    pids = {100: 0, 101: 1}
    looks: list[float] = []

    def idle() -> bool:  # the supervisor's turn between looks: here worker 0 finishes after 3 looks
        looks.append(now[0])
        if len(looks) == 3:
            rounds.finish(0, round_)
        return False

    def sleep(seconds: float) -> None:
        now[0] += seconds

    round_ = rounds.ask()
    late = wait_for_workers(rounds, round_, lambda: pids, 1.0, idle, clock=lambda: now[0], sleep=sleep)
    assert late == [(1, 101)] and now[0] >= 1.0  # worker 1 never answered: named, and no wait past the timeout
    assert len(looks) > 3

    del pids[101]  # a worker that died is no longer waited for; its replacement starts at the current round
    pids[102] = 1
    rounds.finish(1, rounds.asked())
    start = now[0]
    assert wait_for_workers(rounds, round_, lambda: pids, 1.0, idle, clock=lambda: now[0], sleep=sleep) == []
    assert now[0] == start  # nobody behind: no wait at all

    round_ = rounds.ask()  # a stop pending: the wait ends at the next look, naming who is behind
    assert wait_for_workers(rounds, round_, lambda: pids, 30.0, lambda: True, clock=lambda: now[0], sleep=sleep) == [
        (0, 100),
        (1, 102),
    ]
    assert now[0] == start
