"""Maildir snapshot reuse: with unchanged, old-enough directory stamps a login lists nothing (in-process
memo, else the cache file's keys); any change, or stamps too young to trust, means a real listing."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_maildir import deliver, opened, snapshot

from pop3d.storage.maildir import scan as scan_mod


@pytest.fixture
def md(tmp_path: Path) -> Path:
    return tmp_path / "Maildir"


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the directories were last changed long ago (ctime cannot be set back, the clock can)."""
    real = time.time_ns
    monkeypatch.setattr(scan_mod.time, "time_ns", lambda: real() + 60 * 10**9)


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = os.listdir

    def spy(path: Any) -> list[str]:
        calls.append(str(path))  # a directory fd since listing goes through O_NOFOLLOW fds
        return real(path)

    monkeypatch.setattr(scan_mod.os, "listdir", spy)
    return calls


@pytest.fixture(autouse=True)
def clean_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_mod, "_MEMO", scan_mod.OrderedDict())


def _fill(md: Path, n: int = 5) -> None:
    for i in range(n):
        deliver(md, f"17000000{i:02d}.M{i}P1.h", b"x\n" * (i + 1), "new" if i % 2 else "cur")
    deliver(md, "1700000050.M50P1.h:2,S", b"seen\n", "cur")


async def test_young_stamps_are_never_trusted(md: Path, listings: list[str]) -> None:
    _fill(md)
    first = await snapshot(md)
    listings.clear()
    assert await snapshot(md) == first
    assert len(listings) == 2  # new/ and cur/ listed again: a same-tick change could hide in young stamps


async def test_unchanged_old_stamps_skip_listing_via_cache_file(md: Path, later: None, listings: list[str]) -> None:
    _fill(md)
    first = await snapshot(md)
    listings.clear()
    assert await snapshot(md) == first
    assert listings == []
    assert "\0" in (md / ".pop3d.sizes").read_text()  # the keys line


async def test_memo_serves_big_maildrops_and_is_a_copy(
    md: Path, later: None, listings: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scan_mod, "_MEMO_MIN", 1)
    _fill(md)
    first = await snapshot(md)
    (md / ".pop3d.sizes").write_bytes(b"garbage")  # only the memo can answer now without listing
    listings.clear()
    drop = await opened(md)
    try:
        assert [(m.size, m.uid, m.key) for m in drop.messages] == first and listings == []
        drop.messages.pop()  # a session's list is its own
    finally:
        await drop.close()
    assert await snapshot(md) == first


@pytest.mark.parametrize("change", ["deliver", "delete", "rename"])
async def test_any_change_is_seen(md: Path, later: None, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    monkeypatch.setattr(scan_mod, "_MEMO_MIN", 1)
    _fill(md)
    first = await snapshot(md)
    await asyncio.sleep(0.05)  # directory times are coarse (a kernel tick); the trust window covers that in real use
    if change == "deliver":
        deliver(md, "1700000099.M99P1.h", b"new mail\n", "new")
    elif change == "delete":
        os.unlink(md / "new" / "1700000001.M1P1.h")
    else:
        os.rename(md / "new" / "1700000001.M1P1.h", md / "cur" / "1700000001.M1P1.h:2,S")
    after = await snapshot(md)
    assert after != first
    scan_mod._MEMO.clear()
    (md / ".pop3d.sizes").unlink()
    assert await snapshot(md) == after  # the same as a scan from scratch


async def test_commit_invalidates(md: Path, later: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_mod, "_MEMO_MIN", 1)
    _fill(md)
    first = await snapshot(md)
    await asyncio.sleep(0.05)
    drop = await opened(md)
    await drop.commit({0}, {1})
    await drop.close()
    after = await snapshot(md)
    assert len(after) == len(first) - 1 and after[0] == (*first[1][:2], after[0][2])
    assert after[0][2].endswith(":2,S")
