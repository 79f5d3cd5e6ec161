"""The `lgd` command line: `python -m lgd <command> ...` or the `lgd` console script."""
from __future__ import annotations

import argparse
import logging
import sys

from lgd.errors import LgdError


def build_parser() -> argparse.ArgumentParser:
    from lgd import sample

    parser = argparse.ArgumentParser(prog="lgd", description="Learnability-Guided Diffusion dataset distillation")
    commands = parser.add_subparsers(dest="command", required=True)
    sample.add_arguments(commands.add_parser("sample", help="unguided class-conditional sampling to PNGs"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sample":
            from lgd.sample import run

            print(run(args))
    except LgdError as exc:
        print(f"lgd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
