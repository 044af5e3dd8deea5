"""`python -m fleet.lab up|down|status|ssh`: the lab without the main fleet CLI."""

from __future__ import annotations

import argparse
import sys

from fleet.lab.cli import add_lab_commands, add_location_options, run_lab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.lab",
        description="A local fleet of real hosts (systemd-nspawn containers) to rehearse on.",
    )
    add_location_options(parser, default=None)
    add_lab_commands(parser)
    return run_lab(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
