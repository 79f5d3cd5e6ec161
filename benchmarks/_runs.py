"""What the quality benchmarks share: running lgd commands as a user would, and writing the
rows measured so far (JSON and a markdown table) after each one, so a stopped benchmark
leaves its finished rows, and the seconds each run's commands took, kept with the run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def lgd(*args: str) -> None:
    """Run one lgd command in a subprocess, failing loudly."""
    command = [sys.executable, "-m", "lgd", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


SECONDS = "benchmark_seconds.json"  # <run>/: {command: seconds}, so a reused run reports the time it took


def seconds_of(folder: Path) -> dict:
    """The seconds recorded for the run folder's commands so far ({} when none)."""
    path = folder / SECONDS
    return json.loads(path.read_text()) if path.is_file() else {}


def timed(folder: Path, *args: str) -> None:
    """Run one lgd command (args[0] names it) for the run `folder` and record its seconds there."""
    start = time.monotonic()
    lgd(*args)
    timing = {**seconds_of(folder), args[0]: round(time.monotonic() - start)}
    (folder / SECONDS).write_text(json.dumps(timing) + "\n")


def measure_all(out: Path, stem: str, items: Iterable, measure: Callable[[object], dict],
                table: Callable[[list[dict]], str]) -> list[dict]:
    """rows = [measure(item) ...], written to out/<stem>.json and out/<stem>.md as they come."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in items:
        rows.append(measure(item))
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / f"{stem}.md").write_text(table(rows))
    print(table(rows))
    return rows
