"""The demo generator's quality measures (lgd.demo.quality) against closed forms."""
import pytest
import torch

from lgd.demo.quality import diversity, frechet_distance, image_grid, psnr


def gaussian(n, dim, mean=0.0, std=1.0, seed=0):
    return (torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std + mean)


@pytest.mark.parametrize("dim", [2, 16])
def test_frechet_distance_of_gaussians_matches_the_closed_form(dim):
    a = gaussian(20000, dim)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, I): |m|^2; N(0, I) vs N(0, 4 I): tr(I + 4I - 2 * 2I) = dim
    assert frechet_distance(a, gaussian(20000, dim, mean=0.5, seed=1)) == pytest.approx(0.25 * dim, rel=0.1, abs=0.02)
    assert frechet_distance(a, gaussian(20000, dim, std=2.0, seed=2)) == pytest.approx(dim, rel=0.1)
    # symmetric, and a floor from two samples of one distribution that shrinks with n
    b = gaussian(20000, dim, mean=0.5, seed=1)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(gaussian(20000, dim, seed=3), a) < frechet_distance(gaussian(200, dim, seed=3), a)


def test_diversity_is_the_mean_within_class_pairwise_distance():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    assert diversity(feats, labels) == pytest.approx((5.0 + 0.0) / 2)  # class 0: 5 apart, class 1: identical


def test_psnr_and_image_grid():
    a = torch.zeros(2, 1, 4, 4)
    assert psnr(a + 0.1, a).tolist() == pytest.approx([20.0, 20.0])
    assert psnr(a + 2.0, a + 1.0).tolist() == pytest.approx([100.0, 100.0])  # clamped to [0, 1] first
    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, 1, 2, 2)
    grid = image_grid(images, rows=2)
    assert grid.shape == (1, 4, 6) and grid[0, 0, ::2].tolist() == [0, 1, 2] and grid[0, 2, ::2].tolist() == [3, 4, 5]


def test_measure_a_tiny_generator_on_tiny_data(tmp_path):
    from lgd.classifiers import build_classifier
    from lgd.demo.quality import measure
    from tests.helpers import save_dit, tiny_dit, tiny_vae, write_fashion_mnist

    root = write_fashion_mnist(tmp_path / "fmnist", train_per_class=6, test_per_class=4)
    tiny_vae(1, sample_size=32).save_pretrained(tmp_path / "gen" / "vae")  # 32 px -> 16x16x4 latents
    save_dit(tiny_dit(0, input_size=16, num_classes=10), tmp_path / "gen" / "dit.safetensors")
    torch.manual_seed(0)
    classifier = build_classifier("convnet3", 1, 10, 32, width=8).eval()
    result = measure(tmp_path / "gen", [1.0, 3.0], per_class=3, steps=3, seed=0, classifier=classifier,
                     pictures=tmp_path / "pictures", root=root)
    assert result["test_images"] == 40 and result["real"]["images"] == 30
    assert 0 < result["reconstruction_psnr_db"] < 60 and result["real"]["frechet_floor"] >= 0
    assert [row["cfg_scale"] for row in result["samples"]] == [1.0, 3.0]
    for row in result["samples"]:
        assert 0 <= row["top1"] <= 1 and row["frechet"] >= 0 and row["diversity_vs_real"] > 0
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [
        "reconstructions.png", "samples_cfg1.png", "samples_cfg3.png"]
