"""Which user an LMTP recipient names (`lmtp.recipient`, `lmtp.recipient_delimiter`). Pure.

RFC 5321 §2.4: the local part is case-sensitive, so it is used as it comes; the MTA, which knows the
domain's rules, folds case if the site wants it (Postfix does for local recipients).
"""

from __future__ import annotations

from typing import Literal

MAX_NAME = 255


def user_name(address: str, mode: Literal["localpart", "address"], delimiter: str = "") -> str | None:
    """The user name for `address` (an addr-spec from RCPT TO), or None when it names nobody.

    "localpart": the part before the last `@` (a quoted local part may hold another `@`); "address": the
    whole address. With a delimiter, the local part is cut at the first of its characters (bob+list -> bob).
    """
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if delimiter:
        cut = min((i for i in (local.find(c) for c in delimiter) if i > 0), default=-1)
        if cut > 0:
            local = local[:cut]
    name = local if mode == "localpart" else (f"{local}@{domain}" if at else local)
    if not name or len(name) > MAX_NAME or not name.isprintable():
        return None
    return name
