"""SASL state machines, CRAM-MD5 contexts, SCRAM keys, the penalty table, certificate mapping: no sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.auth import cram_md5, sasl, schemes
from pop3d.auth.base import Credentials, Decoy, User, apop_check
from pop3d.auth.penalty import Penalty
from pop3d.auth.sasl_schemes import ScramKeys
from pop3d.net.tls import client_identity
from pop3d.pop3.protocol import MAX_SASL_LINE, Command, CommandParser, LineBuffer, Rejected, State

ALICE = User("alice")


def creds(scheme: str, password: str, name: str = "alice") -> Credentials:
    stored = schemes.hash_password(scheme, password)
    s, secret = schemes.split_scheme(stored)
    return Credentials(User(name), s, secret)


# -- CRAM-MD5 contexts ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=90), st.binary(max_size=200))
def test_cram_context_matches_stdlib_hmac(password, challenge):
    expected = hmac.new(password.encode("utf-8", "surrogateescape"), challenge, "md5").hexdigest()
    assert cram_md5.digest_from_context(cram_md5.context(password), challenge) == expected


def test_cram_context_is_dovecots_encoding():
    # 32 octets = outer (a,b,c,d) then inner state; for the empty key the states are MD5 after 64×0x5c / 64×0x36
    ctx = cram_md5.context("")
    assert len(ctx) == 64 and int(ctx, 16) >= 0
    assert cram_md5.verify_password(ctx, "") and not cram_md5.verify_password(ctx, "x")
    with pytest.raises(ValueError):
        cram_md5.digest_from_context("abcd", b"x")


# Entries written by Dovecot (its password-scheme unit test and `doveadm pw` output): the formats must agree.
DOVECOT_VECTORS = [
    ("CRAM-MD5", "e02d374fde0dc75a17a557039a3a5338c7743304777dccd376f332bee68d2cf6", "test"),
    ("CRAM-MD5", "017ec858afebdc0a0bf7ab508169465750335f608ae201ca22b333b0aaa84f3a", "tprzo.40"),
    (
        "SCRAM-SHA-256",
        "4096,LfNGSFqiFykEZ1xDAYlnKQ==,HACNf9CII7cMz3XjRy/Oh3Ae2LHApoDyNw74d3YtFws=,"
        "AQH0j7Hf8J12g8eNBadvzlNB2am3PxgNwFCFd3RxEaw=",
        "test",
    ),
    (
        "SCRAM-SHA-256",
        "4096,kUUWnvu6LCpRsZ2kf2ET8Q==,gxa9gYcu7AKRFeHC78hBUcmzLXF1LXd0xJVbLnUT8RY=,"
        "P1Su/6jHm9awXwS3Y2RGr56KbooOKvcO7Jw6zNTx9k8=",
        "pass",
    ),
]


@pytest.mark.parametrize("scheme,secret,password", DOVECOT_VECTORS)
def test_dovecot_written_secrets(scheme, secret, password):
    assert schemes.verify(scheme, secret, password)
    assert not schemes.verify(scheme, secret, password + "x")
    if scheme == "CRAM-MD5":
        assert cram_md5.context(password) == secret  # the same bytes Dovecot writes
    else:
        keys = ScramKeys.decode(secret)
        assert ScramKeys.from_password(password, keys.iterations, keys.salt) == keys  # ServerKey too


def test_scram_keys_round_trip_and_reject_malformed():
    keys = ScramKeys.from_password("pw")
    assert ScramKeys.decode(keys.encode()) == keys
    assert keys.iterations == 4096
    stored = schemes.hash_password("SCRAM-SHA-256", "pw")
    assert stored.startswith("{SCRAM-SHA-256}4096,")
    for bad in ["", "4096,a,b", "x,AAAA,AAAA,AAAA", "4096,!!,AAAA,AAAA", "4096,AAAA,AAAA,AAAA"]:
        with pytest.raises(ValueError):
            ScramKeys.decode(bad)
        assert not schemes.verify("SCRAM-SHA-256", bad, "pw")  # a corrupt entry is a failed login


# -- mechanisms -----------------------------------------------------------------------------------


def test_plain():
    m = sasl.Plain()
    assert m.start(None) == sasl.Challenge(b"")
    assert m.step(b"\0alice\0pw") == sasl.CheckPassword("alice", "pw")
    assert sasl.Plain().start(b"alice\0alice\0pw") == sasl.CheckPassword("alice", "pw")
    for bad in [b"alice\0pw", b"\0\0pw", b"\0alice\0", b"\0\xff\0pw", b"bob\0alice\0pw"]:
        assert isinstance(sasl.Plain().start(bad), sasl.Failure)


def test_login():
    m = sasl.Login()
    assert m.start(None) == sasl.Challenge(b"Username:")
    assert m.step(b"alice") == sasl.Challenge(b"Password:")
    assert m.step(b"a pw") == sasl.CheckPassword("alice", "a pw")
    m = sasl.Login()
    assert m.start(b"alice") == sasl.Challenge(b"Password:")
    assert isinstance(m.step(b""), sasl.Failure)


@pytest.mark.parametrize("scheme", ["PLAIN", "CRAM-MD5"])
def test_cram_md5_from_plain_and_context(scheme):
    m = sasl.CramMd5("test.invalid")
    ch = m.start(None)
    assert isinstance(ch, sasl.Challenge) and ch.data.endswith(b"@test.invalid>")
    digest = hmac.new(b"pw", ch.data, "md5").hexdigest()
    assert m.step(f"alice {digest}".encode()) == sasl.Lookup("alice")
    assert m.resume(creds(scheme, "pw")) == sasl.Success(ALICE)


def test_cram_md5_failures():
    assert isinstance(sasl.CramMd5("h").start(b"early"), sasl.Failure)
    m = sasl.CramMd5("h")
    m.start(None)
    assert isinstance(m.step(b"nodigest"), sasl.Failure)
    for c in [None, creds("PLAIN", "other"), creds("ARGON2ID", "pw")]:
        m = sasl.CramMd5("h")
        ch = m.start(None)
        assert isinstance(ch, sasl.Challenge)
        m.step(f"alice {hmac.new(b'pw', ch.data, 'md5').hexdigest()}".encode())
        assert isinstance(m.resume(c), sasl.Failure)
    assert len({sasl.CramMd5("h").challenge for _ in range(20)}) == 20  # unique per exchange


def run_scram(stored: Credentials | None, user: str, password: str) -> sasl.Step:
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    m = sasl.ScramSha256()
    assert m.start(None) == sasl.Challenge(b"")
    assert m.step(client.get_client_first().encode()) == sasl.Lookup(user)
    first = m.resume(stored)
    assert isinstance(first, sasl.Challenge)
    client.set_server_first(first.data.decode())
    final = m.step(client.get_client_final().encode())
    if isinstance(final, sasl.Failure):
        return final
    assert isinstance(final, sasl.Challenge)
    client.set_server_final(final.data.decode())  # verifies the server signature
    return m.step(b"")


@pytest.mark.parametrize("scheme", ["PLAIN", "SCRAM-SHA-256"])
def test_scram_with_scramp_client(scheme):
    assert run_scram(creds(scheme, "pässword"), "alice", "pässword") == sasl.Success(ALICE)


@pytest.mark.parametrize("stored", [None, "wrong", "argon"])
def test_scram_failures(stored):
    c = {None: None, "wrong": creds("PLAIN", "other"), "argon": creds("ARGON2ID", "pw")}[stored]
    assert isinstance(run_scram(c, "alice", "pw"), sasl.Failure)


def test_scram_rejects_channel_binding_and_bad_messages():
    m = sasl.ScramSha256()
    assert isinstance(m.start(b"p=tls-unique,,n=alice,r=abc"), sasl.Failure)
    assert isinstance(sasl.ScramSha256().start(b"n,a=bob,n=alice,r=abc"), sasl.Failure)
    assert isinstance(sasl.ScramSha256().start(b"garbage"), sasl.Failure)
    assert sasl.ScramSha256().start(b"n,,n=a=2Cb=3Dc,r=abc") == sasl.Lookup("a,b=c")  # RFC 5802 §5.1


def test_external():
    m = sasl.External("alice")
    assert m.start(None) == sasl.Challenge(b"")
    assert m.step(b"") == sasl.Lookup("alice")
    assert m.resume(creds("PLAIN", "x")) == sasl.Success(ALICE)
    assert sasl.External("alice").start(b"alice") == sasl.Lookup("alice")
    assert isinstance(sasl.External("alice").start(b"bob"), sasl.Failure)
    assert isinstance(sasl.External(None).start(b""), sasl.Failure)
    m = sasl.External("zed")
    m.start(b"")
    assert isinstance(m.resume(None), sasl.Failure)


# -- grammar and line limits ------------------------------------------------------------------------


def test_auth_grammar():
    p = CommandParser.with_extensions(stls=False)
    A = State.AUTHORIZATION
    assert p.parse(b"auth plain AGEAYg==", A) == Command("AUTH", ("plain", "AGEAYg=="))
    assert p.parse(b"AUTH", A) == Command("AUTH", ())
    assert p.parse(b"AUTH PLAIN =", A) == Command("AUTH", ("PLAIN", "="))
    for bad in [b"AUTH PLAIN a b", b"AUTH PL@IN", b"AUTH PLAIN a!b", b"AUTH " + b"X" * 21]:
        assert isinstance(p.parse(bad, A), Rejected)
    assert isinstance(p.parse(b"AUTH PLAIN", State.TRANSACTION), Rejected)
    assert isinstance(p.parse(b"STLS", A), Rejected)  # unknown without TLS
    assert CommandParser.with_extensions(stls=True).parse(b"stls", A) == Command("STLS", ())


def test_commands_keep_255_limit_while_buffer_admits_sasl_lines():
    lb = LineBuffer(MAX_SASL_LINE)
    long = b"A" * 1000
    assert lb.feed(long + b"\r\n") == [long]  # a SASL response may be this long (RFC 5034 §4)
    assert isinstance(CommandParser().parse(long, State.AUTHORIZATION), Rejected)  # a command may not
    assert lb.feed(b"B" * (MAX_SASL_LINE + 10) + b"\r\n") == [None]
    assert lb.pending == 0


# -- penalty ----------------------------------------------------------------------------------------


def test_penalty_doubles_caps_and_resets():
    p = Penalty(2.0, 15.0)
    assert [p.fail("192.0.2.1", 0.0) for _ in range(6)] == [2, 4, 8, 15, 15, 15]
    assert p.fail("192.0.2.2", 0.0) == 2  # per address
    p.succeed("192.0.2.1")
    assert p.fail("192.0.2.1", 1.0) == 2
    assert p.failures("192.0.2.1", 1.0 + 7200) == 0  # forgotten after an idle hour
    assert Penalty(0, 15).fail("x", 0) == 0


def test_penalty_table_is_bounded():
    p = Penalty(1, 8, max_entries=100)
    for i in range(1000):
        p.fail(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(p) == 100


# -- certificate → user ----------------------------------------------------------------------------

CERT = {
    "subject": ((("organizationName", "x"),), (("commonName", "alice"),)),
    "subjectAltName": (("DNS", "h.example"), ("email", "al.ice@example.org")),
}


def test_client_identity_mapping():
    assert client_identity(CERT, "cn") == "alice"
    assert client_identity(CERT, "email") == "al.ice@example.org"
    assert client_identity(CERT, "email-localpart") == "al.ice"
    assert client_identity({}, "cn") is None
    assert client_identity(None, "email") is None
    subject_email = {"subject": ((("emailAddress", "bob@example.org"),),)}
    assert client_identity(subject_email, "email-localpart") == "bob"
    assert client_identity(subject_email, "cn") is None


# -- decoys: an unknown user runs the same steps ---------------------------------------------------------


def decoy_of(scheme: str, name: str = "nobody") -> Decoy:
    c = creds(scheme, "nobody knows", name)
    return Decoy(c, b"k" * 32)


def test_cram_md5_unknown_user_computes_on_the_decoy(monkeypatch):
    seen: list[str] = []
    real = cram_md5.digest_from_context
    monkeypatch.setattr(cram_md5, "digest_from_context", lambda s, ch: seen.append(s) or real(s, ch))
    for stored, decoy in [(creds("CRAM-MD5", "pw"), decoy_of("CRAM-MD5")), (None, decoy_of("CRAM-MD5"))]:
        m = sasl.CramMd5("h")
        ch = m.start(None)
        assert isinstance(ch, sasl.Challenge)
        m.step(f"alice {hmac.new(b'wrong', ch.data, 'md5').hexdigest()}".encode())
        assert isinstance(m.resume(stored, decoy), sasl.Failure)
    assert len(seen) == 2  # the same HMAC-MD5 from a stored context, for the real user and the unknown one


def test_cram_md5_decoy_never_succeeds_even_with_its_own_digest():
    decoy = decoy_of("PLAIN")
    m = sasl.CramMd5("h")
    ch = m.start(None)
    assert isinstance(ch, sasl.Challenge)
    m.step(f"nobody {cram_md5.digest_from_password(decoy.creds.secret, ch.data)}".encode())
    assert isinstance(m.resume(None, decoy), sasl.Failure)


def test_cram_md5_non_ascii_digest_is_a_failure_not_a_crash():
    m = sasl.CramMd5("h")
    m.start(None)
    assert m.step(("alice " + "é" * 32).encode()) == sasl.Lookup("alice")
    assert isinstance(m.resume(creds("PLAIN", "pw")), sasl.Failure)


def test_scram_unknown_user_gets_the_decoys_salt_and_iterations():
    decoy_keys = ScramKeys.from_password("nobody knows", 6000, b"s" * 16)
    decoy = Decoy(Credentials(User("nobody"), "SCRAM-SHA-256", decoy_keys.encode()), b"k" * 32)
    m = sasl.ScramSha256()
    m.step(b"n,,n=nobody,r=abc")
    first = m.resume(None, decoy)
    assert isinstance(first, sasl.Challenge)
    fields = dict(p.split("=", 1) for p in first.data.decode().split(","))
    assert fields["i"] == "6000" and fields["s"] == base64.b64encode(b"s" * 16).decode()


def test_scram_salt_of_a_plain_user_comes_from_the_decoy_key():
    def salt(key: bytes) -> str:
        m = sasl.ScramSha256()
        m.step(b"n,,n=alice,r=abc")
        first = m.resume(Credentials(ALICE, "PLAIN", "pw"), Decoy(Credentials(ALICE, "PLAIN", "x"), key))
        assert isinstance(first, sasl.Challenge)
        return dict(p.split("=", 1) for p in first.data.decode().split(","))["s"]

    assert salt(b"a" * 32) == salt(b"a" * 32) != salt(b"b" * 32)


def test_penalty_delay_is_what_a_failure_would_wait():
    p = Penalty(2.0, 15.0)
    assert p.delay("x", 0) == 0
    p.fail("x", 0)
    assert p.delay("x", 1) == p.fail("x", 1) == 4


def test_scram_entry_that_cannot_serve_runs_the_decoys_steps(monkeypatch):
    """A {SHA512-CRYPT} user costs what an unknown user with the same decoy costs (PBKDF2 from a {PLAIN}
    decoy), and the decoy's password never lets the real user in."""
    derived: list[str] = []
    real = ScramKeys.from_password
    monkeypatch.setattr(
        ScramKeys, "from_password", classmethod(lambda cls, pw, *a, **k: derived.append(pw) or real(pw, *a, **k))
    )
    decoy = Decoy(Credentials(ALICE, "PLAIN", "decoy-pw"), b"k" * 32)
    for stored in (creds("SHA512-CRYPT", "pw"), None):
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "decoy-pw")
        m = sasl.ScramSha256()
        m.step(client.get_client_first().encode())
        first = m.resume(stored, decoy)
        assert isinstance(first, sasl.Challenge)
        client.set_server_first(first.data.decode())
        assert isinstance(m.step(client.get_client_final().encode()), sasl.Failure)
    assert derived == ["decoy-pw", "decoy-pw"]


def test_cram_md5_entry_that_cannot_serve_runs_the_decoys_steps(monkeypatch):
    seen: list[str] = []
    real = cram_md5.digest_from_password
    monkeypatch.setattr(cram_md5, "digest_from_password", lambda s, ch: seen.append(s) or real(s, ch))
    decoy = Decoy(Credentials(ALICE, "PLAIN", "decoy-pw"), b"k" * 32)
    for stored in (creds("SHA512-CRYPT", "pw"), None):
        m = sasl.CramMd5("h")
        ch = m.start(None)
        assert isinstance(ch, sasl.Challenge)
        m.step(f"alice {real('decoy-pw', ch.data)}".encode())  # the decoy's own digest
        assert isinstance(m.resume(stored, decoy), sasl.Failure)
    assert seen == ["decoy-pw", "decoy-pw"]


def test_apop_hashed_entry_runs_the_decoys_steps_and_fails():
    decoy = Decoy(Credentials(ALICE, "PLAIN", "decoy-pw"), b"k" * 32)
    stamp = "<1@h>"
    digest = hashlib.md5((stamp + "decoy-pw").encode()).hexdigest()
    assert apop_check(creds("SHA512-CRYPT", "pw"), decoy, stamp, digest) is None
    assert apop_check(None, decoy, stamp, digest) is None
    right = hashlib.md5((stamp + "pw").encode()).hexdigest()
    assert apop_check(creds("PLAIN", "pw"), decoy, stamp, right) == ALICE


def test_rehearsal_reaches_each_lookup_step():
    decoy = Decoy(Credentials(User(""), "PLAIN", "x"), b"k" * 32)
    for name in sasl.LOOKUP_MECHANISMS:
        sasl.rehearse_lookup(name, decoy)
