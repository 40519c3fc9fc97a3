"""Logs: one JSON object per line, each carrying the current call's request id and its
trace and span ids, so every line written while serving a call can be tied to it.

Lines are formatted where they are logged (the call's context is there) and written by a
thread of their own, so a slow terminal or pipe never blocks the event loop. Part of the
kernel: links and services log through it; ``setup_logging`` installs it for a process.
"""

from __future__ import annotations

import atexit
import json as jsonlib
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as _text
from typing import IO, Any

from opentelemetry import trace

from learnmesh.kernel.principal import call_info
from learnmesh.kernel.tracecontext import SPAN_KEY, current_context

# Attributes every LogRecord has; anything else on a record is an "extra" field to emit.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "request_id",
    "trace_id",
    "span_id",
}


# Made once: json.dumps(default=…) would build an encoder per line. Values JSON cannot hold
# (datetimes, exceptions, …) are written as their str().
_ENCODER = jsonlib.JSONEncoder(default=str)


# ".000Z" … ".999Z": the end of a time, by its milliseconds.
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


class _Clock:
    """ISO-8601 UTC times with milliseconds, each text made once per millisecond (a busy
    server logs several lines in one) and its seconds part once per second."""

    def __init__(self) -> None:
        # (whole second or millisecond, its text), each swapped as one object so threads
        # never see a mix.
        self._second: tuple[int, str] = (-1, "")
        self._millisecond: tuple[int, str] = (-1, "")

    def iso(self, created: float) -> str:
        millisecond = int(created * 1000)
        cached, text = self._millisecond
        if millisecond == cached:
            return text
        second, rest = divmod(millisecond, 1000)
        cached, prefix = self._second
        if second != cached:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, prefix)
        text = prefix + _MILLIS[rest]
        self._millisecond = (millisecond, text)
        return text


_CLOCK = _Clock()
iso_time = _CLOCK.iso
_IDS = frozenset({"request_id", "trace_id", "span_id"})


def call_ids() -> tuple[str, str, str]:
    """(request id, trace id, span id) of the current call and span; empty when unknown."""
    # trace.get_current_span() in two calls instead of four (this runs for every log line).
    span: trace.Span | None = current_context().get(SPAN_KEY)  # type: ignore[assignment]
    span_context = span.get_span_context() if span is not None else None
    if span_context is not None and span_context.is_valid:
        trace_id, span_id = f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"
    else:
        trace_id = span_id = ""
    return call_info().request_id, trace_id, span_id


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, trace_id,
    span_id (when known) and the record's extra fields.

    The ids come from the record when a caller set them, else from the current call's
    context, so format where the record is made (as setup_logging's handler does).
    """

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._clock.iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        ids: tuple[str, str, str] | None = None
        for index, key in enumerate(("request_id", "trace_id", "span_id")):
            value = fields.get(key)
            if value is None:  # not set by the caller: the current call's
                if ids is None:
                    ids = call_ids()
                value = ids[index]
            if value:
                entry[key] = value
        for key, value in fields.items():
            if key not in _RESERVED and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _ENCODER.encode(entry)


class TextFormatter(logging.Formatter):
    """Plain lines for people, still with the request and trace ids when known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id, trace_id, _ = call_ids()
        request_id = record.__dict__.get("request_id") or request_id
        trace_id = record.__dict__.get("trace_id") or trace_id
        ids = " ".join(
            f"{name}={value}"
            for name, value in (("request", request_id), ("trace", trace_id))
            if value
        )
        return f"{line} [{ids}]" if ids else line


class LineWriter:
    """Writes finished lines to a stream from a thread of its own, in batches.

    ``put`` only appends to a deque (thread-safe, no lock, no wake-up while the thread is
    busy or resting). After each write the thread rests for ``interval`` seconds and then
    takes everything that queued up meanwhile: under load it wakes a few times a second
    instead of once per line (each wake-up is a thread switch and a GIL hand-over that the
    event loop pays for); a lone line after a quiet spell is still written at once.

    When the stream cannot keep up (a stalled pipe) lines beyond ``max_queued`` are dropped
    and counted rather than piling up in memory or blocking the event loop; the count is
    written once the stream moves again.
    """

    def __init__(self, stream: IO[str], max_queued: int = 100_000, interval: float = 0.1) -> None:
        self.stream = stream
        self.pending: deque[str] = deque()
        self.max_queued = max_queued
        self.interval = interval
        self.dropped = 0
        self._idle = False  # the thread waits for a line: put() must wake it
        self._wake = threading.Event()
        self._stopping = False
        self._rest = threading.Event()  # set to cut a rest short when stopping
        self._thread = threading.Thread(target=self._run, name="learnmesh-log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = self.pending
        while True:
            self._idle = True
            if not pending and not self._stopping:
                self._wake.wait()
            self._wake.clear()
            self._idle = False
            lines = [pending.popleft() for _ in range(len(pending))]
            dropped, self.dropped = self.dropped, 0
            if dropped:
                lines.append(f'{{"level": "WARNING", "message": "{dropped} log lines dropped"}}\n')
            if lines:
                try:
                    self.stream.write("".join(lines))
                    self.stream.flush()
                except (OSError, ValueError):  # the stream was closed under us; nothing to do
                    pass
            if self._stopping and not pending:
                return
            self._rest.wait(self.interval)

    def put(self, line: str) -> None:
        if len(self.pending) >= self.max_queued:
            self.dropped += 1
            return
        self.pending.append(line)
        if self._idle:
            self._idle = False
            self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Writes what is queued and ends the thread."""
        if self._thread.is_alive():
            self._stopping = True
            self._rest.set()
            self._wake.set()
            self._thread.join(timeout)


class QueuedLineHandler(logging.Handler):
    """Formats in the logging thread (where the call's context is) and queues the line."""

    def __init__(self, writer: LineWriter, formatter: logging.Formatter) -> None:
        super().__init__()
        self.writer = writer
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.put(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.writer.stop()
        super().close()


_installed: QueuedLineHandler | None = None


def direct_writer(logger: logging.Logger) -> LineWriter | None:
    """The writer of setup_logging's JSON handler when it alone would get ``logger``'s
    records, so a hot path may hand it a line it formatted itself (same JSON) instead of
    going through the logging machinery; None otherwise (another handler is listening)."""
    installed = _installed
    if installed is None or logger.handlers or not logger.propagate:
        return None
    if not isinstance(installed.formatter, JsonFormatter):
        return None
    handlers = logging.getLogger().handlers
    if len(handlers) != 1 or handlers[0] is not installed:
        return None
    return installed.writer


def json_line(created: float, logger: str, message: str, fields: Mapping[str, Any]) -> str:
    """The line JsonFormatter writes for an INFO record with ``fields`` (ids included).

    Strings, whole numbers and finite floats are written directly (what json would write
    for them); anything else goes through the JSON encoder.
    """
    parts = [
        f'{{"time": "{_CLOCK.iso(created)}", "level": "INFO", "logger": {_text(logger)}, '
        f'"message": {_text(message)}'
    ]
    for key, value in fields.items():
        if value == "" and key in _IDS:
            continue
        kind = type(value)
        if kind is str:
            encoded = _text(value)
        elif kind is int or (kind is float and math.isfinite(value)):
            encoded = repr(value)
        else:
            encoded = _ENCODER.encode(value)
        parts.append(f", {_text(key)}: {encoded}")
    parts.append("}\n")
    return "".join(parts)


def setup_logging(
    level: str | int = "INFO",
    json: bool = True,
    *,
    access_log: bool = True,
    stream: IO[str] | None = None,
) -> QueuedLineHandler:
    """Sends every log record to ``stream`` (stderr) as JSON lines (or plain text).

    Replaces the handler an earlier call installed and leaves others alone (it does turn
    off logging's thread and process lookups, which neither format uses). The access
    log (``learnmesh.access``, INFO) follows ``access_log``, not ``level``, so quieting
    the rest does not lose it. Call ``close()`` on the result at exit to flush (also
    registered with atexit).
    """
    global _installed
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        atexit.unregister(_installed.close)
        _installed.close()
    handler = QueuedLineHandler(
        LineWriter(stream or sys.stderr), JsonFormatter() if json else TextFormatter()
    )
    root.addHandler(handler)
    root.setLevel(level)
    # Neither format writes thread or process names; logging's documented switches spare
    # every record the lookups (the access log makes one record per call).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    access = logging.getLogger("learnmesh.access")
    access.setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
    atexit.register(handler.close)
    _installed = handler
    return handler
