"""The languages pop3d has message catalogs for (a leaf: config validates `server.language` against it).

English is the source language (the msgids); every other tag has pop3d/locale/<tag>/LC_MESSAGES/pop3d.po,
and a test checks that this list and those directories agree.
"""

from __future__ import annotations

from typing import Final

#: RFC 5646 language tags, lower case; the first is the source language of the catalogs
LANGUAGES: Final = ("en", "fr")
SOURCE: Final = "en"
