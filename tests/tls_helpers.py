"""TLS test material made at test time (trustme) and a raw line client that can switch to TLS."""

from __future__ import annotations

import base64
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from conftest import Raw


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, and files the server config points at."""

    ca: trustme.CA
    dir: Path
    cafile: Path
    server_pem: Path  # key + chain in one file: used for both tls.cert and tls.key

    @classmethod
    def make(cls, where: Path, name: str = "pki") -> Pki:
        d = where / name
        d.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cafile = d / "ca.pem"
        ca.cert_pem.write_to_path(str(cafile))
        server_pem = d / "server.pem"
        ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_pem))
        return cls(ca, d, cafile, server_pem)

    def client_cert(self, filename: str, *identities: str, common_name: str | None = None) -> Path:
        path = self.dir / filename
        self.ca.issue_cert(*identities, common_name=common_name).private_key_and_cert_chain_pem.write_to_path(str(path))
        return path

    def client_context(self, cert: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        if cert is not None:
            ctx.load_cert_chain(str(cert))
        return ctx

    def tls_section(self, client_ca: bool = False) -> dict[str, str]:
        section = {"cert": str(self.server_pem), "key": str(self.server_pem)}
        if client_ca:
            section["client_ca"] = str(self.cafile)
        return section


class TlsRaw(Raw):
    """Raw, plus STLS/implicit TLS and SASL helpers."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None) -> None:
        if ctx is None:
            super().__init__(port)
            return
        self.sock = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1"
        )
        self.buf = b""
        self.greeting = self.line()

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b"", f"unread plaintext before the handshake: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def capa(self) -> list[bytes]:
        assert self.cmd(b"CAPA").startswith(b"+OK")
        return self.multi()

    def respond(self, data: bytes) -> bytes:
        """Send one SASL response (base64) and return the server's next line."""
        return self.cmd(base64.b64encode(data))


def challenge(line: bytes) -> bytes:
    assert line.startswith(b"+ "), line
    return base64.b64decode(line[2:])
