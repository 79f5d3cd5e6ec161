"""The kernel policy: which implementation each fused op runs, per mode and device.

CUDA is played by patching the device query (no GPU here): the decisions are pure functions of
the mode, the device type, its compute capability and the recorded GPU checks.
"""
import json

import pytest
import torch

from lgd.config import load_config
from lgd.errors import ConfigError
from lgd.kernels import _common, adaln_norm, policy

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of compute capability 9.0 with Triton, and a GPU-check record to fill."""
    record: dict = {}
    monkeypatch.setattr(policy, "HAS_TRITON", True)
    monkeypatch.setattr(policy, "_capabilities", {0: "9.0"})
    monkeypatch.setattr(policy, "validated_record", lambda: record)
    monkeypatch.setattr(policy, "_validated", None)
    return record


def test_auto_on_a_gpu_runs_no_triton_kernel_without_a_recorded_check(gpu):
    with policy.kernel_mode("auto"):
        assert policy.status(CUDA) == {k: "torch" for k in policy.KERNELS}


def test_auto_runs_exactly_the_kernels_validated_for_the_capability(gpu, monkeypatch):
    gpu["adaln_norm"] = [{"gpu": "NVIDIA H100", "capability": "9.0", "speedup_min": 1.3}]
    gpu["learnability"] = [{"gpu": "NVIDIA A100", "capability": "8.0", "speedup_min": 1.2}]
    with policy.kernel_mode("auto"):
        assert policy.status(CUDA) == {"adaln_norm": "triton", "group_norm_silu": "torch", "learnability": "torch",
                                       "norm_relu_pool": "torch"}
    monkeypatch.setattr(policy, "_capabilities", {0: "8.0"})
    with policy.kernel_mode("auto"):
        assert policy.status(CUDA) == {"adaln_norm": "torch", "group_norm_silu": "torch", "learnability": "triton",
                                       "norm_relu_pool": "torch"}


def test_fused_and_torch_modes(gpu, monkeypatch):
    with policy.kernel_mode("fused"):  # every kernel with a Triton version; norm_relu_pool has none
        assert policy.status(CUDA) == {k: "triton" if k in policy.GPU_KERNELS else "torch" for k in policy.KERNELS}
        assert policy.status(CUDA)["norm_relu_pool"] == "torch"
    with policy.kernel_mode("torch"):
        assert policy.status(CUDA) == {k: "torch" for k in policy.KERNELS}
        assert policy.status("cpu") == {k: "torch" for k in policy.KERNELS}
    monkeypatch.setattr(policy, "HAS_TRITON", False)  # no Triton: plain ops whatever the mode
    with policy.kernel_mode("fused"):
        assert policy.status(CUDA) == {k: "torch" for k in policy.KERNELS}


def test_cpu_runs_the_compiled_cpp_ops_unless_told_torch():
    from lgd import _ops

    if not (_ops.has_op("learnability") and _ops.has_op("norm_relu_pool")):
        pytest.skip("lgd._C is not built")
    for mode in ("auto", "fused"):
        with policy.kernel_mode(mode):
            assert policy.status("cpu") == {"adaln_norm": "torch", "group_norm_silu": "torch", "learnability": "cpp",
                                            "norm_relu_pool": "cpp"}


def test_kernel_mode_restores_the_previous_mode():
    outer = policy.current_mode()
    with policy.kernel_mode("torch"):
        with policy.kernel_mode("fused"):
            assert policy.current_mode() == "fused"
        assert policy.current_mode() == "torch"
    assert policy.current_mode() == outer


def test_environment_overrides_the_config(monkeypatch):
    assert policy.resolve_mode("fused") == "fused"
    monkeypatch.setenv(policy.ENV, "torch")
    assert policy.resolve_mode("fused") == "torch"
    monkeypatch.setenv(policy.ENV, "always")
    with pytest.raises(ConfigError, match="LGD_KERNELS must be one of auto, fused, torch, got 'always'"):
        load_config("demo")
    monkeypatch.delenv(policy.ENV)
    with pytest.raises(ConfigError, match="sampling.kernels must be one of"):
        load_config("demo", ["sampling.kernels=triton"])


def test_dispatch_follows_the_policy(monkeypatch):
    """The public op runs whatever the policy names (Triton here through its interpreter)."""
    if not _common.HAS_TRITON:
        pytest.skip("triton is not importable")
    x, shift, scale = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)
    called = []
    monkeypatch.setattr(adaln_norm, "adaln_modulate_triton", lambda *a: called.append("triton") or a[0])
    adaln_norm.adaln_modulate(x, shift, scale)
    monkeypatch.setattr(policy, "backend", lambda kernel, device: "triton")
    adaln_norm.adaln_modulate(x, shift, scale)
    assert called == ["triton"]


def test_decoder_norms_are_swapped_only_where_the_triton_kernel_runs(monkeypatch):
    from lgd.acceleration import apply_speedups
    from lgd.kernels.group_norm_silu import GroupNormSiLU
    from lgd.models import create_dit
    from tests.helpers import tiny_vae
    from lgd.models.vae import LatentCodec

    def fused_norms(route):
        monkeypatch.setattr(policy, "backend", lambda kernel, device: route)
        vae = tiny_vae(blocks=(8,), groups=4, seed=None)
        codec = LatentCodec(vae)
        apply_speedups(create_dit("DiT-T/2", input_size=4, num_classes=3), codec)
        return sum(isinstance(m, GroupNormSiLU) for m in vae.decoder.modules())

    assert fused_norms("torch") == 0
    assert fused_norms("triton") > 0


def test_the_shipped_record_is_valid_and_names_known_kernels():
    record = policy.validated_record()
    assert set(record) <= set(policy.KERNELS)
    for entries in record.values():
        for entry in entries:
            assert {"gpu", "capability", "speedup_min"} <= set(entry) and entry["speedup_min"] >= 1.05
    json.dumps(record)
