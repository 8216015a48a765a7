"""The secret pop3d keeps in `server.state_dir`, so what it derives from it survives restarts.

Decoy credentials for unknown users (pop3d.auth.decoys) are HMACs of this secret: fake SCRAM salts and
iteration counts must stay the same across restarts, as real ones do, or a restart would tell which names are
real (RFC 5802 §9). Read it once per server start, in the process that forks the workers, so every worker
derives the same values.

The file (`auth-secret`, 32 random octets, mode 0600) is created under a random temporary name with
O_CREAT|O_EXCL|O_NOFOLLOW and then linked into place without replacing anything, so a half-written secret is
never seen and two processes starting together end up with the same one. When the directory cannot be
used, a warning says so and a random secret serves this process: everything works, but decoys change at
restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

__all__ = ["FILE_NAME", "SECRET_BYTES", "load_or_create"]

log = logging.getLogger(__name__)

FILE_NAME: Final[str] = "auth-secret"
SECRET_BYTES: Final[int] = 32
_NOFOLLOW: Final[int] = getattr(os, "O_NOFOLLOW", 0)


def _read(path: Path) -> bytes:
    """The secret in `path`; FileNotFoundError when absent, OSError/ValueError when it is not a secret file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != SECRET_BYTES:
            raise ValueError(f"{path} is not a {SECRET_BYTES}-octet regular file")
        data = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != SECRET_BYTES:
        raise ValueError(f"{path} changed while it was read")
    if st.st_mode & 0o077:
        log.warning("%s is readable by others (mode %o); make it 0600", path, stat.S_IMODE(st.st_mode))
    return data


def _create(directory: Path, path: Path) -> None:
    """Write a new secret next to `path` and link it into place unless another process got there first."""
    tmp = directory / f".{FILE_NAME}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces a secret another process just made
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: rename, then everybody reads what is there
            os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create(state_dir: str | Path) -> bytes:
    """The server secret from `state_dir` (created, with the directory, when missing).

    Never raises: if the directory cannot be used it logs one warning and returns a random secret for this
    process (call it once per start; the caller keeps the value and hands it to `build_auth` on reloads).
    """
    directory = Path(state_dir)
    path = directory / FILE_NAME
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return _read(path)
        except FileNotFoundError:
            _create(directory, path)
            return _read(path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning(
            "state_dir %s cannot keep the server secret (%s); using a random one, so decoys for "
            "unknown users will change at restart",
            directory,
            reason,
        )
        return secrets.token_bytes(SECRET_BYTES)
