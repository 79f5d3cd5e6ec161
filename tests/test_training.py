"""Training recipes and augmentations on tiny CPU shapes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lgd.classifiers import ImageClassifier, build_classifier
from lgd.config import TrainSection
from lgd.errors import ConfigError, DataError
from lgd.training import (
    accuracy,
    color_jitter,
    cutmix,
    default_epochs,
    dsa_augment,
    hard_label_augment,
    mixed_cross_entropy,
    pca_lighting,
    random_resized_crop,
    train_classifier,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def separable(n_per_class=8, size=8, channels=1, seed=0):
    """Two classes: bright top half vs bright bottom half, plus noise."""
    g = gen(seed)
    x = 0.2 * torch.rand(2 * n_per_class, channels, size, size, generator=g)
    y = torch.arange(2).repeat_interleave(n_per_class)
    x[y == 0, :, : size // 2] += 0.7
    x[y == 1, :, size // 2 :] += 0.7
    return x.clamp(0, 1), y


def tiny_net(channels=1, classes=2, size=8, seed=0):
    torch.manual_seed(seed)
    return build_classifier("convnet3", channels, classes, size, width=8)


# ------------------------------------------------------------------ augmentations


@pytest.mark.parametrize("channels", [1, 3])
def test_hard_label_augment_keeps_shape_and_range(channels):
    x = torch.rand(5, channels, 16, 16)
    out = hard_label_augment(x, 12, gen())
    assert out.shape == (5, channels, 12, 12)
    assert out.min() >= 0 and out.max() <= 1
    for fn in (lambda t: color_jitter(t, gen()), lambda t: pca_lighting(t, gen())):
        y = fn(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(pca_lighting(x, gen()), x) or channels == 3  # lighting is RGB-only


def test_random_resized_crop_full_frame_is_identity_and_flip_mirrors():
    x = torch.rand(3, 3, 8, 8)
    same = random_resized_crop(x, 8, gen(), scale=(1, 1), ratio=(1, 1), flip_p=0.0)
    torch.testing.assert_close(same, x)
    mirrored = random_resized_crop(x, 8, gen(), scale=(1, 1), ratio=(1, 1), flip_p=1.0)
    torch.testing.assert_close(mirrored, x.flip(-1))


def test_augmentations_are_seeded():
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(hard_label_augment(x, 16, gen(5)), hard_label_augment(x, 16, gen(5)))
    assert torch.equal(dsa_augment(x, gen(5)), dsa_augment(x, gen(5)))
    assert not torch.equal(hard_label_augment(x, 16, gen(5)), hard_label_augment(x, 16, gen(6)))


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_mixes_labels_by_area(seed):
    b, h, w = 6, 10, 12
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, h, w).contiguous()
    labels = torch.arange(b)
    mixed, partner, lam = cutmix(x, labels, gen(seed))
    assert mixed.shape == x.shape and 0 <= float(lam) <= 1
    for i in range(b):
        own = (mixed[i] == i).float().mean()
        if partner[i] != i:
            torch.testing.assert_close(own, lam)  # lam is the untouched area fraction
            assert torch.all((mixed[i] == i) | (mixed[i] == partner[i]))
    logits = torch.randn(b, b)
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, partner)
    torch.testing.assert_close(mixed_cross_entropy(logits, labels, partner, lam), expected)


@pytest.mark.parametrize("family", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_dsa_is_differentiable(family):
    x = torch.rand(4, 3, 12, 12, requires_grad=True)
    out = dsa_augment(x, gen(1), strategy=family)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dsa_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown DSA"):
        dsa_augment(torch.rand(1, 1, 8, 8), gen(), strategy="color_warp")


def test_dsa_crop_is_an_integer_shift():
    x = torch.rand(2, 1, 8, 8) + 1  # strictly positive, so zero fill is visible
    out = dsa_augment(x, gen(3), strategy="crop", mean=0.0, std=1.0)
    for i in range(2):
        shifts = [(dy, dx) for dy in range(-1, 2) for dx in range(-1, 2)
                  if torch.equal(out[i], _shift(x[i], dy, dx))]
        assert shifts, "crop must translate by whole pixels with zero fill"


def _shift(img, dy, dx):
    h, w = img.shape[-2:]
    padded = F.pad(img, (1, 1, 1, 1))
    return padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


# ------------------------------------------------------------------ training


def test_plain_training_reduces_loss_and_learns():
    x, y = separable()
    model = tiny_net()
    section = TrainSection(recipe="plain", epochs=8, lr=0.05, batch_size=8)
    history = train_classifier(model, (x, y), section, seed=0, progress=False)
    assert len(history.loss) == 8
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert accuracy(model, (x, y)) == 1.0
    assert not model.training


@pytest.mark.parametrize("recipe", ["hard_label", "dc"])
def test_training_is_deterministic_given_the_seed(recipe):
    x, y = separable(channels=3)
    base = tiny_net(channels=3)
    section = TrainSection(recipe=recipe, epochs=2, batch_size=8)
    runs = []
    for seed in (7, 7, 8):
        model = copy.deepcopy(base)
        history = train_classifier(model, (x, y), section, seed=seed, progress=False)
        runs.append((history.loss, torch.cat([p.flatten() for p in model.parameters()])))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_on_epoch_runs_before_training_and_after_each_epoch():
    x, y = separable()
    seen = []
    train_classifier(tiny_net(), (x, y), TrainSection(recipe="plain", epochs=3, batch_size=8),
                     on_epoch=lambda e, m: seen.append((e, m.training)), progress=False)
    assert [e for e, _ in seen] == [0, 1, 2, 3]


@pytest.mark.parametrize("recipe, epochs, expected", [
    ("hard_label", 6, [0.01] * 4 + [0.002, 0.0004]),  # x0.2 at 2/3 (epoch 4) and 5/6 (epoch 5)
    ("hard_label", 12, [0.01] * 8 + [0.002] * 2 + [0.0004] * 2),
    ("dc", 4, [0.01, 0.01, 0.001, 0.001]),
    ("plain", 3, [0.01] * 3),
])
def test_lr_schedule_milestones(recipe, epochs, expected):
    x, y = separable(n_per_class=2)
    history = train_classifier(tiny_net(), (x, y), TrainSection(recipe=recipe, epochs=epochs), progress=False)
    assert history.lr == pytest.approx(expected)


def test_default_epochs_follow_ipc():
    assert [default_epochs("hard_label", ipc) for ipc in (1, 10, 11, 50, 51, 200, 500)] == [
        2000, 2000, 1500, 1500, 1000, 1000, 1000]
    assert default_epochs("dc", 10) == 300 and default_epochs("plain", 10) == 50


class _MeanChannel(ImageClassifier):
    """Logit of class c = mean of channel c (4 px input, identity statistics): a fixed,
    hand-checkable classifier."""

    def __init__(self):
        super().__init__(3, 4, mean=0.0, std=1.0)
        self.seen_sizes = []

    def forward(self, x):
        x = self.prepare(x)
        self.seen_sizes.append(tuple(x.shape[-2:]))
        return x.mean(dim=(2, 3))


def test_accuracy_on_a_hand_made_case():
    x = torch.zeros(4, 3, 6, 6)
    for i, c in enumerate([0, 1, 2, 2]):
        x[i, c] = 1.0
    labels = torch.tensor([0, 1, 2, 0])  # the last one is predicted 2: 3 of 4 right
    model = _MeanChannel().train()
    assert accuracy(model, (x, labels), batch_size=3) == pytest.approx(0.75)
    assert set(model.seen_sizes) == {(4, 4)} and model.training  # resized; mode restored


def test_tracking_eval_and_resizing():
    x, y = separable(size=12)
    history = train_classifier(
        tiny_net(size=8), (x, y), TrainSection(recipe="hard_label", epochs=3, batch_size=8),
        eval_data=(x, y), track=(x[:5], y[:5]), eval_every=2, progress=False,
    )
    assert history.epochs == 3 and history.test_epochs == [2, 3] and len(history.test_accuracy) == 2
    assert history.confidence.shape == (3, 5)
    assert history.confidence.min() >= 0 and history.confidence.max() <= 1


class _ListDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_datasets_and_uint8_images_are_accepted():
    x, y = separable()
    section = TrainSection(recipe="plain", epochs=2, batch_size=8)
    h1 = train_classifier(tiny_net(), _ListDataset(x, y), section, progress=False)
    uint8 = ((x * 255).round().to(torch.uint8), y)
    h2 = train_classifier(tiny_net(), uint8, section, progress=False)
    assert len(h1.loss) == len(h2.loss) == 2
    with pytest.raises(DataError):
        train_classifier(tiny_net(), (x[:0], y[:0]), section, progress=False)
    with pytest.raises(ConfigError, match="recipe"):
        train_classifier(tiny_net(), (x, y), TrainSection(recipe="adam"), progress=False)

