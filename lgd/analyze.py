"""`lgd analyze`: the paper's analyses (docs/method.md §9) of a run directory, then the report.

    python -m lgd analyze runs/nette --sets lgd dit igd --network convnet6 --device cuda
    python lgd/analyze.py runs/nette

Cross-increment matrix, training dynamics and data cartography of each image set, merged
into RUN/eval/analyses.json with their plots; RUN/eval/report.md is rewritten.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (python lgd/analyze.py): import the installed package rather than
    # letting lgd/'s own modules shadow the standard library.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402

ANALYSES = ("cross", "dynamics", "cartography")  # as lgd.assessment.ANALYSES; keeps the parser light


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory written by `lgd distill`")
    parser.add_argument("--sets", nargs="+", choices=("lgd", "dit", "igd"), help="image sets (default: all present)")
    parser.add_argument("--analyses", nargs="+", choices=ANALYSES, help="which analyses (default: all)")
    parser.add_argument("--network", help="classifier (default: the first of the config's eval.networks)")
    parser.add_argument("--epochs", type=int,
                        help="training epochs for cross-increment and cartography (default: the eval recipe's, by IPC)")
    parser.add_argument("--dynamics-epochs", type=int,
                        help="epochs per increment for training dynamics (default: recipe epochs / increments)")
    parser.add_argument("--eval-every", type=int, default=1, help="score the test set every N epochs (dynamics)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's device)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--partial", action="store_true", help="analyse a run that has not finished (no done.json)")
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value",
                        help="change how to train, e.g. eval.recipe.engine=reference eval.recipe.compile=false")


def run(args: argparse.Namespace) -> Path:
    from lgd.assessment import analyze_run, check_finished, load_run_config, write_report
    from lgd.runtime import computing_threads, resolve_device

    config = load_run_config(args.run_dir, args.overrides)
    check_finished(args.run_dir, args.partial)
    with computing_threads(config.threads):
        analyze_run(args.run_dir, config, sets=args.sets, network=args.network, analyses=args.analyses,
                    epochs=args.epochs, dynamics_epochs=args.dynamics_epochs, eval_every=args.eval_every,
                    device=resolve_device(args.device or config.device), progress=not args.no_progress)
    return write_report(args.run_dir)


def main(argv: list[str] | None = None) -> int:
    from lgd.__main__ import main as lgd_main

    return lgd_main(["analyze", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
