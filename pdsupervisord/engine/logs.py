"""Log output of the stand-in's processes.

Only the two entry points (the API server's ``main`` and the engine child's)
call :func:`configure`; importing any engine module configures nothing.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

__all__ = ["configure"]


def configure(process: str) -> None:
    """Send structlog output to stdout, one flushed line per event.

    JSON lines when stdout is not a terminal (a supervisor's log file), a
    plain console rendering when it is. Every line carries ``process`` (the
    vLLM process name it stands for) and ``pid``, since the API server and the
    engine child share their output files, as vLLM's processes do.

    Args:
        process: ``APIServer`` or ``EngineCore``.
    """
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stdout.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process, pid=os.getpid())
