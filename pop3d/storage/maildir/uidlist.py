"""Small per-maildrop maps pop3d keeps beside the messages: imported UIDLs and retrieval times.

* `.pop3d.uidlist` maps pop3d's own uid of a message (names.uid_for of its base name) to the UIDL another
  server gave it (`pop3d uidl import`, pop3d.migrate), so clients that leave mail on the server do not
  download everything again after a move. Read at every login, so it is one capped read and one split
  when present, one failed open when absent; applying it to a snapshot is a dict lookup per message.
* `.pop3d.retrieved` maps own uid -> the Unix time a session that retrieved the message ended in UPDATE,
  for RFC 2449 §6.7 EXPIRE with a number of days (pop3d.storage.maildir.drop; the mbox driver keeps the
  same map, keyed by its UIDLs, beside its index).

Both are text: a version line, then one `KEY SP VALUE` line per message. Keys are own uids, which are
1-70 octets of 0x21-0x7E (names.uid_for), so they never contain a space or a newline. The maildrop's owner
can write these files, so they are read like every file of the maildrop (safefile: no link, no FIFO,
owned by the owner or by pop3d, at most MAX_MAP octets) and every line is checked: an imported UIDL must
satisfy RFC 1939 §7 (1-70 characters in 0x21-0x7E) and be unique; a file that breaks any rule is ignored
whole with a warning (the cost: pop3d's own UIDLs, or no expiry, until it is repaired), never a crash.
Written atomically (pop3d.storage.atomic), mode 0600, given to the owner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pop3d.storage.atomic import replace_text
from pop3d.storage.base import MessageInfo
from pop3d.storage.safefile import Owner, read_capped

log = logging.getLogger(__name__)

UIDLIST = ".pop3d.uidlist"
UIDLIST_MAGIC = "pop3d-uidlist 1"
RETRIEVED = ".pop3d.retrieved"
RETRIEVED_MAGIC = "pop3d-retrieved 1"
#: about 150 octets a line: 100,000 messages fit many times over; a bigger file is garbage and not read
MAX_MAP = 16 * 1024 * 1024
MAX_UIDL = 70  # RFC 1939 §7


def valid_uidl(text: str) -> bool:
    """RFC 1939 §7: "one to 70 characters in the range 0x21 to 0x7E"."""
    return 0 < len(text) <= MAX_UIDL and text.isascii() and text.isprintable() and " " not in text


def _time_value(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 12


def parse(data: bytes, magic: str = UIDLIST_MAGIC, value_ok: Callable[[str], bool] = valid_uidl) -> dict[str, str]:
    """key -> value of a map file; ValueError naming the first broken rule (whole file refused)."""
    text = data.decode("ascii")  # UnicodeDecodeError is a ValueError
    lines = text.split("\n")
    if lines[0] != magic:
        raise ValueError(f"first line is not {magic!r}")
    if lines[-1] != "":
        raise ValueError("truncated (no final newline)")
    out: dict[str, str] = {}
    for number, line in enumerate(lines[1:-1], 2):
        key, sep, value = line.partition(" ")
        if not sep or not valid_uidl(key) or not value_ok(value):
            raise ValueError(f"line {number} is not `KEY VALUE` with a valid key and value")
        if key in out:
            raise ValueError(f"line {number}: {key} is listed twice")
        out[key] = value
    if magic == UIDLIST_MAGIC and len(set(out.values())) != len(out):
        raise ValueError("a UIDL is given to two messages (RFC 1939 §7: unique in the maildrop)")
    return out


def render(mapping: dict[str, str], magic: str = UIDLIST_MAGIC) -> str:
    return "".join([magic, "\n", *(f"{k} {v}\n" for k, v in sorted(mapping.items()))])


@dataclass(frozen=True)
class Kind:
    """One kind of map file: its version line and what a value must be."""

    magic: str
    value_ok: Callable[[str], bool]
    durable: bool  # fsync before the rename: an import must not be lost; retrieval times may be


UIDS = Kind(UIDLIST_MAGIC, valid_uidl, True)
TIMES = Kind(RETRIEVED_MAGIC, _time_value, False)


def load(dir_fd: int | None, owner: Owner | None, where: str, name: str = UIDLIST, kind: Kind = UIDS, *,
         loop_cap: int | None = None) -> dict[str, str]:  # fmt: skip
    """The map file `name` (below `dir_fd` when given); empty when absent, unusable or broken (logged);
    TooBigForLoop, unread, when larger than `loop_cap` (see safefile.read_capped)."""
    try:
        data = read_capped(name, MAX_MAP, dir_fd=dir_fd, owner=owner, loop_cap=loop_cap)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("%s: %s ignored: %s", where, name, exc)
        return {}
    try:
        return parse(data, kind.magic, kind.value_ok)
    except ValueError as exc:
        log.warning("%s: %s ignored: %s", where, name, exc)
        return {}


def save(mapping: dict[str, str], dir_fd: int | None, owner: Owner | None, name: str = UIDLIST,
         kind: Kind = UIDS) -> None:  # fmt: skip
    """Replace the map atomically (OSError is the caller's: the import reports it, a commit logs it)."""
    prepare = None if owner is None else partial(Owner.give, owner)
    replace_text(name, render(mapping, kind.magic), name, dir_fd=dir_fd, prepare=prepare, durable=kind.durable)


def apply(messages: list[MessageInfo], mapping: dict[str, str], where: str) -> dict[str, str]:
    """Give the messages of a snapshot their imported UIDLs, in place of the list's entries (new objects:
    the scan memo shares MessageInfo objects between sessions). Returns imported -> own uid of what was
    replaced. An imported UIDL that equals the own uid of another message of the snapshot (new mail
    could, in theory, be named like an old UIDL) is not applied: RFC 1939 §7 uniqueness wins, logged."""
    if not mapping:
        return {}
    own = {m.uid for m in messages}
    back: dict[str, str] = {}
    for i, m in enumerate(messages):
        new = mapping.get(m.uid)
        if new is None or new == m.uid:
            continue
        if new in own:
            log.warning("%s: imported UIDL %s of %s not used: another message has it", where, new, m.uid)
            continue
        back[new] = m.uid
        messages[i] = MessageInfo(m.size, new, m.key)
    return back
