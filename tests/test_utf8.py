"""RFC 6856: the UTF8 command and capability (§2), SASLprep of user names and passwords (§2.2), LANG (§3)."""

from __future__ import annotations

import base64
import stringprep
from typing import Any

import pytest
from fakes import ClockLoop, Connection, FakeAuth, make_context, stored
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.i18n.saslprep import SASLprepError, saslprep
from pop3d.pop3.protocol import MAX_COMMAND_LINE, Command, CommandParser, Rejected, State

USERS = {"alice": "wonderland", "café": "pässwörd", "ｘ": "unused"}


def connect(loop: ClockLoop, **kw: Any) -> Connection:
    storage = stored({"alice": [b"Subject: hi\n\nbody\n"], "café": [b"Subject: \xc3\xa9t\xc3\xa9\n\nbody\n"]})
    return Connection(loop, make_context(FakeAuth(dict(USERS)), storage, **kw))


def say(c: Connection, line: str | bytes) -> list[bytes]:
    """Send one command line; the lines written in answer."""
    start = len(c.transport.writes)
    c.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
    return c.lines(start)


# ---- §2: the capability and the command --------------------------------------------------------------------


def test_capa_announces_utf8_user_and_lang_in_both_states(clock: ClockLoop) -> None:
    c = connect(clock)
    before = say(c, "CAPA")
    c.login()
    after = say(c, "CAPA")
    for lines in (before, after):  # RFC 2449 §5, RFC 6856 §2, §3.1: "both / no"
        assert b"UTF8 USER" in lines and b"LANG" in lines, lines


def test_utf8_only_before_login(clock: ClockLoop) -> None:
    c = connect(clock)
    assert say(c, "UTF8") == [b"+OK UTF-8 mode enabled"]
    assert say(c, "utf8") == [b"+OK UTF-8 mode enabled"]  # keywords are case-insensitive
    assert say(c, "UTF8 please") == [b"-ERR UTF8: no arguments allowed"]  # §2.1: no parameters
    c.login()
    assert say(c, "UTF8") == [b"-ERR UTF8 not allowed after login"]  # §2: valid in AUTHORIZATION only


def test_stls_refused_after_utf8(clock: ClockLoop) -> None:
    """§2.1: servers MAY refuse STLS after UTF8, with -ERR and no response code (a protocol error)."""
    c = connect(clock, with_tls=True)
    say(c, "UTF8")
    assert say(c, "STLS") == [b"-ERR STLS is not allowed after UTF8"]


def test_auth_after_utf8_is_rfc_5034_as_before(clock: ClockLoop) -> None:
    """§2.2: UTF-8 in AUTH "is governed by" RFC 5034; UTF8 changes nothing there."""
    c = connect(clock)
    say(c, "UTF8")
    token = base64.b64encode("\0café\0pässwörd".encode()).decode()
    assert say(c, f"AUTH PLAIN {token}")[-1].startswith("+OK café has 1 message".encode())


# ---- §2.2: UTF-8 user names and passwords, SASLprep ------------------------------------------------------


def test_utf8_user_before_the_utf8_command(clock: ClockLoop) -> None:
    """§2.2: with "UTF8 USER" in CAPA the client MAY use UTF-8 in USER and PASS before issuing UTF8."""
    c = connect(clock)
    assert say(c, "USER café") == [b"+OK send PASS"]
    # logged in; the name is not echoed as UTF-8 outside UTF-8 mode (§2.1, see below)
    assert say(c, "PASS pässwörd")[-1].startswith(b"+OK caf? has 1 message")


def test_names_and_passwords_are_saslprepped(clock: ClockLoop) -> None:
    """NFKC (decomposed é, fullwidth letters), B.1 characters mapped to nothing (soft hyphen, zero-width
    space), non-ASCII spaces to SPACE: what reaches the user database is the prepared string."""
    c = connect(clock)
    say(c, "UTF8")
    say(c, "USER cafe\u0301")  # e + COMBINING ACUTE ACCENT
    assert say(c, "PASS pa\u0308ss\u00adwo\u0308rd")[-1].startswith("+OK café has".encode())
    assert ("verify", "café") in c.auth.calls  # the prepared name, not the decomposed one
    c2 = connect(clock)
    say(c2, "USER \uff41lice")  # FULLWIDTH LATIN SMALL LETTER A
    assert say(c2, "PASS wonder\u200bland")[-1].startswith(b"+OK alice has 1 message")


def test_prohibited_characters_are_refused(clock: ClockLoop) -> None:
    """§2.2: servers MUST reject names or passwords with a SASLprep §2.3 character."""
    c = connect(clock)
    assert say(c, "USER ali\ue000ce") == [b"-ERR [AUTH] user name refused: not a valid SASLprep string (RFC 6856)"]
    assert say(c, "PASS wonderland") == [b"-ERR USER first"]  # the refused USER named nobody
    assert say(c, b"USER al\x01ice")[0].startswith(b"-ERR [AUTH]")  # ASCII control (C.2.1)
    say(c, "USER alice")
    # a prohibited password is a failed login: the same line, the same penalty, nothing more said
    assert say(c, "PASS wonder\u2028land") == [b"-ERR [AUTH] authentication failed"]
    assert c.handler.auth_failures == 1
    assert say(c, "APOP \u202ebob 0123456789abcdef0123456789abcdef")[0].startswith(b"-ERR [AUTH]")


def test_invalid_utf8_is_refused(clock: ClockLoop) -> None:
    """§2.2: the server MUST reject names that are not well-formed UTF-8 (overlong, surrogate, stray)."""
    c = connect(clock)
    for bad in (b"USER \xc0\xaf", b"USER \xed\xa0\x80", b"PASS \xff"):
        assert say(c, bad) == [b"-ERR command is not valid UTF-8"]


# ---- §3: LANG ----------------------------------------------------------------------------------------------


def test_lang_lists_one_line_per_language(clock: ClockLoop) -> None:
    c = connect(clock)
    assert say(c, "LANG") == [b"+OK Language listing follows", b"en English", "fr Français".encode(), b"."]


def test_lang_switches_every_text_but_codes_and_numbers(clock: ClockLoop) -> None:
    c = connect(clock)
    assert say(c, "LANG fr") == ["+OK fr Langue modifiée".encode()]  # answered in the new language
    assert say(c, "FOO") == [b"-ERR commande inconnue"]
    say(c, "USER alice")
    assert say(c, "PASS wrong") == ["-ERR [AUTH] échec de l'authentification".encode()]
    say(c, "USER alice")
    assert say(c, "PASS wonderland") == [b"+OK alice a 1 message (21 octets)"]
    assert say(c, "STAT") == [b"+OK 1 21"]
    assert say(c, "LIST") == [b"+OK 1 messages (21 octets)", b"1 21", b"."]
    assert say(c, "UIDL 1")[0].startswith(b"+OK 1 ")
    capa = say(c, "CAPA")
    assert capa[0] == "+OK Voici la liste des capacités".encode() and b"UTF8 USER" in capa
    assert say(c, "DELE 1") == ["+OK message 1 supprimé".encode()]
    assert say(c, "LANG en") == [b"+OK en Language changed"]  # LANG works in TRANSACTION too
    assert say(c, "RSET") == [b"+OK maildrop has 1 message (21 octets)"]


def test_unknown_language_keeps_the_current_one(clock: ClockLoop) -> None:
    c = connect(clock)
    say(c, "LANG fr")
    assert say(c, "LANG uga") == [b"-ERR langue uga inconnue"]
    assert say(c, "LANG fr-CA") == [b"-ERR langue fr-CA inconnue"]  # RFC 4647 basic filtering: no match
    assert say(c, "LANG x_y") == [b"-ERR LANG : plage de langues invalide (RFC 4647)"]
    assert say(c, "NOOP") == [b"-ERR NOOP n'est pas permis avant l'authentification"]
    assert say(c, "LANG EN") == [b"+OK en Language changed"]  # tags are case-insensitive


def test_server_language_and_lang_star(clock: ClockLoop) -> None:
    c = connect(clock, server={"language": "fr"})
    assert c.lines()[0].startswith(b"+OK pop3d pret <")  # §2.1: ASCII until UTF8 or LANG
    assert say(c, "USER x\u0301")[0] == b"+OK envoyez PASS"
    assert say(c, "LANG en") == [b"+OK en Language changed"]
    assert say(c, "LANG *") == ["+OK fr Langue modifiée".encode()]  # §3.2: the administrator's choice
    c2 = connect(clock, server={"language": "fr"})
    say(c2, "UTF8")
    assert say(c2, "BAD") == [b"-ERR commande inconnue"]
    assert say(c2, "RPOP x")[0].decode().startswith("-ERR RPOP n'est pas proposé")


# ---- properties --------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(arg=st.text(min_size=1, max_size=120).filter(lambda s: "\n" not in s and "\r" not in s))
def test_parser_keeps_utf8_user_arguments_whole(arg: str) -> None:
    """Any UTF-8 argument of USER that fits the line is handed over unchanged, as one argument."""
    line = b"USER " + arg.encode()
    event = CommandParser.with_extensions(stls=False).parse(line, State.AUTHORIZATION)
    if len(line) + 2 > MAX_COMMAND_LINE:
        assert isinstance(event, Rejected)
    else:
        assert event == Command("USER", (arg,))


@settings(max_examples=300, deadline=None)
@given(arg=st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s))
def test_parser_lang_argument_is_a_basic_language_range(arg: str) -> None:
    event = CommandParser.with_extensions(stls=False).parse(b"LANG " + arg.encode(), State.TRANSACTION)
    if isinstance(event, Command):
        assert event.verb == "LANG" and len(event.args) <= 1
        for a in event.args:  # RFC 4647 §2.1: ASCII letters, digits and hyphens, or "*"
            assert a == "*" or (a.isascii() and a.replace("-", "").isalnum() and not a.startswith("-"))
    else:
        assert isinstance(event, Rejected) and event.reply.isascii()


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=30))
def test_saslprep_output_is_clean(text: str) -> None:
    try:
        out = saslprep(text)
    except SASLprepError:
        return
    assert not any(stringprep.in_table_b1(c) or stringprep.in_table_c21_c22(c) for c in out)
    assert not any(stringprep.in_table_c3(c) or stringprep.in_table_c12(c) for c in out)
    assert saslprep(out) == out  # preparing a prepared string changes nothing
    if text.isascii() and text.isprintable():
        assert out is text


def test_saslprep_rfc_4013_examples() -> None:
    """RFC 4013 §3."""
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("user") == "user"
    assert saslprep("USER") == "USER"
    assert saslprep("\u00aa") == "a"
    assert saslprep("\u2168") == "IX"
    with pytest.raises(SASLprepError):
        saslprep("\u0007")
    with pytest.raises(SASLprepError):
        saslprep("\u0627\u0031")  # bidi: must end with a right-to-left character
    assert saslprep("\u0221", stored=False) == "\u0221"  # unassigned in Unicode 3.2: fine in a query
    with pytest.raises(SASLprepError):
        saslprep("\u0221", stored=True)


# ---- §2.1 and §5: no UTF-8 to a client outside UTF-8 mode ------------------------------------------------

UTF8_HEADERS = "Subject: café crème\nFrom: jöran@exämple.org\n\nbody\n".encode()
EIGHT_BIT_BODY = "Subject: plain\n\ncafé in the body only (8BITMIME)\n".encode()


@pytest.mark.parametrize("big", [False, True], ids=["small", "streamed"])
def test_utf8_headers_need_utf8_mode(clock: ClockLoop, big: bool) -> None:
    """§2.1: outside UTF-8 mode, non-ASCII strings MUST NOT be sent as is: RETR and TOP of a message with
    UTF-8 header fields answer -ERR [UTF8] (§5), and the same commands succeed once the client sent UTF8."""
    headers = UTF8_HEADERS + (b"x" * 99 + b"\n") * 2000 if big else UTF8_HEADERS
    c = Connection(clock, make_context(FakeAuth(dict(USERS)), stored({"alice": [headers, EIGHT_BIT_BODY]})))
    c.login()
    for command in ("RETR 1", "TOP 1 0"):
        reply = say(c, command)
        assert reply[-1].startswith(b"-ERR [UTF8] ") and len(reply) == 1, reply
    assert say(c, "RETR 2")[-1] == b"."  # ASCII headers, 8-bit body: sent as stored, as POP3 always did
    c.send(b"QUIT\r\n")

    d = Connection(clock, make_context(FakeAuth(dict(USERS)), stored({"alice": [headers]})))
    say(d, "UTF8")
    d.login()
    retr = say(d, "RETR 1")
    assert retr[0].startswith(b"+OK") and "Subject: café crème".encode() in retr


def test_a_utf8_user_name_is_not_echoed_outside_utf8_mode(clock: ClockLoop) -> None:
    """§2.1 again: the +OK after PASS names the user, and a UTF-8 name would reach a client not in UTF-8 mode."""
    c = connect(clock)
    assert say(c, "USER café") == [b"+OK send PASS"]
    last = say(c, "PASS pässwörd")[-1]
    assert last.startswith(b"+OK caf? has 1 message") and last.isascii()


def test_apop_digest_uses_the_saslprepped_stored_secret(clock: ClockLoop) -> None:
    """§2.2: client and server MUST SASLprep the APOP password, the server treating it as a stored string. A
    secret stored decomposed (a + COMBINING DIAERESIS) is prepared to its NFKC form, which is what a
    conforming client hashes; unprepared, the two digests would differ."""
    import hashlib
    import re

    stored_secret, typed = "pa\u0308sswort", "p\u00e4sswort"
    c = Connection(clock, make_context(FakeAuth({"zoe": stored_secret}), stored({"zoe": [b"Subject: x\n\ny\n"]})))
    stamp = re.search(rb"<[^>]+>", c.lines()[0]).group(0).decode()  # type: ignore[union-attr]
    digest = hashlib.md5((stamp + saslprep(typed)).encode()).hexdigest()
    assert say(c, f"APOP zoe {digest}")[-1].startswith(b"+OK zoe has 1 message")
