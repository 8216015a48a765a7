"""TLS for STLS (RFC 2595) and implicit-TLS listeners (RFC 8314): the server SSLContext and its reload.

One `TlsManager` per process holds the current SSLContext, so SIGHUP can swap in a context built from
re-read files: sessions already encrypted keep theirs, new handshakes get the new one, and a reload that
fails (missing file, key not matching the certificate) keeps the old context and says why in the log.
STLS hands `manager.context` to loop.start_tls. Implicit-TLS listeners are created once with a listener
context whose servername callback (OpenSSL calls it for every ClientHello, with or without SNI) moves the
connection onto the current context before the certificate is chosen: SSL_set_SSL_CTX takes the new
certificate, key, chain and client-CA store. (Starting TLS from connection_made instead is not possible on
uvloop: its transport delivers the ClientHello before a pause_reading there takes effect.)

Client certificates (`tls.client_ca`) are optional (CERT_OPTIONAL): a client without one still connects,
and one with a certificate the CA did not sign fails the handshake (OpenSSL cannot "ignore" a bad one).
`client_identity` maps a verified certificate to a login name for SASL EXTERNAL:
- "cn": the subject commonName;
- "email": the first subjectAltName rfc822Name (else the subject emailAddress);
- "email-localpart": that address without "@domain".
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from pop3d.config import TlsSettings

log = logging.getLogger("pop3d.net.tls")


def build_context(s: TlsSettings) -> ssl.SSLContext:
    """A server context from the configured PEM files. Raises OSError or ssl.SSLError with the reason."""
    if s.cert is None or s.key is None:
        raise ValueError("tls.cert and tls.key are required")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996: TLS 1.0 and 1.1 are deprecated
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(s.cert), str(s.key))
    if s.client_ca is not None:
        ctx.load_verify_locations(cafile=str(s.client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class TlsManager:
    """The current server SSLContext, rebuilt on `reload()`."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.context = build_context(settings)
        self.generation = 1

    def listener_context(self) -> ssl.SSLContext:
        """A context for an implicit-TLS listener that always hands out the current certificate."""
        base = build_context(self.settings)

        def switch(ssl_object: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
            current = self.context
            if ssl_object.context is not current:
                ssl_object.context = current

        base.sni_callback = switch
        return base

    def reload(self) -> bool:
        """Re-read cert/key/CA files; keep the old context if that fails. Returns True on success."""
        try:
            ctx = build_context(self.settings)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self.context = ctx
        self.generation += 1
        log.info("TLS certificates reloaded (generation %d)", self.generation)
        return True


def _subject_field(cert: dict[str, Any], name: str) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == name:
                return str(value)
    return None


def client_identity(cert: dict[str, Any] | None, how: str) -> str | None:
    """The login name a verified client certificate stands for, or None (no certificate, no such field)."""
    if not cert:
        return None
    if how == "cn":
        return _subject_field(cert, "commonName") or None
    email = next((str(v) for k, v in cert.get("subjectAltName", ()) if k == "email"), None)
    email = email or _subject_field(cert, "emailAddress")
    if not email:
        return None
    if how == "email-localpart":
        local, at, _domain = email.rpartition("@")
        return local if at and local else None
    return email


def peer_identity(ssl_object: ssl.SSLObject | None, how: str) -> str | None:
    """The EXTERNAL identity of an established TLS connection (only certificates the CA verified count)."""
    if ssl_object is None:
        return None
    try:
        return client_identity(ssl_object.getpeercert(), how)
    except ValueError:  # handshake not done
        return None
