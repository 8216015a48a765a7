"""LMTP's pure parts and the drivers' deliver() without a server: recipients, trace fields, stored forms,
mbox records read back by the mbox reader, hostile maildirs and spools."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3d.auth.base import User
from pop3d.config import load_settings
from pop3d.lmtp.recipient import user_name
from pop3d.lmtp.trace import trace_header
from pop3d.storage import build_storage
from pop3d.storage.base import PermanentError, TemporaryError
from pop3d.storage.delivery import stored_form
from pop3d.storage.maildir.deliver import unique_name
from pop3d.storage.maildir.names import STANDARD_NAMES, size_field, uid_for
from pop3d.storage.mbox.deliver import entry, envelope_sender
from pop3d.storage.mbox.format import scan, unquote
from pop3d.wire import to_network

lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12)


def crlf_message(parts: list[bytes]) -> bytes:
    """What aiosmtpd hands over after DATA: lines ending CRLF (bare CR or LF inside a line possible)."""
    return b"".join(p + b"\r\n" for p in parts)


def test_recipient_modes() -> None:
    assert user_name("bob@example.org", "localpart") == "bob"
    assert user_name("bob@example.org", "address") == "bob@example.org"
    assert user_name("bob", "localpart") == "bob"
    assert user_name('"a@b"@example.org', "localpart") == '"a@b"'
    assert user_name("bob+lists@x", "localpart", "+") == "bob"
    assert user_name("bob+lists@x", "address", "+") == "bob@x"
    assert user_name("+lists@x", "localpart", "+") == "+lists"  # an empty user is not made from it
    assert user_name("@x", "localpart") is None
    assert user_name("a\x00b@x", "localpart") is None
    assert user_name("a" * 300 + "@x", "localpart") is None


@given(st.text(max_size=80), st.sampled_from(["localpart", "address"]), st.sampled_from(["", "+", "+-"]))
def test_recipient_never_yields_control_characters(address: str, mode: str, delim: str) -> None:
    name = user_name(address, mode, delim)  # type: ignore[arg-type]
    assert name is None or (name and name.isprintable() and len(name) <= 255)


@given(st.text(max_size=60), st.text(max_size=60), st.text(max_size=60))
def test_trace_header_cannot_add_fields(sender: str, rcpt: str, helo: str) -> None:
    head = trace_header(sender, rcpt, helo, "127.0.0.1", "mx.example", "abc", now=0)
    fields = head.split(b"\r\n")[:-1]
    assert fields[0].startswith(b"Return-Path: <") and fields[1].startswith(b"Received: from ")
    assert len(fields) == 4 and all(f.startswith(b"\t") for f in fields[2:])
    assert b"\n" not in head.replace(b"\r\n", b"")


def test_null_sender() -> None:
    assert trace_header("<>", "a@x", "h", "::1", "mx", "id", now=0).startswith(b"Return-Path: <>\r\n")
    assert envelope_sender(b"Return-Path: <>\r\nX: y\r\n") == "MAILER-DAEMON"
    assert envelope_sender(b"Return-Path: <a b@x>\r\n") == "a_b@x"
    assert envelope_sender(b"Subject: no trace\r\n") == "MAILER-DAEMON"


@given(lines)
def test_stored_form_keeps_the_network_form(parts: list[bytes]) -> None:
    message = crlf_message(parts)
    assert to_network(stored_form(message)) == to_network(message)


@given(lines, st.booleans())
def test_mbox_record_reads_back_as_delivered(parts: list[bytes], mboxrd: bool) -> None:
    message = crlf_message(parts)
    spool = b"From x Thu Nov 26 10:00:00 2026\nSubject: old\n\nold\n\n" + entry(message, mboxrd)
    entries = scan(lambda o, n: spool[o : o + n], 0, len(spool), mboxrd)
    assert len(entries) == 2
    e = entries[1]
    body = spool[e.body : e.end]
    body = unquote(body) if mboxrd else body
    assert e.size == len(to_network(body)) if body else e.size == 0
    if mboxrd:
        assert to_network(body) == to_network(message)


def test_maildir_names_are_standard_and_carry_the_size() -> None:
    for host in ("mx", "a/b:c", "h" * 200):
        name = unique_name(1234, 1300, host=host)
        assert STANDARD_NAMES.fullmatch(name), name
        assert uid_for(name) == name and len(name) <= 70
        assert size_field(name) == 1300
    assert unique_name(1, 1, host="a/b:c").count("\\057") == 1


# ---- the drivers without a server -------------------------------------------------------------------------


def storage_for(tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    return build_storage(load_settings(None, storage={"location": str(tmp_path / "{user}" / "Maildir"), **kw}).storage)


def test_maildir_deliver_refuses_a_linked_tmp(tmp_path: Path) -> None:
    storage = storage_for(tmp_path)
    asyncio.run(storage.deliver(User("alice"), b"Subject: 1\r\n\r\none\r\n"))
    md = tmp_path / "alice" / "Maildir"
    assert len(list((md / "new").iterdir())) == 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (md / "tmp").rmdir()
    (md / "tmp").symlink_to(elsewhere)
    with pytest.raises(TemporaryError):
        asyncio.run(storage.deliver(User("alice"), b"Subject: 2\r\n\r\ntwo\r\n"))
    assert not list(elsewhere.iterdir())
    assert len(list((md / "new").iterdir())) == 1


def test_deliver_refuses_a_user_that_cannot_be_a_path(tmp_path: Path) -> None:
    with pytest.raises(PermanentError):
        asyncio.run(storage_for(tmp_path).deliver(User(".."), b"x\r\n"))


def test_mbox_deliver_refuses_a_linked_spool_and_a_non_mbox(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    mail.mkdir()
    cfg = {"driver": "mbox", "location": str(mail / "{user}"), "mbox_index_dir": str(tmp_path / "idx")}
    storage = build_storage(load_settings(None, storage={**cfg, "mbox_lock_write": ["fcntl"]}).storage)
    target = tmp_path / "target"
    target.write_bytes(b"")
    (mail / "alice").symlink_to(target)
    with pytest.raises(TemporaryError):
        asyncio.run(storage.deliver(User("alice"), b"x\r\n"))
    assert target.read_bytes() == b""
    (mail / "bob").write_bytes(b"not an mbox\n")
    with pytest.raises(TemporaryError):
        asyncio.run(storage.deliver(User("bob"), b"x\r\n"))
    assert (mail / "bob").read_bytes() == b"not an mbox\n"
    asyncio.run(storage.deliver(User("carol"), b"Return-Path: <s@x>\r\n\r\nFrom me\r\n"))
    data = (mail / "carol").read_bytes()
    assert data.startswith(b"From s@x ") and data.endswith(b"\n\n>From me\n\n")
    assert os.stat(mail / "carol").st_mode & 0o777 == 0o600
