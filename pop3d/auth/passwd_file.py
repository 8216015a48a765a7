"""A user database in Dovecot's passwd-file format, re-read when the file changes.

Line format: `user:{SCHEME}secret[:uid:gid:gecos:home:shell:extra_fields]`, extra fields being space-separated
`key=value` (or bare `key`) tokens. A password without `{SCHEME}` is CRYPT, as in Dovecot.
The file is the operator's to edit while the server runs: a bad line costs that one account (with a warning
naming file and line, never the secret), and a file that vanishes or turns unreadable leaves the last good
copy in service, so a botched edit or a non-atomic rewrite cannot lock everybody out.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import grp
import logging
import os
import pwd
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Final, NamedTuple, TypeVar

from pop3d.auth import schemes
from pop3d.auth.base import Authenticator, Credentials, User

__all__ = ["PasswdFileAuthenticator"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Schemes cheap enough to check on the event loop; everything else goes to the hash pool.
_INLINE_SCHEMES: Final[frozenset[str]] = frozenset({"PLAIN", "CLEARTEXT"})
_DUMMY_PASSWORD: Final[str] = "pop3d timing-equaliser dummy password"


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


# --- hash pool ---------------------------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_dummy_hashes: dict[str, str] = {}
_dummy_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """One small process-wide pool: bounds CPU and memory (Argon2 takes 64 MiB per check) under a login flood."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="pop3d-hash")
        return _pool


def _dummy_secret(scheme: str) -> str:
    """A hash of a fixed password in `scheme`, made once per process, to spend real time on unknown users."""
    with _dummy_lock:
        secret = _dummy_hashes.get(scheme)
        if secret is None:
            secret = schemes.split_scheme(schemes.hash_password(scheme, _DUMMY_PASSWORD))[1]
            _dummy_hashes[scheme] = secret
        return secret


def _burn(scheme: str, password: str) -> None:
    """Do the work of a failed check so an unknown user costs what a known one does."""
    schemes.verify(scheme, _dummy_secret(scheme), password)


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


def _read(path: Path) -> tuple[dict[str, Credentials], _FileId]:
    """Read and parse; the id comes from the open descriptor, so it describes exactly the bytes parsed."""
    with open(path, "rb") as f:
        file_id = _FileId.of(os.fstat(f.fileno()))
        data = f.read()
    return _parse(path, data), file_id


def _most_common_scheme(users: dict[str, Credentials]) -> str:
    """The scheme most entries use (known schemes only); the default scheme for an empty file."""
    counts = collections.Counter(c.scheme for c in users.values() if schemes.is_known(c.scheme))
    return counts.most_common(1)[0][0] if counts else schemes.DEFAULT_SCHEME


# --- the authenticator -------------------------------------------------------------------------------------


class PasswdFileAuthenticator(Authenticator):
    """`Authenticator` over a Dovecot passwd-file; edits to the file take effect without a restart."""

    def __init__(
        self,
        path: str | Path,
        *,
        min_check_interval: float = 1.0,
        dummy_scheme: str | None = None,
        executor: Executor | None = None,
    ) -> None:
        """Load `path` now, so a missing or unreadable file fails at startup (OSError with the path in it).

        `min_check_interval`: seconds between stat() calls looking for changes (0: every lookup).
        `dummy_scheme`: scheme of the hash checked for unknown users; by default the file's most common
        scheme, so an unknown user costs what a known one does.
        `executor`: where slow hash checks run; default is a small process-wide pool.
        """
        self._path = Path(path)
        self._min_check_interval = min_check_interval
        self._dummy_scheme = schemes.canonical(dummy_scheme) if dummy_scheme else None
        self._executor = executor
        self._users, self._file_id = _read(self._path)
        self._last_check = time.monotonic()
        self._unavailable_warned = False
        self._reload_lock = asyncio.Lock()
        log.info("passwd-file %s: %d users", self._path, len(self._users))

    @property
    def path(self) -> Path:
        return self._path

    async def lookup(self, name: str) -> Credentials | None:
        """The stored credentials of `name`, from the file as of at most `min_check_interval` ago."""
        await self._refresh()
        return self._users.get(name)

    async def verify(self, name: str, password: str) -> User | None:
        """The user when `password` is right; None otherwise, in about the same time whether or not `name` exists."""
        creds = await self.lookup(name)
        if creds is None:
            scheme = self._dummy_scheme or _most_common_scheme(self._users)
            if scheme in _INLINE_SCHEMES:
                _burn(scheme, password)
            else:
                await self._in_pool(_burn, scheme, password)
            return None
        if creds.scheme in _INLINE_SCHEMES:
            ok = self._check(creds, password)
        else:
            ok = await self._in_pool(self._check, creds, password)
        return creds.user if ok else None

    def _check(self, creds: Credentials, password: str) -> bool:
        try:
            return schemes.verify(creds.scheme, creds.secret, password)
        except schemes.UnknownScheme:
            log.error(
                "passwd-file %s: user %r has unknown password scheme {%s}; login refused",
                self._path,
                creds.user.name,
                creds.scheme,
            )
            return False

    async def _in_pool(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor or _hash_pool(), functools.partial(fn, *args))

    def reload_soon(self) -> None:
        """Re-read the file at the next lookup even if its stat looks unchanged (SIGHUP)."""
        self._last_check = float("-inf")
        self._file_id = None  # type: ignore[assignment]

    async def _refresh(self) -> None:
        """Re-read the file if it changed; rate-limited, and one reload at a time."""
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
            if _FileId.of(os.stat(self._path)) == self._file_id:
                self._available_again()
                return None
            loaded = _read(self._path)
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
        log.info("passwd-file %s: reloaded, %d users", self._path, len(loaded[0]))
        return loaded

    def _available_again(self) -> None:
        if self._unavailable_warned:
            self._unavailable_warned = False
            log.info("passwd-file %s: readable again", self._path)
