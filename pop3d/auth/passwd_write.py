"""Change one user's secret in a passwd-file: atomically, keeping every other octet, one writer at a time.

Readers (every worker's pop3d.auth.passwd_file, the operator's tools) must only ever see the old file or the
new one, never half of it, so the new content goes to an exclusively created temporary file in the same
directory (O_CREAT|O_EXCL|O_NOFOLLOW under an unpredictable name: nobody can plant a link there), gets the
original's owner and mode, is written and fsynced, and is renamed over the file; the directory is fsynced so
the rename survives a crash. Only the password field of that user's line changes: every other field of the
line and every other line stay as they were, octet for octet (comments, blank lines, CRLF line ends).

Two changes at once (two workers, or poppassd and `pop3d user passwd`) must not lose one: each runs its
read-modify-rename under an exclusive lock on `FILE.lock` beside the file (flock: released by the kernel if
the holder dies). An editor that rewrites the file meanwhile without the lock is noticed (the file's identity
changed between the read and the rename) and the change is redone on its version.

Every rewrite gets a modification time later than the file it replaces, even within one clock tick: readers
notice changes by (device, inode, size, mtime), and a recycled inode with the same size (hashes of one
scheme have one length) must not look like a version they already hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Final

__all__ = ["LOCK_SUFFIX", "PasswdWriteError", "replace_secret"]

LOCK_SUFFIX: Final = ".lock"
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: times the file may change under us (an editor without the lock) before we give up
_ATTEMPTS: Final = 5


class PasswdWriteError(OSError):
    """The file could not be rewritten as required (its owner cannot be kept, it keeps changing)."""


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _is_entry_of(line: bytes, name: bytes, is_entry: Callable[[str], bool]) -> bool:
    """Whether `line` (with its line end) is the entry the reader takes for `name`: the reader skips blank
    lines, comments, undecodable lines and lines it cannot parse (`is_entry` says which, for the text)."""
    if not line.startswith(name + b":"):
        return False
    try:
        text = line.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return is_entry(text)


def rewrite(data: bytes, name: str, secret: str, is_entry: Callable[[str], bool]) -> bytes | None:
    """`data` with the password field of `name`'s entry replaced by `secret`; None when there is no entry.

    Only that field changes. Lines are split as the reader splits them (bytes.splitlines: LF, CRLF or CR), and
    the first parsable line of the name is the entry, as for the reader (later ones are ignored there). An
    entry on a last line without a line end gets an LF: a reader takes an unterminated last line of a freshly
    written file for one still being written.
    """
    key = name.encode("utf-8")
    lines = data.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if _is_entry_of(line, key, is_entry):
            body = line.rstrip(b"\r\n")
            end = line[len(body) :] or b"\n"
            rest = body[len(key) + 1 :]
            colon = rest.find(b":")
            tail = rest[colon:] if colon >= 0 else b""
            lines[i] = key + b":" + secret.encode("utf-8") + tail + end
            return b"".join(lines)
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """The exclusive writer lock of the passwd-file `path` (`path` + LOCK_SUFFIX, created 0600 if missing)."""
    fd = os.open(path + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def replace_secret(path: str | os.PathLike[str], name: str, secret: str, is_entry: Callable[[str], bool]) -> bool:
    """Set `name`'s password field in the passwd-file `path` to `secret` (a `{SCHEME}...` string); False when
    the file has no entry for `name`. Blocks (lock, fsync): call it off the event loop.

    `path` may be a symbolic link: the file it points to is replaced, the link stays. Raises OSError
    (PasswdWriteError when the owner cannot be kept or the file keeps changing).
    """
    if any(c in secret for c in ":\r\n") or not secret:
        raise ValueError("a stored secret cannot be empty or contain ':' or a line end")
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    with locked(real):
        for _ in range(_ATTEMPTS):
            with open(real, "rb") as f:
                before = os.fstat(f.fileno())
                data = f.read()
            new = rewrite(data, name, secret, is_entry)
            if new is None:
                return False
            if _install(real, directory, new, before):
                return True
        raise PasswdWriteError(f"{real} kept changing while pop3d rewrote it; password not changed")


def _install(real: str, directory: str, data: bytes, before: os.stat_result) -> bool:
    """Write `data` to a temporary file shaped like `before` and rename it over `real`; False (nothing
    changed) when `real` is no longer the file `before` describes."""
    tmp = ""
    fd = -1
    try:
        for _ in range(8):
            tmp = os.path.join(directory, f".{os.path.basename(real)}.{secrets.token_hex(8)}.tmp")
            try:
                fd = os.open(tmp, _CREATE, 0o600)
                break
            except FileExistsError:  # 64 random bits: only a planted name collides; draw again
                continue
        else:
            raise PasswdWriteError(f"cannot create a temporary file beside {real}")
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (before.st_uid, before.st_gid):
            try:
                os.fchown(fd, before.st_uid, before.st_gid)
            except PermissionError:
                raise PasswdWriteError(
                    f"{real}: cannot give the new file the owner {before.st_uid}:{before.st_gid} of the old one"
                ) from None
        os.fchmod(fd, before.st_mode & 0o7777)
        _write_all(fd, data)
        # strictly later than the file it replaces (see the module docstring)
        mtime = max(time.time_ns(), before.st_mtime_ns + 1)
        os.utime(fd, ns=(before.st_atime_ns, mtime))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            now = os.stat(real)
        except FileNotFoundError:
            return False
        if _identity(now) != _identity(before):
            return False  # rewritten without the lock meanwhile: redo the change on that version
        os.rename(tmp, real)
        tmp = ""
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(directory)
    return True
