"""Sans-IO POP3 core: line splitting, command grammar, state legality, reply formatting.

Rules of this file:
- No asyncio, no sockets, no files. Feed bytes in, get events out; format replies as bytes.
- Every protocol rule that does not need a maildrop or a password lives here, as data where possible
  (the VERBS table), with the RFC section next to it. The session states and their transitions are data
  too, in pop3d.pop3.state.
- The receive buffer never rescans bytes it has already looked at, and never grows past the line limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pop3d import wire
from pop3d.pop3.state import State as State  # re-exported: the parser is handed the state

CRLF = b"\r\n"

#: RFC 2449 §4: a command line is at most 255 octets including the terminating CRLF.
MAX_COMMAND_LINE = 255
#: RFC 5034 §4: the 255-octet limit binds the AUTH command itself, initial response included (a client whose
#: initial response would not fit sends AUTH without it and waits for the "+ " continuation); the client's
#: responses inside the exchange are not commands, and servers must accept responses as long as their
#: mechanisms produce (the same rule as RFC 4954 §4 for SMTP, which suggests 12288). Ours are small, so
#: 8 KiB bounds memory per connection while leaving room for long names and passwords.
MAX_SASL_LINE = 8192


AUTH = frozenset({State.AUTHORIZATION})
TRANS = frozenset({State.TRANSACTION})
BOTH = frozenset({State.AUTHORIZATION, State.TRANSACTION})


# ---------------------------------------------------------------------------------------------
# Events produced by the core


class Command:
    """A well-formed command, legal in the current state. Arguments are already validated.

    A plain slotted class (immutable for mypy through Final): one is built per pipelined command, and a
    frozen dataclass costs twice as much to construct.
    """

    __slots__ = ("args", "verb")

    def __init__(self, verb: str, args: tuple[str, ...]) -> None:
        self.verb: Final = verb
        self.args: Final = args

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Command) and other.verb == self.verb and other.args == self.args

    def __hash__(self) -> int:
        return hash((self.verb, self.args))

    def __repr__(self) -> str:
        return f"Command({self.verb!r}, {self.args!r})"


@dataclass(frozen=True, slots=True)
class Text:
    """Human-readable text before translation: `msgid` is the English str.format template (the catalog key,
    pop3d/locale) and `values` fill its fields; a value that is itself a Text is translated too.

    The parser is a pure core and knows no catalog: it says what it means, the session translates it into
    the session's language (pop3d.pop3.catalog); `english()` is the text as the msgid says it.
    """

    msgid: str
    values: tuple[tuple[str, str | int | Text], ...] = ()

    def english(self) -> str:
        if not self.values:
            return self.msgid
        return self.msgid.format(**{k: v.english() if isinstance(v, Text) else v for k, v in self.values})


@dataclass(frozen=True, slots=True)
class Rejected:
    """A line that is not a legal command here; `reply` is the complete -ERR line to send, in English;
    `text` and `code` say the same for a session in another language (RFC 6856 §3)."""

    reply: bytes
    text: Text | None = None
    code: str | None = None


def _rejected(text: Text, code: str | None = None) -> Rejected:
    return Rejected(err(text.english(), code), text, code)


Event = Command | Rejected


# ---------------------------------------------------------------------------------------------
# Replies


def ok(text: str = "") -> bytes:
    """A single-line positive reply (RFC 1939 §3)."""
    return b"+OK " + text.encode("utf-8") + CRLF if text else b"+OK" + CRLF


def err(text: str, code: str | None = None) -> bytes:
    """A single-line negative reply, with an RFC 2449 §8 / RFC 3206 response code when given."""
    if code:
        return f"-ERR [{code}] {text}".encode() + CRLF
    return b"-ERR " + text.encode("utf-8") + CRLF


def multiline(first: bytes, lines: list[str]) -> bytes:
    """A multi-line reply whose lines are protocol text (LIST, UIDL, CAPA): stuffed and terminated.

    Message bodies do not come through here; they go through pop3d.wire, which handles arbitrary bytes.
    """
    body = "".join(("." + line if line.startswith(".") else line) + "\r\n" for line in lines)
    return first + body.encode("utf-8") + b".\r\n"


# ---------------------------------------------------------------------------------------------
# Human-readable texts of the parser's -ERR replies: the catalog msgids (pop3d/locale/pop3d.pot), in one place.

NO_ARGUMENTS = Text("no arguments allowed")
ONE_ARGUMENT = Text("exactly 1 argument required")
N_ARGUMENTS = "exactly {n} arguments required"
BETWEEN = "between {lo} and {hi} arguments allowed"
BAD_MSGNUM = Text("invalid message number")
BAD_COUNT = Text("invalid line count")
BAD_DIGEST = Text("digest must be 32 hexadecimal digits")
AUTH_ARGS = Text("at most a mechanism and an initial response allowed")
BAD_MECHANISM = Text("invalid mechanism name")
NOT_BASE64 = Text("initial response is not base64")
BAD_LANGUAGE = Text("invalid language range (RFC 4647)")
AT_MOST_ONE = Text("at most 1 argument allowed")
TOO_LONG = "command line too long (limit {limit} octets, RFC 2449)"
NOT_UTF8 = Text("command is not valid UTF-8")
EMPTY = Text("empty command")
UNKNOWN = Text("unknown command")
BEFORE_LOGIN = "{verb} not allowed before login"
AFTER_LOGIN = "{verb} not allowed after login"
PROBLEM = "{verb}: {problem}"
#: every msgid above, for the catalog tests (each must be in pop3d.pot and translated)
MESSAGES: tuple[str, ...] = (
    *(t.msgid for t in (NO_ARGUMENTS, ONE_ARGUMENT, BAD_MSGNUM, BAD_COUNT, BAD_DIGEST, AUTH_ARGS, BAD_MECHANISM)),
    *(t.msgid for t in (NOT_BASE64, BAD_LANGUAGE, AT_MOST_ONE, NOT_UTF8, EMPTY, UNKNOWN)),
    *(N_ARGUMENTS, BETWEEN, TOO_LONG, BEFORE_LOGIN, AFTER_LOGIN, PROBLEM),
)

_TOO_LONG = _rejected(Text(TOO_LONG, (("limit", MAX_COMMAND_LINE),)))
_NOT_UTF8 = _rejected(NOT_UTF8)
_EMPTY = _rejected(EMPTY)
_UNKNOWN = _rejected(UNKNOWN)


# ---------------------------------------------------------------------------------------------
# Argument grammar. Each validator takes the argument list and returns the problem as a Text, or None.

_HEX32 = re.compile(r"[0-9a-fA-F]{32}\Z")  # RFC 1939 §7: APOP digest is 32 hex digits (lower case; we accept both)

ArgCheck = Callable[[tuple[str, ...]], Text | None]


def _count(lo: int, hi: int) -> ArgCheck:
    if lo == hi == 0:
        problem = NO_ARGUMENTS
    elif lo == hi:
        problem = ONE_ARGUMENT if lo == 1 else Text(N_ARGUMENTS, (("n", lo),))
    else:
        problem = Text(BETWEEN, (("lo", lo), ("hi", hi)))

    def check(args: tuple[str, ...]) -> Text | None:
        return None if lo <= len(args) <= hi else problem

    return check


def _msgnums(lo: int, hi: int, n_msg: int) -> ArgCheck:
    """`n_msg` leading arguments are message numbers (>= 1); TOP's second is a count (>= 0)."""
    count = _count(lo, hi)

    def check(args: tuple[str, ...]) -> Text | None:
        if not lo <= len(args) <= hi:
            return count(args)
        for i, a in enumerate(args):
            # RFC 1939 §3: a decimal number; no sign, no spaces, ASCII digits only (at most 10 of them)
            if not (a.isascii() and a.isdigit() and len(a) <= 10):
                return BAD_MSGNUM if i < n_msg else BAD_COUNT
            if i < n_msg and int(a) == 0:
                return BAD_MSGNUM
        return None

    return check


_TWO = Text(N_ARGUMENTS, (("n", 2),))


def _apop(args: tuple[str, ...]) -> Text | None:
    if len(args) != 2:
        return _TWO
    if not _HEX32.match(args[1]):
        return BAD_DIGEST
    return None


_MECH = re.compile(r"[A-Za-z0-9_-]{1,20}\Z")  # RFC 4422 §3.1 mechanism names (matched case-insensitively)
_B64 = re.compile(r"(?:[A-Za-z0-9+/]*={0,2}|=)\Z")


def _auth(args: tuple[str, ...]) -> Text | None:
    """RFC 5034 §4: AUTH mechanism [initial-response]; bare AUTH lists mechanisms (pre-RFC 5034 clients)."""
    if len(args) > 2:
        return AUTH_ARGS
    if args and not _MECH.match(args[0]):
        return BAD_MECHANISM
    if len(args) == 2 and not _B64.match(args[1]):
        return NOT_BASE64
    return None


#: RFC 4647 §2.1 basic language range: "*" or 1*8ALPHA *("-" 1*8alphanum), ASCII only
_LANGUAGE_RANGE = re.compile(r"(?:\*|[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*)\Z")


def _lang(args: tuple[str, ...]) -> Text | None:
    """RFC 6856 §3.2: LANG [language-range]; without one, the server lists its languages."""
    if len(args) > 1:
        return AT_MOST_ONE
    if args and not _LANGUAGE_RANGE.match(args[0]):
        return BAD_LANGUAGE
    return None


# RFC 1939 §3 says "arguments may be up to 40 characters long", but the limit is not enforced on USER and
# PASS (nor on the other verbs, whose arguments the grammar already bounds): e-mail addresses used as login
# names and generated passwords are often longer, real clients send them, and widely used servers accept
# them. The RFC 2449 §4 line limit (255 octets, MAX_COMMAND_LINE) is what bounds an argument here.
def _rest(args: tuple[str, ...]) -> Text | None:
    """USER and PASS: the rest of the line is one argument, spaces included, and must not be empty."""
    return None if args and args[0] else ONE_ARGUMENT


@dataclass(frozen=True, slots=True)
class Verb:
    """Where a verb is legal and what it takes. `rest` verbs keep the rest of the line as one argument."""

    states: frozenset[State]
    check: ArgCheck
    rest: bool = False
    #: response code on grammar errors (AUTH: RFC 3206 §4 [AUTH], promised by the AUTH-RESP-CODE capability)
    code: str | None = None


#: The POP3 command table (RFC 1939 §4-7, RFC 2449 §5, RFC 1460 LAST/RPOP, RFC 5034 AUTH, RFC 2595 STLS).
VERBS: dict[str, Verb] = {
    "USER": Verb(AUTH, _rest, rest=True),  # RFC 1939 §7; names may hold spaces in some directories
    "PASS": Verb(AUTH, _rest, rest=True),  # RFC 1939 §7: the password may contain spaces
    "APOP": Verb(AUTH, _apop),  # RFC 1939 §7
    "RPOP": Verb(AUTH, _count(1, 1)),  # RFC 1460: refused, trust-by-port is unsafe
    "QUIT": Verb(BOTH, _count(0, 0)),  # RFC 1939 §5, §6
    "STAT": Verb(TRANS, _count(0, 0)),  # RFC 1939 §5
    "LIST": Verb(TRANS, _msgnums(0, 1, 1)),
    "RETR": Verb(TRANS, _msgnums(1, 1, 1)),
    "DELE": Verb(TRANS, _msgnums(1, 1, 1)),
    "NOOP": Verb(TRANS, _count(0, 0)),
    "RSET": Verb(TRANS, _count(0, 0)),
    "TOP": Verb(TRANS, _msgnums(2, 2, 1)),  # RFC 1939 §7: TOP msg n, n >= 0
    "UIDL": Verb(TRANS, _msgnums(0, 1, 1)),  # RFC 1939 §7
    "LAST": Verb(TRANS, _count(0, 0)),  # RFC 1460 (obsolete, still sent by old clients)
    "CAPA": Verb(BOTH, _count(0, 0)),  # RFC 2449 §5: legal in AUTHORIZATION and TRANSACTION
}

#: Extensions registered per server by `CommandParser.with_extensions` (the base table stays RFC 1939).
AUTH_VERB = Verb(AUTH, _auth, code="AUTH")  # RFC 5034 §4: AUTHORIZATION state only
STLS_VERB = Verb(AUTH, _count(0, 0))  # RFC 2595 §4: AUTHORIZATION state only, no arguments
UTF8_VERB = Verb(AUTH, _count(0, 0))  # RFC 6856 §2: "Commands valid in states: AUTHORIZATION"; no parameters
LANG_VERB = Verb(BOTH, _lang)  # RFC 6856 §3.1: valid in AUTHORIZATION and TRANSACTION


# ---------------------------------------------------------------------------------------------
# Line splitting


class LineBuffer(wire.LineBuffer):
    """pop3d.wire.LineBuffer with POP3's limit by default: 255 octets per command line (RFC 2449 §4)."""

    __slots__ = ()

    def __init__(self, max_line: int = MAX_COMMAND_LINE) -> None:
        super().__init__(max_line)


# ---------------------------------------------------------------------------------------------
# The command parser


class CommandParser:
    """Turns complete lines into events according to the session state.

    The state itself is owned by the handler (it moves through pop3d.pop3.state's table); the parser is
    handed it for each line so it can refuse verbs that are illegal here (RFC 1939 §3).
    """

    __slots__ = ("verbs",)

    def __init__(self, verbs: dict[str, Verb] | None = None) -> None:
        # a copy, so extensions (AUTH, STLS, UTF8...) can register verbs per server without touching VERBS
        self.verbs = dict(VERBS if verbs is None else verbs)

    @classmethod
    def with_extensions(cls, *, stls: bool) -> CommandParser:
        """The table plus AUTH, UTF8 and LANG (RFC 6856), and STLS when this server has TLS configured (else
        STLS is unknown)."""
        parser = cls()
        parser.verbs["AUTH"] = AUTH_VERB
        parser.verbs["UTF8"] = UTF8_VERB
        parser.verbs["LANG"] = LANG_VERB
        if stls:
            parser.verbs["STLS"] = STLS_VERB
        return parser

    def parse(self, line: bytes | None, state: State) -> Event:
        # the line buffer admits MAX_SASL_LINE for SASL responses; commands keep RFC 2449's 255
        if line is None or len(line) + 2 > MAX_COMMAND_LINE:
            return _TOO_LONG
        try:
            # RFC 6856 §2.2: UTF-8 user names and passwords that are not well-formed UTF-8 are refused here
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return _NOT_UTF8
        verb_text, sep, rest = text.partition(" ")
        # RFC 1939 §3: keywords are case-insensitive ASCII. Check ASCII *before* upper-casing: Unicode case
        # mapping turns "u\N{LATIN SMALL LETTER LONG S}er" into "USER" and the "st" ligature + "ls" into "STLS".
        verb = verb_text.upper() if verb_text.isascii() else ""
        spec = self.verbs.get(verb) if verb.isalnum() else None  # alnum: UTF8
        if spec is None:
            return _UNKNOWN if verb_text else _EMPTY
        if state not in spec.states:
            return _rejected(Text(BEFORE_LOGIN if state is State.AUTHORIZATION else AFTER_LOGIN, (("verb", verb),)))
        if spec.rest:
            args: tuple[str, ...] = (rest,) if sep else ()
        else:
            args = tuple(rest.split()) if sep else ()
        problem = spec.check(args)
        if problem is not None:
            return _rejected(Text(PROBLEM, (("verb", verb), ("problem", problem))), spec.code)
        return Command(verb, args)
