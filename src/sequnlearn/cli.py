"""Command line: parse → config → call. Nothing else lives here.

Every subcommand has an ``_add_<name>(sub)`` that declares its arguments and a
``cmd_<name>(args)`` that wires config, loading and the call. A :class:`UserError`
anywhere becomes one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys

from sequnlearn.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The ``sequnlearn`` parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="sequnlearn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_unlearn,):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sequnlearn`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"sequnlearn {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- unlearn


def _add_unlearn(sub) -> None:
    p = sub.add_parser("unlearn", help="sequential back-to-front unlearning of a causal LM")
    p.set_defaults(func=cmd_unlearn)


def cmd_unlearn(args) -> None:
    raise UserError("unlearn is being built")
