"""Test-wide environment: set before any module under test is imported.

TRITON_INTERPRET must be set before `@triton.jit` decorators run, so it lives here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny random 10-class DiT file and 1-channel VAE folder: the generator of tiny_overrides' runs."""
    from tests.helpers import tiny_dit_file, tiny_vae_folder

    root = tmp_path_factory.mktemp("tiny")
    return tiny_dit_file(root / "dit.safetensors", num_classes=10), tiny_vae_folder(root / "vae", image_channels=1)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny trainings: on the shared 2-core machine, thread contention
    made them ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
