"""`pop3d serve --demo`: a self-contained first try, created in a local directory.

It writes a passwd-file with user `demo` / password `demo` ({PLAIN}, so APOP works too) and a Maildir with a
few sample messages that show the edge cases a POP3 server must get right (a line starting with a dot, a
message without final newline, 8-bit text). `--listen HOST:PORT` (or POP3D_SERVER__LISTEN) moves it off
127.0.0.1:8110, e.g. to run it in a container or next to another demo.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pop3d.config import Settings, load_settings

DEMO_LISTEN = "127.0.0.1:8110"

SAMPLES: list[bytes] = [
    b"From: pop3d <postmaster@localhost>\nTo: demo@localhost\nSubject: Welcome to pop3d\n"
    b"Date: Thu, 26 Nov 2026 12:00:00 +0000\nMessage-ID: <welcome@pop3d.demo>\n\n"
    b"Hello! This maildrop was created by `pop3d serve --demo`.\n"
    b"Try: STAT, LIST, UIDL, TOP 1 0, RETR 1, DELE 1, RSET, QUIT.\n",
    b"From: pop3d <postmaster@localhost>\nTo: demo@localhost\nSubject: Dot-stuffing\n"
    b"Date: Thu, 26 Nov 2026 12:01:00 +0000\nMessage-ID: <dots@pop3d.demo>\n\n"
    b"The next line starts with a dot, which the server doubles on the wire:\n.hidden\n..two dots\n.\n"
    b"and this message has no final newline",
    "From: pop3d <postmaster@localhost>\nTo: demo@localhost\nSubject: =?UTF-8?Q?8-bit_caf=C3=A9?=\n"
    "Date: Thu, 26 Nov 2026 12:02:00 +0000\nMessage-ID: <8bit@pop3d.demo>\nMIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n\nCafé, naïve, Grüße.\n".encode(),
]


def prepare(directory: Path, listen: list[str] | None = None) -> Settings:
    """Create (once) the demo passwd-file and Maildir under `directory`; return settings that use them.

    Listens on `listen` (`serve --demo --listen`), else on $POP3D_SERVER__LISTEN, else on DEMO_LISTEN."""
    directory = directory.resolve()
    maildir = directory / "mail" / "demo" / "Maildir"
    passwd = directory / "passwd"
    if not passwd.exists():
        directory.mkdir(parents=True, exist_ok=True)
        passwd.write_text("# pop3d demo user; generate real entries with `pop3d passwd`\ndemo:{PLAIN}demo\n")
    if not maildir.exists():
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        now = int(time.time())
        for n, body in enumerate(SAMPLES):
            name = f"{now + n}.M{n}P{os.getpid()}.demo"
            (maildir / "new" / name).write_bytes(body)
    server: dict[str, object] = {"hostname": "localhost", "state_dir": str(directory / "state")}
    if listen:
        server["listen"] = listen
    elif "POP3D_SERVER__LISTEN" not in os.environ:  # env overrides win, as for every other key
        server["listen"] = [DEMO_LISTEN]
    return load_settings(
        None,
        server=server,
        auth={"passwd_file": str(passwd)},
        storage={"driver": "maildir", "location": str(directory / "mail" / "{user}" / "Maildir")},
    )


def banner(addresses: list[str]) -> str:
    addr = addresses[0] if addresses else DEMO_LISTEN
    return (
        f"pop3d demo listening on {', '.join(addresses)}; user 'demo', password 'demo'.\n"
        f"Try:  curl pop3://{addr}/ -u demo:demo        (list)\n"
        f"      curl pop3://{addr}/1 -u demo:demo       (read message 1)\n"
        f"      python3 -c \"import poplib; p=poplib.POP3('{addr.rsplit(':', 1)[0]}', "
        f"{addr.rsplit(':', 1)[1]}); p.user('demo'); p.pass_('demo'); print(p.stat()); p.quit()\"\n"
        "Stop with Ctrl-C."
    )
