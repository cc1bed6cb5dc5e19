"""Run the PD proxy: ``python -m pdsupervisord.proxy --help``."""

from __future__ import annotations

import sys

from pdsupervisord.proxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
