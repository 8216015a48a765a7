"""pop3d.pop3.eager: a coroutine's first step now, the rest in a Task only if it has to wait."""

from __future__ import annotations

import asyncio

import pytest

from pop3d.pop3.eager import Rest, first_step


async def test_a_coroutine_that_never_waits_is_done_in_the_first_step() -> None:
    ran: list[str] = []

    async def quick() -> str:
        ran.append("body")
        return "done"

    assert first_step(quick()) == "done"
    assert ran == ["body"]  # ran right here, no loop iteration


async def test_an_error_before_the_first_wait_reaches_the_caller() -> None:
    async def broken() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        first_step(broken())


async def test_a_coroutine_that_waits_is_finished_by_a_task_with_what_it_awaited() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def slow() -> int:
        steps.append("before")
        value = await fut
        steps.append("after")
        await asyncio.sleep(0)  # a bare yield (None) passes through too
        return value * 2

    rest = first_step(slow())
    assert isinstance(rest, Rest) and steps == ["before"]
    task = asyncio.get_running_loop().create_task(rest.finish())
    await asyncio.sleep(0)
    assert not task.done()
    fut.set_result(21)
    assert await task == 42
    assert steps == ["before", "after"]


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def waits() -> None:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleanup")

    rest = first_step(waits())
    assert isinstance(rest, Rest)
    task = asyncio.get_running_loop().create_task(rest.finish())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled", "cleanup"] and fut.cancelled()


async def test_an_error_after_a_wait_is_the_task_s() -> None:
    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("late")

    rest = first_step(fails_later())
    assert isinstance(rest, Rest)
    with pytest.raises(KeyError):
        await asyncio.get_running_loop().create_task(rest.finish())


async def test_a_coroutine_may_catch_a_cancellation_and_return() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def shrugs() -> str:
        try:
            await fut
        except asyncio.CancelledError:
            return "kept going"
        return "unreachable"

    rest = first_step(shrugs())
    assert isinstance(rest, Rest)
    task = asyncio.get_running_loop().create_task(rest.finish())
    await asyncio.sleep(0)
    task.cancel()
    assert await task == "kept going"
