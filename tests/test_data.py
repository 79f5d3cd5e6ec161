"""Datasets: folder layout checks, folder loading, IDX reading, the embedded subset,
subset helpers and class lists."""
import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from lgd.data import (
    FASHION_MNIST_CLASSES,
    IMAGENET_INDEX,
    IMAGENETTE,
    IMAGEWOOF,
    WNID_NAMES,
    ImageFolderDataset,
    TensorImageDataset,
    check_layout,
    class_indices,
    load_dataset,
    load_fashion_mnist,
    per_class_subset,
    read_idx,
)
from lgd.data.embedded import ASSET
from lgd.data.fashion_mnist import DEFAULT_ROOT
from lgd.data.make_embedded import make_embedded
from lgd.errors import ConfigError, DataError
from tests.helpers import idx_bytes


# ---------------------------------------------------------------- ImageNet-layout folders
def _write_image(path, size=(20, 10), color=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


@pytest.fixture
def folder_root(tmp_path):
    """root/{train,val}/{a,b}/ with tiny images of mixed sizes, modes and suffixes."""
    for split in ("train", "val"):
        _write_image(tmp_path / split / "a" / "1.png", (20, 10))
        _write_image(tmp_path / split / "a" / "2.JPEG", (12, 16))
        _write_image(tmp_path / split / "b" / "1.jpg", (9, 9), mode="L")
    return tmp_path


def test_check_layout_names_missing_and_empty_classes(folder_root):
    (folder_root / "train" / "empty").mkdir()
    (folder_root / "train" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as err:
        check_layout(folder_root, "train", ["a", "n09999999", "empty", "b"])
    message = str(err.value)
    assert "missing class folder(s): n09999999;" in message  # only the missing one
    assert message.endswith("no .JPEG/.jpg/.png images: empty")  # only the empty one


def test_check_layout_names_missing_split(folder_root):
    with pytest.raises(DataError, match="test"):
        check_layout(folder_root, "test", ["a"])


def test_check_layout_returns_files_in_class_order(folder_root):
    files = check_layout(folder_root, "train", ["b", "a"])
    assert [len(f) for f in files] == [1, 2]


def test_image_folder_dataset(folder_root):
    data = ImageFolderDataset(folder_root, "train", ["a", "b"], image_size=8)
    assert len(data) == 3 and data.num_classes == 2 and data.channels == 3 and data.image_size == 8
    assert data.labels.tolist() == [0, 0, 1]
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y == data.labels[i]
    assert torch.allclose(data[0][0][0], torch.ones(8, 8))  # the red PNG
    assert torch.allclose(data[2][0][0], data[2][0][1])  # the grey JPEG, converted to RGB


def test_centre_crop_keeps_the_middle(tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 255, 0), (10, 0, 20, 10))  # green middle third
    (tmp_path / "train" / "a").mkdir(parents=True)
    img.save(tmp_path / "train" / "a" / "x.png")
    x, _ = ImageFolderDataset(tmp_path, "train", ["a"], image_size=10)[0]
    assert x[1, :, 2:8].min() > 0.9 and x[0, :, 2:8].max() < 0.1


def test_load_dataset_folders(folder_root):
    data = load_dataset("imagefolder", "val", root=folder_root, image_size=8)
    assert data.class_ids == ["a", "b"] and len(data) == 3
    with pytest.raises(DataError, match=IMAGENETTE[0]):
        load_dataset("imagenette", root=folder_root)
    with pytest.raises(ConfigError, match="root"):
        load_dataset("imagewoof")


def test_load_dataset_rejects_unknown_names_and_splits():
    with pytest.raises(ConfigError, match="fashion_mnist_embedded"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("demo", split="holdout")


# ---------------------------------------------------------------- IDX files
def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "img.gz").write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(tmp_path / "img.gz"), images)
    ints = np.array([-5, 7, 70000], dtype=np.int32)
    (tmp_path / "ints").write_bytes(idx_bytes(ints, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), ints)


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\x00\x00\x07\x01\x00\x00\x00\x02ab", "magic"),  # unknown type byte
        (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", "magic"),
        (b"\x00\x00\x08\x03\x00\x00", "header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05ab", "needs 5"),  # truncated data
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, payload, match):
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(DataError, match=match):
        read_idx(tmp_path / "bad")


def test_read_idx_rejects_bad_gzip(tmp_path):
    (tmp_path / "bad.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "bad.gz")


def test_load_fashion_mnist_from_folder(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3], dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    data = load_fashion_mnist("test", tmp_path)
    assert data.images.shape == (4, 1, 28, 28) and data.labels.tolist() == [0, 9, 3, 3]
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    with pytest.raises(DataError, match="train-images"):
        load_fashion_mnist("train", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[:3])))
    with pytest.raises(DataError, match="4 images"):
        load_fashion_mnist("test", tmp_path)


# ---------------------------------------------------------------- embedded subset
def test_embedded_subset_is_balanced():
    train, test = load_dataset("demo"), load_dataset("fashion_mnist_embedded", "val")
    for data, per_class in ((train, 500), (test, 100)):
        assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (1, 28, 28)
        assert data.labels.min() >= 0 and data.labels.max() < 10
        assert torch.bincount(data.labels, minlength=10).tolist() == [per_class] * 10
        assert data.classes == list(FASHION_MNIST_CLASSES)
    assert ASSET.stat().st_size < 5_000_000
    assert (ASSET.parent / "FASHION_MNIST_LICENSE.txt").is_file()


def test_embedded_resize_to_32():
    data = load_dataset("demo", "test", image_size=32)
    x, y = data[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert data.image_size == 32 and data.channels == 1 and isinstance(y, int)


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="Fashion-MNIST IDX files not installed")
def test_make_embedded_reproduces_the_asset(tmp_path):
    out = make_embedded(out=tmp_path / "subset.npz")
    with np.load(out) as new, np.load(ASSET) as shipped:
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            np.testing.assert_array_equal(new[key], shipped[key])


# ---------------------------------------------------------------- subsets and contract
def _toy_dataset(per_class=(6, 4, 5)) -> TensorImageDataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    images = torch.randint(0, 256, (len(labels), 3, 4, 4), dtype=torch.uint8)
    return TensorImageDataset(images, labels, ["x", "y", "z"])


def test_per_class_subset_and_class_indices():
    data = _toy_dataset()
    assert class_indices(data, 1).tolist() == [6, 7, 8, 9]
    first = per_class_subset(data, 3, torch.Generator().manual_seed(1))
    assert torch.bincount(data.labels[first], minlength=3).tolist() == [3, 3, 3]
    assert len(set(first.tolist())) == 9
    assert torch.equal(first, per_class_subset(data, 3, torch.Generator().manual_seed(1)))
    others = [per_class_subset(data, 3, torch.Generator().manual_seed(s)) for s in range(2, 6)]
    assert any(not torch.equal(first, o) for o in others)
    with pytest.raises(DataError, match="fewer than ipc=5"):
        per_class_subset(data, 5, torch.Generator().manual_seed(0))


def test_tensor_dataset_validates_input():
    with pytest.raises(DataError, match="uint8"):
        TensorImageDataset(torch.rand(2, 1, 4, 4), torch.zeros(2), ["a"])
    with pytest.raises(DataError, match="labels"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"])


# ---------------------------------------------------------------- class lists
@pytest.mark.parametrize("wnids", [IMAGENETTE, IMAGEWOOF])
def test_class_lists(wnids):
    assert len(wnids) == 10 and len(set(wnids)) == 10
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)
    assert all(w in WNID_NAMES and w in IMAGENET_INDEX for w in wnids)
    # ImageNet indices are the ranks of the sorted wnids: they must increase with the wnid
    ranked = sorted(wnids)
    assert [IMAGENET_INDEX[w] for w in ranked] == sorted(IMAGENET_INDEX[w] for w in wnids)


def test_imagenet_index_is_the_rank_among_all_1000_sorted_wnids():
    from lgd.data.classes import IMAGENET_WNIDS

    assert len(IMAGENET_WNIDS) == 1000 and list(IMAGENET_WNIDS) == sorted(set(IMAGENET_WNIDS))
    assert IMAGENET_INDEX["n01440764"] == 0 and IMAGENET_INDEX["n02102040"] == 217  # tench, springer
    assert IMAGENET_INDEX["n15075141"] == 999  # toilet tissue, the last class


def test_model_class_map():
    from types import SimpleNamespace

    from lgd.errors import ConfigError
    from lgd.data import model_class_map

    folder = lambda wnids: SimpleNamespace(num_classes=len(wnids), class_ids=list(wnids))
    assert model_class_map(folder(IMAGEWOOF), 1000) == [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]
    # Any ImageNet classes, not only the Nette/Woof lists; the full set maps to itself.
    assert model_class_map(folder(["n04592741", "n01443537"]), 1000) == [908, 1]  # wing, goldfish
    from lgd.data.classes import IMAGENET_WNIDS
    assert model_class_map(folder(IMAGENET_WNIDS), 1000) == list(range(1000))
    assert model_class_map(folder(["a", "b"]), 2) == [0, 1]
    with pytest.raises(ConfigError, match="not ImageNet WordNet ids"):
        model_class_map(folder(["cat", "dog"]), 1000)


def test_canonical_orders():
    assert IMAGENETTE[0] == "n01440764" and WNID_NAMES[IMAGENETTE[0]] == "tench"
    assert IMAGEWOOF[0] == "n02096294" and WNID_NAMES[IMAGEWOOF[0]] == "Australian terrier"
    assert not set(IMAGENETTE) & set(IMAGEWOOF)
    assert len(FASHION_MNIST_CLASSES) == 10


# ---------------------------------------------------------------- validation split
def test_validation_split_holds_out_a_fixed_class_balanced_part_of_train():
    from lgd.config import DataSection
    from lgd.data.splits import load_split, split_validation

    train = load_dataset("demo", "train")
    fit, validation = split_validation(train, 100)
    assert validation.labels.bincount().tolist() == [100] * 10
    assert fit.labels.bincount().tolist() == [400] * 10
    # disjoint and together the whole training split: no image is both trained on and scored
    keys = lambda d: {bytes(x.numpy()) for x in d.images}  # noqa: E731
    assert not keys(fit) & keys(validation) and len(keys(fit) | keys(validation)) == len(keys(train))
    again = load_split(DataSection(name="demo", evaluate_on="validation", image_size=28), "test")
    assert torch.equal(again.images, validation.images)  # the same images in every run
    section = DataSection(name="demo", evaluate_on="validation", validation_per_class=30)
    assert len(load_split(section, "train")) == 4700 and len(load_split(section, "test")) == 300
    assert len(load_split(DataSection(name="demo"), "test")) == 1000  # the default: the test split


def test_validation_split_of_a_folder_dataset(folder_root):
    from lgd.data.splits import split_validation

    _write_image(folder_root / "train" / "b" / "2.png", (9, 9))
    data = ImageFolderDataset(folder_root, "train", ["a", "b"], 8)
    fit, validation = split_validation(data, 1)
    assert validation.labels.tolist() == [0, 1] and fit.labels.tolist() == [0, 1]
    assert {p for p, _ in fit.samples} | {p for p, _ in validation.samples} == {p for p, _ in data.samples}
    assert validation[1][0].shape == (3, 8, 8)


def test_validation_split_needs_enough_images(folder_root):
    from lgd.data.splits import split_validation

    with pytest.raises(DataError, match=r"validation_per_class=1 leaves no training images: class 1 \(b\) has 1"):
        split_validation(ImageFolderDataset(folder_root, "train", ["a", "b"], 8), 1)
