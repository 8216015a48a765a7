"""SASLprep (RFC 4013), the string preparation RFC 6856 §2.2 asks of UTF-8 user names and passwords.

Why SASLprep from the standard library and not PRECIS (RFC 8265, e.g. the precis-i18n package): RFC 6856 §2.2
names SASLprep "or one of its Standards Track successors" and then speaks in SASLprep's own terms ("query
string", "stored string", the prohibited characters of RFC 4013 §2.3). PRECIS's username profiles build on the
IdentifierClass, which forbids spaces, and pop3d has always accepted user names with spaces (some directories
have them), so a PRECIS username profile would lock out accounts that work today. `stringprep` carries the
RFC 3454 tables, and `unicodedata.ucd_3_2_0` the Unicode 3.2 normalisation that RFC 3454 fixes: no dependency.
"""

from __future__ import annotations

import stringprep
import unicodedata

_NFKC = unicodedata.ucd_3_2_0.normalize  # RFC 3454 §4 fixes Unicode 3.2, whatever Python's own version

# RFC 4013 §2.3: prohibited output (C.1.2 non-ASCII space, C.2.1/C.2.2 controls, C.3 private use,
# C.4 non-character code points, C.5 surrogates, C.6 inappropriate for plain text, C.7 inappropriate for
# canonical representation, C.8 change display properties or deprecated, C.9 tagging characters)
_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


class SASLprepError(ValueError):
    """The string cannot be prepared: it holds a prohibited character or breaks the bidi rule."""


def saslprep(text: str, *, stored: bool = False) -> str:
    """`text` prepared by RFC 4013 SASLprep; SASLprepError when it must be rejected.

    `stored` False prepares a "query string" (unassigned code points allowed), as RFC 6856 §2.2 asks for the
    USER and PASS arguments and the APOP user name; True a "stored string" (RFC 3454 §7: unassigned code
    points prohibited), as it asks for the APOP shared secret. Printable ASCII is returned as is: SASLprep
    maps, normalises and forbids nothing in it, so the common case costs two string scans.
    """
    if text.isascii() and text.isprintable():
        return text
    # §2.1 mapping: non-ASCII spaces become SPACE, "commonly mapped to nothing" (B.1) characters vanish
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    prepared = _NFKC("NFKC", mapped)  # §2.2
    for c in prepared:
        if any(table(c) for table in _PROHIBITED):
            raise SASLprepError(f"prohibited character U+{ord(c):04X} (RFC 4013 §2.3)")
        if stored and stringprep.in_table_a1(c):
            raise SASLprepError(f"unassigned code point U+{ord(c):04X} in a stored string (RFC 3454 §7)")
    # §2.4: the bidi rule of RFC 3454 §6
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared):
            raise SASLprepError("mixes right-to-left and left-to-right characters (RFC 3454 §6)")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise SASLprepError("right-to-left text must start and end with a right-to-left character")
    return prepared
