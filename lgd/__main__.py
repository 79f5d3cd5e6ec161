"""The `lgd` command line: `python -m lgd <command> ...` or the `lgd` console script.

Commands: sample (unguided sampling), distill (an LGD run), evaluate, analyze and export (a
run directory). Bad input ends with one clear message and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lgd.errors import LgdError

COMMANDS = {
    "sample": ("lgd.sample", "unguided class-conditional sampling to PNGs"),
    "distill": ("lgd.distill", "run LGD distillation into a run directory"),
    "evaluate": ("lgd.evaluate", "evaluate a run directory (accuracy table, report)"),
    "analyze": ("lgd.analyze", "the paper's analyses of a run directory"),
    "export": ("lgd.export", "write a run's set as tensors and an ImageFolder tree for other evaluators"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgd", description="Learnability-Guided Diffusion dataset distillation")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a trailing positional list only the words before the first option; the
    # key=value words after options belong to it too.
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = importlib.import_module(COMMANDS[args.command][0]).run(args)
    except LgdError as exc:
        print(f"lgd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Finished images and trainings are on disk (every write is atomic): the same command resumes.
        print(f"lgd {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
