"""Delivery into a Maildir (https://cr.yp.to/proto/maildir.html): write in tmp/, then link into new/.

* The maildir is opened, or created (0700, the user's), with the checks of a login (MaildirDrop._open_root,
  drop.py: no symbolic link, directories of the owner), and tmp/ and new/ are then opened below the root's fd
  without following a link, so a user who swaps a directory for a link cannot aim the delivery elsewhere.
* The file is created exclusively (O_EXCL|O_NOFOLLOW, mode 0600, given to the owner when pop3d is root),
  written, fsynced, hard-linked into new/ (link(2) never replaces an existing name: a clash draws a new
  name), then new/ is fsynced: only then is the message durable, and only then does delivery return.
* The name is `<seconds>.M<usec>P<pid>Q<n>.<host>,S=<stored octets>,W=<network octets>`: unique per host
  (time, pid, a per-process counter), the delivery time first so the scan orders by it, and `,W=` so the
  next login learns the size from the name without reading the body (names.size_field). The host is
  escaped (`/` -> `\\057`, `:` -> `\\072`, as Maildir requires) and cut so the base name stays within the
  70 characters of a standard name (names.STANDARD_NAMES), whose UIDL is the name itself.
* An open POP3 session never sees it: its snapshot was fixed at login (RFC 1939 §4); the next one does.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import time

from pop3d.storage.base import TemporaryError
from pop3d.storage.delivery import stored_form, temporary, write_all
from pop3d.storage.maildir.names import MAX_UID
from pop3d.storage.safefile import DIR_FLAGS, Owner
from pop3d.wire import network_size

log = logging.getLogger(__name__)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_counter = itertools.count(1)


def host_part(host: str) -> str:
    """A host name as a Maildir name part: `/` and `:` escaped, as the Maildir specification says."""
    return host.replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name(size: int, wsize: int, now: float | None = None, host: str | None = None) -> str:
    """A new base name (see the module docstring); at most MAX_UID characters."""
    now = time.time() if now is None else now
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    head = f"{sec}.M{usec:06d}P{os.getpid()}Q{next(_counter)}."
    tail = f",S={size},W={wsize}"
    room = max(MAX_UID - len(head) - len(tail), 1)
    return head + host_part(socket.gethostname() if host is None else host)[:room] + tail


def deliver_into(root_fd: int, owner: Owner, path: str, message: bytes) -> str:
    """Store `message` in the maildir open as `root_fd` (checked by the caller: MaildirDrop._open_root);
    the key `new/NAME`. No session lock is taken. Raises TemporaryError (pop3d.storage.delivery)."""
    data = stored_form(message)
    fds: list[int] = []
    try:
        tmp_fd = os.open("tmp", DIR_FLAGS, dir_fd=root_fd)
        fds.append(tmp_fd)
        new_fd = os.open("new", DIR_FLAGS, dir_fd=root_fd)
        fds.append(new_fd)
        for sub, fd in (("tmp", tmp_fd), ("new", new_fd)):
            owner.check_ours(os.fstat(fd), f"{path}/{sub}")
        return _store(owner, tmp_fd, new_fd, data)
    except Exception as exc:
        log.error("maildir %s: delivery failed: %s", path, exc)
        raise temporary(exc, f"maildir {path}") from exc
    finally:
        for fd in fds:
            os.close(fd)


def _store(owner: Owner, tmp_fd: int, new_fd: int, data: bytes) -> str:
    for _ in range(8):
        name = unique_name(len(data), network_size(data))
        try:
            fd = os.open(name, _CREATE, 0o600, dir_fd=tmp_fd)
        except FileExistsError:
            continue  # a leftover of a crashed delivery with the same pid: draw again
        try:
            try:
                owner.give(fd)
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)
            except FileExistsError:
                continue
            os.fsync(new_fd)  # the new directory entry is on disk: the message is durable
        finally:
            try:
                os.unlink(name, dir_fd=tmp_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the message is in new/ already: a stale tmp/ file is no failure
                log.warning("cannot remove tmp/%s: %s", name, exc)
        return f"new/{name}"
    raise TemporaryError(f"no unique name after 8 attempts ({errno.errorcode[errno.EEXIST]})")
