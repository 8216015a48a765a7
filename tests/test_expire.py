"""RFC 2449 §6.7 EXPIRE with storage.expire_days: CAPA, the old session.expire key, and deletion of messages
retrieved at least n days ago at the start of the owner's next session (Maildir and mbox). Time is a
hand-set clock, never a sleep."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pop3d.auth.base import User
from pop3d.config import ConfigError, load_settings
from pop3d.storage import build_storage
from pop3d.storage.maildir import uidlist
from pop3d.storage.maildir.drop import MaildirDrop
from pop3d.storage.mbox import MboxDrop

DAY = 86400
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- configuration ----------------------------------------------------------------------------------------


def test_expire_days_values() -> None:
    assert load_settings(None, environ={}).storage.expire_days == "never"
    assert load_settings(None, environ={}, storage={"expire_days": 7}).storage.expire_days == 7
    assert load_settings(None, environ={}, storage={"expire_days": "NEVER"}).storage.expire_days == "never"
    env = {"POP3D_STORAGE__EXPIRE_DAYS": "3"}
    assert load_settings(None, environ=env).storage.expire_days == 3
    for bad in (-1, "soon", "1.5", True):
        with pytest.raises(ConfigError, match=r"storage\.expire_days"):
            load_settings(None, environ={}, storage={"expire_days": bad})


def test_old_session_expire_still_works_and_conflicts_are_errors(caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings(None, environ={}, session={"expire": "5"})
    assert s.storage.expire_days == 5
    assert "deprecated" in caplog.text
    assert load_settings(None, environ={}, session={"expire": "never"}).storage.expire_days == "never"
    same = load_settings(None, environ={}, session={"expire": "2"}, storage={"expire_days": 2})
    assert same.storage.expire_days == 2
    with pytest.raises(ConfigError, match=r"session\.expire .* storage\.expire_days"):
        load_settings(None, environ={}, session={"expire": "2"}, storage={"expire_days": 3})


def test_capa_announces_expire_days(start_server) -> None:  # type: ignore[no-untyped-def]
    import poplib

    srv = start_server(storage={"expire_days": 3})
    p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    try:
        assert p.capa()["EXPIRE"] == ["3"]
    finally:
        p.quit()


# ---- Maildir ----------------------------------------------------------------------------------------------


def _maildir(tmp_path: Path, count: int = 3) -> Path:
    md = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    for i in range(1, count + 1):
        (md / "new" / f"170000000{i}.M{i}P1.host").write_bytes(b"Subject: %d\n\nbody\n" % i)
    return md


async def _session(md: Path, clock: Clock, days: int | None = 2, retrieve: set[int] | None = None,
                   delete: set[int] | None = None) -> list[str]:  # fmt: skip
    """One session: open, optionally retrieve/delete and QUIT; the UIDLs it saw."""
    drop = MaildirDrop(str(md), expire_days=days, clock=clock)
    await drop.open()
    try:
        uids = [m.uid for m in drop.messages]
        if retrieve is not None or delete is not None:
            await drop.commit(delete or set(), (retrieve or set()) - (delete or set()))
        return uids
    finally:
        await drop.close()


async def test_maildir_retrieved_messages_expire_after_n_days(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    clock = Clock()
    names = await _session(md, clock, retrieve={0})  # message 1 retrieved at T0
    assert len(names) == 3
    times = uidlist.parse((md / uidlist.RETRIEVED).read_bytes(), uidlist.RETRIEVED_MAGIC, uidlist.TIMES.value_ok)
    assert times == {names[0]: str(int(T0))}
    clock.now = T0 + 2 * DAY - 1
    assert await _session(md, clock, retrieve={1}) == names  # not yet: nothing deleted, message 2 retrieved
    clock.now = T0 + 2 * DAY  # message 1: "at least n days ago"; message 2 only 1 day ago
    assert await _session(md, clock) == names[1:]  # numbering of the new session starts at what is left
    assert not any(n.startswith(names[0]) for n in os.listdir(md / "cur") + os.listdir(md / "new"))
    times = uidlist.parse((md / uidlist.RETRIEVED).read_bytes(), uidlist.RETRIEVED_MAGIC, uidlist.TIMES.value_ok)
    assert set(times) == {names[1]}
    clock.now = T0 + 10 * DAY
    assert await _session(md, clock) == names[2:]  # never retrieved: kept whatever its age


async def test_maildir_first_retrieval_counts_and_uncommitted_ones_do_not(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 2)
    clock = Clock()
    names = await _session(md, clock, retrieve={0})
    clock.now = T0 + DAY
    await _session(md, clock, retrieve={0})  # retrieved again: the first time still counts
    # a session that ends without QUIT records nothing (RFC 1939 §6): no commit
    drop = MaildirDrop(str(md), expire_days=2, clock=clock)
    await drop.open()
    await drop.close()
    clock.now = T0 + 2 * DAY
    assert await _session(md, clock) == names[1:]


async def test_maildir_never_and_zero_record_nothing(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    await _session(md, Clock(), days=None, retrieve={0})
    await _session(md, Clock(), days=0, retrieve={0})
    assert not (md / uidlist.RETRIEVED).exists()


async def test_maildir_expiry_with_imported_uidls(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 2)
    own = await _session(md, Clock(), days=None)
    (md / uidlist.UIDLIST).write_text(f"{uidlist.UIDLIST_MAGIC}\n{own[0]} OLD-1\n{own[1]} OLD-2\n")
    clock = Clock()
    assert await _session(md, clock, retrieve={0}) == ["OLD-1", "OLD-2"]
    clock.now = T0 + 3 * DAY
    assert await _session(md, clock) == ["OLD-2"]


async def test_maildir_corrupt_retrieval_file_expires_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    md = _maildir(tmp_path, 1)
    names = await _session(md, Clock(), days=None)
    (md / uidlist.RETRIEVED).write_text(f"{uidlist.RETRIEVED_MAGIC}\n{names[0]} yesterday\n")
    assert await _session(md, Clock(T0 + 100 * DAY)) == names
    assert "ignored" in caplog.text


# ---- mbox -------------------------------------------------------------------------------------------------


def _msg(n: int) -> bytes:
    return b"From s@example.org Thu Nov 26 10:00:00 2026\nMessage-ID: <%d@test>\n\nbody %d\n\n" % (n, n)


async def test_mbox_retrieved_messages_expire_after_n_days(tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "alice").write_bytes(_msg(1) + _msg(2) + _msg(3))
    cfg = {"driver": "mbox", "location": str(tmp_path / "mail" / "{user}"), "mbox_index_dir": str(tmp_path / "idx"),
           "mbox_lock_timeout": 1.0, "expire_days": 1}  # fmt: skip
    store = build_storage(load_settings(None, environ={}, storage=cfg).storage)
    clock = Clock()
    store.clock = clock  # type: ignore[attr-defined]

    async def session(retrieve: set[int] | None = None) -> list[str]:
        drop = store.maildrop(User("alice"))
        assert isinstance(drop, MboxDrop)
        await drop.open()
        try:
            uids = [m.uid for m in drop.messages]
            if retrieve:
                await drop.commit(set(), retrieve)
            return uids
        finally:
            await drop.close()

    uids = await session({1})
    clock.now = T0 + DAY - 1
    assert await session() == uids
    clock.now = T0 + DAY
    assert await session() == [uids[0], uids[2]]  # the same UIDLs for what is left, numbered afresh
    assert b"<2@test>" not in (tmp_path / "mail" / "alice").read_bytes()
    assert (tmp_path / "mail" / "alice").read_bytes() == _msg(1) + _msg(3)
