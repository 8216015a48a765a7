"""What the old servers stored: parsers for Dovecot's `dovecot-uidlist`, Courier's `courierpop3dsizelist`
and qpopper's `X-UIDL:` headers, each giving Maildir base name -> the UIDL that server announced.

Every input is hostile (the maildrop's owner could write these files): parsers take bytes already read
with a size cap, never raise anything but ValueError, and skip nothing silently: a line that breaks the
format makes the whole file refused (a half-understood list would announce wrong UIDLs, and a client
would then re-download or, worse, skip mail). Whether a UIDL is acceptable to pop3d (RFC 1939 §7) is
checked by the importer, per message, so one odd id is reported, not fatal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pop3d.storage.maildir.names import split_name

#: Dovecot's default pop3_uidl_format (doc: "pop3_uidl_format = %08Xu%08Xv")
DOVECOT_DEFAULT_FORMAT = "%08Xu%08Xv"
_MAX_NUMBER = 2**32 - 1  # Dovecot's uids and uidvalidity are 32-bit


@dataclass
class DovecotRecord:
    uid: int
    name: str  # the file name as the list has it (base name, maybe with its info part)
    fields: dict[str, str] = field(default_factory=dict)  # extension letter -> value (W, S, G, O, ...)

    @property
    def base(self) -> str:
        return split_name(self.name)[0]


@dataclass
class DovecotList:
    version: int
    uidvalidity: int
    records: list[DovecotRecord]


def _number(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > _MAX_NUMBER:
        raise ValueError(f"{what} {text[:20]!r} is not a 32-bit number")
    return int(text)


def _text_lines(data: bytes) -> list[str]:
    """The lines of a UTF-8 text file, without their LF (a final LF ends the last line); ValueError if the
    file is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def parse_dovecot_uidlist(data: bytes) -> DovecotList:
    """`dovecot-uidlist`, format version 1 (`1 UIDVALIDITY NEXTUID`, then `UID FILENAME` lines) or 3
    (`3 V<uidvalidity> N<nextuid> [G<guid>...]`, then `UID [<letter><value>...] :FILENAME` lines)."""
    lines = _text_lines(data)
    if not lines:
        raise ValueError("empty file")
    head = lines[0].split(" ")
    if head[0] == "1":
        if len(head) != 3:
            raise ValueError("version 1 header is not `1 UIDVALIDITY NEXTUID`")
        version, uidvalidity = 1, _number(head[1], "uidvalidity")
        _number(head[2], "next uid")
    elif head[0] == "3":
        version = 3
        keys = {part[:1]: part[1:] for part in head[1:] if part}
        if "V" not in keys:
            raise ValueError("version 3 header has no V<uidvalidity>")
        uidvalidity = _number(keys["V"], "uidvalidity")
    else:
        raise ValueError(f"unsupported dovecot-uidlist version {head[0][:10]!r} (1 and 3 are known)")
    records: list[DovecotRecord] = []
    seen: set[int] = set()
    for number, line in enumerate(lines[1:], 2):
        if version == 1:
            uid_text, sep, name = line.partition(" ")
            fields: dict[str, str] = {}
        else:
            before, sep, name = line.partition(" :")
            if not sep:
                before, sep, name = line.partition(":")  # a record without extension fields: `UID :NAME`
                before = before.rstrip(" ")
            uid_text, _, rest = before.partition(" ")
            fields = {}
            for part in rest.split(" ") if rest else []:
                if not part or not part[:1].isalpha():
                    raise ValueError(f"line {number}: bad extension field {part[:20]!r}")
                fields[part[:1]] = part[1:]
        if not sep or not name or "/" in name or "\0" in name:
            raise ValueError(f"line {number}: not a uidlist record")
        uid = _number(uid_text, f"line {number}: uid")
        if uid == 0 or uid in seen:
            raise ValueError(f"line {number}: uid {uid} is zero or listed twice")
        seen.add(uid)
        records.append(DovecotRecord(uid, name, fields))
    return DovecotList(version, uidvalidity, records)


# %[offset.][0][width][modifiers]<letter> or %[...]{name}: the subset of Dovecot's var_expand that
# pop3_uidl_format uses in practice
_VAR = re.compile(r"%(?:(?P<off>\d+)\.)?(?P<width>\d+)?(?P<mods>[XxLU]*)(?:(?P<letter>[uvmfg%])|\{(?P<long>[a-z]+)\})")
_LONG = {"uid": "u", "uidvalidity": "v", "md5": "m", "filename": "f", "guid": "g"}


def check_format(fmt: str) -> None:
    """ValueError unless `fmt` is a pop3_uidl_format this importer can render: %u %v %f %g, modifiers X
    (lower-case hex, as Dovecot), L, U, width/zero padding, offset. Not %m, the header MD5, whose exact
    input Dovecot does not document: such a list needs its `O` fields."""
    pos = 0
    for m in _VAR.finditer(fmt):
        if "%" in fmt[pos : m.start()]:
            raise ValueError(f"pop3_uidl_format {fmt!r}: unknown variable at {fmt[pos:][:10]!r}")
        letter = m["letter"] or _LONG.get(m["long"] or "", "")
        if not letter:
            raise ValueError(f"pop3_uidl_format {fmt!r}: unknown variable %{{{m['long']}}}")
        if letter == "m":
            raise ValueError(f"pop3_uidl_format {fmt!r}: %m (header MD5) cannot be reproduced; use O fields")
        pos = m.end()
    if "%" in fmt[pos:]:
        raise ValueError(f"pop3_uidl_format {fmt!r}: unknown variable at {fmt[pos:][:10]!r}")


def render_dovecot(fmt: str, record: DovecotRecord, uidvalidity: int) -> str:
    """The UIDL Dovecot announced for `record` with pop3_uidl_format `fmt` (check_format first). An `O`
    field is an explicit POP3 UIDL (kept from an earlier migration) and wins over the format, as in Dovecot."""
    explicit = record.fields.get("O")
    if explicit:
        return explicit
    values: dict[str, int | str] = {
        "u": record.uid,
        "v": uidvalidity,
        "f": record.base,
        "g": record.fields.get("G") or record.base,
    }

    def one(m: re.Match[str]) -> str:
        letter = m["letter"] or _LONG[m["long"]]
        if letter == "%":
            return "%"
        value = values[letter]
        mods = m["mods"]
        if "X" in mods or "x" in mods:  # Dovecot's X is lower-case hex (seen: %08Xv -> 6b0db759)
            text = f"{value:x}" if isinstance(value, int) else value.encode().hex()
        else:
            text = str(value)
        if "L" in mods:
            text = text.lower()
        if "U" in mods:
            text = text.upper()
        if m["off"]:
            text = text[int(m["off"]) :]
        width = m["width"]
        if width:
            text = text.rjust(int(width), "0") if width.startswith("0") else text[: int(width)]
        return text

    return _VAR.sub(one, fmt)


def dovecot_uidls(data: bytes, fmt: str = DOVECOT_DEFAULT_FORMAT) -> dict[str, str]:
    """base name -> UIDL from a `dovecot-uidlist`; ValueError for a file or format that is not understood."""
    check_format(fmt)
    parsed = parse_dovecot_uidlist(data)
    return {r.base: render_dovecot(fmt, r, parsed.uidvalidity) for r in parsed.records}


def courier_uidls(data: bytes) -> dict[str, str]:
    """base name -> UIDL from Courier's `courierpop3dsizelist`: header `/VERSION NEXTUID [UIDV]` (versions 2
    and 3), lines `FILENAME SIZE N:UIDV[:UTF8]`; Courier announces `UID<N>-<UIDV>` (`UID<N>` when UIDV is 0)."""
    lines = _text_lines(data)
    if not lines or not lines[0].startswith("/"):
        raise ValueError("no `/VERSION` header: not a courierpop3dsizelist")
    head = lines[0][1:].split(" ")
    if head[0] not in ("2", "3") or len(head) not in (2, 3):
        raise ValueError(f"unsupported courierpop3dsizelist header {lines[0][:30]!r} (versions 2 and 3)")
    out: dict[str, str] = {}
    for number, line in enumerate(lines[1:], 2):
        rest, _, ids = line.rpartition(" ")
        name, _, size = rest.rpartition(" ")
        parts = ids.split(":")
        if not name or "/" in name or not (size.isascii() and size.isdigit()) or len(parts) not in (2, 3):
            raise ValueError(f"line {number}: not `FILENAME SIZE N:UIDV[:UTF8]`")
        n, uidv = _number(parts[0], f"line {number}: uid"), _number(parts[1], f"line {number}: uidv")
        base = split_name(name)[0]
        if base in out:
            raise ValueError(f"line {number}: {base[:40]!r} is listed twice")
        out[base] = f"UID{n}-{uidv}" if uidv else f"UID{n}"
    return out


#: how much of a message's start is searched for its header (qpopper puts X-UIDL among the first headers)
XUIDL_HEAD = 64 * 1024
_XUIDL = re.compile(rb"^X-UIDL:[ \t]*(\S*)[ \t]*\r?$", re.I | re.M)


def find_xuidl(head: bytes) -> str | None:
    """The `X-UIDL:` value of the header block at the start of `head` (qpopper's UIDL), or None. The value is
    returned even when it is not a valid UIDL, so the importer can report it."""
    end = min((i for i in (head.find(b"\n\n"), head.find(b"\r\n\r\n")) if i >= 0), default=len(head))
    m = _XUIDL.search(head, 0, end)
    if m is None or not m[1]:
        return None
    return m[1].decode("latin-1")
