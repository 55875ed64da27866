"""structlog setup: a console format for people, JSON lines for machines.

A log line is cheap and bounded whatever a request held: every value is cut to
`MAX_VALUE_CHARS` (a protobuf message is logged by its type and size only, a long list
by its first items), a traceback to `MAX_TRACEBACK_CHARS`, never with local variables.
Lines are written by a thread of their own, so a slow reader of stderr never holds up
the thread that logged.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from google.protobuf.message import Message

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_VALUE_CHARS = 1000
MAX_TRACEBACK_CHARS = 6000
MAX_LISTED_ITEMS = 16
# Lines waiting for the writer thread; past this many, new ones are dropped (and counted).
MAX_QUEUED_LINES = 10_000
_PLAIN = (bool, int, float, type(None))


def configure_logging(*, json: bool, level: str = "info", process: str | None = None) -> None:
    """Send structured logs to stderr, one event per line.

    `process` names the process's role (`frontend`, `jobs`, ...) on every line, since the
    processes of one `twolane serve` share its stderr. Tracebacks are rendered plainly,
    never with local variables: those hold requests and would put prompts in the log,
    and rendering them is slow enough to stall the process (seconds for a large request).
    """
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        bound_values,
    ]
    if json:
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors.append(
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        )
    structlog.contextvars.clear_contextvars()
    if process is not None:
        structlog.contextvars.bind_contextvars(process=process, pid=os.getpid())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line: the processes of one `twolane serve` share its stderr, and a
        # line written in two pieces could interleave with another process's.
        # WriteLogger only calls write() and flush(), which _QueuedStream has; structlog
        # types its file as TextIO.
        logger_factory=structlog.WriteLoggerFactory(_writer(sys.stderr)),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def bound_values(
    logger: object, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Cut every value of an event to a bounded, cheaply made size (a structlog processor)."""
    for key, value in event_dict.items():
        if key == "exception" and isinstance(value, str):
            event_dict[key] = _clip(value, MAX_TRACEBACK_CHARS)
        elif not isinstance(value, _PLAIN):
            event_dict[key] = _bounded(value)
    return event_dict


def _bounded(value: object) -> object:
    if isinstance(value, str):
        return _clip(value, MAX_VALUE_CHARS)
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, Message):
        # Never the payload: a request can hold megabytes of prompt.
        return f"<{value.DESCRIPTOR.full_name}, {value.ByteSize()} bytes>"
    if isinstance(value, list | tuple | set | frozenset):
        shown = [_item(v) for v in itertools.islice(value, MAX_LISTED_ITEMS)]
        more = f" ...({len(value) - len(shown)} more items)" if len(value) > len(shown) else ""
        return _clip(f"{shown}{more}", MAX_VALUE_CHARS)
    if isinstance(value, Mapping):
        items = itertools.islice(value.items(), MAX_LISTED_ITEMS)
        shown_map = {_item(k): _item(v) for k, v in items}
        more = (
            f" ...({len(value) - len(shown_map)} more items)" if len(value) > len(shown_map) else ""
        )
        return _clip(f"{shown_map}{more}", MAX_VALUE_CHARS)
    return _clip(repr(value), MAX_VALUE_CHARS)


def _item(value: object) -> object:
    return value if isinstance(value, _PLAIN) else _bounded(value)


def _clip(text: str, max_chars: int) -> str:
    """`text` cut in the middle to `max_chars`: a traceback's start and its error line stay."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]} ...({len(text) - 2 * half} characters cut)... {text[-half:]}"


class _QueuedStream:
    """A write-only stream whose writes a daemon thread carries to `stream`, in order."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: queue.Queue[str | None] = queue.Queue(MAX_QUEUED_LINES)
        self._num_dropped = 0
        self._thread = threading.Thread(target=self._run, name="twolane-log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, text: str) -> None:
        try:
            self._lines.put_nowait(text)
        except queue.Full:
            self._num_dropped += 1

    def flush(self) -> None:
        pass  # the writer thread flushes after every line

    def close(self) -> None:
        """Write what is queued, then stop the thread (at exit)."""
        self._lines.put(None)
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while (text := self._lines.get()) is not None:
            if self._num_dropped:
                dropped, self._num_dropped = self._num_dropped, 0
                text = f"({dropped} log lines dropped: stderr was not read)\n{text}"
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or broken: nobody can read the log any more


_streams: dict[TextIO, _QueuedStream] = {}


def _writer(stream: TextIO) -> _QueuedStream:
    """One queued stream per underlying stream, however often logging is configured."""
    if stream not in _streams:
        _streams[stream] = _QueuedStream(stream)
    return _streams[stream]
