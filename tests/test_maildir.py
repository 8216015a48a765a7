"""Maildir driver: snapshot order, UIDL rules (RFC 1939 §7), exact sizes, size cache, locking, UPDATE."""

from __future__ import annotations

import builtins
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.auth.base import User
from pop3d.storage.base import InUse, MessageGone, PermanentError, ReadLater, TemporaryError
from pop3d.storage.maildir import MaildirDrop, MaildirStorage
from pop3d.storage.maildir import drop as drop_mod
from pop3d.storage.maildir import scan as scan_mod
from pop3d.storage.maildir.names import split_name, uid_for
from pop3d.storage.maildir.scan import measure
from pop3d.wire import network_size

ROOT = Path(__file__).resolve().parent.parent
UID_RE = re.compile(r"[\x21-\x7e]{1,70}\Z")  # RFC 1939 §7


def deliver(md: Path, name: str, data: bytes, sub: str = "new", mtime: int | None = None) -> Path:
    for s in ("cur", "new", "tmp"):
        (md / s).mkdir(parents=True, exist_ok=True)
    path = md / sub / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


async def opened(md: Path, mark_seen: bool = True) -> MaildirDrop:
    drop = MaildirDrop(str(md), mark_seen=mark_seen)
    await drop.open()
    return drop


async def snapshot(md: Path) -> list[tuple[int, str, str]]:
    drop = await opened(md)
    try:
        return [(m.size, m.uid, m.key) for m in drop.messages]
    finally:
        await drop.close()


@pytest.fixture
def md(tmp_path: Path) -> Path:
    return tmp_path / "Maildir"


# ---- location template --------------------------------------------------------------------------------


async def test_location_template(tmp_path: Path) -> None:
    storage = MaildirStorage(str(tmp_path) + "/{user}/Maildir")
    assert storage.path_for(User("bob")) == f"{tmp_path}/bob/Maildir"
    home = MaildirStorage("{home}/Maildir")
    assert home.path_for(User("bob", home="/home/b")) == "/home/b/Maildir"
    both = MaildirStorage("/m/{user}/{home}")
    assert both.path_for(User("{home}", home="/h")) == "/m/{home}//h"  # no second expansion
    with pytest.raises(PermanentError):
        home.path_for(User("bob"))  # no home for a {home} template
    with pytest.raises(PermanentError):  # maildrop() itself does not raise: the login fails at open()
        await home.maildrop(User("bob")).open()
    with pytest.raises(ValueError):
        MaildirStorage("/var/mail/shared")


def test_template_anchor(tmp_path: Path) -> None:
    bob = User("bob", home="/home/bob")
    assert MaildirStorage("/srv/mail/{user}/Maildir").anchor_for(bob) == "/srv/mail"
    assert MaildirStorage("/srv/mail/{user}").anchor_for(bob) == "/srv/mail"
    assert MaildirStorage("{home}/Maildir").anchor_for(bob) == "/home/bob"
    assert MaildirStorage("{home}/mail/{user}/").anchor_for(bob) == "/home/bob/mail"
    assert MaildirStorage("/{user}").anchor_for(bob) == "/"
    assert MaildirStorage("{user}/Maildir").anchor_for(bob) == "."


async def test_new_user_without_per_user_directory(tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    storage = MaildirStorage(str(tmp_path / "mail" / "{user}" / "Maildir"))
    drop = storage.maildrop(User("bob"))
    await drop.open()
    await drop.close()
    assert (tmp_path / "mail/bob/Maildir/new").is_dir()
    assert (tmp_path / "mail/bob").stat().st_mode & 0o777 == 0o700
    with pytest.raises(PermanentError):  # the fixed part of the template must exist (a missing mount)
        await MaildirStorage(str(tmp_path / "nomount" / "{user}" / "Maildir")).maildrop(User("bob")).open()
    with pytest.raises(PermanentError):  # a missing home is not created either
        await MaildirStorage("{home}/Maildir").maildrop(User("bob", home=str(tmp_path / "nohome"))).open()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
async def test_unsafe_user_names_refused(tmp_path: Path, name: str) -> None:
    storage = MaildirStorage(str(tmp_path) + "/{user}")
    with pytest.raises(PermanentError):
        storage.path_for(User(name))
    drop = storage.maildrop(User(name))
    with pytest.raises(PermanentError):
        await drop.open()
    await drop.close()
    assert list(tmp_path.iterdir()) == []


# ---- open ---------------------------------------------------------------------------------------------


async def test_new_user_maildir_is_created(md: Path) -> None:
    drop = await opened(md)
    assert drop.messages == []
    await drop.close()
    for sub in ("cur", "new", "tmp"):
        assert (md / sub).is_dir()
    assert (md.stat().st_mode & 0o777) == 0o700


async def test_missing_parent_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError):
        await opened(tmp_path / "nobody" / "Maildir")


async def test_path_under_a_file_is_permanent(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermanentError):
        await opened(tmp_path / "file" / "Maildir")


async def test_subdir_that_is_a_file_is_permanent(md: Path) -> None:
    md.mkdir()
    (md / "new").mkdir()
    (md / "cur").write_text("x")
    with pytest.raises(PermanentError):
        await opened(md)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_permission_denied_is_permanent(tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    deliver(parent / "Maildir", "1700000000.M1P1.h", b"x\n")
    parent.chmod(0)
    try:
        with pytest.raises(PermanentError):
            await opened(parent / "Maildir")
    finally:
        parent.chmod(0o700)


async def test_order_by_delivery_time_then_name(md: Path) -> None:
    deliver(md, "1700000300.M1P1.h", b"c\n", "cur")
    deliver(md, "1700000100.M9P1.h", b"a\n", "new")
    deliver(md, "1700000100.M10P1.h:2,S", b"a\n", "cur")  # same second: by name, "M10" < "M9"
    deliver(md, "imported-mail", b"b\n", "cur", mtime=1700000200)  # no time in the name: mtime
    deliver(md, "999999999.M1P1.h", b"z\n", "cur")  # 9-digit time (2001) sorts first, not as a string
    deliver(md, ".hidden", b"no\n", "new")
    deliver(md, "1700000000.M0P1.h", b"tmp\n", "tmp")
    uids = [uid for _, uid, _ in await snapshot(md)]
    assert uids == [
        "999999999.M1P1.h",
        "1700000100.M10P1.h",
        "1700000100.M9P1.h",
        "imported-mail",
        "1700000300.M1P1.h",
    ]
    assert uids == [uid for _, uid, _ in await snapshot(md)]  # and the same from the cache


async def test_order_standard_names(md: Path) -> None:
    names = [f"17000{i % 7:05d}.M{i}P{i}.host" for i in range(50)]
    for n in names:
        deliver(md, n, b"x\n", "cur" if len(n) % 2 else "new")
    expected = sorted(names, key=lambda n: (int(n.split(".")[0]), n))
    assert [uid for _, uid, _ in await snapshot(md)] == expected
    assert [uid for _, uid, _ in await snapshot(md)] == expected


async def test_keys_are_relative_paths(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"x\n", "new")
    deliver(md, "1700000001.M1P1.h:2,RS", b"x\n", "cur")
    assert [key for _, _, key in await snapshot(md)] == ["new/1700000000.M1P1.h", "cur/1700000001.M1P1.h:2,RS"]


# ---- UIDL ---------------------------------------------------------------------------------------------


async def test_uid_independent_of_flags_and_directory(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"one\n", "new")
    deliver(md, "1700000001.M2P1.h:2,", b"two\n", "cur")
    deliver(md, "1700000002.M3P1.h;2,S", b"three\n", "cur")
    deliver(md, "1700000003.M4P1.h!2,F", b"four\n", "cur")
    before = await snapshot(md)
    os.rename(md / "new/1700000000.M1P1.h", md / "cur/1700000000.M1P1.h:2,S")
    os.rename(md / "cur/1700000001.M2P1.h:2,", md / "cur/1700000001.M2P1.h:2,FRS")
    os.rename(md / "cur/1700000002.M3P1.h;2,S", md / "cur/1700000002.M3P1.h;2,ST")
    after = await snapshot(md)
    assert (
        [u for _, u, _ in before]
        == [u for _, u, _ in after]
        == [
            "1700000000.M1P1.h",
            "1700000001.M2P1.h",
            "1700000002.M3P1.h",
            "1700000003.M4P1.h",
        ]
    )
    assert [s for s, _, _ in before] == [s for s, _, _ in after]


async def test_same_base_in_new_and_cur_is_one_message(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"x\n", "new")
    deliver(md, "1700000000.M1P1.h:2,S", b"x\n", "cur")
    assert [key for _, _, key in await snapshot(md)] == ["cur/1700000000.M1P1.h:2,S"]


async def test_odd_and_long_names_give_valid_unique_uids(md: Path) -> None:
    names = [
        "with space",
        "with%20space",  # must not collide with the escape of "with space"
        "tab\there",
        "caf\u00e9",
        os.fsdecode(b"bad\xffbyte"),
        "x" * 70,
        "x" * 71,
        "y" * 200,
        "y" * 201,
        "1700000000." + "z" * 100 + ":2,S",
        "%H" + "0" * 40,  # cannot collide with a digest uid
    ]
    for i, n in enumerate(names):
        deliver(md, n, b"m\n", "cur", mtime=1700000000 + i)
    first = await snapshot(md)
    uids = [u for _, u, _ in first]
    assert len(uids) == len(names) == len(set(uids))
    assert all(UID_RE.match(u) for u in uids)
    assert "x" * 70 in uids  # a valid name stays itself
    assert await snapshot(md) == first  # stable across sessions


@given(st.text(min_size=1, max_size=90).filter(lambda s: "/" not in s and "\0" not in s))
def test_uid_for_is_valid(name: str) -> None:
    assert UID_RE.match(uid_for(name))


@given(st.lists(st.text(min_size=1, max_size=90), min_size=2, max_size=6, unique=True))
def test_uid_for_is_injective(names: list[str]) -> None:
    assert len({uid_for(n) for n in names}) == len(names)


def test_split_name() -> None:
    assert split_name("1.M1.h:2,RS") == ("1.M1.h", ":", "RS")
    assert split_name("1.M1.h;2,S") == ("1.M1.h", ";", "S")
    assert split_name("1.M1.h!2,") == ("1.M1.h", "!", "")
    assert split_name("1.M1.h") == ("1.M1.h", "", "")


# ---- sizes --------------------------------------------------------------------------------------------

BODIES = {
    "lf": b"Subject: a\n\nline one\n.dot\n",
    "crlf": b"Subject: a\r\n\r\nline one\r\n.dot\r\n",
    "no-final-newline": b"Subject: a\n\nlast line",
    "bare-cr": b"Subject: a\n\nbare\rcr\r",
    "mixed": b"a\r\nb\nc\rd\r\n\r\n",
    "empty": b"",
}


async def test_sizes_are_network_octets(md: Path) -> None:
    for i, (name, body) in enumerate(BODIES.items()):
        deliver(md, f"17000000{i:02d}.M{i}P1.{name}", body)
    expected = [network_size(body) for body in BODIES.values()]
    assert [s for s, _, _ in await snapshot(md)] == expected
    assert [s for s, _, _ in await snapshot(md)] == expected  # from the cache


@settings(max_examples=200)
@given(st.binary(max_size=64), st.integers(min_value=1, max_value=9))
def test_measure_streaming_matches_network_size(tmp_path_factory: Any, data: bytes, chunk: int) -> None:
    path = tmp_path_factory.mktemp("m") / "msg"
    path.write_bytes(data)
    assert measure(str(path), chunk_size=chunk)[0] == network_size(data)


async def test_w_field_is_honoured(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h,S=5,W=999:2,S", b"short", "cur")
    deliver(md, "odd-name,W=77", b"x\n", "new", mtime=1700000001)
    assert [s for s, _, _ in await snapshot(md)] == [999, 77]


async def test_second_open_reads_no_bodies(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bodies = [b"hello\n" * (i + 1) for i in range(5)]
    for i, body in enumerate(bodies):
        deliver(md, f"170000000{i}.M{i}P1.h", body, "new" if i % 2 else "cur")
    deliver(md, "no-time-name", b"odd\n", "cur", mtime=1700000009)
    first = await snapshot(md)
    # Garbage of other sizes under the same names: a second open that read bodies would see it.
    for sub in ("cur", "new"):
        for p in (md / sub).iterdir():
            p.write_bytes(b"garbage\r\n" * 100)
    opened_paths: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened_paths.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    def os_spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened_paths.append(os.fspath(file))  # messages are opened relative to the maildir's fd: "cur/NAME"
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    assert await snapshot(md) == first
    assert not [p for p in opened_paths if p.startswith(("cur/", "new/")) or "/cur/" in p or "/new/" in p]


async def test_cache_not_rewritten_when_unchanged(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"x\n")
    await snapshot(md)
    before = os.stat(md / ".pop3d.sizes")
    await snapshot(md)
    after = os.stat(md / ".pop3d.sizes")
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


async def test_cache_drops_vanished_and_learns_new(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"x\n")
    deliver(md, "1700000001.M1P1.h", b"yy\n")
    await snapshot(md)
    os.unlink(md / "new/1700000000.M1P1.h")
    deliver(md, "1700000002.M1P1.h", b"zzz\n")
    assert [(s, u) for s, u, _ in await snapshot(md)] == [(4, "1700000001.M1P1.h"), (5, "1700000002.M1P1.h")]
    text = (md / ".pop3d.sizes").read_text()
    assert "1700000000.M1P1.h" not in text and "1700000002.M1P1.h" in text


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xff\xfe", b"pop3d-sizes 3\n", b"pop3d-sizes 3\na/b\n[1]\n{}\n", b"pop3d-sizes 3\na\n[-1]\n{}\n",
     b"pop3d-sizes 3\na\n" + b"[" * 100000 + b"\n{}\n", b"pop3d-sizes 3\na\n[1.5]\n{}\n"],
)  # fmt: skip
async def test_corrupt_cache_is_rebuilt(md: Path, garbage: bytes) -> None:
    deliver(md, "1700000000.M1P1.h", b"abc\n")
    deliver(md, "odd", b"de\n", "cur", mtime=1700000005)
    expected = await snapshot(md)
    (md / ".pop3d.sizes").write_bytes(garbage)
    assert await snapshot(md) == expected
    (md / "new/1700000000.M1P1.h").write_bytes(b"changed, so only a rebuilt cache can be right\n")
    assert await snapshot(md) == expected  # the rebuilt cache is in use


async def test_fast_and_general_scans_agree(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(30):
        deliver(md, f"17000000{i % 4:02d}.M{i}P{i}.host,S=3", b"ab\n" * i, "cur" if i % 3 else "new")
    fast = await snapshot(md)
    os.unlink(md / ".pop3d.sizes")
    monkeypatch.setattr(scan_mod, "STANDARD_NAMES", re.compile(r"(?!)"))
    assert await snapshot(md) == fast
    os.unlink(md / ".pop3d.sizes")
    monkeypatch.undo()
    assert await snapshot(md) == fast


# ---- reading ------------------------------------------------------------------------------------------


async def test_read_small_and_chunks(md: Path) -> None:
    body = b"Subject: x\n\n" + b"0123456789\n" * 50
    deliver(md, "1700000000.M1P1.h", body)
    drop = await opened(md)
    try:
        assert drop.read_small(0) == body
        assert b"".join([c async for c in drop.chunks(0, chunk_size=7)]) == body
    finally:
        await drop.close()


async def test_vanished_message_is_gone_alone(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"one\n")
    deliver(md, "1700000001.M2P1.h", b"two\n", "cur")
    drop = await opened(md)
    try:
        os.unlink(md / "new/1700000000.M1P1.h")
        with pytest.raises(MessageGone):
            drop.read_small(0)
        with pytest.raises(MessageGone):
            [c async for c in drop.chunks(0)]
        assert drop.read_small(1) == b"two\n"
    finally:
        await drop.close()


async def test_renamed_message_still_readable(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"one\n")
    deliver(md, "1700000001.M2P1.h:2,", b"two\n", "cur")
    drop = await opened(md)
    try:
        os.rename(md / "new/1700000000.M1P1.h", md / "cur/1700000000.M1P1.h:2,S")
        os.rename(md / "cur/1700000001.M2P1.h:2,", md / "cur/1700000001.M2P1.h:2,FT")  # not a guess
        assert drop.read_small(0) == b"one\n"
        assert drop.messages[0].key == "cur/1700000000.M1P1.h:2,S"
        assert b"".join([c async for c in drop.chunks(1)]) == b"two\n"
        assert drop.messages[1].key == "cur/1700000001.M2P1.h:2,FT"
    finally:
        await drop.close()


# ---- commit / close -----------------------------------------------------------------------------------


async def test_commit_deletes_and_marks_seen(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"del\n")
    deliver(md, "1700000001.M2P1.h", b"seen new\n")
    deliver(md, "1700000002.M3P1.h:2,RF", b"seen cur\n", "cur")
    deliver(md, "1700000003.M4P1.h", b"untouched\n")
    deliver(md, "1700000004.M5P1.h:2,S", b"already seen\n", "cur")
    drop = await opened(md)
    await drop.commit(deleted={0}, seen={0, 1, 2, 4})
    await drop.close()
    assert sorted(os.listdir(md / "new")) == ["1700000003.M4P1.h"]
    assert sorted(os.listdir(md / "cur")) == [
        "1700000001.M2P1.h:2,S",
        "1700000002.M3P1.h:2,FRS",
        "1700000004.M5P1.h:2,S",
    ]
    after = await snapshot(md)
    assert [u for _, u, _ in after] == ["1700000001.M2P1.h", "1700000002.M3P1.h", "1700000003.M4P1.h",
                                        "1700000004.M5P1.h"]  # fmt: skip
    assert "1700000000.M1P1.h" not in (md / ".pop3d.sizes").read_text()


async def test_commit_without_mark_seen_only_deletes(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"a\n")
    deliver(md, "1700000001.M2P1.h", b"b\n")
    drop = await opened(md, mark_seen=False)
    await drop.commit(deleted={1}, seen={0})
    await drop.close()
    assert os.listdir(md / "new") == ["1700000000.M1P1.h"] and os.listdir(md / "cur") == []


async def test_commit_follows_renames_and_tolerates_gone(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"a\n")
    deliver(md, "1700000001.M2P1.h", b"b\n")
    deliver(md, "1700000002.M3P1.h", b"c\n")
    drop = await opened(md)
    os.rename(md / "new/1700000000.M1P1.h", md / "cur/1700000000.M1P1.h:2,F")  # flagged elsewhere
    os.unlink(md / "new/1700000001.M2P1.h")  # deleted elsewhere: still counts as deleted
    os.rename(md / "new/1700000002.M3P1.h", md / "cur/1700000002.M3P1.h:2,T")
    await drop.commit(deleted={0, 1}, seen={2})
    await drop.close()
    assert os.listdir(md / "new") == []
    assert os.listdir(md / "cur") == ["1700000002.M3P1.h:2,ST"]


async def test_failed_unlink_raises_after_doing_the_rest(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"a\n")
    deliver(md, "1700000001.M2P1.h", b"b\n")
    deliver(md, "1700000002.M3P1.h", b"c\n")
    drop = await opened(md)
    os.unlink(md / "new/1700000000.M1P1.h")
    os.mkdir(md / "new/1700000000.M1P1.h")  # unlink() of a directory fails, even for root
    with pytest.raises(TemporaryError):
        await drop.commit(deleted={0, 1}, seen={2})
    await drop.close()
    assert sorted(os.listdir(md / "new")) == ["1700000000.M1P1.h"]
    assert os.listdir(md / "cur") == ["1700000002.M3P1.h:2,S"]


async def test_close_without_commit_deletes_nothing(md: Path) -> None:
    deliver(md, "1700000000.M1P1.h", b"a\n")
    deliver(md, "1700000001.M2P1.h:2,", b"b\n", "cur")
    drop = await opened(md)
    drop.read_small(0)
    await drop.close()
    await drop.close()  # idempotent
    assert os.listdir(md / "new") == ["1700000000.M1P1.h"]
    assert os.listdir(md / "cur") == ["1700000001.M2P1.h:2,"]


# ---- locking ------------------------------------------------------------------------------------------


async def test_second_session_is_in_use(md: Path) -> None:
    first = await opened(md)
    second = MaildirDrop(str(md))
    with pytest.raises(InUse):
        await second.open()
    await first.close()
    await second.open()
    await second.close()


async def test_lock_held_by_other_process(md: Path) -> None:
    md.mkdir()
    code = (
        "import sys, time\n"
        "from pop3d.storage.locking import MaildropLock\n"
        "lock = MaildropLock(sys.argv[1])\n"
        "lock.acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(md / ".pop3d.lock")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(InUse):
            await opened(md)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    drop = await opened(md)  # kill -9 left no stale lock
    await drop.close()


async def test_failed_open_releases_the_lock(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md.mkdir()

    def boom(*args: Any) -> None:
        raise TemporaryError("scan failed")

    monkeypatch.setattr(scan_mod, "snapshot", boom)
    with pytest.raises(TemporaryError):
        await opened(md)
    monkeypatch.undo()
    drop = await opened(md)
    await drop.close()


async def test_unchanged_maildrop_takes_the_snapshot_path(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        deliver(md, f"170000000{i}.M{i}P1.h", b"x\n" * i)
    first = await snapshot(md)

    def slow(*args: Any) -> Any:
        raise AssertionError("per-message scan on an unchanged maildrop")

    monkeypatch.setattr(scan_mod, "_scan_standard", slow)
    monkeypatch.setattr(scan_mod, "_scan_general", slow)
    assert await snapshot(md) == first


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The calls that went through a worker thread (ThreadHop.run), in order."""
    from pop3d.storage.offload import ThreadHop

    calls: list[object] = []
    real_run = ThreadHop.run

    async def counted(self: ThreadHop, func: Any, **kw: Any) -> Any:
        calls.append(func)
        return await real_run(self, func, **kw)

    monkeypatch.setattr(ThreadHop, "run", counted)
    return calls


async def test_small_maildrop_opens_on_the_loop_and_a_large_one_in_a_thread(
    md: Path, monkeypatch: pytest.MonkeyPatch, hops: list[object]
) -> None:
    """The thread hop costs more than listing a small maildrop (docs/DESIGN.md performance rule 2), but a
    large listing must not hold the loop."""
    for i in range(3):
        deliver(md, f"170000000{i}.M{i}P1.h", b"x\n")
    small = await opened(md)
    assert len(small.messages) == 3 and hops == []
    await small.close()
    sizes = sum(os.stat(md / sub).st_size for sub in ("new", "cur"))
    monkeypatch.setattr(drop_mod, "INLINE_LISTING", sizes - 1)  # one octet more listing than the loop takes
    large = await opened(md)
    assert len(large.messages) == 3 and len(hops) == 1
    await large.close()


async def test_commit_renames_on_the_loop_deletes_in_a_thread_and_does_nothing_when_nothing_changes(
    md: Path, monkeypatch: pytest.MonkeyPatch, hops: list[object]
) -> None:
    for i in range(4):
        deliver(md, f"170000000{i}.M{i}P1.h", b"x\n")
    drop = await opened(md)
    await drop.commit(set(), {0, 1})  # two renames new/ -> cur/: on the loop
    await drop.close()
    assert hops == [] and len(os.listdir(md / "cur")) == 2
    drop = await opened(md)
    seen_already = {i for i, m in enumerate(drop.messages) if m.key.startswith("cur/")}
    await drop.commit(set(), seen_already)  # flagged already: nothing to do on disk
    await drop.close()
    assert hops == []
    monkeypatch.setattr(drop_mod, "INLINE_CHANGES", 1)
    drop = await opened(md)
    await drop.commit({0}, {1, 2, 3})  # one unlink and two renames: more than the loop takes
    await drop.close()
    assert len(hops) == 1
    assert len(os.listdir(md / "cur")) == 3 and os.listdir(md / "new") == []


async def test_one_deletion_goes_to_a_thread(md: Path, hops: list[object]) -> None:
    """A deletion rewrites the size cache, which the maildrop's owner may have made huge: never on the loop."""
    for i in range(2):
        deliver(md, f"170000000{i}.M{i}P1.h", b"x\n")
    drop = await opened(md)
    await drop.commit({0}, set())
    await drop.close()
    assert len(hops) == 1 and os.listdir(md / "new") == ["1700000001.M1P1.h"]


@pytest.fixture
def loop_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories os.listdir was asked for on this (the event loop's) thread."""
    import threading

    here, calls, real = threading.get_ident(), [], os.listdir

    def spy(path: Any = ".") -> list[str]:
        if threading.get_ident() == here:
            calls.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", spy)
    return calls


async def test_a_message_renamed_meanwhile_is_found_again_off_the_loop_in_a_large_maildrop(
    md: Path, monkeypatch: pytest.MonkeyPatch, hops: list[object], loop_listings: list[str]
) -> None:
    """Another program renames messages to flags we cannot guess during the session: finding them again
    lists new/ and cur/, which the maildrop's owner may have made huge. On the loop (read_small, a commit
    of renames) only a small listing is made; else ReadLater, or the commit finishes in a thread."""
    for i in range(3):
        deliver(md, f"170000000{i}.M{i}P1.h", b"body %d\n" % i)
    drop = await opened(md)  # small: listed on the loop
    assert hops == [] and loop_listings
    loop_listings.clear()
    for i in range(3):  # new/NAME -> cur/NAME:2,T (trashed): none of the names tried first
        os.rename(md / "new" / f"170000000{i}.M{i}P1.h", md / "cur" / f"170000000{i}.M{i}P1.h:2,T")
    assert drop.read_small(0) == b"body 0\n"  # a small listing: found again on the loop
    assert len(loop_listings) == 1 and hops == []
    loop_listings.clear()
    monkeypatch.setattr(drop_mod, "INLINE_LISTING", 0)  # any listing is now more than the loop takes
    with pytest.raises(ReadLater):
        drop.read_small(1)
    assert await drop.read(1) == b"body 1\n" and len(hops) == 1
    await drop.commit(set(), {2})  # a rename whose source must be found again: finished in a thread
    await drop.close()
    assert loop_listings == [] and len(hops) == 2
    assert os.path.exists(md / "cur" / "1700000002.M2P1.h:2,ST")


async def test_cancelled_open_does_not_leak_the_lock(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import threading

    md.mkdir()
    release = threading.Event()
    real_open_locked = MaildirDrop._open_locked

    def stalled(self: MaildirDrop, *args: Any) -> Any:
        release.wait(5)  # before the lock is taken: close() below finds nothing to release yet
        return real_open_locked(self, *args)

    monkeypatch.setattr(drop_mod, "INLINE_LISTING", -1)  # a large maildrop: locked and listed in a thread
    monkeypatch.setattr(MaildirDrop, "_open_locked", stalled)
    drop = MaildirDrop(str(md))
    task = asyncio.ensure_future(drop.open())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await drop.close()  # the session ends while the thread still runs
    release.set()
    monkeypatch.undo()
    for _ in range(100):  # the thread finishes, then the lock must be dropped
        await asyncio.sleep(0.01)
        try:
            again = await opened(md)
        except InUse:
            continue
        await again.close()
        break
    else:
        pytest.fail("lock still held after the cancelled open finished")
