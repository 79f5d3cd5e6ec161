"""The run directory: what a distillation run writes and how later commands read it.

    RUN/
      config.yaml                      the resolved config (written before any work)
      history.jsonl                    one line per resume that changed a field or the environment (lgd/resume.py)
      environment.json                 what changes the bits besides the config (threads, versions, device)
      log.txt                          every start's log lines, all processes (INFO and up)
      .lock                            held by the main process of the run using the folder
      done.json                        written when every set is complete
      images/<class>/<stage>-<slot>.png  the distilled set, ImageFolder layout; <class> is the class's
                                       identity (WordNet id, or the class name), see classes.json
      classes.json                     folder -> class index, name, WordNet id, the DiT's label
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

import fcntl
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lgd.errors import ConfigError, DamagedFileError, DataError, LgdError, first_line
from lgd.files import atomic_path, read_json, write_json, write_png, write_tensors

log = logging.getLogger(__name__)

def image_name(stage: int, cls: int, slot: int, folder: str | None = None) -> str:
    """An image's path; `folder` is its class's folder (runs before lgd 0.1 used the index)."""
    return f"images/{folder or f'{cls:04d}'}/{stage:02d}-{slot:05d}.png"


def class_folders(dataset) -> list[str]:
    """The folder of each class: its WordNet id (ImageNet-derived data), else its name made
    safe for a path. Sorted-folder readers (torchvision's ImageFolder) then pair the set with
    a real split of the same layout, whatever the order of the classes in lgd."""
    names = getattr(dataset, "class_ids", None) or dataset.classes
    folders = [re.sub(r"[^\w.-]+", "-", str(name)).strip("-") or f"{i:04d}" for i, name in enumerate(names)]
    if len(set(folders)) != len(folders):
        return [f"{i:04d}" for i in range(len(folders))]
    return folders


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

    def __init__(self, path: str | Path, folders: list[str] | None = None):
        self.path = Path(path)
        self.folders = folders  # each class's image folder (None: the class index, the old layout)
        self._lock = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    def sub(self, name: str) -> "RunDir":
        """A set stored inside this one (baselines/<name>) with the same layout."""
        return RunDir(self.path / name, self.folders)

    def image(self, stage: int, cls: int, slot: int) -> str:
        return image_name(stage, cls, slot, self.folders[cls] if self.folders else None)

    def use_class_folders(self, dataset, dit_classes: list[int]) -> None:
        """Name the image folders by class identity and write classes.json, unless the run was
        started with the old numbered folders (then it keeps them, so a resume stays consistent)."""
        records = sorted(self.path.glob("records/*/*.json"))
        if records and read_json(records[0])["file"].split("/")[1].isdigit():
            log.info("%s keeps its numbered class folders (written by an older lgd)", self.path)
            return
        self.folders = class_folders(dataset)
        ids = getattr(dataset, "class_ids", None)
        write_json(self.path / "classes.json", [
            {"folder": folder, "index": i, "name": dataset.classes[i], "wnid": ids[i] if ids else None,
             "dit_label": dit_classes[i]} for i, folder in enumerate(self.folders)])

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

    def remove_leftovers(self) -> None:
        """Delete the temporary files of writes that a kill interrupted (lgd.files.atomic_path
        names them .<target>.<random>.tmp); call with the lock held."""
        for tmp in self.path.rglob(".*.tmp"):
            if tmp.is_file():
                log.info("removing %s, left by an interrupted write", tmp)
                tmp.unlink()

    def open_log(self, rank: int, world: int) -> logging.Handler:
        """Append lgd's log lines (and Python warnings) to log.txt, marked with the process when
        there are several; returns the handler, for `close_log`."""
        handler = logging.FileHandler(self.path / "log.txt", mode="a", encoding="utf-8")
        who = f" [rank {rank}]" if world > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s{who} %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        for name in ("lgd", "py.warnings"):
            logging.getLogger(name).addHandler(handler)
        logging.captureWarnings(True)
        return handler

    @staticmethod
    def close_log(handler: logging.Handler) -> None:
        for name in ("lgd", "py.warnings"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def busy(self) -> bool:
        """Whether a running lgd distill holds this folder's lock."""
        path = self.path / ".lock"
        if not path.exists():
            return False
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    # --- images ---------------------------------------------------------------------------
    def is_finished(self, stage: int, cls: int, slot: int) -> bool:
        return (self.path / record_name(stage, cls, slot)).exists()

    def latent(self, stage: int, cls: int, slot: int) -> torch.Tensor:
        return load_file(str(self.path / latent_name(stage, cls, slot)))["latent"]

    def write(self, finished: list[Finished]) -> None:
        """PNG, latent and (last) record of each image; the record holds both files' checksums."""
        for f in finished:
            name = self.image(f.stage, f.cls, f.slot)
            png, latent = self.path / name, self.path / latent_name(f.stage, f.cls, f.slot)
            write_png(png, f.image)
            write_tensors(latent, {"latent": f.latent})
            write_json(self.path / record_name(f.stage, f.cls, f.slot),
                       {"file": name, **f.record, "sha256": {"png": sha256(png), "latent": sha256(latent)}})

    def repair(self) -> list[str]:
        """Treat every image whose record is unreadable, or whose PNG or latent is missing or
        does not match the record's checksum, as unfinished (its record is removed, so the run
        recomputes it bit for bit); the same for the sets under baselines/. Returns their names."""
        damaged = []
        for record in sorted(self.path.glob("records/*/*.json")) + sorted(self.path.glob("baselines/*/records/*/*.json")):
            root = record.parents[2]
            problem = _damage(root, record)
            if problem:
                log.warning("%s: %s; it will be made again", record.relative_to(self.path), problem)
                record.unlink()
                damaged.append(str(record.relative_to(self.path)))
        return damaged

    def share_initial_stage(self, run: "RunDir") -> None:
        """Link every finished image of `run`'s initial increment into this folder (the baseline
        set of the initial increment's method starts with them)."""
        for record in sorted((run / "records" / "01").glob("*.json")):
            cls, slot = (int(p) for p in record.stem.split("-"))
            for rel in (read_json(record)["file"], latent_name(1, cls, slot), record_name(1, cls, slot)):
                _link(run / rel, self.path / rel)

    # --- other files ----------------------------------------------------------------------
    def model_path(self, name: str) -> Path:
        return self.path / "models" / f"{name}.safetensors"

    def has_model(self, name: str) -> bool:
        """Whether models/<name>.safetensors is there and whole; a damaged one is removed (with a
        warning), so that it is trained again. The header check catches truncation (safetensors
        refuses a file its header does not cover) without reading the weights twice."""
        path = self.model_path(name)
        if not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # a truncated or overwritten file: SafetensorError, OSError, ...
            log.warning("%s is damaged (%s); it will be trained again", path, first_line(exc))
            path.unlink()
            return False
        return True

    def mark_done(self, images: int, stages: int) -> None:
        write_json(self.path / "done.json", {"images": images, "stages": stages})


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


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _damage(root: Path, record: Path) -> str | None:
    """What is wrong with a finished image of the set at `root`, or None."""
    try:
        meta = read_json(record)
        stage, cls, slot = meta["stage"], meta["class"], meta["slot"]
    except (ValueError, KeyError, TypeError, OSError):
        return "the record is unreadable"
    sums = meta.get("sha256", {})
    for kind, name in (("png", meta.get("file", "")), ("latent", latent_name(stage, cls, slot))):
        path = root / name
        if not name or not path.is_file():
            return f"{name or 'its image'} is missing"
        if kind in sums and sha256(path) != sums[kind]:
            return f"{name} does not match its record's checksum"
    return None


def read_png(path: Path) -> torch.Tensor:
    try:
        array = np.asarray(Image.open(path))
    except (OSError, ValueError) as exc:  # missing, truncated or not a PNG
        raise DamagedFileError(f"cannot read {path} ({first_line(exc)}): "
                               "rerun the run's lgd distill command to repair its set") from None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()).float() / 255


def finished_records(run: str | Path) -> list[dict]:
    """Metadata of every finished image, in (stage, class, slot) order."""
    run = Path(run)
    records = []
    for path in sorted((run / "records").glob("*/*.json")):
        try:
            records.append(read_json(path))
        except (ValueError, OSError):
            raise DamagedFileError(f"{path} is not a readable record: rerun the run's lgd distill command to "
                                   "repair its set") from None
    return records


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
