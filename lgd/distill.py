"""`lgd distill`: run LGD dataset distillation into a run directory.

    accelerate launch lgd/distill.py --config nette --out runs/nette model.dit=... data.root=...
    python -m lgd.distill --config demo --out runs/demo
    python -m lgd distill --config demo --out runs/demo sampling.steps=25

CONFIG is a preset (demo, nette, woof, imagenet1k) or a YAML file; trailing `section.key=value`
arguments override it. Rerunning the same command on the same --out resumes the run.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (accelerate launch lgd/distill.py): import the installed package rather
    # than letting lgd/'s own modules shadow the standard library.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset (demo, nette, woof, imagenet1k) or YAML file")
    parser.add_argument("--out", type=Path, help="run directory (created, or resumed); required unless --print-config")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, every field with its meaning, and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. stages.ipc=20")


def run(args: argparse.Namespace) -> Path | None:
    from lgd.config import load_config
    from lgd.pipeline import Distiller

    config = load_config(args.config, args.overrides)
    if args.print_config:
        from lgd.config import describe

        print(describe(config), end="")
        return None
    if args.out is None:
        from lgd.errors import ConfigError

        raise ConfigError("--out is required: the run directory to create or resume")
    start = time.perf_counter()
    out = Distiller(config, args.out, progress=not args.no_progress).run_all()
    logging.getLogger("lgd").info("distillation finished in %.1f s: %s", time.perf_counter() - start, out)
    return out


def main(argv: list[str] | None = None) -> int:
    from lgd.__main__ import main as lgd_main

    return lgd_main(["distill", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
