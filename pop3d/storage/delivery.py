"""What the Maildir and mbox delivery paths share: the stored line ends, and which errors a delivery reports.

* Line ends: LMTP carries CRLF (RFC 5321 §2.3.8); Maildir and mbox keep LF, the Unix way (as Postfix's
  local(8) and Dovecot write them). CRLF -> LF changes nothing POP3 serves: the network form (pop3d.wire)
  turns every LF back into CRLF, so sizes and RETR octets are those the MTA sent. The one exception is a CR
  just before a CRLF (`\\r\\r\\n`), which LF storage would read back as a plain line end: such a message is
  stored as it came, CRLF and all, which pop3d.wire serves unchanged too.
* Errors: a mailbox that cannot be written now (a full disk, a lock held too long, a directory in the wrong
  place, wrong rights) is a TemporaryError, as Postfix's local(8) and Dovecot's LMTP defer such mail: the
  MTA keeps the message and retries until an operator fixes the mailbox. Only a recipient that can never
  have a maildrop (a name that cannot be a path) is refused for good.
"""

from __future__ import annotations

import os

from pop3d.storage.base import StorageError, TemporaryError


def stored_form(message: bytes) -> bytes:
    """The octets to store for `message` as delivered: CRLF -> LF unless that would lose a CR (see above)."""
    if b"\r\n" not in message or b"\r\r\n" in message:
        return message
    return message.replace(b"\r\n", b"\n")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every octet is written (a short write is not an error)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def temporary(exc: BaseException, what: str) -> TemporaryError:
    """The delivery error for `exc`: always temporary, so the MTA keeps the message (see above)."""
    if isinstance(exc, TemporaryError):
        return exc
    if isinstance(exc, StorageError):
        return TemporaryError(f"{what}: {exc}")
    if isinstance(exc, OSError):
        return TemporaryError(f"{what}: {exc.strerror or exc}")
    return TemporaryError(f"{what}: {exc}")
