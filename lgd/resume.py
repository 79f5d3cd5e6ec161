"""Resume rules: which config fields a resume may change, and the record of what changed.

A run directory's config.yaml is the resolved config of its first start. A later start on the
same folder must agree with it on every field that defines the images; the fields that only say
how to compute (RESUMABLE) may change, and each change is appended to history.jsonl with the
ones that may alter the last bits of the images still to be made. environment.json records what
besides the config changes the bits; a resume computes with its thread count.
"""
from __future__ import annotations

import datetime
import fnmatch
import json
import logging

import yaml

from lgd.errors import ConfigError
from lgd.files import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

# Config fields a resume may change: they say how to compute, not what to make, and never touch
# a finished image. The rest (model, data, stages, lgd/igd settings, steps, CFG, precision, seed,
# round planning...) define the images: a resume that changes one of them is refused.
RESUMABLE = (
    "tracker", "device", "distributed_timeout", "threads", "eval.*", "model.attention",
    "sampling.batch_size", "sampling.compile", "sampling.kernels", "sampling.tf32", "sampling.checkpoint_decoder",
    *(f"{section}.{field}" for section in ("lgd.stage_model", "lgd.reference_model", "igd.surrogate")
      for field in ("engine", "compile", "micro_batch", "stacking", "group_size", "distributed")),
)
# Of those, the ones that cannot change a bit of what is still to be made (the others change
# the float order, so the images made after the resume may differ in their last bits from an
# uninterrupted run's; the history says so).
BIT_NEUTRAL = ("tracker", "distributed_timeout", "eval.*", "sampling.checkpoint_decoder")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def claim(run, config) -> None:
    """Write the resolved config, or check that a resumed run uses the same one up to the
    RESUMABLE fields; a change to those rewrites config.yaml and is appended to history.jsonl."""
    from lgd.config import Config

    wanted = config.to_dict()
    path = run.path / "config.yaml"
    if path.exists():
        try:  # fields added to Config since the run started take their defaults
            found = Config.from_dict(yaml.safe_load(path.read_text())).to_dict()
        except ConfigError as exc:
            raise ConfigError(f"{path} does not fit this version of lgd: {exc}") from None
        diff = sorted(_diff(found, wanted))
        refused = [key for key in diff if not _matches(key, RESUMABLE)]
        if refused:
            raise ConfigError(f"{run.path} was started with a different config ({', '.join(refused[:5])}); "
                              "use a new --out folder or the same settings")
        log.info("resuming the run in %s", run.path)
        if not diff:
            return
        changed = {key: [_get(found, key), _get(wanted, key)] for key in diff}
        log.info("this resume changes %s", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        bits = [key for key in diff if not _matches(key, BIT_NEUTRAL)]
        if bits:
            log.warning("%s may change the last bits of the images still to be made (finished ones are kept)",
                        ", ".join(bits))
        append_history(run, "resume", changed, may_change_bits=bits)
    run.path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(wanted, sort_keys=False))


def pin_environment(run, current: dict) -> dict:
    """The environment the run started under (environment.json, written at the first start).
    A resume computes with the run's thread count; other differences (CPU, torch
    version, device, process count) are kept in history.jsonl, since they may change the last bits
    of the images still to be made (finished ones are never touched)."""
    path = run.path / "environment.json"
    if not path.exists():
        write_json(path, current)
        return current
    recorded = read_json(path)
    # A field the record lacks (a run started by an older lgd) is unknown, not a change.
    changed = {k: [recorded[k], v] for k, v in current.items() if k in recorded and recorded[k] != v}
    if changed:
        append_history(run, "environment", changed)
        # the thread count is pinned, and the process count does not change the bits
        differs = {k: v for k, v in changed.items() if k not in ("threads", "processes")}
        if differs:
            log.warning("this resume runs under a different %s than the run's start (%s): the images "
                        "still to be made may differ in their last bits from an uninterrupted run's",
                        ", ".join(differs), ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differs.items()))
    return recorded


def append_history(run, event: str, changed: dict, **extra) -> None:
    """One line of RUN/history.jsonl."""
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "event": event, "changed": changed, **extra}
    with open(run.path / "history.jsonl", "a") as history:
        history.write(json.dumps(entry) + "\n")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")
