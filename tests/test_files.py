"""Atomic writes: a failed write leaves nothing behind and says why in one message."""
import errno

import pytest
import torch

from lgd.errors import LgdError
from lgd.files import write_json, write_png


def test_full_disk_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lgd.files.os.replace", full)
    with pytest.raises(LgdError, match="No space left on device"):
        write_json(tmp_path / "a.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LgdError, match="cannot write"):
        write_png(blocker / "img.png", torch.zeros(1, 4, 4))


def test_nan_image_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_png(tmp_path / "nan.png", torch.full((1, 4, 4), float("nan")))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_safetensors_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError (os error 28): it becomes the
    same one-line LgdError as any other write, and no temporary file is left behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    from lgd.errors import LgdError
    from lgd.files import write_tensors

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(LgdError) as failure:
        write_tensors(tmp_path / "latent.safetensors", {"latent": torch.zeros(2)})
    assert str(failure.value) == f"cannot write {tmp_path / 'latent.safetensors'}: No space left on device"
    assert list(tmp_path.iterdir()) == []
