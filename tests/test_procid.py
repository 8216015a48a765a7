"""pop3d.procid: the pid without a system call, right in forked children too."""

from __future__ import annotations

import os

from pop3d import procid


def test_current_is_the_pid_here_and_in_a_forked_child() -> None:
    assert procid.current() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and exits at once
        os.write(write, b"%d %d" % (procid.current(), os.getpid()))
        os._exit(0)
    os.close(write)
    seen, real = map(int, os.read(read, 64).split())
    os.close(read)
    os.waitpid(child, 0)
    assert seen == real == child
