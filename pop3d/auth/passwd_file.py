"""A user database in Dovecot's passwd-file format, re-read when the file changes.

Line format: `user:{SCHEME}secret[:uid:gid:gecos:home:shell:extra_fields]`, extra fields being space-separated
`key=value` (or bare `key`) tokens. A password without `{SCHEME}` is CRYPT, as in Dovecot.
The file is the operator's to edit while the server runs: a bad line costs that one account (with a warning
naming file and line, never the secret), and a file that vanishes or turns unreadable leaves the last good
copy in service, so a botched edit cannot lock everybody out.

A rewrite in place (truncate, then write) can be read half-done. So a read never replaces the table in force
when the file changed while it was read, and while the file is fresh (modified less than `settle` seconds
ago) a read only adds and changes entries: an incomplete last line is ignored and users missing from it are
kept from the previous table until the file has settled. An empty file never replaces a non-empty table
unless a reload is asked for (SIGHUP). Atomic replacement (write a new file, rename it) needs none of this.

Unknown users, and names that cannot be user names, cost what real ones cost (pop3d.auth.decoys), and failures
answer no sooner than the dearest entry of the file would (pop3d.auth.floors, calibrated at each load).
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Final, NamedTuple, TypeVar

from pop3d.auth import passwd_write, schemes
from pop3d.auth.base import Credentials, User
from pop3d.auth.generation import Generation
from pop3d.auth.hashed import DEFAULT_MAX_PASSWORD_LENGTH, MAX_NAME_OCTETS, HashedSecrets, plausible_name

__all__ = [
    "DEFAULT_MAX_PASSWORD_LENGTH",
    "MAX_NAME_OCTETS",
    "PasswdFileAuthenticator",
    "plausible_name",
    "read_entries",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds after its last modification a file may still be mid-rewrite.
DEFAULT_SETTLE: Final[float] = 2.0


class _FileId(NamedTuple):
    """What identifies one version of the file; any difference means "re-read"."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Malformed(ValueError):
    """A line that cannot become an account. The message must never contain the secret."""


class _Changing(OSError):
    """The file changed while it was being read."""


# --- parsing -----------------------------------------------------------------------------------------------


def _parse_id(value: str, what: str, by_name: Callable[[str], int]) -> int | None:
    """Empty -> None; a number; or (as Dovecot allows) a user/group name resolved through NSS."""
    if value == "":
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        return by_name(value)
    except KeyError:
        raise _Malformed(f"{what} {value!r} is neither a number nor a known name") from None


def _parse_extra(value: str) -> dict[str, str]:
    """'k=v k2=v2 flag' -> {'k': 'v', 'k2': 'v2', 'flag': ''}."""
    extra: dict[str, str] = {}
    for token in value.split():
        key, _, val = token.partition("=")
        if not key:
            raise _Malformed("extra field without a name")
        extra[key] = val
    return extra


def _parse_line(line: str) -> Credentials:
    parts = line.split(":", 7)  # extra fields (the 8th) may contain ':' themselves
    if len(parts) < 2:
        raise _Malformed("no password field")
    name, stored = parts[0], parts[1]
    if not name:
        raise _Malformed("empty user name")
    if not plausible_name(name):
        raise _Malformed("user name with control characters or over 255 octets")
    scheme, secret = schemes.split_scheme(stored)
    if not secret:
        raise _Malformed("empty password")  # never "anyone may log in": the account is simply not loaded
    fields = parts[2:] + [""] * (6 - len(parts[2:]))
    uid_s, gid_s, _gecos, home, _shell, extra_s = fields
    user = User(
        name=name,
        uid=_parse_id(uid_s, "uid", lambda n: pwd.getpwnam(n).pw_uid),
        gid=_parse_id(gid_s, "gid", lambda n: grp.getgrnam(n).gr_gid),
        home=home or None,
        extra=_parse_extra(extra_s),
    )
    return Credentials(user=user, scheme=scheme, secret=secret)


def _parse(path: Path, data: bytes) -> dict[str, Credentials]:
    """All good entries of the file; each bad line is logged (file and line number only) and skipped."""
    table: dict[str, Credentials] = {}
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("passwd-file %s line %d: not valid UTF-8, line skipped", path, lineno)
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            creds = _parse_line(line)
        except _Malformed as exc:
            log.warning("passwd-file %s line %d: %s, line skipped", path, lineno, exc)
            continue
        name = creds.user.name
        if name in table:
            log.warning("passwd-file %s line %d: user %r already defined, line skipped", path, lineno, name)
            continue
        if not schemes.is_known(creds.scheme):
            # Kept: lookup() still serves it (a later-registered scheme may need it); verify() will refuse it.
            log.warning("passwd-file %s line %d: unknown password scheme {%s}", path, lineno, creds.scheme)
        table[name] = creds
    return table


def read_entries(path: str | Path) -> dict[str, Credentials]:
    """Every good entry of the passwd-file at `path` (bad lines logged and skipped), for `pop3d user
    import`; OSError when it cannot be read."""
    p = Path(path)
    return _parse(p, p.read_bytes())


def _read(path: Path) -> tuple[bytes, _FileId, float]:
    """(content, id, mtime) in one open; _Changing when the file changed under the read (a writer is busy)."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        data = f.read()
        after = os.fstat(f.fileno())
    file_id = _FileId.of(before)
    if _FileId.of(after) != file_id or len(data) != before.st_size:
        raise _Changing(f"{path} changed while it was read")
    return data, file_id, before.st_mtime


# --- the authenticator -------------------------------------------------------------------------------------


class PasswdFileAuthenticator(HashedSecrets):
    """`Authenticator` over a Dovecot passwd-file; edits to the file take effect without a restart."""

    task_free = True  # a file read into memory, hashes in threads: see Authenticator.task_free

    def __init__(
        self,
        path: str | Path,
        *,
        min_check_interval: float = 1.0,
        executor: Executor | None = None,
        secret: bytes | None = None,
        max_password_length: int = DEFAULT_MAX_PASSWORD_LENGTH,
        settle: float = DEFAULT_SETTLE,
        generation: Generation | None = None,
    ) -> None:
        """Load `path` now, so a missing or unreadable file fails at startup (OSError with the path in it).

        `min_check_interval`: seconds between stat() calls looking for changes (0: every lookup).
        `executor`: where slow hash checks run; default is a small process-wide pool.
        `secret`: the server secret decoys derive from (pop3d.auth.state_secret); None: random, for this
        object only. `max_password_length`: octets; longer passwords fail unhashed. `settle`: see the module.
        `generation`: the workers' count of password changes (pop3d.auth.generation): when it moves, the file
        is looked at before the next lookup instead of up to `min_check_interval` later.
        """
        super().__init__(executor=executor, secret=secret, max_password_length=max_password_length)
        self._generation = generation
        self._generation_seen = generation.current() if generation is not None else 0
        self._path = Path(path)
        self.source = f"passwd-file {self._path}"
        self._min_check_interval = min_check_interval
        self._settle = settle
        data, self._file_id = self._first_read()
        self._users = _parse(self._path, data)
        self._learn(self._users)
        self._last_check = time.monotonic()
        self._settle_at: float | None = None  # wall time after which a fresh read is read again, in full
        self._forced = False  # reload_soon(): an empty file may replace the table
        self._unavailable_warned = False
        self._noted: object = None  # the last partial-read event logged, so each is logged once
        self._reload_lock = asyncio.Lock()
        log.info("passwd-file %s: %d users", self._path, len(self._users))

    def _first_read(self) -> tuple[bytes, _FileId]:
        for _ in range(5):
            try:
                data, file_id, _mtime = _read(self._path)
                return data, file_id
            except _Changing:
                time.sleep(0.05)
        with open(self._path, "rb") as f:  # still busy: take what is there; the next change is read again
            return f.read(), _FileId.of(os.fstat(f.fileno()))

    @property
    def path(self) -> Path:
        return self._path

    async def lookup(self, name: str) -> Credentials | None:
        """The stored credentials of `name`, from the file as of at most `min_check_interval` ago.

        None for an unknown user and for anything that cannot be a user name (`plausible_name`).
        """
        await self._refresh()
        if not plausible_name(name):
            return None
        return self._users.get(name)

    async def user_names(self) -> list[str]:
        await self._refresh()
        return sorted(self._users)

    async def set_secret(self, name: str, secret: str) -> bool:
        """Replace `name`'s password field by `secret` (`{SCHEME}...`, already hashed) in the file, atomically
        and under the writer lock (pop3d.auth.passwd_write); False when the file has no entry for `name`.

        Other workers see the new file at their next check (within `min_check_interval`); this one re-reads
        it at its next lookup. Raises OSError when the file cannot be rewritten.
        """

        def is_entry(line: str) -> bool:
            try:
                return _parse_line(line).user.name == name
            except _Malformed:
                return False

        changed = await asyncio.to_thread(passwd_write.replace_secret, self._path, name, secret, is_entry)
        if changed:
            self._last_check = float("-inf")  # look at the file at the next lookup, not in a second
            if self._generation is not None:
                self._generation.bump()  # and so do the other workers
        return changed

    def reload_soon(self) -> None:
        """Re-read the file at the next lookup even if its stat looks unchanged (SIGHUP)."""
        self._last_check = float("-inf")
        self._file_id = None  # type: ignore[assignment]
        self._forced = True

    async def _refresh(self) -> None:
        """Re-read the file if it changed; rate-limited (unless a worker changed a password), one reload at a
        time."""
        gen = self._generation
        if gen is not None and (now := gen.current()) != self._generation_seen:
            self._generation_seen = now
            self._last_check = float("-inf")
        if time.monotonic() - self._last_check < self._min_check_interval:
            return
        async with self._reload_lock:
            if time.monotonic() - self._last_check < self._min_check_interval:
                return  # another task reloaded while we waited for the lock
            self._last_check = time.monotonic()
            loaded = await asyncio.to_thread(self._reload_if_changed)
            if loaded is not None:
                self._users, self._file_id = loaded

    def _reload_if_changed(self) -> tuple[dict[str, Credentials], _FileId] | None:
        """(new table, id) when the file changed and could be read; None to keep the current table."""
        try:
            if _FileId.of(os.stat(self._path)) == self._file_id and (
                self._settle_at is None or time.time() < self._settle_at
            ):
                self._available_again()
                return None
            data, file_id, mtime = _read(self._path)
        except _Changing:
            self._note(("changing", self._file_id), "is being written; keeping the %d users in force, retrying")
            return None
        except OSError as exc:
            if not self._unavailable_warned:
                self._unavailable_warned = True
                log.warning(
                    "passwd-file %s: cannot read it (%s); still serving the last good copy (%d users)",
                    self._path,
                    exc.strerror or type(exc).__name__,
                    len(self._users),
                )
            return None
        self._available_again()
        table = self._merge(data, file_id, mtime)
        if table is None:
            return None
        self._forced = False
        self._learn(table)
        log.info("passwd-file %s: reloaded, %d users", self._path, len(table))
        return table, file_id

    def _merge(self, data: bytes, file_id: _FileId, mtime: float) -> dict[str, Credentials] | None:
        """The table to put in force after reading `data`, or None to keep the current one (see the module)."""
        old = self._users
        age = time.time() - mtime
        fresh = -self._settle < age < self._settle
        complete = data.endswith(b"\n") or not data
        if fresh and not complete:
            data = data[: data.rfind(b"\n") + 1]  # the last line may still be growing
        new = _parse(self._path, data)
        if not new and old and not self._forced:
            self._settle_at = None
            self._note(("empty", file_id), "has no users; keeping the %d in force (SIGHUP applies an empty file)")
            return None
        missing = old.keys() - new.keys() if fresh else set()
        if fresh and (missing or not complete):
            self._settle_at = mtime + self._settle
            self._note(
                ("fresh", file_id),
                "looks partly written; until it settles, users it lacks stay from the previous copy (%d in force)",
            )
            for name in missing:
                new[name] = old[name]
        else:
            self._settle_at = None
        return new

    def _note(self, event: object, message: str) -> None:
        """Log `message` (with the table size) once per distinct event."""
        if event != self._noted:
            self._noted = event
            log.warning("passwd-file %s " + message, self._path, len(self._users))

    def _available_again(self) -> None:
        if self._unavailable_warned:
            self._unavailable_warned = False
            log.info("passwd-file %s: readable again", self._path)
