"""`pop3d mkmaildrops DIR`: synthetic users and maildrops for benchmarks and POP3 client tests.

Writes into DIR:
* `passwd`: a Dovecot passwd-file with `{PLAIN}` secrets (so a benchmark measures the POP3 server, not a
  password hash; both pop3d and Dovecot read this format);
* `users.txt`: `user:password` lines, the input of `pop3d bench --users`;
* `mail/<user>/Maildir/` (maildir format) or `mail/<user>` (one mbox file per user);
* `pop3d.toml`: a configuration that serves exactly this (127.0.0.1:1110).

Messages are RFC 5322 text with LF line ends (as an MTA stores them) of exactly `size` stored octets,
with a body that exercises dot-stuffing (some lines start with "."). Maildir names are standard
(`<time>.M<n>P<pid>.<host>`) and delivery times increase with the message number.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

FORMATS = ("maildir", "mbox")
_SIZE = re.compile(r"^([0-9]+)\s*([kKmM]?)[bB]?$")
_BASE_TIME = 1_700_000_000


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
    directory: str | Path, users: int, messages: int, size: int, fmt: str = "maildir", prefix: str = "user"
) -> Path:
    """Create everything; returns the users file. Existing maildrops of the same names are replaced."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if users < 1 or messages < 0 or size < 1:
        raise ValueError("--users must be >= 1, --messages >= 0, --size >= 1")
    root = Path(directory).resolve()
    mail = root / "mail"
    mail.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(users)))
    names = [f"{prefix}{i:0{width}d}" for i in range(1, users + 1)]
    passwords = {u: secrets.token_urlsafe(9) for u in names}
    host = "bench"
    for u in names:
        if fmt == "maildir":
            _write_maildir(mail, u, messages, size, host)
        else:
            _write_mbox(mail, u, messages, size)
    (root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{passwords[u]}\n" for u in names))
    users_file = root / "users.txt"
    users_file.write_text("".join(f"{u}:{passwords[u]}\n" for u in names))
    location = f"{mail}/{{user}}/Maildir" if fmt == "maildir" else f"{mail}/{{user}}"
    (root / "pop3d.toml").write_text(
        '# written by pop3d mkmaildrops\n[server]\nlisten = ["127.0.0.1:1110"]\nhostname = "bench.invalid"\n'
        f'[auth]\npasswd_file = "{root / "passwd"}"\nfailure_delay = 0\n'
        f'[storage]\ndriver = "{fmt}"\nlocation = "{location}"\n'
    )
    return users_file
