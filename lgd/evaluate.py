"""`lgd evaluate`: the accuracy protocol (docs/method.md §7) on a run directory, then the report.

    python -m lgd evaluate runs/nette --networks convnet6 resnet18 --runs 3 --device cuda
    accelerate launch -m lgd evaluate runs/nette
    accelerate launch lgd/evaluate.py runs/nette

Trains every network `runs` times from scratch on each image set (LGD, the baselines under
RUN/baselines/, a random real subset) and writes RUN/eval/results.json and RUN/eval/report.md.
Launched on several processes, the trainings are shared among them (the table is the same);
on a CPU, eval.processes > 1 starts that many processes itself, of threads / N threads each.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (accelerate launch lgd/evaluate.py): import the installed package rather
    # than letting lgd/'s own modules shadow the standard library.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402

from lgd.errors import ConfigError  # noqa: E402

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
    from lgd.assessment import check_finished, load_run_config, write_report
    from lgd.runtime import launched, resolve_device, run_on_local_processes

    config = load_run_config(args.run_dir, args.overrides)
    check_finished(args.run_dir, args.partial)
    processes = config.eval.processes
    if processes == 1 or launched():
        return write_report(args.run_dir) if evaluate_here(args, config, config.threads) else None
    if resolve_device(args.device or config.device).type != "cpu":
        raise ConfigError(f"eval.processes={processes} shares the trainings among CPU processes; on GPUs "
                          "start one process per GPU with `accelerate launch` (and eval.processes=1)")
    import torch

    # Small networks train faster one thread each, side by side, than on all threads in turn.
    threads = max(1, (config.threads or torch.get_num_threads()) // processes)
    run_on_local_processes(evaluate_here, processes, threads, args, config, None)  # None: the process's threads
    return write_report(args.run_dir)


def evaluate_here(args: argparse.Namespace, config, threads: int | None) -> bool:
    """This process's share of the evaluation (all of it alone); whether it is the main process."""
    from lgd.assessment import evaluate_run
    from lgd.runtime import Runtime, computing_threads

    runtime = Runtime()
    try:
        device = runtime.device_for(args.device or config.device)
        with computing_threads(threads):
            evaluate_run(args.run_dir, config, networks=args.networks, runs=args.runs, epochs=args.epochs,
                         sets=args.sets, device=device, runtime=runtime, progress=not args.no_progress)
        return runtime.is_main
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    from lgd.__main__ import main as lgd_main

    return lgd_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
