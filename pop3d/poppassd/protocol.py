"""The poppassd protocol, sans I/O: line splitting, command parsing, the order of the dialogue, reply lines.

poppassd is the password-change service Eudora's "Change Password" command speaks (the protocol Steve Dorner
described for it, served by qpopper's distribution and its successors; there is no RFC). Replies look like
FTP's: `200` for success, `500` for failure, then text. One command per line, verbs in any case:

    S: 200 host poppassd hello, who are you?
    C: user NAME             S: 200 Your password please.
    C: pass OLD              S: 200 Your new password please.     (or 500 Old password is incorrect.)
    C: newpass NEW           S: 200 Password changed, thank-you.  (or 500 and why not)
    C: quit                  S: 200 Bye.

The argument is everything after the single space that follows the verb, verbatim: a password may contain
spaces, and leading or trailing ones are part of it. A line is at most `max_line` octets with its line end
(LF or CRLF); a longer one is dropped as it streams in, memory bounded, and answered `500`. Lines must be
UTF-8 without control characters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from pop3d.wire import LineBuffer as LineBuffer  # re-exported: the session splits lines with it

#: octets of a line with its CRLF: "newpass " and the longest password (auth.max_password_length) must fit
LINE_OVERHEAD: Final = len("newpass ") + 2


class Step(enum.Enum):
    """What the server waits for next."""

    USER = "user"
    PASS = "pass"
    NEWPASS = "newpass"


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # lower case: user, pass, newpass, quit
    arg: str


@dataclass(frozen=True, slots=True)
class Bad:
    """A line that is no command at this point; `reply` is the `500` line to send."""

    reply: bytes


def reply(code: int, text: str) -> bytes:
    """One reply line; `text` comes from the server (never echoes client input), so it needs no escaping."""
    return f"{code} {text}\r\n".encode()


def ok(text: str) -> bytes:
    return reply(200, text)


def err(text: str) -> bytes:
    return reply(500, text)


TOO_LONG: Final = Bad(err("Line too long."))
NOT_TEXT: Final = Bad(err("Lines must be UTF-8 text without control characters."))
EMPTY_ARGUMENT: Final = {
    "user": Bad(err("Username required.")),
    "pass": Bad(err("Password required.")),
    "newpass": Bad(err("New password required.")),
}


def parse(line: bytes | None, step: Step) -> Command | Bad:
    """The command on `line` (None: an over-long line), checked against what `step` expects. `quit` is
    legal at every step."""
    if line is None:
        return TOO_LONG
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_TEXT
    if not text.isprintable():  # control characters, and what str.isprintable counts with them
        return NOT_TEXT
    verb, sep, arg = text.partition(" ")
    verb = verb.lower()
    if verb == "quit":
        return Command("quit", "")
    if verb != step.value:
        return Bad(err(f'Expected "{step.value}".'))
    if not sep or arg == "":
        return EMPTY_ARGUMENT[verb]
    if verb == "user":
        arg = arg.strip()
        if not arg:
            return EMPTY_ARGUMENT[verb]
    return Command(verb, arg)


# The texts of the dialogue: short, the same for everybody (no reply tells whether a user exists).
GREETING_TEXT: Final = "{host} poppassd hello, who are you?"
SEND_PASS: Final = ok("Your password please.")
SEND_NEWPASS: Final = ok("Your new password please.")
BAD_PASSWORD: Final = err("Old password is incorrect.")
CHANGED: Final = ok("Password changed, thank-you.")
NOT_CHANGED: Final = err("Server error, password not changed.")
BYE: Final = ok("Bye.")
TOO_MANY_BAD: Final = err("Too many bad commands, closing connection.")
TOO_MANY_FAILURES: Final = err("Too many failures, closing connection.")
TIMEOUT: Final = err("Timeout, closing connection.")
SHUTDOWN: Final = err("Server shutting down.")


def greeting(host: str) -> bytes:
    return ok(GREETING_TEXT.format(host=host))


def max_line(max_password_octets: int) -> int:
    """The line limit that lets the longest acceptable password through, and no more."""
    return max_password_octets + LINE_OVERHEAD
