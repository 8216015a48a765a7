"""The scenario and login names the command line offers, importable without the client machinery (asyncio,
scramp): `pop3d` builds every subcommand's parser at start-up."""

from __future__ import annotations

from typing import Final

SCENARIOS: Final[tuple[str, ...]] = ("poll", "download", "download-delete", "top-list", "idle", "pipelined")
LOGINS: Final[tuple[str, ...]] = ("user", "apop", "plain", "scram")
#: the logins that are one command line each way, so a pipelined session can send them in its batch
PIPELINABLE: Final[tuple[str, ...]] = ("user", "apop", "plain")
