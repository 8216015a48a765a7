"""Write a file pop3d keeps beside a maildrop atomically, without trusting the directory it lives in.

The directory may be writable by the maildrop's owner, and pop3d may run as root: a predictable temporary
name (`PATH.PID.tmp`) opened with a plain open() lets the owner plant a symbolic link there and have root
truncate any file. So the temporary file is created exclusively (O_CREAT|O_EXCL|O_NOFOLLOW, which never
opens an existing name nor follows a link) under an unpredictable name in the same directory, mode 0600,
then renamed over the target (rename replaces a planted link itself, never what it points to).

Used for the caches beside maildrops (Maildir size cache, mbox index) and the mbox commit journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable

log = logging.getLogger("pop3d.storage")

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
TEMP_SUFFIX = ".tmp"


def temp_name(path: str) -> str:
    """An unpredictable sibling of `path`: `.NAME.<64 random bits>.tmp` (a dotfile, so Maildir scans skip it)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")


def is_temp_of(name: str, target: str) -> bool:
    """Whether the directory entry `name` is a temporary file made by temp_name for `target`'s name."""
    prefix = f".{os.path.basename(target)}."
    return name.startswith(prefix) and name.endswith(TEMP_SUFFIX) and len(name) == len(prefix) + 16 + 4


def create_temp(path: str, *, dir_fd: int | None = None, mode: int = 0o600) -> tuple[int, str]:
    """(fd, name) of a new, empty temporary file for `path`, opened for writing."""
    for _ in range(8):
        tmp = temp_name(path)
        try:
            return os.open(tmp, _CREATE, mode, dir_fd=dir_fd), tmp
        except FileExistsError:  # 64 random bits: only a planted name collides; draw again
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def install(fd: int, tmp: str, path: str, *, dir_fd: int | None = None, durable: bool = False) -> None:
    """Close the written temporary file and rename it over `path` (fsynced first when `durable`)."""
    try:
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def replace_text(path: str, text: str, what: str, *, durable: bool = False, dir_fd: int | None = None,
                 prepare: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """Write `text` (ASCII) to `path` (relative to `dir_fd` if given) atomically; `durable` fsyncs before the
    rename; `prepare(fd)` runs on the temporary file before it is installed (e.g. to give it to the
    maildrop's owner). A failure is logged and swallowed: losing a cache costs a slower next login."""
    tmp = None
    try:
        fd, tmp = create_temp(path, dir_fd=dir_fd)
        try:
            data = text.encode("ascii")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if prepare is not None:
                prepare(fd)
        except BaseException:
            os.close(fd)
            raise
        install(fd, tmp, path, dir_fd=dir_fd, durable=durable)
    except OSError as exc:
        log.warning("cannot write %s %s: %s", what, path, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
