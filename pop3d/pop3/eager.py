"""Run a coroutine's first step at once, and hand it to a Task only when it has to wait.

A poll's PASS and QUIT usually finish without waiting for anything (a `{PLAIN}` or remembered password, a
small Maildir opened on the loop, nothing to delete), and so does the end of most sessions. Started as Tasks,
each cost a Task, a trip through the loop and, for a reply, a pause and a resume of reading (two epoll_ctl
system calls). Python 3.12's eager task factory does this for every task; 3.11 has none, and only these
per-session steps are worth it.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

_T = TypeVar("_T")


class Rest(Generic[_T]):
    """A coroutine stopped at its first real wait: `finish()` (for a Task) drives it to its end."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, _T], yielded: Any) -> None:
        self.coro, self.yielded = coro, yielded

    async def finish(self) -> _T:
        return await _resume(self.coro, self.yielded)


def first_step(coro: Coroutine[Any, Any, _T]) -> _T | Rest[_T]:
    """`coro`'s result if it ends without waiting, else a Rest to give a Task. An exception raised before the
    first wait is raised here, to the caller, as a direct call would."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    return Rest(coro, yielded)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, _T], yielded: Any) -> Generator[Any, Any, _T]:
    """Pass what `coro` waits on to the Task driving us, and what the Task sends or throws (a cancellation)
    back into `coro`, until it returns: what `await coro` does, for a coroutine already past its start."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # forwarded as is, CancelledError included
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
