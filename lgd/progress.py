"""Progress display: tqdm bars on a terminal; elsewhere (a log file, CI, a batch job) no bars,
whose carriage returns and nested-bar escape codes would garble it, and the run's own
progress lines (`RunProgress`) instead."""
from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("lgd.progress")


def progress_bar(*args, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar, shown only when stderr is a terminal."""
    return tqdm(*args, disable=disable or not sys.stderr.isatty(), **kwargs)


class RunProgress:
    """One line per update, at most every `every` seconds (and at the end): images done of
    the whole run, the rate since the start and the time left at that rate."""

    def __init__(self, total: int, what: str = "images", every: float = 30.0, enabled: bool = True):
        self.total, self.what, self.every, self.enabled = total, what, every, enabled
        self.done, self.start, self.last = 0, time.perf_counter(), float("-inf")
        self.fresh = 0  # made in this process (a resume skips finished work, which takes no time)

    def update(self, count: int, made: bool = True) -> None:
        self.done += count
        self.fresh += count if made else 0
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            elapsed = now - self.start
            rate = self.fresh / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else None
            log.info("%d/%d %s (%.0f %%), %.2f/s%s", self.done, self.total, self.what, 100 * self.done / self.total,
                     rate, f", about {_duration(eta)} left" if eta is not None else "")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
