"""Log output: human-readable text (the default) or one JSON object per line (`log.format = "json"`).

Every line names the process it comes from (`pop3d[pid]` in text, `"pid"` in JSON): with several workers the
lines of one session are those with its session id, and the pid says which worker served it.

Events a shipper wants to count or alert on (login, auth failure, maildrop in use, session end) are logged
with `event()`: the text line ends in `key=value` pairs, and the JSON object carries the same keys as fields
(`extra={"fields": {...}}`, merged into the object), so nobody needs a regex. Nothing here ever sees a
password: the handlers log user names and addresses only, and no command line is logged verbatim.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pop3d import procid

if TYPE_CHECKING:
    from pop3d.config import LogSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
#: characters that make a text value ambiguous or able to forge a line: such values are JSON-quoted
_UNSAFE = re.compile(r'[ "=\\]')


#: a text value made only of these (printable ASCII but space, `"`, `=` and `\\`) is written as it is
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")


def text_value(value: object) -> str:
    """One `key=value` value: booleans as yes/no, floats to the millisecond, a string with spaces, quotes,
    `=` or control characters JSON-quoted (a user name from the wire must not forge a second line)."""
    kind = type(value)
    if kind is str:  # the common cases first: names, addresses, session ids, then counters
        if _PLAIN.fullmatch(value):  # type: ignore[call-overload]
            return value  # type: ignore[return-value]
    elif kind is int:
        return str(value)
    elif value is None:
        return "-"
    elif kind is bool:
        return "yes" if value else "no"
    elif kind is float:
        return f"{value:.3f}"
    s = str(value)
    if not s or not s.isprintable() or _UNSAFE.search(s):  # isprintable: no control characters at all
        return json.dumps(s, ensure_ascii=False)
    return s


def pairs(fields: Mapping[str, object]) -> str:
    """`k=v k=v` of `fields`, in order."""
    return " ".join([f"{k}={text_value(v)}" for k, v in fields.items()])


def event(
    logger: logging.Logger,
    level: int,
    name: str,
    text: str,
    fields: Mapping[str, object],
    shown: Mapping[str, object] | None = None,
) -> None:
    """Log `text` followed by `shown` (default: all of `fields`) as `key=value` pairs; in JSON, every field
    plus `"event": name`. `text` may spell some fields out in its own words (the session-end line keeps
    Dovecot's counters). Nothing is formatted when the level is off.

    The record is made here rather than by `Logger.log`, which would walk the stack for a file and line
    that no pop3d format shows: these lines are written for every login and every session end.
    """
    if logger.isEnabledFor(level):
        suffix = pairs(fields if shown is None else shown)
        line = f"{text} {suffix}" if suffix else text
        direct = _direct
        if direct is not None and direct.takes(logger, level):
            direct.emit_direct(logger.name, level, line, {"event": name, **fields})
            return
        extra = {"fields": {"event": name, **fields}}
        logger.handle(logger.makeRecord(logger.name, level, "(event)", 0, line, (), None, name, extra))


class _Seconds:
    """`strftime` of the current second, made once per second: a busy worker logs thousands of lines a
    second, and formatting the same date for each is most of what a text line costs to format."""

    __slots__ = ("_at", "_convert", "_fmt", "_text")

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self._fmt, self._convert, self._at, self._text = fmt, convert, -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._at:  # one tuple assignment: threads may race here, both write the same thing
            self._at, self._text = second, time.strftime(self._fmt, self._convert(second))
        return self._text


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT with the date part of `asctime` made once per second (logging's own default format:
    local time, `YYYY-mm-dd HH:MM:SS,mmm`)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._seconds = _Seconds(self.default_time_format, time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"

    def line(self, created: float, level: str, name: str, pid: int, msg: str, fields: Mapping[str, object]) -> str:
        """What `format` makes of a record with these attributes and no exception (`event` lines)."""
        return f"{self._seconds(created)},{_msecs(created):03d} {level} {name}[{pid}]: {msg}"


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "pid", "msg", <fields>}`; UTC timestamps with milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        out = self._object(
            f"{self._seconds(record.created)}.{int(record.msecs):03d}Z",
            record.levelname,
            record.name,
            record.process,
            record.getMessage(),
            fields if isinstance(fields, dict) else {},
        )
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)

    def line(self, created: float, level: str, name: str, pid: int, msg: str, fields: Mapping[str, object]) -> str:
        """What `format` makes of a record with these attributes and no exception (`event` lines)."""
        ts = f"{self._seconds(created)}.{_msecs(created):03d}Z"
        return json.dumps(self._object(ts, level, name, pid, msg, fields), ensure_ascii=False, default=str)

    @staticmethod
    def _object(
        ts: str, level: str, name: str, pid: int | None, msg: str, fields: Mapping[str, object]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"ts": ts, "level": level, "logger": name, "pid": pid, "msg": msg}
        for k, v in fields.items():
            out.setdefault(k, v)
        return out


def _msecs(created: float) -> int:
    """The milliseconds of `created`, as LogRecord computes them."""
    return int((created - int(created)) * 1000)


def make_formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


class LoopBatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose lines, when logged on a running event loop, leave in one write per loop
    iteration instead of one write (a system call) per line.

    A worker under load ends hundreds of sessions per iteration, each with a log line; those lines reach
    the stream a few microseconds later, still in order, in one system call. Lines logged with no running
    loop (start-up, other threads, the supervisor) are written at once, after anything still pending from
    the loop thread. Nothing is lost at exit: `flush()` (logging.shutdown, which every exit path runs)
    writes what is pending, and so does a fork, so no line is written twice by parent and child.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._loop_thread: int | None = None  # the thread whose loop will write `_pending`
        os.register_at_fork(before=self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._queue(self.format(record) + self.terminator)
        except RecursionError:  # pragma: no cover - logging's own convention
            raise
        except Exception:
            self.handleError(record)

    def takes(self, logger: logging.Logger, level: int) -> bool:
        """Whether a record of `logger` at `level` (enabled) would reach this handler and no other, through
        no filter, and be formatted by one of ours: then `emit_direct` writes what `handle` would."""
        if self.filters or level < self.level or not isinstance(self.formatter, (TextFormatter, JsonFormatter)):
            return False
        node: logging.Logger | None = logger
        while node is not None:
            if node.filters or (node.handlers and node.handlers != [self]):
                return False
            if node.handlers:  # ours, and it must be the only handler on the way: nothing further up
                return node.parent is None or not node.propagate
            if not node.propagate:
                return False
            node = node.parent
        return False

    def emit_direct(self, name: str, level: int, msg: str, fields: Mapping[str, object]) -> None:
        """The line `emit` would write for a record of logger `name` with these attributes, made without one."""
        formatter = self.formatter
        assert isinstance(formatter, (TextFormatter, JsonFormatter))
        line = formatter.line(time.time(), logging.getLevelName(level), name, procid.current(), msg, fields)
        self.acquire()
        try:
            self._queue(line + self.terminator)
        except Exception:  # as Handler.handleError does: a logging failure must not end the session
            if logging.raiseExceptions:
                traceback.print_exc(file=sys.stderr)
        finally:
            self.release()

    def _queue(self, line: str) -> None:
        """Hold `line` for the loop's next turn, or write it now with no running loop. Under the lock."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop.is_closed():
            self._write_pending(line)
            return
        # callers hold the handler's lock (Handler.handle, emit_direct), so this is one thread at a time
        if self._loop_thread is not None and self._loop_thread != threading.get_ident():
            self._write_pending(line)  # another loop's thread has lines pending: keep one writer
            return
        self._pending.append(line)
        if self._loop_thread is None:
            self._loop_thread = threading.get_ident()
            loop.call_soon(self._from_loop)

    def _from_loop(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self, extra: str = "") -> None:
        """Write what is pending, then `extra`, in one write and one flush; the caller holds the lock."""
        lines, self._pending, self._loop_thread = self._pending, [], None
        text = "".join(lines) + extra if lines else extra
        if text:
            stream = self.stream
            stream.write(text)
            stream.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self._write_pending()
        finally:
            self.release()


_HANDLER_NAME = "pop3d-stdout"
#: pop3d's stdout handler once `configure` installed it: `event` lines may go to it directly
_direct: LoopBatchedHandler | None = None


def configure(cfg: LogSettings) -> None:
    """Install (or, on reload, update) the stdout handler on the root logger: level and format."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = LoopBatchedHandler(sys.stdout)
        handler.set_name(_HANDLER_NAME)
        root.addHandler(handler)
    handler.setFormatter(make_formatter(cfg.format))
    root.setLevel(cfg.level)
    global _direct
    _direct = handler if isinstance(handler, LoopBatchedHandler) else None
    # neither format shows thread or multiprocessing names: do not look them up for every record
    logging.logThreads = False
    logging.logMultiprocessing = False
