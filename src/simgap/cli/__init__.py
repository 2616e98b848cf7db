"""The ``simgap`` command line: parses arguments, calls the library, prints. Nothing else."""

from __future__ import annotations

import argparse
import sys

from simgap.cli import audit, embed, evaluate, materialize, report, run, scan, select, train, world
from simgap.io import error_line

# In `simgap --help` order; each module adds its command(s) and their handler.
COMMANDS = (world, run, embed, scan, select, audit, materialize, train, evaluate, report)


def parser() -> argparse.ArgumentParser:
    # The description is this docstring, which `simgap --help` prints.
    ap = argparse.ArgumentParser(prog="simgap", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_to(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("simgap: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as e:
        # Library errors name the file and the problem; a traceback would bury that line.
        # (OSError covers missing files and a full disk, whose message names the file.)
        print(f"simgap: error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0
