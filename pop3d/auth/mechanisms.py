"""The names of the SASL mechanisms pop3d implements (pop3d.auth.sasl), importable without their code.

`pop3d.config` validates `auth.mechanisms` against `KNOWN` and must stay light to import, so the names live
here and the state machines in pop3d.auth.sasl.
"""

from __future__ import annotations

from typing import Final

#: Mechanisms this server implements, in the order CAPA lists them (strongest first helps naive clients).
KNOWN: Final[tuple[str, ...]] = ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN", "EXTERNAL")
#: RFC 4616 §2 / LOGIN: the password travels in clear inside the exchange; refused on insecure connections.
PLAINTEXT: Final[frozenset[str]] = frozenset({"PLAIN", "LOGIN"})
