"""The brute-force penalty shared by worker processes (pop3d.auth.penalty.SharedPenalty)."""

from __future__ import annotations

import os

from pop3d.auth.penalty import Penalty, SharedPenalty, SharedTable


def test_shared_penalty_behaves_like_the_private_one():
    shared = SharedPenalty(2.0, 15.0, SharedTable(slots=64))
    private = Penalty(2.0, 15.0)
    for p in (shared, private):
        assert [p.fail("192.0.2.1", 0.0) for _ in range(6)] == [2, 4, 8, 15, 15, 15]
        assert p.fail("192.0.2.2", 0.0) == 2  # per address
        p.succeed("192.0.2.1")
        assert p.fail("192.0.2.1", 1.0) == 2
        assert p.failures("192.0.2.1", 1.0 + 7200) == 0  # forgotten after an idle hour
    assert len(shared) == 2


def test_table_is_bounded_by_its_slots():
    p = SharedPenalty(1, 8, SharedTable(slots=32))
    for i in range(1000):
        p.fail(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(p) <= 32


def test_failures_in_a_forked_worker_count_in_the_others():
    table = SharedTable(slots=256)
    pid = os.fork()
    if pid == 0:  # the "other worker"
        child = SharedPenalty(2.0, 15.0, table)
        child.fail("198.51.100.7", 10.0)
        child.fail("198.51.100.7", 11.0)
        os._exit(0)
    os.waitpid(pid, 0)
    parent = SharedPenalty(2.0, 15.0, table)
    assert parent.failures("198.51.100.7", 12.0) == 2
    assert parent.fail("198.51.100.7", 12.0) == 8  # the third consecutive failure, wherever it happened


def test_supervisor_share_reaches_the_workers_contexts(env):
    """The supervisor builds the table before fork; each worker's context is handed it, no global involved."""
    from pop3d.runtime.server import build_context
    from pop3d.runtime.shared import share_between_workers

    settings = env.settings(auth={"failure_delay": 2.0, "failure_delay_max": 15.0})
    share = share_between_workers(settings)
    try:
        assert type(build_context(settings).penalty) is Penalty  # a single process keeps its own
        pid = os.fork()
        if pid == 0:  # a worker
            ctx = build_context(settings, share.state)
            ctx.penalty.fail("203.0.113.9", 5.0)
            os._exit(0 if isinstance(ctx.penalty, SharedPenalty) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        sibling = build_context(settings, share.state).penalty
        assert sibling.failures("203.0.113.9", 6.0) == 1
        assert sibling.fail("203.0.113.9", 6.0) == 4.0
    finally:
        share.remove()


def test_a_worker_answers_a_success_after_the_penalty_earned_in_another(env):
    """`delay` (what every answer, success included, must wait) reads the same shared table as `fail`."""
    from pop3d.runtime.server import build_context
    from pop3d.runtime.shared import share_between_workers

    share = share_between_workers(env.settings(auth={"failure_delay": 2.0, "failure_delay_max": 15.0}))
    try:
        pid = os.fork()
        if pid == 0:
            build_context(env.settings(), share.state).penalty.fail("203.0.113.10", 5.0)
            os._exit(0)
        os.waitpid(pid, 0)
        sibling = build_context(env.settings(), share.state).penalty
        assert sibling.delay("203.0.113.10", 6.0) == 4.0  # a right password from there waits too
        sibling.succeed("203.0.113.10")
        assert sibling.delay("203.0.113.10", 6.0) == 0.0
    finally:
        share.remove()
