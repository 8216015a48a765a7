"""A counter of user-database changes, shared by the worker processes.

poppassd (or `pop3d user passwd` on a passwd-file) changes a password in one worker; the others look at the
passwd-file at most once a second (`min_check_interval`), so for up to a second they would still accept the
old password. The writer bumps this counter after the rename; every lookup compares it with the value its
table was read at (one 8-octet read of shared memory) and re-reads the file at once when it moved. So a
change takes effect at the next login on every worker, as a password change must.

Made by the supervisor before it forks (anonymous MAP_SHARED memory, like the penalty table); a single
process keeps a private one. Increments are not atomic across processes: two bumps at the same instant may
leave the counter one higher instead of two, which still differs from what every reader saw before.
"""

from __future__ import annotations

import mmap
import struct

_COUNTER = struct.Struct("=Q")


class Generation:
    """One 64-bit counter in anonymous memory (`shared`: visible to processes forked after it was made)."""

    __slots__ = ("_buf",)

    def __init__(self, shared: bool = False) -> None:
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        self._buf = mmap.mmap(-1, _COUNTER.size, flags=flags)

    def current(self) -> int:
        return int(_COUNTER.unpack_from(self._buf)[0])

    def bump(self) -> int:
        """Say "the user database changed"; returns the new value."""
        value = (self.current() + 1) & 0xFFFF_FFFF_FFFF_FFFF
        _COUNTER.pack_into(self._buf, 0, value)
        return value
