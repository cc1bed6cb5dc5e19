"""``python -m pdsupervisord.engine serve MODEL [vllm serve flags...]``."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in engine's API server.

    Returns:
        The exit status; see :mod:`pdsupervisord.engine.apiserver`.
    """
    # A SIGTERM during the imports below must still end as "interrupted while
    # loading" (130), not by the signal; the server replaces this handler.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return 130


def _run(argv: list[str]) -> int:
    # Imported here, after the SIGTERM handler is in place: aiohttp and its
    # friends take a noticeable part of a second to import.
    from pdsupervisord.engine.apiserver import run  # noqa: PLC0415

    return run(argv, os.environ)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
