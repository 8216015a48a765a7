"""TLS for STLS (RFC 2595) and implicit-TLS listeners (RFC 8314): the server SSLContext and its reload.

One `TlsManager` per server holds two kinds of context. The *certificate* context (`current`) is built
from the PEM files and replaced on SIGHUP: sessions already encrypted keep theirs, new handshakes get the
new one, and a reload that fails (missing file, key not matching the certificate) keeps the old context and
says why in the log. The *front* contexts are what handshakes start on: `context` for STLS (handed to
loop.start_tls) and `listener_context()` for implicit-TLS listeners. A front's servername callback (OpenSSL
calls it for every ClientHello, with or without SNI) moves the connection onto `current` before the
certificate is chosen: SSL_set_SSL_CTX takes the new certificate, key, chain and client-CA store. (Starting
TLS from connection_made instead is not possible on uvloop: its transport delivers the ClientHello before a
pause_reading there takes effect.)

Session resumption (RFC 8446 §2.2, TLS 1.3 tickets): OpenSSL encrypts and decrypts tickets with the keys of
the context a connection *started* on (its session_ctx), which SSL_set_SSL_CTX does not change, and makes
those keys at random when the context is created. The fronts are made once, in the supervisor before it
forks (pop3d.runtime.startup), so every worker holds the same keys and resumes a ticket any other worker
issued, before and after a certificate reload: a reload never rebuilds a front. The keys live as long as the
server process (a restart rotates them, and with them the forward secrecy window of resumed sessions);
tickets expire after OpenSSL's default lifetime (two hours). The one exception: a reload that turns
`tls.client_ca` on or off must change whether the server asks for a certificate, which is the front's
setting, so the STLS front is rebuilt in each worker (STLS tickets are then per worker until a restart)
and implicit-TLS listeners keep the verify mode they started with until a restart.
One ticket per handshake (`num_tickets`, OpenSSL sends two by default): a mail client holds one connection
per account and resumes with the newest ticket; each ticket costs an encryption and a write.

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


#: TLS 1.3 tickets sent after each handshake (full or resumed); see the module docstring
TICKETS_PER_HANDSHAKE = 1


def build_context(s: TlsSettings) -> ssl.SSLContext:
    """A server context from the configured PEM files. Raises OSError or ssl.SSLError with the reason."""
    if s.cert is None or s.key is None:
        raise ValueError("tls.cert and tls.key are required")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996: TLS 1.0 and 1.1 are deprecated
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = TICKETS_PER_HANDSHAKE
    ctx.load_cert_chain(str(s.cert), str(s.key))
    if s.client_ca is not None:
        ctx.load_verify_locations(cafile=str(s.client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class TlsManager:
    """The current certificate context (`current`, rebuilt on `reload()`) and the front contexts that
    handshakes start on (`context` for STLS, `listener_context()`), whose ticket keys never change."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.current = build_context(settings)
        self.generation = 1
        self.context = self._front()

    def _front(self) -> ssl.SSLContext:
        """A context that starts handshakes (and owns the ticket keys) and hands each one to `current`."""
        front = build_context(self.settings)

        def switch(ssl_object: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
            current = self.current
            if ssl_object.context is not current:
                ssl_object.context = current

        front.sni_callback = switch
        return front

    def listener_context(self) -> ssl.SSLContext:
        """A front for an implicit-TLS listener (its own, so handshake counting can hook it alone)."""
        return self._front()

    def reload(self) -> bool:
        """Re-read cert/key/CA files; keep the old context if that fails. Returns True on success."""
        try:
            ctx = build_context(self.settings)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        asks_for_certificate = self.context.verify_mode != ssl.CERT_NONE
        self.current = ctx
        if asks_for_certificate != (self.settings.client_ca is not None):
            self.context = self._front()  # the verify mode is the front's: new ticket keys, this process only
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
