"""The ceiling for pop3d's benchmarks: a bare uvloop responder with no POP3 care at all.

    python3 benchmarks/bare_responder.py --passwd DIR/passwd --location 'DIR/mail/{user}/Maildir' \
        --listen 127.0.0.1:12120 [--tls-listen 127.0.0.1:12121 --cert PEM --key PEM] [--procs 2]

It answers what `pop3d bench` sends (USER, PASS, STAT, UIDL, LIST, RETR, NOOP, QUIT) from the same
passwd-file and Maildirs `pop3d mkmaildrops` makes, in N processes that each listen with SO_REUSEPORT on
their own uvloop loop, in cleartext and over implicit TLS. What it leaves out is what a POP3 server must
do and a ceiling must not: no state machine, no line-length limit, no lock, no log line, no metrics, no
size cache, no exact sizes (STAT adds the stored octets), no pipelining order, no timeouts, no hash (a
`{PLAIN}` secret is compared, any other scheme is accepted unchecked), no deletion. A message is sent with
CRLF line ends and dot-stuffed (`bytes.replace`), the least a client needs to find its end (RFC 1939 §3).
TLS: one server context made before the fork (every process shares its ticket keys, as pop3d's workers
do), TLS 1.2 minimum and one ticket per handshake, like pop3d.

benchmarks/compare.sh starts it next to pop3d and Dovecot and reports pop3d's ratio to it in every run.
Not a server: do not expose it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys


def load_passwd(path: str) -> dict[bytes, bytes | None]:
    """user -> {PLAIN} secret, or None for a hashed one (accepted unchecked)."""
    users: dict[bytes, bytes | None] = {}
    with open(path, "rb") as f:
        for line in f:
            name, _, rest = line.rstrip(b"\n").partition(b":")
            secret = rest.split(b":", 1)[0]
            users[name] = secret[7:] if secret.startswith(b"{PLAIN}") else None
    return users


class Bare(asyncio.Protocol):
    __slots__ = ("buf", "files", "location", "t", "user", "users")

    def __init__(self, users: dict[bytes, bytes | None], location: str) -> None:
        self.users = users
        self.location = location
        self.buf = b""
        self.user = b""
        self.files: list[tuple[str, int]] = []
        self.t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.t.write(b"+OK bare\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while (end := buf.find(b"\n")) >= 0:
            line, buf = buf[:end].rstrip(b"\r"), buf[end + 1 :]
            verb, _, arg = line.partition(b" ")
            out.append(self.answer(verb.upper(), arg))
        self.buf = buf
        if out and self.t is not None:
            self.t.write(b"".join(out))
            if out[-1] == b"+OK bye\r\n":
                self.t.close()

    def answer(self, verb: bytes, arg: bytes) -> bytes:
        if verb == b"USER":
            self.user = arg
            return b"+OK\r\n"
        if verb == b"PASS":
            secret = self.users.get(self.user, b"")
            if secret is not None and secret != arg:
                return b"-ERR [AUTH] no\r\n"
            md = self.location.replace("{user}", self.user.decode())
            files = []
            for sub in ("cur", "new"):
                with os.scandir(f"{md}/{sub}") as it:
                    files += [(e.path, e.stat().st_size) for e in it]
            files.sort()
            self.files = files
            return b"+OK\r\n"
        if verb == b"STAT":
            return b"+OK %d %d\r\n" % (len(self.files), sum(s for _, s in self.files))
        if verb == b"LIST":
            return b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i, s) for i, (_, s) in enumerate(self.files, 1)) + b".\r\n"
        if verb == b"UIDL":
            names = (os.path.basename(p).split(":")[0].encode() for p, _ in self.files)
            return b"+OK\r\n" + b"".join(b"%d %s\r\n" % (i, n) for i, n in enumerate(names, 1)) + b".\r\n"
        if verb == b"RETR":
            with open(self.files[int(arg) - 1][0], "rb") as f:
                body = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if not body.endswith(b"\r\n"):
                body += b"\r\n"
            return b"+OK\r\n" + (b"." + body if body.startswith(b".") else body).replace(b"\r\n.", b"\r\n..") + b".\r\n"
        if verb == b"NOOP":
            return b"+OK\r\n"
        if verb == b"QUIT":
            return b"+OK bye\r\n"
        return b"-ERR\r\n"


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 1
    ctx.load_cert_chain(cert, key)
    return ctx


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(args: argparse.Namespace, tls: ssl.SSLContext | None) -> None:
    import uvloop  # noqa: F401  (the loop is uvloop's: see main)

    loop = asyncio.get_running_loop()
    users = load_passwd(args.passwd)

    def factory() -> Bare:
        return Bare(users, args.location)

    for text, ctx in ((args.listen, None), (args.tls_listen, tls)):
        if text:
            host, port = hostport(text)
            await loop.create_server(factory, host, port, reuse_port=True, backlog=4096, ssl=ctx)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passwd", required=True)
    p.add_argument("--location", required=True, help="Maildir path with {user}, as in pop3d's storage.location")
    p.add_argument("--listen", default="", metavar="HOST:PORT")
    p.add_argument("--tls-listen", default="", metavar="HOST:PORT")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="0: serve in this process (valgrind)")
    args = p.parse_args()
    if args.tls_listen and not (args.cert and args.key):
        p.error("--tls-listen needs --cert and --key")
    tls = tls_context(args.cert, args.key) if args.tls_listen else None  # before the fork: shared ticket keys
    import uvloop

    if args.procs == 0:  # no fork: a profiler or valgrind sees the serving process itself
        uvloop.run(serve(args, tls))
        return 0
    children = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                uvloop.run(serve(args, tls))
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(sig: int, _frame: object) -> None:
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for c in children:
        while True:
            try:
                os.waitpid(c, 0)
                break
            except InterruptedError:
                continue
    return 0


if __name__ == "__main__":
    sys.exit(main())
