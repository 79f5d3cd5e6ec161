"""Atomic file output: a reader never sees a half-written file.

Each writer writes a temporary file next to the target and renames it into place
(os.replace is atomic on POSIX and Windows within one filesystem).
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lgd.errors import LgdError, first_line


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temporary path in the target's folder; move it onto the target on success.
    A failed write (full disk, no permission) leaves no file and raises one clear LgdError."""
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are meant to be shared
        os.replace(tmp, target)
    except OSError as exc:
        raise LgdError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> [H, W] or [H, W, C] uint8 (values clamped, rounded)."""
    if not torch.isfinite(image).all():
        raise ValueError("refusing to write an image with NaN or inf values")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def write_png(path: str | Path, image: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        except SafetensorError as exc:  # safetensors reports a full disk as its own error (os error 28)
            text = str(exc)
            if re.search(r"os error 28|code: 28\b|StorageFull", text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise OSError(None, first_line(exc)) from None
