"""Log output: human-readable text (the default) or one JSON object per line (`log.format = "json"`).

Every line names the process it comes from (`pop3d[pid]` in text, `"pid"` in JSON): with several workers the
lines of one session are those with its session id, and the pid says which worker served it.

Events a shipper wants to count or alert on (login, auth failure, maildrop in use, session end) are logged
with `event()`: the text line ends in `key=value` pairs, and the JSON object carries the same keys as fields
(`extra={"fields": {...}}`, merged into the object), so nobody needs a regex. Nothing here ever sees a
password: the handlers log user names and addresses only, and no command line is logged verbatim.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pop3d.config import LogSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
#: characters that make a text value ambiguous or able to forge a line: such values are JSON-quoted
_UNSAFE = re.compile(r'[ "=\\]')


def text_value(value: object) -> str:
    """One `key=value` value: booleans as yes/no, floats to the millisecond, a string with spaces, quotes,
    `=` or control characters JSON-quoted (a user name from the wire must not forge a second line)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    s = str(value)
    if not s or not s.isprintable() or _UNSAFE.search(s):  # isprintable: no control characters at all
        return json.dumps(s, ensure_ascii=False)
    return s


def pairs(fields: Mapping[str, object]) -> str:
    """`k=v k=v` of `fields`, in order."""
    return " ".join(f"{k}={text_value(v)}" for k, v in fields.items())


def event(
    logger: logging.Logger,
    level: int,
    name: str,
    text: str,
    fields: Mapping[str, object],
    shown: Mapping[str, object] | None = None,
    stacklevel: int = 2,
) -> None:
    """Log `text` followed by `shown` (default: all of `fields`) as `key=value` pairs; in JSON, every field
    plus `"event": name`. `text` may spell some fields out in its own words (the session-end line keeps
    Dovecot's counters). Nothing is formatted when the level is off. `stacklevel`: as for `Logger.log`;
    the default, 2, makes the record name the caller of this function rather than this line."""
    if logger.isEnabledFor(level):
        suffix = pairs(fields if shown is None else shown)
        line = f"{text} {suffix}" if suffix else text
        logger.log(level, "%s", line, extra={"fields": {"event": name, **fields}}, stacklevel=stacklevel)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "pid", "msg", <fields>}`; UTC timestamps with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def make_formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


_HANDLER_NAME = "pop3d-stdout"


def configure(cfg: LogSettings) -> None:
    """Install (or, on reload, update) the stdout handler on the root logger: level and format."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(_HANDLER_NAME)
        root.addHandler(handler)
    handler.setFormatter(make_formatter(cfg.format))
    root.setLevel(cfg.level)
