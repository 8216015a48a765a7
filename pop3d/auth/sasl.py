"""SASL mechanism state machines (RFC 4422) for POP3 AUTH (RFC 5034): pure, no I/O, no asyncio.

A mechanism is fed the client's decoded responses and answers with one `Step`:
- `Challenge(data)`: send `+ base64(data)` and route the next client line back here;
- `Lookup(authcid)`: the caller fetches the stored credentials and hands them to `resume()`;
- `CheckPassword(authcid, password)`: the caller verifies a clear password (hashes run off the loop);
- `Success(user)` or `Failure(reason)`.
So every mechanism is tested with bytes in, steps out (tests/test_sasl.py), and the user database stays
behind pop3d.auth.base.Authenticator. No mechanism ever says whether a user exists: unknown user and wrong
secret end in the same Failure, at the same step, after the same work: `resume` gets a `Decoy` along with
the credentials (`Authenticator.with_credentials`) and, for an unknown user, runs on the decoy's credentials
exactly what it runs on real ones, then fails.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import scramp

from pop3d.auth import cram_md5
from pop3d.auth.base import Credentials, Decoy, User, name_bytes
from pop3d.auth.mechanisms import KNOWN as KNOWN  # re-exported: callers name mechanisms as sasl.KNOWN
from pop3d.auth.mechanisms import PLAINTEXT as PLAINTEXT
from pop3d.auth.sasl_schemes import SCRAM_ITERATIONS, ScramKeys


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes


@dataclass(frozen=True, slots=True)
class Lookup:
    authcid: str


@dataclass(frozen=True, slots=True)
class CheckPassword:
    authcid: str
    password: str


@dataclass(frozen=True, slots=True)
class Success:
    user: User


@dataclass(frozen=True, slots=True)
class Failure:
    """`reason` is for the log; the client gets the same `-ERR [AUTH]` line whatever it is."""

    reason: str
    authcid: str | None = None


Step = Challenge | Lookup | CheckPassword | Success | Failure


class Mechanism(Protocol):
    name: str

    def start(self, initial: bytes | None) -> Step:
        """Begin; `initial` is the RFC 5034 §4 initial response (b"" for "="), None when absent."""
        ...

    def step(self, response: bytes) -> Step:
        """The client's next (base64-decoded) response."""
        ...

    def resume(self, creds: Credentials | None, decoy: Decoy | None = None) -> Step:
        """Continue after a `Lookup` with what the user database has (None: no such user) and the name's
        decoy (`Authenticator.decoy`; None: a per-process one, which changes at restart)."""
        ...


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _Base:
    name = ""

    def resume(self, creds: Credentials | None, decoy: Decoy | None = None) -> Step:
        return Failure(f"{self.name}: unexpected lookup")


#: Per-process key for decoys when the caller passes none (the Authenticator's are stable across restarts).
_FAKE_KEY: Final[bytes] = os.urandom(32)


def _fallback_decoy(name: str) -> Decoy:
    key = hmac.new(_FAKE_KEY, b"user\0" + name_bytes(name), hashlib.sha256).digest()
    return Decoy(Credentials(User(name=name), "PLAIN", key.hex()), key)


class Plain(_Base):
    """RFC 4616: one message `authzid NUL authcid NUL passwd`; empty challenge when there is no initial one."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3:
            return Failure("PLAIN: message is not authzid NUL authcid NUL passwd")
        authz, authc, passwd = (_text(p) for p in parts)
        if authz is None or authc is None or passwd is None or not authc or not passwd:
            return Failure("PLAIN: empty or non-UTF-8 field")
        if authz and authz != authc:  # RFC 4616 §2: no proxy authorization here
            return Failure("PLAIN: authorization identity differs from authentication identity", authc)
        return CheckPassword(authc, passwd)


class Login(_Base):
    """The (never standardised, widely used) LOGIN mechanism: "Username:", then "Password:" challenges."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"Username:") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        text = _text(response)
        if not text:
            return Failure("LOGIN: empty or non-UTF-8 response", self._user)
        if self._user is None:
            self._user = text
            return Challenge(b"Password:")
        return CheckPassword(self._user, text)


class CramMd5(_Base):
    """RFC 2195: the server sends `<unique@host>`, the client answers `user hex(HMAC-MD5(secret, challenge))`."""

    name = "CRAM-MD5"

    def __init__(self, hostname: str) -> None:
        # RFC 2195 §2: a msg-id, unique per exchange
        self.challenge = f"<{secrets.randbits(64)}.{time.time_ns() // 1000}@{hostname}>".encode("ascii")
        self._user: str | None = None
        self._digest = ""

    def start(self, initial: bytes | None) -> Step:
        if initial:
            return Failure("CRAM-MD5: the server speaks first, no initial response")
        return Challenge(self.challenge)

    def step(self, response: bytes) -> Step:
        text = _text(response)
        user, _, digest = (text or "").rpartition(" ")
        if not user or len(digest) != 32:
            return Failure("CRAM-MD5: response is not 'user digest'")
        self._user, self._digest = user, digest.lower()
        return Lookup(user)

    def _expected(self, source: Credentials) -> str | None:
        """The digest `source` gives for this challenge; None when its scheme cannot answer CRAM-MD5."""
        secret = source.plaintext()
        try:
            if secret is not None:
                return cram_md5.digest_from_password(secret, self.challenge)
            if source.scheme == "CRAM-MD5":
                return cram_md5.digest_from_context(source.secret, self.challenge)
        except ValueError:
            return None
        return None

    def resume(self, creds: Credentials | None, decoy: Decoy | None = None) -> Step:
        own = self._expected(creds) if creds is not None else None
        # an unknown user, or an entry that cannot answer CRAM-MD5, runs the very same steps on its decoy
        expected = own if own is not None else self._expected((decoy or _fallback_decoy(self._user or "")).creds)
        ok = expected is not None and hmac.compare_digest(
            expected.encode(), self._digest.encode("utf-8", "surrogatepass")
        )
        if ok and own is not None and creds is not None:
            return Success(creds.user)
        if creds is not None and own is None:
            return Failure(f"CRAM-MD5: stored {{{creds.scheme}}} secret cannot answer CRAM-MD5", self._user)
        return Failure("CRAM-MD5: wrong digest or unknown user", self._user)


_SCRAM = scramp.ScramMechanism("SCRAM-SHA-256")


def _unescape_saslname(value: str) -> str | None:
    """RFC 5802 §5.1: ',' is sent as '=2C' and '=' as '=3D'; any other '=' is an error."""
    out = value.replace("=2C", ",").replace("=3D", "=")
    return None if "=" in value.replace("=2C", "").replace("=3D", "") else out


class ScramSha256(_Base):
    """RFC 5802 / RFC 7677 via scramp. Keys come from a {SCRAM-SHA-256} entry or are derived from {PLAIN}.

    No channel binding (-PLUS is not offered). After the client proof checks out, server-final goes out as
    one more challenge and the client's empty response completes the exchange (RFC 5034 §4: POP3 has no way
    to carry additional data with +OK).
    """

    name = "SCRAM-SHA-256"

    def __init__(self) -> None:
        self._client_first = ""
        self._user: str | None = None
        self._creds: Credentials | None = None
        self._server: scramp.core.ScramServer | None = None
        self._done: User | None = None

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"") if not initial else self.step(initial)

    def step(self, response: bytes) -> Step:
        if self._done is not None:  # the client acknowledges server-final with an empty response
            return Success(self._done) if response == b"" else Failure("SCRAM: data after server-final", self._user)
        text = _text(response)
        if text is None:
            return Failure("SCRAM: message is not UTF-8", self._user)
        if self._server is None:
            return self._first(text)
        return self._final(text)

    def _first(self, text: str) -> Step:
        parts = text.split(",", 3)
        if len(parts) < 4 or parts[0] not in ("n", "y") or not parts[2].startswith("n="):
            return Failure("SCRAM: bad client-first message (channel binding is not offered)")
        user = _unescape_saslname(parts[2][2:])
        if not user:
            return Failure("SCRAM: bad user name")
        authz = _unescape_saslname(parts[1][2:]) if parts[1].startswith("a=") else ("" if not parts[1] else None)
        if authz is None or (authz and authz != user):
            return Failure("SCRAM: authorization identity differs from user", user)
        self._client_first, self._user = text, user
        return Lookup(user)

    @staticmethod
    def _keys(creds: Credentials, key: bytes) -> ScramKeys | None:
        """The SCRAM keys `creds` can give: stored ({SCRAM-SHA-256}) or derived by PBKDF2 ({PLAIN}, with a
        salt fixed per user by `key`); None for any other scheme."""
        try:
            if creds.scheme == "SCRAM-SHA-256":
                return ScramKeys.decode(creds.secret)
            secret = creds.plaintext()
            if secret is not None:
                salt = hmac.new(key, b"SCRAM salt", hashlib.sha256).digest()[:16]
                return ScramKeys.from_password(secret, salt=salt)
        except (ValueError, scramp.ScramException):
            return None
        return None

    def resume(self, creds: Credentials | None, decoy: Decoy | None = None) -> Step:
        decoy = decoy if decoy is not None else _fallback_decoy(self._user or "")
        keys = self._keys(creds, decoy.key) if creds is not None else None
        if keys is not None:
            self._creds = creds
        else:
            # an unknown user, or an entry that cannot do SCRAM, runs on its decoy exactly what a real user runs
            # on its entry (RFC 5802 §9), and fails at the proof
            keys = self._keys(decoy.creds, decoy.key)
        if keys is None:  # no SCRAM secret, real or decoy: keys nobody can match, fixed per name; fail at the proof
            k = decoy.key
            keys = ScramKeys(
                SCRAM_ITERATIONS,
                hmac.new(k, b"SCRAM salt", hashlib.sha256).digest()[:16],
                hmac.new(k, b"StoredKey", hashlib.sha256).digest(),
                hmac.new(k, b"ServerKey", hashlib.sha256).digest(),
            )
        info = (keys.salt, keys.stored_key, keys.server_key, keys.iterations)
        server = _SCRAM.make_server(lambda _name: info)
        try:
            server.set_client_first(self._client_first)
            first = server.get_server_first()
        except scramp.ScramException as exc:
            return Failure(f"SCRAM: {exc}", self._user)
        self._server = server
        return Challenge(first.encode("utf-8"))

    def _final(self, text: str) -> Step:
        server = self._server
        assert server is not None
        try:
            server.set_client_final(text)
        except scramp.ScramException:
            return Failure("SCRAM: wrong proof or unknown user", self._user)
        if self._creds is None:  # keys nobody knows cannot match, but never let a decoy in
            return Failure("SCRAM: unknown user", self._user)
        self._done = self._creds.user
        return Challenge(server.get_server_final().encode("utf-8"))


class External(_Base):
    """RFC 4422 Appendix A: the identity comes from the TLS client certificate (pop3d.net.tls maps it).

    The client may send an authorization identity; it must be empty or equal to the certificate's user.
    """

    name = "EXTERNAL"

    def __init__(self, identity: str | None) -> None:
        self.identity = identity

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        if self.identity is None:
            return Failure("EXTERNAL: no verified client certificate")
        authz = _text(response)
        if authz is None or (authz and authz != self.identity):
            return Failure(f"EXTERNAL: certificate is for {self.identity!r}, not {authz!r}", self.identity)
        return Lookup(self.identity)

    def resume(self, creds: Credentials | None, decoy: Decoy | None = None) -> Step:
        if creds is None:  # the decoy is of no use here: the certificate already named the user
            return Failure("EXTERNAL: certificate user is not in the user database", self.identity)
        return Success(creds.user)


#: first client message of each mechanism with a `Lookup` step whose cost depends on the stored entry
_REHEARSAL: Final[dict[str, bytes]] = {
    "CRAM-MD5": b"rehearsal " + b"0" * 32,
    "SCRAM-SHA-256": b"n,,n=rehearsal,r=rehearsal",
}
#: the mechanisms `rehearse_lookup` knows
LOOKUP_MECHANISMS: Final[tuple[str, ...]] = tuple(_REHEARSAL)


def rehearse_lookup(name: str, decoy: Decoy) -> None:
    """Run mechanism `name` through its `Lookup` step for an unknown user whose decoy is `decoy`: timed at load
    on one decoy per shape, it gives the cost of that step for every entry (pop3d.auth.floors)."""
    mech = create(name, hostname="localhost")
    mech.start(None)
    step = mech.step(_REHEARSAL[name])
    assert isinstance(step, Lookup), step
    mech.resume(None, decoy)


def create(name: str, *, hostname: str, external_identity: str | None = None) -> Mechanism:
    """A fresh state machine for one exchange. KeyError for a name not in KNOWN."""
    factories: dict[str, Callable[[], Mechanism]] = {
        "PLAIN": Plain,
        "LOGIN": Login,
        "CRAM-MD5": lambda: CramMd5(hostname),
        "SCRAM-SHA-256": ScramSha256,
        "EXTERNAL": lambda: External(external_identity),
    }
    return factories[name]()
