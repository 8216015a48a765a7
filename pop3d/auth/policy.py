"""What a new password must be before a user may set it (`auth.password_policy`). Pure: strings in, a reason out.

The reasons go back to the client verbatim (poppassd's `500` line), so they name the rule, never the password.
Only printable characters are accepted: a password is typed, and control characters (a NUL, an escape) could
not travel in the one-line protocols that carry it to a login.
"""

from __future__ import annotations

import unicodedata

from pop3d.config import PasswordPolicySettings

#: names shorter than this are not looked for inside a new password ("al" would refuse too much)
MIN_NAME_IN_PASSWORD = 3


def refusal(policy: PasswordPolicySettings, name: str, old: str, new: str, max_octets: int) -> str | None:
    """Why `new` may not replace `old` as `name`'s password, or None when it may.

    `max_octets`: auth.max_password_length, the longest password a login accepts (a longer one could never be
    used). Lengths are counted in characters (NFC, so an "é" typed either way counts once), the maximum in
    UTF-8 octets, as logins count it.
    """
    if not new:
        return "New password required."
    if len(new.encode("utf-8", "surrogatepass")) > max_octets:
        return f"New password is longer than {max_octets} octets."
    if not all(c.isprintable() for c in new):
        return "New password contains characters that cannot be typed."
    if len(unicodedata.normalize("NFC", new)) < policy.min_length:
        return f"New password must be at least {policy.min_length} characters long."
    if new == old:
        return "New password must differ from the old one."
    if policy.refuse_user_name and len(name) >= MIN_NAME_IN_PASSWORD and name.casefold() in new.casefold():
        return "New password must not contain the user name."
    return None
