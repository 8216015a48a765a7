"""Helpers both storage drivers share: location templates, the OSError table, the thread hop, the GC
pause, and the optional hooks of the Storage interface."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
from pathlib import Path

import pytest

from pop3d.auth.base import User
from pop3d.config import load_settings
from pop3d.storage import build_storage
from pop3d.storage.base import InUse, Maildrop, PermanentError, Storage, StorageError, TemporaryError
from pop3d.storage.location import expand, has_fields
from pop3d.storage.maildir import MaildirStorage
from pop3d.storage.mbox import MboxStorage
from pop3d.storage.offload import ThreadHop, no_gc
from pop3d.storage.oserrors import lock_error, storage_error

# ---- location templates -------------------------------------------------------------------------------

HOSTILE_NAMES = ["", ".", "..", "/", "a/b", "../x", "x/..", "/etc/passwd", "a\0b", "a\nb", "a\rb", "a\tb", "\x7f",
                 "\x1b[2J"]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_user_names_are_refused(name: str) -> None:
    with pytest.raises(PermanentError, match="user name"):
        expand("/srv/mail/{user}", User(name, home="/home/x"))
    with pytest.raises(PermanentError, match="user name"):  # also where the template does not use the name
        expand("{home}/Maildir", User(name, home="/home/x"))


@pytest.mark.parametrize("name", ["...", "a..b", ".hidden", "bob@example.org", "j\u00fcrgen", "a b", "{home}"])
def test_odd_but_harmless_user_names_stay_literal(name: str) -> None:
    assert expand("/srv/mail/{user}/x", User(name, home="/h")) == f"/srv/mail/{name}/x"


@pytest.mark.parametrize("home", [None, "", "relative/home", "~bob", "/home/a\0b"])
def test_home_must_be_an_absolute_path(home: str | None) -> None:
    with pytest.raises(PermanentError, match="home"):
        expand("{home}/Maildir", User("bob", home=home))
    assert expand("/srv/{user}", User("bob", home=home)) == "/srv/bob"  # not needed, not checked


def test_fields_are_substituted_in_one_pass() -> None:
    assert expand("/m/{user}/{home}", User("{home}", home="/{user}")) == "/m/{home}//{user}"
    assert expand("/m/{user}/{user}", User("bob")) == "/m/bob/bob"
    assert expand("/m/{other}/{user}", User("bob")) == "/m/{other}/bob"  # only the two known fields
    assert has_fields("/m/{user}") and has_fields("{home}/M") and not has_fields("/var/mail/{other}")


@pytest.mark.parametrize("name", ["..", "../x", "a/b"])
async def test_both_drivers_refuse_hostile_names(tmp_path: Path, name: str) -> None:
    cfg = {"driver": "mbox", "location": str(tmp_path / "{user}"), "mbox_index_dir": str(tmp_path / "idx")}
    for storage in (MaildirStorage(str(tmp_path / "{user}")), build_storage(load_settings(None, storage=cfg).storage)):
        drop = storage.maildrop(User(name))  # no I/O and no exception yet: the login fails at open()
        with pytest.raises(PermanentError):
            await drop.open()
        await drop.close()
    assert list(tmp_path.iterdir()) == []


async def test_mbox_recovery_skips_journals_of_unusable_names(tmp_path: Path) -> None:
    (tmp_path / "idx").mkdir()
    (tmp_path / "mail").mkdir()
    (tmp_path / "idx" / "..pop3d-journal").write_bytes(b"x")  # "." as a user name
    cfg = {"driver": "mbox", "location": str(tmp_path / "mail" / "{user}"), "mbox_index_dir": str(tmp_path / "idx")}
    await build_storage(load_settings(None, storage=cfg).storage).recover_interrupted()
    assert sorted(os.listdir(tmp_path / "idx")) == ["..pop3d-journal"]  # left alone, nothing created
    assert os.listdir(tmp_path / "mail") == []


# ---- OSError classification (RFC 3206 §4, RFC 2449 §8.1.1) --------------------------------------------

PERMANENT = [errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EROFS,
             errno.ENAMETOOLONG]  # fmt: skip
TEMPORARY = [errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR,
             errno.ENOLCK, errno.ESTALE, errno.EAGAIN]  # fmt: skip


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))  # OSError() picks the subclass (PermissionError...) from errno


@pytest.mark.parametrize("code", PERMANENT + TEMPORARY)
def test_storage_error_table(code: int) -> None:
    err = storage_error(oserror(code), "cannot open spool /var/mail/bob")
    assert type(err) is (PermanentError if code in PERMANENT else TemporaryError)
    assert err.code == ("SYS/PERM" if code in PERMANENT else "SYS/TEMP")
    assert str(err) == f"cannot open spool /var/mail/bob: {os.strerror(code)}"


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK])
def test_busy_lock_is_in_use(code: int) -> None:
    err = lock_error(oserror(code), "cannot lock x")
    assert type(err) is InUse and err.code == "IN-USE"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EBADF, errno.EINTR, errno.EIO])
def test_other_lock_failures_follow_the_table(code: int) -> None:
    assert type(lock_error(oserror(code), "cannot lock x")) is TemporaryError


def test_message_without_strerror() -> None:
    err = storage_error(OSError("odd"), "cannot list /m/new")
    assert type(err) is TemporaryError and str(err) == "cannot list /m/new: odd"


# ---- thread hop and GC pause ----------------------------------------------------------------------------


async def test_after_runs_at_once_when_idle() -> None:
    hop = ThreadHop()
    done: list[str] = []
    hop.after(lambda: done.append("now"))
    assert done == ["now"]
    assert await hop.run(lambda: 42) == 42
    hop.after(lambda: done.append("again"))
    assert done == ["now", "again"]


async def test_cancelled_call_runs_on_and_defers_cleanup() -> None:
    hop = ThreadHop()
    started, go = threading.Event(), threading.Event()
    finished: list[str] = []

    def work() -> None:
        started.set()
        go.wait(10)
        finished.append("work")
        raise OSError("nobody is left to see this")

    task = asyncio.ensure_future(hop.run(work, on_cancel=lambda: finished.append("on_cancel")))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hop.after(lambda: finished.append("after"))
    assert finished == []  # the thread still runs: neither cleanup has happened
    waiter = asyncio.get_running_loop().create_future()
    hop.after(lambda: waiter.set_result(None))
    go.set()
    await waiter
    assert finished == ["work", "on_cancel", "after"]


async def test_exception_reaches_the_caller() -> None:
    def fail() -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        await ThreadHop().run(fail)


@pytest.mark.parametrize("enabled", [True, False])
def test_no_gc_restores_the_previous_state(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        with no_gc():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError), no_gc():
            raise ValueError
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


# ---- the Storage interface ------------------------------------------------------------------------------


def test_storage_is_abstract_and_hooks_have_defaults() -> None:
    with pytest.raises(TypeError):
        Storage()  # type: ignore[abstract]

    class Minimal(Storage):
        def maildrop(self, user: User) -> Maildrop:
            raise StorageError("none")

    assert asyncio.run(Minimal().recover_interrupted()) is None


async def test_every_driver_offers_recover_interrupted(tmp_path: Path) -> None:
    maildir = build_storage(load_settings(None, storage={"location": str(tmp_path / "{user}")}).storage)
    mbox = build_storage(load_settings(None, storage={"driver": "mbox", "location": str(tmp_path / "{user}"),
                                                      "mbox_index_dir": str(tmp_path / "idx")}).storage)  # fmt: skip
    assert isinstance(maildir, MaildirStorage) and isinstance(mbox, MboxStorage)
    for storage in (maildir, mbox):
        assert isinstance(storage, Storage)
        await storage.recover_interrupted()  # declared on the interface: no getattr probing needed
    assert sorted(os.listdir(tmp_path)) == []  # nothing to settle: nothing created
