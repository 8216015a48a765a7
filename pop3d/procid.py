"""This process's id, without a system call each time it is asked.

The server forks its workers after building what they share, and several per-session paths need the pid:
the APOP timestamp, session ids, log lines, shared-memory regions, database links. os.getpid() is a system
call every time; `current()` reads a value kept up to date by a fork hook, so each child sees its own.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def current() -> int:
    """os.getpid(), as of the last fork."""
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
