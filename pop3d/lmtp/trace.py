"""The trace fields pop3d prepends to a delivered message (RFC 5321 §4.4): `Return-Path:` then `Received:`.

The delivered octets follow unchanged. Everything taken from the MTA (sender, LHLO name) is reduced to
printable ASCII without the characters that would end a field or a comment, and cut in length, so a hostile
envelope cannot add header lines.
"""

from __future__ import annotations

import email.utils
import re

_JUNK = re.compile(r"[^\x21-\x7e]|[()<>\\]")


def clean(text: str, limit: int = 255) -> str:
    return _JUNK.sub("_", text[:limit])


def trace_header(sender: str, recipient: str, helo: str, peer: str, hostname: str, ident: str,
                 now: float | None = None) -> bytes:  # fmt: skip
    """`Return-Path: <sender>` and a folded `Received:` field, CRLF-terminated (`<>` is the null sender)."""
    sender = "" if sender == "<>" else clean(sender)
    date = email.utils.formatdate(now, localtime=True)
    text = (
        f"Return-Path: <{sender}>\r\n"
        f"Received: from {clean(helo) or 'unknown'} ({clean(peer)})\r\n"
        f"\tby {clean(hostname)} (pop3d) with LMTP id {clean(ident)}\r\n"
        f"\tfor <{clean(recipient)}>; {date}\r\n"
    )
    return text.encode("ascii")
