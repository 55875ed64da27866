"""structlog setup: a console format for people, JSON lines for machines."""

from __future__ import annotations

import logging
import os
import sys

import structlog

LOG_LEVELS = ("debug", "info", "warning", "error")


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
    ]
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
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
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
