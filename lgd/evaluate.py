"""`lgd evaluate`: the accuracy protocol (docs/method.md §7) on a run directory, then the report.

    python -m lgd evaluate runs/nette --networks convnet6 resnet18 --runs 3 --device cuda
    accelerate launch -m lgd evaluate runs/nette
    accelerate launch lgd/evaluate.py runs/nette

Trains every network `runs` times from scratch on each image set (LGD, the baselines under
RUN/baselines/, a random real subset) and writes RUN/eval/results.json and RUN/eval/report.md.
Launched on several processes, the trainings are shared among them (the table is the same).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (accelerate launch lgd/evaluate.py): import the installed package rather
    # than letting lgd/'s own modules shadow the standard library.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402

SETS = ("random", "dit", "igd", "lgd")  # as lgd.assessment.SET_ORDER; here so building the parser stays light


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory written by `lgd distill`")
    parser.add_argument("--networks", nargs="+", help="classifiers to evaluate (default: the config's eval.networks)")
    parser.add_argument("--runs", type=int, help="trainings per network and set (default: eval.runs)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the eval recipe's, by IPC)")
    parser.add_argument("--sets", nargs="+", choices=SETS, help="image sets (default: lgd and eval.baselines)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's device)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--partial", action="store_true", help="evaluate a run that has not finished (no done.json)")
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value",
                        help="change how to evaluate, e.g. eval.recipe.engine=reference eval.recipe.compile=false")


def run(args: argparse.Namespace) -> Path | None:
    from lgd.assessment import check_finished, evaluate_run, load_run_config, write_report
    from lgd.runtime import Runtime, computing_threads

    config = load_run_config(args.run_dir, args.overrides)
    check_finished(args.run_dir, args.partial)
    runtime = Runtime()
    try:
        device = runtime.device_for(args.device or config.device)
        with computing_threads(config.threads):
            evaluate_run(args.run_dir, config, networks=args.networks, runs=args.runs, epochs=args.epochs,
                         sets=args.sets, device=device, runtime=runtime, progress=not args.no_progress)
        return write_report(args.run_dir) if runtime.is_main else None
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    from lgd.__main__ import main as lgd_main

    return lgd_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
