"""What every benchmark's command line shares: ``--verbose``, else the library logs warnings only.

Unconfigured, structlog prints every info line of the library (engine start, demotions) among
the tables and ratios a benchmark exists to print.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Add ``--verbose``, parse, and send vmwatch's logs to stderr at WARNING (DEBUG if verbose)."""
    parser.add_argument("--verbose", action="store_true", help="show vmwatch's info and debug logs")
    args = parser.parse_args(argv)
    from vmwatch import logs

    logs.configure_cli("debug" if args.verbose else "warning", sys.stderr)
    return args
