"""`pop3d mkmaildrops DIR`: synthetic users and maildrops for benchmarks and POP3 client tests.

Writes into DIR:
* `passwd`: a Dovecot passwd-file (pop3d and Dovecot both read it) with `{PLAIN}` secrets by default, so a
  benchmark measures the POP3 server rather than a password hash, or real hashes (`scheme`, e.g. ARGON2ID) to
  show the cost that dominates a real server's logins;
* `users.txt`: `user:password` lines, the input of `pop3d bench --users`;
* `mail/<user>/Maildir/` (maildir format) or `mail/<user>` (one mbox file per user);
* `pop3d.toml`: a configuration that serves exactly this (127.0.0.1:1110), SCRAM-SHA-256 and CRAM-MD5
  enabled next to PLAIN and LOGIN so that every `pop3d bench --login` can be tried.

Hashes come from the server's own `pop3d.auth.schemes.hash_password`, imported only when a scheme other than
PLAIN is asked for: a fixture must hold exactly what the server verifies, and a second implementation could
drift from it. That one lazy import is the load generator package's only way into pop3d.auth (the
bench-standalone contract in pyproject.toml names it); the client modules stay free of server code.

Messages are RFC 5322 text with LF line ends (as an MTA stores them) of exactly `size` stored octets,
with a body that exercises dot-stuffing (some lines start with "."). Maildir names are standard
(`<time>.M<n>P<pid>.<host>`) and delivery times increase with the message number.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FORMATS = ("maildir", "mbox")
_SIZE = re.compile(r"^([0-9]+)\s*([kKmM]?)[bB]?$")
_BASE_TIME = 1_700_000_000
#: schemes keeping what a challenge-response login needs; every other scheme allows USER/PASS and PLAIN only
_LOGINS = {"PLAIN": ("user", "plain", "apop", "scram"), "SCRAM-SHA-256": ("user", "plain", "scram")}


def logins_for(scheme: str) -> tuple[str, ...]:
    """The `pop3d bench --login` methods that work with passwords stored in `scheme` (RFC 1939 §7: APOP needs
    the clear secret; SCRAM, RFC 5802 §3, its keys or the clear secret)."""
    return _LOGINS.get(scheme.upper(), ("user", "plain"))


def hasher(scheme: str) -> Callable[[str], str]:
    """password -> the passwd-file secret `{SCHEME}...`; ValueError for a scheme that cannot hash."""
    if scheme.upper() == "PLAIN":
        return lambda password: "{PLAIN}" + password
    from pop3d.auth.schemes import SCHEMES, UnknownScheme, hash_password  # the server's own hashing

    name = scheme.upper()
    if name not in SCHEMES:
        raise ValueError(f"--scheme: unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")

    def hash_one(password: str) -> str:
        try:
            return hash_password(name, password)
        except UnknownScheme as exc:  # pragma: no cover - SCHEMES lists only schemes that hash
            raise ValueError(str(exc)) from None

    return hash_one


def _hash_all(scheme: str, passwords: list[str]) -> list[str]:
    """Slow schemes (ARGON2ID: about 0.2 s each) on every CPU: argon2 and bcrypt release the GIL."""
    one = hasher(scheme)
    if scheme.upper() == "PLAIN" or len(passwords) < 4:
        return [one(p) for p in passwords]
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        return list(pool.map(one, passwords))


def parse_size(text: str) -> int:
    """'4096', '4k', '100K', '1M' → octets (k = 1024)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 4k, 1M)")
    return int(m[1]) * {"": 1, "k": 1024, "m": 1024 * 1024}[m[2].lower()]


def message(user: str, n: int, size: int) -> bytes:
    """A message of exactly `size` octets (headers alone may exceed a tiny size; then it is cut)."""
    head = (
        f"From: Bench Sender <sender@bench.invalid>\nTo: {user}@bench.invalid\n"
        f"Subject: benchmark message {n}\nMessage-ID: <{n}.{user}@bench.invalid>\n"
        f"Date: Thu, 26 Nov 2026 12:00:00 +0000\n\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuv\n"
    dotted = b".A line that starts with a dot, stuffed on the wire.\n"
    body = bytearray()
    i = 0
    while len(head) + len(body) < size:
        body += dotted if i % 10 == 9 else line
        i += 1
    data = (head + bytes(body))[:size]
    if size and not data.endswith(b"\n"):
        data = data[:-1] + b"\n"
    return data


def _write_maildir(root: Path, user: str, messages: int, size: int, host: str) -> None:
    md = root / user / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    for n in range(1, messages + 1):
        name = f"{_BASE_TIME + n}.M{n}P{pid}.{host}"
        (md / "new" / name).write_bytes(message(user, n, size))


def _write_mbox(root: Path, user: str, messages: int, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / user, "wb") as f:
        for n in range(1, messages + 1):
            body = message(user, n, size)
            # mboxrd quoting: a line starting with ">*From " gets one more ">"
            body = re.sub(rb"(?m)^(>*From )", rb">\1", body)
            f.write(b"From sender@bench.invalid Thu Nov 26 12:00:00 2026\n" + body + b"\n")


def make(
    directory: str | Path,
    users: int,
    messages: int,
    size: int,
    fmt: str = "maildir",
    scheme: str = "PLAIN",
    prefix: str = "user",
) -> Path:
    """Create everything; returns the users file. Existing maildrops of the same names are replaced."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    hasher(scheme)  # an unknown scheme fails before anything is written
    if users < 1 or messages < 0 or size < 1:
        raise ValueError("--users must be >= 1, --messages >= 0, --size >= 1")
    root = Path(directory).resolve()
    mail = root / "mail"
    mail.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(users)))
    names = [f"{prefix}{i:0{width}d}" for i in range(1, users + 1)]
    passwords = {u: secrets.token_urlsafe(9) for u in names}
    stored = dict(zip(names, _hash_all(scheme, [passwords[u] for u in names]), strict=True))
    host = "bench"
    for u in names:
        if fmt == "maildir":
            _write_maildir(mail, u, messages, size, host)
        else:
            _write_mbox(mail, u, messages, size)
    (root / "passwd").write_text("".join(f"{u}:{stored[u]}\n" for u in names))
    users_file = root / "users.txt"
    users_file.write_text("".join(f"{u}:{passwords[u]}\n" for u in names))
    location = f"{mail}/{{user}}/Maildir" if fmt == "maildir" else f"{mail}/{{user}}"
    (root / "pop3d.toml").write_text(
        '# written by pop3d mkmaildrops\n[server]\nlisten = ["127.0.0.1:1110"]\nhostname = "bench.invalid"\n'
        f'[auth]\npasswd_file = "{root / "passwd"}"\nfailure_delay = 0\n'
        'mechanisms = ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN"]\n'
        f'[storage]\ndriver = "{fmt}"\nlocation = "{location}"\n'
    )
    return users_file
