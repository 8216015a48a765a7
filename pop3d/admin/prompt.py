"""Reading a new password from a person or a script (`pop3d passwd`, `pop3d user add/passwd`).

Kept apart from the database helpers so `pop3d passwd` does not import asyncpg.
"""

from __future__ import annotations

import getpass
import sys

from pop3d.config import ConfigError


def read_password(from_stdin: bool = False) -> str:
    """The first line of standard input with `from_stdin` or when it is not a terminal (`echo pw | pop3d
    passwd`); else asked twice on the terminal. ConfigError (exit 2) for a mismatch, an empty password, no
    input, or a line that is not UTF-8."""
    try:
        if from_stdin or not sys.stdin.isatty():
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Repeat: ") != password:
                raise ConfigError("passwords do not match")
    except EOFError:
        raise ConfigError("no password given") from None
    except UnicodeDecodeError:
        raise ConfigError("the password on stdin is not UTF-8") from None
    if not password:
        raise ConfigError("empty password")
    return password
