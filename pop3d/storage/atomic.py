"""Replace a small metadata file atomically (a temp file in the same directory, then rename).

Used for the caches beside maildrops (Maildir size cache, mbox index). A failure is logged and swallowed:
losing a cache costs a slower next login, never mail.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("pop3d.storage")


def replace_text(path: str, text: str, what: str, *, durable: bool = False) -> None:
    """Write `text` (ASCII) to `path` atomically; `durable` fsyncs before the rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s %s: %s", what, path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
