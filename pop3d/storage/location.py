"""Where a user's maildrop lives: the `storage.location` template with `{user}` and `{home}` filled in.

The name comes from the client (through the user database) and the home from the user database, so the
expansion refuses anything that could make the path leave the place the template gives it: a name that is
empty, `.` or `..`, or holds `/`, NUL or a control character, and a home that is not an absolute path. Both
fields are substituted in one pass, so a `{home}` inside a user name stays literal.
"""

from __future__ import annotations

import re

from pop3d.auth.base import User
from pop3d.storage.base import PermanentError

_FIELD = re.compile(r"\{(user|home)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_fields(template: str) -> bool:
    """Whether the template names `{user}` or `{home}`, i.e. differs from user to user."""
    return _FIELD.search(template) is not None


def expand(template: str, user: User, what: str = "maildrop") -> str:
    """`template` for `user`; PermanentError (RFC 3206 SYS/PERM) when the name or home is unusable.

    `what` names the kind of path in the error ("maildir", "spool").
    """
    name = user.name
    if not name or name in (".", "..") or "/" in name or _CONTROL.search(name):
        raise PermanentError(f"user name not usable as a {what} path")
    home = user.home or ""
    if "{home}" in template and (not home.startswith("/") or "\0" in home):
        raise PermanentError(f"user has no absolute home directory for the {what} location")
    return _FIELD.sub(lambda m: name if m.group(1) == "user" else home, template)
