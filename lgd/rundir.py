"""The run directory: what a distillation run writes and how later commands read it.

    RUN/
      config.yaml                      the resolved config (written before any work)
      history.jsonl                    one line per resume that changed a RESUMABLE field
      .lock                            held by the main process of the run using the folder
      done.json                        written when every set is complete
      images/<class>/<stage>-<slot>.png  the distilled set, ImageFolder layout
      records/<stage>/<class>-<slot>.json  per-image metadata (stage, class, seed, S, losses)
      latents/<stage>/<class>-<slot>.safetensors  the image's final latent
      models/*.safetensors             reference, stage and surrogate classifiers
      baselines/<name>/...             baseline sets for evaluation (random real, plain DiT)
      eval/                            evaluation results, analyses, report.md

A record is written last, after its PNG and latent: an image counts as finished exactly
when its record exists, which is what resuming relies on. `RunDir` owns every write to the
folder and its lock; the functions below read a finished run.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from lgd.errors import ConfigError, DataError, LgdError
from lgd.files import atomic_path, read_json, write_json, write_png, write_tensors

log = logging.getLogger(__name__)

# Config fields a resume may change: they say how to compute, and never touch a finished image.
# sampling.batch_size (the fix after running out of memory) does change the float order, so
# the images still to be made may differ in their last bits from an uninterrupted run's.
RESUMABLE = ("sampling.batch_size", "distributed_timeout")


def image_name(stage: int, cls: int, slot: int) -> str:
    return f"images/{cls:04d}/{stage:02d}-{slot:05d}.png"


def record_name(stage: int, cls: int, slot: int) -> str:
    return f"records/{stage:02d}/{cls:04d}-{slot:05d}.json"


def latent_name(stage: int, cls: int, slot: int) -> str:
    return f"latents/{stage:02d}/{cls:04d}-{slot:05d}.safetensors"


@dataclass
class Finished:
    """One kept image, computed by any rank and written by the main process."""

    stage: int
    cls: int
    slot: int
    image: torch.Tensor  # [C, H, W] in [0, 1]
    latent: torch.Tensor
    record: dict


class RunDir:
    """A run directory (or a baseline folder inside one): its files, written atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    def sub(self, name: str) -> "RunDir":
        """A set stored inside this one (baselines/<name>) with the same layout."""
        return RunDir(self.path / name)

    # --- the folder -----------------------------------------------------------------------
    def check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise LgdError(f"cannot write to the run directory {self.path}: {exc.strerror}") from None

    def lock(self) -> None:
        """Refuse a second run on a folder that is in use (the OS drops the lock when the process
        dies, so a killed run can be resumed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(f"{self.path} is in use by another lgd run; wait for it or use another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def claim(self, config) -> None:
        """Write the resolved config, or check that a resumed run uses the same one up to the
        RESUMABLE fields; a change to those rewrites config.yaml and is appended to history.jsonl."""
        from lgd.config import Config

        wanted = config.to_dict()
        path = self.path / "config.yaml"
        if path.exists():
            try:  # fields added to Config since the run started take their defaults
                found = Config.from_dict(yaml.safe_load(path.read_text())).to_dict()
            except ConfigError as exc:
                raise ConfigError(f"{path} does not fit this version of lgd: {exc}") from None
            diff = sorted(_diff(found, wanted))
            refused = [key for key in diff if key not in RESUMABLE]
            if refused:
                raise ConfigError(f"{self.path} was started with a different config ({', '.join(refused[:5])}); "
                                  "use a new --out folder or the same settings")
            log.info("resuming the run in %s", self.path)
            if not diff:
                return
            changed = {key: [_get(found, key), _get(wanted, key)] for key in diff}
            log.info("this resume changes %s", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
            entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "event": "resume", "changed": changed}
            with open(self.path / "history.jsonl", "a") as history:
                history.write(json.dumps(entry) + "\n")
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(wanted, sort_keys=False))

    # --- images ---------------------------------------------------------------------------
    def is_finished(self, stage: int, cls: int, slot: int) -> bool:
        return (self.path / record_name(stage, cls, slot)).exists()

    def latent(self, stage: int, cls: int, slot: int) -> torch.Tensor:
        return load_file(str(self.path / latent_name(stage, cls, slot)))["latent"]

    def write(self, finished: list[Finished]) -> None:
        """PNG, latent and (last) record of each image."""
        for f in finished:
            write_png(self.path / image_name(f.stage, f.cls, f.slot), f.image)
            write_tensors(self.path / latent_name(f.stage, f.cls, f.slot), {"latent": f.latent})
            write_json(self.path / record_name(f.stage, f.cls, f.slot), f.record)

    def share_seed_stage(self, run: "RunDir") -> None:
        """Link every finished initial-stage image of `run` into this folder (a baseline of the initial increment's method)."""
        for record in sorted((run / "records" / "01").glob("*.json")):
            cls, slot = (int(p) for p in record.stem.split("-"))
            for rel in (image_name(1, cls, slot), latent_name(1, cls, slot), record_name(1, cls, slot)):
                _link(run / rel, self.path / rel)

    # --- other files ----------------------------------------------------------------------
    def model_path(self, name: str) -> Path:
        return self.path / "models" / f"{name}.safetensors"

    def mark_done(self, images: int, stages: int) -> None:
        write_json(self.path / "done.json", {"images": images, "stages": stages})


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


def _link(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a finished file into a baseline folder, atomically."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


@dataclass
class SyntheticSet:
    """A distilled image set in memory: images in [0, 1], labels and the increment of each image."""

    images: torch.Tensor  # float32 [N, C, H, W]
    labels: torch.Tensor  # long [N]
    increments: torch.Tensor  # long [N], stage index (1 = initial increment)

    def __len__(self) -> int:
        return len(self.labels)


def read_png(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path))
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()).float() / 255


def finished_records(run: str | Path) -> list[dict]:
    """Metadata of every finished image, in (stage, class, slot) order."""
    run = Path(run)
    return [read_json(p) for p in sorted((run / "records").glob("*/*.json"))]


def load_synthetic(run: str | Path, stages: list[int] | None = None) -> SyntheticSet:
    """The distilled set of a run directory (optionally only some increments)."""
    run = Path(run)
    records = [r for r in finished_records(run) if stages is None or r["stage"] in stages]
    if not records:
        raise DataError(f"{run} holds no finished images" + (f" for stages {stages}" if stages else ""))
    images = torch.stack([read_png(run / r["file"]) for r in records])
    labels = torch.tensor([r["class"] for r in records])
    increments = torch.tensor([r["stage"] for r in records])
    return SyntheticSet(images, labels, increments)
