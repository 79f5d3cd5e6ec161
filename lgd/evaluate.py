"""`lgd evaluate`: the accuracy protocol (method.md §7) on a run directory, then the report.

    python -m lgd evaluate runs/nette --networks convnet6 resnet18 --runs 3 --device cuda

Trains every network `runs` times from scratch on each image set (LGD, the baselines under
RUN/baselines/, a random real subset) and writes RUN/eval/results.json and RUN/eval/report.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

SETS = ("random", "dit", "igd", "lgd")  # as lgd.evaluation.SET_ORDER; here so building the parser stays light


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory written by `lgd distill`")
    parser.add_argument("--networks", nargs="+", help="classifiers to evaluate (default: the config's eval.networks)")
    parser.add_argument("--runs", type=int, help="trainings per network and set (default: eval.runs)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the eval recipe's, by IPC)")
    parser.add_argument("--sets", nargs="+", choices=SETS, help="image sets (default: lgd and eval.baselines)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's device)")


def run(args: argparse.Namespace) -> Path:
    from lgd.evaluation import evaluate_run, load_run_config, resolve_device, write_report

    config = load_run_config(args.run_dir)
    evaluate_run(args.run_dir, config, networks=args.networks, runs=args.runs, epochs=args.epochs, sets=args.sets,
                 device=resolve_device(args.device or config.device))
    return write_report(args.run_dir)
