"""The Maildir file-name grammar (https://cr.yp.to/proto/maildir.html): base name, info, flags, UIDL.

* The info starts at the first `:2,` (base names cannot contain ':'), else at `;2,` or `!2,`, which some
  systems use where ':' is not allowed in file names. Flags follow it, sorted.
* UIDL (RFC 1939 §7): the uid is the message's unique *base name*, so flag changes and the new/ -> cur/ move
  never change it. Names that are not 1-70 octets of 0x21-0x7E are %XX-escaped (`%` itself too, so escaping
  stays injective); if still too long the uid is `%H` + sha1 hex of the name, which no escaped name can
  equal (`H` is not a hex digit).
"""

from __future__ import annotations

import hashlib
import os
import re

MAX_UID = 70  # RFC 1939 §7: 1 to 70 characters in 0x21-0x7E

# Every base name of the maildrop, joined by "/", is a standard name with a 10-digit time (2001 to 2286),
# at most 70 characters, of 0x21-0x7E without "%" (our uid escape), "!" and ";" (other info separators)
# and "/": then the uid is the base name itself and plain string order is (time, name) order.
_NAME = r"[0-9]{10}\.[\x22-\x24\x26-\x2e\x30-\x3a\x3c-\x7e]{0,59}"
STANDARD_NAMES = re.compile(f"{_NAME}(?:/{_NAME})*")

_ZEROS = ["0" * (20 - n) for n in range(21)]


def split_name(name: str) -> tuple[str, str, str]:
    """(base, separator, flags) of a Maildir file name; separator and flags are "" when it has no info."""
    i = name.find(":2,")
    if i < 0:
        found = [j for j in (name.find(";2,"), name.find("!2,")) if j >= 0]
        if not found:
            return name, "", ""
        i = min(found)
    return name[:i], name[i], name[i + 3 :]


def with_seen(base: str, sep: str, flags: str) -> str:
    """The cur/ key of a message with the `S` (seen) flag added; flags stay sorted, as Maildir requires."""
    return f"cur/{base}{sep or ':'}2,{''.join(sorted(set(flags) | {'S'}))}"


def uid_for(base: str) -> str:
    """The UIDL of a base name: itself when already a valid uid, else an injective escape or a digest."""
    if len(base) <= MAX_UID and base.isascii() and base.isprintable() and " " not in base and "%" not in base:
        return base  # every standard Maildir name
    raw = os.fsencode(base)  # undoes surrogateescape, so undecodable names are escaped byte for byte
    escaped = "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)
    if 0 < len(escaped) <= MAX_UID:
        return escaped
    return "%H" + hashlib.sha1(raw).hexdigest()


def size_field(base: str) -> int | None:
    """Dovecot's `,W=<n>` (size with CRLF line ends) from the base name, or None."""
    i = base.find(",W=")
    if i < 0:
        return None
    j = base.find(",", i + 3)
    digits = base[i + 3 :] if j < 0 else base[i + 3 : j]
    return int(digits) if digits.isdigit() and digits.isascii() else None


def time_key(base: str) -> str:
    """The delivery time of a standard name zero-padded to 20 digits, then the base name, so that one string
    comparison orders by (time, name); "" when the name carries no time (then the file's mtime is used)."""
    dot = base.find(".")
    head = base[:dot]
    return _ZEROS[dot] + base if 0 < dot <= 20 and head.isdigit() and head.isascii() else ""
