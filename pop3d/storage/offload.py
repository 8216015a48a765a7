"""Heavy file work of the drivers kept off the event loop (docs/DESIGN.md performance rules 2 and 3).

* ThreadHop: blocking calls in the default thread pool, one at a time per owner. A thread cannot be
  stopped, so when the session awaiting it is cancelled (client gone) the call runs on; whatever must not
  happen under it (closing its fd, releasing its lock) is deferred with `after` until it has finished.
* no_gc: a pause of the cyclic GC while a snapshot builds 100,000 acyclic objects (MessageInfo, index
  entries), which would otherwise trigger repeated full collections that free nothing (2-3x slower login).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark the outcome as seen: nobody awaits a call whose caller was cancelled."""
    if not fut.cancelled():
        fut.exception()


class ThreadHop:
    """The blocking calls of one owner (a maildrop session, a lock attempt), run in a worker thread."""

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: asyncio.Future[Any] | None = None

    async def run(self, func: Callable[[], _T], *, on_cancel: Callable[[], None] | None = None) -> _T:
        """`func()` in a thread. If the caller is cancelled meanwhile, `on_cancel` runs once `func` ends."""
        # run_in_executor, not to_thread: no Task and no context copy around the call, for every login
        fut = asyncio.get_running_loop().run_in_executor(None, func)
        self._running = fut
        fut.add_done_callback(_retrieve)
        fut.add_done_callback(self._finished)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if on_cancel is not None:
                self.after(on_cancel)
            raise

    def _finished(self, fut: asyncio.Future[Any]) -> None:
        """Forget a finished call: an idle session should not keep its last future alive."""
        if self._running is fut:
            self._running = None

    def after(self, action: Callable[[], None]) -> None:
        """Run `action` now, or once the call in flight has finished."""
        running = self._running
        if running is not None and not running.done():
            running.add_done_callback(lambda _: action())
        else:
            action()


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic GC for the block. Process-wide, but only for the milliseconds of a scan, and the
    previous state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
