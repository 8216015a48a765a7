"""pop3d.storage.maildir.info: unread messages keep their uid once, not their key beside it."""

from __future__ import annotations

import sys

from hypothesis import given
from hypothesis import strategies as st

from pop3d.storage.base import MessageInfo
from pop3d.storage.maildir.info import NewInfo, compact, infos

names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/"), min_size=1)


def test_a_message_in_new_under_its_uid_keeps_no_key_string() -> None:
    (m,) = infos([12], ["1700000000.M1P2.host"], ["new/1700000000.M1P2.host"])
    assert type(m) is NewInfo and m.key == "new/1700000000.M1P2.host"
    assert m == MessageInfo(12, "1700000000.M1P2.host", "new/1700000000.M1P2.host")
    assert MessageInfo(12, "1700000000.M1P2.host", "new/1700000000.M1P2.host") == m
    stored = MessageInfo.__dict__["key"].__get__(m)
    assert stored == ""  # what an idle session holds besides the uid
    assert sys.getsizeof(stored) < sys.getsizeof(m.key)


def test_other_keys_stay_as_they_are() -> None:
    got = infos([1, 2, 3], ["a", "b", "c"], ["cur/a:2,S", "new/bb", "new/c:2,"])
    assert [type(m) for m in got] == [MessageInfo, MessageInfo, MessageInfo]
    assert [m.key for m in got] == ["cur/a:2,S", "new/bb", "new/c:2,"]


def test_a_renamed_message_keeps_its_new_key() -> None:
    (m,) = compact([MessageInfo(5, "u1", "new/u1")])
    m.key = "cur/u1:2,S"  # marked seen at commit, or found renamed by another program
    assert m.key == "cur/u1:2,S" and m != MessageInfo(5, "u1", "new/u1")
    m.key = "new/u1"
    assert m.key == "new/u1"


rows = st.tuples(st.integers(0, 10**9), names, st.sampled_from(["new/", "cur/"]), st.sampled_from(["", ":2,S"]))


@given(st.lists(rows))
def test_compact_changes_no_field(rows: list[tuple[int, str, str, str]]) -> None:
    plain = [MessageInfo(size, uid, f"{sub}{uid}{flags}") for size, uid, sub, flags in rows]
    assert compact(plain) == plain
    assert [(m.size, m.uid, m.key) for m in compact(plain)] == [(m.size, m.uid, m.key) for m in plain]
