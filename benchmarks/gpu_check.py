"""One prepared GPU check: the Triton kernels, the guided steps, sampling and training at the
real (ImageNette / DiT-XL/2) shapes, and the whole `nette` run projected from what it measured.

    python benchmarks/gpu_check.py [--out DIR] [--record] [--budget-s N]
    python benchmarks/gpu_check.py --dry-run [--out DIR]     # CPU, tiny shapes: the code paths only

Needs the GPU machine's own Python with torch >= 2.6 (CUDA build), triton and diffusers, and lgd
installed (`pip install -e . --no-deps --no-build-isolation` from the repo root). No network:
every model has random weights (speed and memory do not depend on their values). A missing
requirement ends the run at once with one line and exit status 2; anything that fails later
(a kernel that is wrong, a compile that breaks, an out-of-memory) is a finding, recorded in
the results, and the exit status stays 0.

Writes DIR/gpu_check.json and DIR/gpu_check.md (DIR defaults to benchmarks/results), again
after every section, so a run cut short keeps what it measured. Progress goes to stderr.

Time: one deadline, --budget-s seconds (default 450, so that the run ends within 8 minutes on
one H100/H200). Each section gets a share of the time left; each row checks the time left
against its own estimate first and is recorded as "skipped: out of time" rather than started.
A single call cannot be interrupted, so a compile slower than its estimate can overrun. The
estimates are guesses until a GPU run has measured them. Each section runs its rows in the
order a short budget should keep them; the compiled rows, the dearest, are the ones it skips
first (a larger --budget-s, e.g. 840 on a machine lent for 15 minutes, runs them).

Sections (each one function; results under "sections" in the JSON):
  environment   GPU, versions, and a measured dense bf16 matmul rate (the ceiling below).
  kernels       every Triton kernel of lgd.kernels, really compiled, at the real shapes, fp32 and
                bf16, forward and backward, against its plain twin by the flash-attention rule
                (lgd.kernels._common.flash_rule, as tests/test_kernels.py applies it), and timed
                against that twin compiled by inductor. A kernel's verdict: correct in every row
                and at least MIN_SPEEDUP x faster in every row.
  guided_steps  one LGD and one IGD guided reverse step (DiT-XL/2, SD-VAE decoder, ConvNet-6 at
                224 px, 30 candidates) eager/compiled, fp32/bf16/bf16 with fp32 guidance, plain
                ops or the fused kernels: images/s, achieved TFLOP/s, peak memory, and the
                largest candidate batch that fits 40 and 80 GiB (emulated on a larger card).
  sampling      a short whole sampling run, seconds per guided and unguided step, the final
                decode, and CUDA graphs (mode="reduce-overhead") for the unguided step.
  training      classifier-training throughput of the fast engine: ConvNet-6, ResNet-18 and
                ResNetAP-10 at 224 px, fp32/bf16, one model or a vmap group of 4, eager/compiled.
  projection    the whole `nette` run (IPC 10 and 50) in hours from the measured rates.

--record writes the kernels whose verdict passed into kernels/validated.json (the file the
kernel policy reads under sampling.kernels=auto), replacing earlier entries of the same compute
capability; a kernel checked in full that did not pass loses its entry for this capability.
--dry-run runs every section on the CPU at tiny shapes, the Triton kernels under the
interpreter and torch.compile eagerly (stance force_eager): it proves the code paths run and
measures nothing that means anything; it cannot --record.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module, metadata
from pathlib import Path

LAUNCHED = time.monotonic()  # the budget covers the heavy imports below too
MIN_TORCH = (2, 6)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
INSTALL_HINT = "pip install -e . --no-deps --no-build-isolation"


# ---------------------------------------------------------------------------------------------
# Preflight: standard library only, so that a missing package costs one line, not a traceback.


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time budget of the whole run in seconds")
    parser.add_argument("--record", action="store_true",
                        help="write the kernels that passed into kernels/validated.json (GPU runs only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, Triton interpreter, torch.compile run eagerly: code paths only")
    return parser.parse_args(argv)


def version_tuple(text: str) -> tuple[int, ...]:
    """(2, 6, 0) from "2.6.0+cu124", "2.6.0a0" or "2.6.0.dev20250101": the leading number of each
    dot-separated field, up to the first field that is not a plain number."""
    numbers = []
    for part in text.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() < len(part):  # "0a0": a pre-release tail ends the release numbers
            break
    return tuple(numbers)


def requirement_problem(dry_run: bool) -> str | None:
    """The first missing requirement, as one line; None when everything is there. Any failure
    to import counts (a broken CUDA install raises OSError or RuntimeError, not ImportError)."""
    try:
        import torch
    except Exception as exc:
        return f"needs torch >= {'.'.join(map(str, MIN_TORCH))}: {exc}"
    if version_tuple(torch.__version__) < MIN_TORCH:
        return f"needs torch >= {'.'.join(map(str, MIN_TORCH))}, this Python has torch {torch.__version__}"
    for package in ("triton", "diffusers"):
        try:
            import_module(package)
        except Exception as exc:
            return f"needs {package}, which is not importable here: {exc}"
    try:
        import_module("lgd.kernels.policy")
    except Exception as exc:
        return f"lgd is not importable ({exc}): run `{INSTALL_HINT}` from the repo root"
    if not dry_run and not torch.cuda.is_available():
        return (f"CUDA is not available to torch {torch.__version__} (CUDA build: {torch.version.cuda}): "
                "run on a GPU machine, or pass --dry-run")
    return None


def preflight(argv: list[str]) -> argparse.Namespace:
    """Arguments, the interpreter switch, the requirement check; exits 2 with one line on a problem."""
    args = parse_args(argv)
    if args.record and args.dry_run:
        print("gpu_check: --record needs a real GPU run; a dry run measures nothing worth recording", file=sys.stderr)
        sys.exit(2)
    # @triton.jit picks the interpreter when it decorates, i.e. when lgd.kernels is imported.
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    problem = requirement_problem(args.dry_run)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        sys.exit(2)
    return args


if __name__ == "__main__":
    ARGS = preflight(sys.argv[1:])

# The requirements are there (or this is an import by the tests).
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch import nn  # noqa: E402

from _measure import count_flops  # noqa: E402
from render import fmt, table  # noqa: E402  (stdlib only)

from lgd.acceleration import _autocast_fp32_out, apply_speedups, tf32  # noqa: E402
from lgd.classifiers import build_classifier  # noqa: E402
from lgd.config import Config, TrainSection, read_preset  # noqa: E402
from lgd.guidance import ClassMemory, InfluenceLoss  # noqa: E402
from lgd.guidance.factory import guidance_factory  # noqa: E402
from lgd.guidance.learnability import learnability  # noqa: E402
from lgd.kernels import adaln_norm, group_norm_silu, policy  # noqa: E402
from lgd.kernels import learnability as learnability_op  # noqa: E402
from lgd.kernels._common import flash_rule  # noqa: E402
from lgd.models import DIT_CONFIGS, create_dit  # noqa: E402
from lgd.models.vae import LatentCodec  # noqa: E402
from lgd.diffusion.sampler import Sampler, SamplerSettings  # noqa: E402
from lgd.seeding import NoiseStream  # noqa: E402
from lgd.training import Member, train_classifiers  # noqa: E402
from lgd.training.recipes import default_epochs  # noqa: E402

NUM_CLASSES = 10  # ImageNette
CLASS = 3  # the class every candidate is drawn for (any class does the same work)
STEP_FRACTION = 0.8  # the step timed: index 40 of 50, inside both guidance windows (as benchmarks/_scenarios.py)
MIN_SPEEDUP = 1.05  # a kernel must beat inductor's plain ops by this much in every row
SKIPPED = "skipped: out of time"
GiB = 2**30
# The layout of sd-vae-ft-mse / sd-vae-ft-ema, the VAE of DiT-XL/2: bench_projection.SD_VAE, restated
# because bench_projection imports pytest (through _scenarios), which a GPU machine may lack;
# tests/test_gpu_check.py keeps the two equal.
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=256,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=4, sample_size=16,
)


@dataclass(frozen=True)
class Scale:
    """The shapes and sizes of a run: REAL on a GPU, TINY for the dry run."""

    matmul_n: int
    adaln_shapes: tuple[tuple[int, int, int], ...]  # (B, T, D)
    group_norm_shapes: tuple[tuple[int, int, int, int], ...]  # (B, C, H, W)
    groups: int
    learnability_shapes: tuple[tuple[int, int], ...]  # (N, C)
    dit: tuple[str, dict]
    vae: dict
    vae_scale: float
    classifier: tuple[str, dict]  # the LGD classifiers and IGD's surrogate
    classifier_size: int
    batch: int  # candidates per guided step
    reps: int  # timed calls per median
    memory_limits_gib: tuple[int, ...]
    search_tries: int
    search_cap: int
    sampling_steps: int
    train_networks: dict[str, tuple[str, dict]]  # the nette network -> what this scale trains for it
    train_size: int
    train_images: int  # per member
    train_batch: int
    train_epochs: int
    estimates: dict[str, float]  # seconds a row is expected to take, for the budget checks


REAL = Scale(
    matmul_n=8192,
    adaln_shapes=((60, 256, 1152),),  # DiT-XL/2: 30 candidates x 2 CFG rows, 256 tokens, hidden 1152
    # The SD-VAE decoder's GroupNorm+SiLU inputs at batch 30 on 32x32x4 latents are 512 channels at
    # 32, 64, 128 px and 256, 128 at 256 px: the smallest, a middle and the largest are checked
    # (512@64 and 128@256 lie between them in size; left out for time).
    group_norm_shapes=((30, 512, 32, 32), (30, 512, 128, 128), (30, 256, 256, 256)),
    groups=32,
    learnability_shapes=((30, 10), (30, 1000)),
    dit=("DiT-XL/2", {}),
    vae=SD_VAE,
    vae_scale=0.18215,
    classifier=("convnet6", {}),
    classifier_size=224,
    batch=30,
    reps=3,
    memory_limits_gib=(40, 80),
    search_tries=5,
    search_cap=960,
    sampling_steps=4,
    train_networks={"convnet6": ("convnet6", {}), "resnet18": ("resnet18", {}), "resnet_ap10": ("resnet_ap10", {})},
    train_size=224,
    train_images=512,
    train_batch=64,
    train_epochs=2,
    # Guesses (nothing has run on a GPU yet): a compile of DiT-XL/2 forward + backward, the SD-VAE
    # decoder and the influence gradient is assumed to take about two minutes.
    estimates={"environment": 10, "kernel_row": 20, "eager_variant": 25, "compiled_variant": 150,
               "sampling": 30, "cuda_graph_mode": 90, "train_eager": 15, "train_compiled": 90},
)
TINY = Scale(
    matmul_n=256,
    adaln_shapes=((4, 16, 48),),
    group_norm_shapes=((2, 64, 4, 4),),
    groups=32,
    learnability_shapes=((6, 10), (6, 1000)),
    dit=("DiT-S/2", dict(input_size=8, depth=2, num_classes=NUM_CLASSES)),
    vae=TINY_VAE,
    vae_scale=0.18215,
    classifier=("convnet3", dict(width=8)),
    classifier_size=32,
    batch=3,
    reps=1,
    memory_limits_gib=(40,),
    search_tries=2,
    search_cap=6,
    sampling_steps=2,
    train_networks={"convnet6": ("convnet3", dict(width=8)), "resnet18": ("resnet18", dict(width=4)),
                    "resnet_ap10": ("resnet_ap10", dict(width=4))},
    train_size=32,
    train_images=16,
    train_batch=8,
    train_epochs=1,
    estimates={"environment": 1, "kernel_row": 1, "eager_variant": 1, "compiled_variant": 1,
               "sampling": 1, "cuda_graph_mode": 1, "train_eager": 1, "train_compiled": 1},
)


# ---------------------------------------------------------------------------------------------
# Time, progress, rows


class Budget:
    """A deadline. `share` carves out the part of the time left that one section may use."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds

    def share(self, fraction: float) -> Budget:
        return Budget(self.left() * fraction)


def progress(message: str) -> None:
    print(f"[gpu_check {time.monotonic() - LAUNCHED:6.1f} s] {message}", file=sys.stderr, flush=True)


def failure(exc: BaseException) -> str:
    """One line for the results; the traceback goes to stderr."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run_row(label: str, estimate_s: float, budget: Budget, measure: Callable[[], dict], **info) -> dict:
    """measure() as a result row with status "ok", or a row saying why it did not run."""
    if not budget.allows(estimate_s):
        progress(f"{label}: {SKIPPED} ({budget.left():.0f} s left, needs ~{estimate_s:.0f} s)")
        return {**info, "status": SKIPPED}
    try:
        row = {**info, "status": "ok", **measure()}
    except Exception as exc:  # a failed measurement is a finding: record it and go on
        row = {**info, "status": failure(exc)}
    progress(f"{label}: {summary(row)}")
    return row


def summary(row: dict) -> str:
    keys = ("speedup", "images_per_s", "step_s", "tflops", "peak_gib", "images_per_s_per_model")
    shown = [f"{k}={row[k]:.3g}" for k in keys if isinstance(row.get(k), (int, float))]
    return row["status"] + (" " + " ".join(shown) if shown else "")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_s(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_s(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    return statistics.median(wall_s(fn, device) for _ in range(reps))


def kernel_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of fn after a warm-up call: triton's do_bench on a GPU (CUDA events,
    L2 flushed between calls: sub-millisecond kernels need both), the wall clock on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()
    return 1e3 * median_s(fn, device, reps)


def peak_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated GPU memory of one call (None on the CPU, where nothing is measured)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GiB


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OOM, or a cuBLAS/cuDNN workspace allocation that failed under a memory limit."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("ALLOC_FAILED" in str(exc) or "out of memory" in str(exc)))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


# ---------------------------------------------------------------------------------------------
# Context shared by the sections


def nette_config() -> Config:
    """The nette preset's settings (unvalidated: the weight paths it asks for are not needed here)."""
    return Config.from_dict(read_preset("nette"))


def frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def wake(dit: nn.Module) -> nn.Module:
    """Re-draw the adaLN-Zero layers, zero at init (the DiT output and its input gradient would
    be exactly zero), from the global seed."""
    with torch.no_grad():
        for module in dit.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.weight.normal_(0.0, 0.02)
    return dit


@dataclass
class Models:
    """The guided step's parts at one scale, on the device. The DiT and codec are built fresh
    for each variant (same seed: the same weights), since speedups apply once per model."""

    scale: Scale
    device: torch.device
    config: Config
    student: nn.Module
    reference: nn.Module
    surrogate: nn.Module
    checkpoints: list[dict[str, torch.Tensor]]
    targets: torch.Tensor  # [E, classes, parameters]: random class targets of the influence loss
    memory: ClassMemory

    @classmethod
    def build(cls, scale: Scale, device: torch.device) -> Models:
        config = nette_config()
        torch.manual_seed(1)
        name, overrides = scale.classifier
        classifier = lambda: frozen(build_classifier(name, 3, NUM_CLASSES, scale.classifier_size, **overrides).to(device))
        student, reference, surrogate = classifier(), classifier(), classifier()
        base = {k: v.detach() for k, v in surrogate.named_parameters()}
        checkpoints = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
                       for _ in range(config.igd.checkpoints)]
        params = sum(v.numel() for v in base.values())
        targets = torch.randn(config.igd.checkpoints, NUM_CLASSES, params, device=device)
        memory = ClassMemory(config.lgd.memory)  # full: deviation searches all of it, as in a late stage
        latent = cls.latent_shape_of(scale)
        for _ in range(config.lgd.memory):
            memory.add(CLASS, torch.randn(latent))
        return cls(scale, device, config, student, reference, surrogate, checkpoints, targets, memory)

    @staticmethod
    def latent_shape_of(scale: Scale) -> tuple[int, int, int]:
        name, overrides = scale.dit
        config = dataclasses.replace(DIT_CONFIGS[name], **overrides)
        return (config.in_channels, config.input_size, config.input_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_shape_of(self.scale)

    def dit(self) -> nn.Module:
        torch.manual_seed(0)
        name, overrides = self.scale.dit
        with self.device:  # initialised where it runs: DiT-XL/2 has 675 M parameters
            return frozen(wake(create_dit(name, **overrides))).to(self.device)

    def codec(self) -> LatentCodec:
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        with self.device:
            return frozen(LatentCodec(AutoencoderKL(**self.scale.vae), scale=self.scale.vae_scale)).to(self.device)

    def sampler(self, dit: nn.Module, steps: int | None = None) -> Sampler:
        s = self.config.sampling
        return Sampler(dit, SamplerSettings(steps or s.steps, s.cfg_scale), self.latent_shape)

    def guidance(self, kind: str, sampler: Sampler, codec: nn.Module, influence: InfluenceLoss | None = None,
                 window: tuple[int, int] | None = None):
        """The guidance the pipeline builds for `kind` (lgd.guidance.factory), with the nette settings."""
        c = self.config
        if window is not None:
            c = dataclasses.replace(c, lgd=dataclasses.replace(c.lgd, window=window),
                                    igd=dataclasses.replace(c.igd, window=window))
        make = guidance_factory(kind, c, codec=codec, alphas_cumprod=sampler.diffusion.alphas_cumprod,
                                memory=self.memory, device=self.device, student=self.student,
                                reference=self.reference, influence=influence)
        return make([CLASS])

    def influence(self, compile: bool) -> InfluenceLoss:
        return InfluenceLoss(self.surrogate, self.checkpoints, self.targets, compile=compile)

    def candidates(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, NoiseStream]:
        """x_t, labels and the per-candidate noise of `batch` candidates."""
        gen = torch.Generator(self.device).manual_seed(batch)
        x = torch.randn((batch, *self.latent_shape), generator=gen, device=self.device)
        labels = torch.full((batch,), CLASS, device=self.device)
        return x, labels, NoiseStream(list(range(1000, 1000 + batch)), self.device)


@dataclass
class Context:
    device: torch.device
    scale: Scale
    dry_run: bool
    results: dict = field(default_factory=dict)  # section name -> its record, as written to the JSON
    _models: Models | None = None

    def models(self) -> Models:
        if self._models is None:
            progress("building the classifiers, surrogate checkpoints and class memory")
            self._models = Models.build(self.scale, self.device)
        return self._models

    def result(self, section: str) -> dict:
        """An earlier section's result ({} if it did not run)."""
        record = self.results.get(section, {})
        return record.get("result") or {}

    @property
    def compiles(self) -> bool:
        """Whether torch.compile compiles (on the GPU) or runs eagerly (the dry run's stance)."""
        return not self.dry_run


# ---------------------------------------------------------------------------------------------
# 1. Environment


def environment_section(ctx: Context, budget: Budget) -> dict:
    device = ctx.device
    info = {
        "device": device.type, "python": platform.python_version(), "torch": torch.__version__,
        # module versions: triton's distribution is "pytorch-triton" in some CUDA builds of torch
        "triton": import_module("triton").__version__, "diffusers": import_module("diffusers").__version__,
        "lgd": metadata.version("lgd"), "cuda": torch.version.cuda,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "torch_compile": "inductor" if ctx.compiles else "force_eager (dry run: compiled calls run eagerly)",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / GiB,
                    multiprocessors=props.multi_processor_count)
    else:
        from _measure import cpu_model

        info.update(gpu=None, cpu=cpu_model(), cores=os.cpu_count())
    with policy.kernel_mode("auto"):
        info["kernels_under_auto"] = policy.status(device)
    info["matmul"] = matmul_rate(ctx.scale.matmul_n, device, ctx.scale.reps)
    return info


def matmul_rate(n: int, device: torch.device, reps: int) -> dict:
    """Dense bf16 n x n x n matmul: the ceiling the achieved TFLOP/s below are set against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = kernel_ms(lambda: a @ b, device, reps)
    return {"n": n, "dtype": "bf16", "ms": ms, "tflops": 2 * n**3 / (ms / 1e3) / 1e12}


# ---------------------------------------------------------------------------------------------
# 2. Kernels: each Triton op against its plain twin


@dataclass(frozen=True)
class KernelSpec:
    """How to drive one fused op and its twin: inputs, the forward, and what to compare."""

    name: str
    fast: Callable  # the Triton op
    reference: Callable  # its plain twin; upcast=False runs it natively in low precision
    inputs: Callable  # (shape, dtype, device, scale) -> (leaves, constants, cotangent)
    forward: Callable  # (op, leaves, constants) -> ({name: output}, the output to differentiate)
    grads: tuple[str, ...]  # names of the gradients of the leaves
    atol: float  # tests/test_kernels.py's atol for this op
    exact: Callable | None = None  # ({name: output}) -> {name: bool}, for integer outputs


def _adaln_inputs(shape, dtype, device, scale):
    B, T, D = shape
    x = torch.randn(B, T, D, device=device) * 2 + 0.5
    shift, mod = torch.randn(B, D, device=device), torch.randn(B, D, device=device) * 0.5
    return [t.to(dtype) for t in (x, shift, mod)], (), torch.randn(B, T, D, device=device).to(dtype)


def _adaln_forward(op, leaves, _constants):
    y = op(*leaves)
    return {"y": y}, y


def _gns_inputs(shape, dtype, device, scale):
    C = shape[1]
    x = torch.randn(shape, device=device) * 2 + 0.7
    weight, bias = torch.randn(C, device=device) * 0.5 + 1, torch.randn(C, device=device) * 0.5
    return [t.to(dtype) for t in (x, weight, bias)], (scale.groups,), torch.randn(shape, device=device).to(dtype)


def _gns_forward(op, leaves, constants):
    x, weight, bias = leaves
    y = op(x, constants[0], weight, bias)
    return {"y": y}, y


def _learnability_inputs(shape, dtype, device, scale):
    N, C = shape
    student, reference = torch.randn(N, C, device=device) * 3, torch.randn(N, C, device=device) * 3
    labels = torch.randint(0, C, (N,), device=device)
    config = nette_config().lgd
    return [student.to(dtype), reference.to(dtype)], (labels, config.omega, config.kappa), torch.randn(N, device=device)


LEARNABILITY_OUTPUTS = ("ce_student", "ce_reference", "score", "grad_student", "grad_reference")


def _learnability_forward(op, leaves, constants):
    out = op(*leaves, *constants)
    return {**{k: getattr(out, k) for k in LEARNABILITY_OUTPUTS}, "winners": out.winners}, out.score


def _winners_first_max(outputs: dict) -> dict[str, bool]:
    """Winners are the first argmax of the op's own S in each group of kappa (as the tests check)."""
    score, winners = outputs["score"], outputs["winners"]
    kappa = score.shape[0] // winners.shape[0]
    expected = score.view(-1, kappa).argmax(1) + torch.arange(0, score.shape[0], kappa, device=score.device)
    return {"winners": torch.equal(winners, expected)}


KERNEL_SPECS = {
    "adaln_norm": KernelSpec("adaln_norm", adaln_norm.adaln_modulate_triton, adaln_norm.adaln_modulate_reference,
                             _adaln_inputs, _adaln_forward, ("dx", "dshift", "dscale"), atol=1e-5),
    "group_norm_silu": KernelSpec("group_norm_silu", group_norm_silu.group_norm_silu_triton,
                                  group_norm_silu.group_norm_silu_reference, _gns_inputs, _gns_forward,
                                  ("dx", "dweight", "dbias"), atol=1e-4),
    "learnability": KernelSpec("learnability", learnability_op.learnability_triton,
                               learnability_op.learnability_reference, _learnability_inputs, _learnability_forward,
                               ("dS/dstudent", "dS/dreference"), atol=1e-5, exact=_winners_first_max),
}
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def forward_backward(spec: KernelSpec, op: Callable, leaves, constants, cotangent) -> Callable[[], dict]:
    """A call of op's forward and backward on fixed leaves -> {output or gradient name: tensor}."""
    leaves = [t.detach().requires_grad_(True) for t in leaves]

    def run() -> dict:
        outputs, diffable = spec.forward(op, leaves, constants)
        grads = torch.autograd.grad(diffable, leaves, cotangent.to(diffable.dtype))
        return {**outputs, **dict(zip(spec.grads, grads))}

    return run


def kernel_shapes(scale: Scale) -> dict[str, tuple]:
    return {"adaln_norm": scale.adaln_shapes, "group_norm_silu": scale.group_norm_shapes,
            "learnability": scale.learnability_shapes}


def kernel_cases(scale: Scale) -> list[tuple[str, tuple, torch.dtype]]:
    """(kernel, shape, dtype), every kernel's first shape before any kernel's second: a run cut
    short still has each kernel checked once."""
    cases = [(i, name, shape, dtype) for name, shapes in kernel_shapes(scale).items()
             for i, shape in enumerate(shapes) for dtype in KERNEL_DTYPES]
    return [(name, shape, dtype) for _, name, shape, dtype in sorted(cases, key=lambda c: c[0])]


def kernel_correctness(spec: KernelSpec, dtype: torch.dtype, leaves, constants, cotangent) -> dict:
    """The flash-attention rule per output: the op against its twin on the same rounded inputs
    in fp32, with the twin run natively in `dtype` as the yardstick."""
    fast = forward_backward(spec, spec.fast, leaves, constants, cotangent)()
    ref = forward_backward(spec, spec.reference, [t.float() for t in leaves], constants, cotangent.float())()
    low_op = lambda *args: spec.reference(*args, upcast=False)
    low = forward_backward(spec, low_op, leaves, constants, cotangent)()
    exact = spec.exact(fast) if spec.exact is not None else {}
    correct, errors, bounds = {}, {}, {}
    for name in ref:
        if name in exact:
            continue
        err, bound = flash_rule(fast[name], ref[name], low[name], dtype, spec.atol)
        correct[name] = fast[name].shape == ref[name].shape and err <= bound
        errors[name], bounds[name] = err, bound
    correct.update(exact)
    return {"correct": correct, "err": errors, "bound": bounds, "all_correct": all(correct.values())}


def kernel_row(ctx: Context, spec: KernelSpec, shape: tuple, dtype: torch.dtype) -> dict:
    device = ctx.device
    torch.manual_seed(0)
    leaves, constants, cotangent = spec.inputs(shape, dtype, device, ctx.scale)
    row = kernel_correctness(spec, dtype, leaves, constants, cotangent)
    release(device)
    torch._dynamo.reset()  # one fresh graph per row: no recompile limit across shapes and dtypes
    baseline = torch.compile(spec.reference, dynamic=False)
    fast_ms = kernel_ms(forward_backward(spec, spec.fast, leaves, constants, cotangent), device, ctx.scale.reps)
    base_ms = kernel_ms(forward_backward(spec, baseline, leaves, constants, cotangent), device, ctx.scale.reps)
    release(device)
    return {**row, "triton_ms": fast_ms, "baseline_ms": base_ms, "speedup": base_ms / fast_ms,
            "baseline": "inductor (torch.compile of the twin)" if ctx.compiles else
            "eager twin (dry run: torch.compile runs eagerly, Triton is interpreted)"}


def kernel_verdicts(rows: list[dict], scale: Scale, dry_run: bool) -> dict:
    """Per kernel: correct in every row, and at least MIN_SPEEDUP x inductor in every row (never
    judged in the dry run, where nothing is timed that means anything)."""
    verdicts = {}
    for name, shapes in kernel_shapes(scale).items():
        mine = [r for r in rows if r["kernel"] == name]
        complete = len(mine) == len(shapes) * len(KERNEL_DTYPES) and all(r["status"] == "ok" for r in mine)
        correct = complete and all(r["all_correct"] for r in mine)
        speedup_min = min(r["speedup"] for r in mine) if complete else None
        fast = None if dry_run or not complete else speedup_min >= MIN_SPEEDUP
        verdicts[name] = {"complete": complete, "correct": correct, "speedup_min": speedup_min,
                          "fast_enough": fast, "passed": bool(correct and fast)}
    return verdicts


def kernels_section(ctx: Context, budget: Budget) -> dict:
    rows = []
    for name, shape, dtype in kernel_cases(ctx.scale):
        label = f"kernels: {name} {list(shape)} {dtype_name(dtype)}"
        info = dict(kernel=name, shape=list(shape), dtype=dtype_name(dtype))
        rows.append(run_row(label, ctx.scale.estimates["kernel_row"], budget,
                            lambda: kernel_row(ctx, KERNEL_SPECS[name], shape, dtype), **info))
    return {"rows": rows, "verdicts": kernel_verdicts(rows, ctx.scale, ctx.dry_run), "min_speedup": MIN_SPEEDUP}


# ---------------------------------------------------------------------------------------------
# 3. Guided steps


@dataclass(frozen=True)
class Variant:
    """How a guided step runs: the sampling.compile / precision / fp32_guidance / kernels switches."""

    name: str
    compile: bool = False
    precision: str = "fp32"
    fp32_guidance: bool = False
    kernels: str = "torch"  # "torch" is what sampling.kernels=auto runs while nothing is validated
    memory_search: bool = False  # also find the largest LGD batch that fits each memory limit


# In order of what a short budget should still measure: the preset's variant, fp32, one compiled
# variant (compiled only in bf16, to bound the time), the rest; the memory searches run after
# all of them. fp32 runs with TF32 matmuls, the pipeline's default (sampling.tf32).
VARIANTS = (
    Variant("eager bf16", precision="bf16", memory_search=True),
    Variant("eager fp32", memory_search=True),
    Variant("compiled bf16", compile=True, precision="bf16"),
    Variant("eager bf16, fused kernels", precision="bf16", kernels="fused"),
    Variant("eager bf16, fp32 guidance", precision="bf16", fp32_guidance=True),
    Variant("compiled bf16, fused kernels", compile=True, precision="bf16", kernels="fused"),
)
PRESET_VARIANT = "eager bf16"  # what the nette preset samples with (precision auto, no compile)
KINDS = ("lgd", "igd")


def step_index(steps: int) -> int:
    return round(STEP_FRACTION * steps)


@dataclass
class Accelerated:
    """One variant's DiT, codec and influence loss."""

    dit: nn.Module
    codec: nn.Module
    influence: InfluenceLoss


def accelerate(models: Models, variant: Variant) -> Accelerated:
    dit, codec = models.dit(), models.codec()
    # apply_speedups swaps in the fused GroupNorm+SiLU only where the kernel policy runs it.
    with policy.kernel_mode(variant.kernels):
        apply_speedups(dit, codec, compile=variant.compile, precision=variant.precision,
                       fp32_guidance=variant.fp32_guidance)
    return Accelerated(dit, codec, models.influence(variant.compile))


def try_accelerate(ctx: Context, variant: Variant) -> Accelerated | str:
    """The variant's models, or why they could not be built (e.g. bf16 asked of a GPU without
    it) as a row status: a finding, not the end of the section."""
    try:
        return accelerate(ctx.models(), variant)
    except Exception as exc:
        return failure(exc)


def step_call(models: Models, parts: Accelerated, kind: str, batch: int) -> Callable[[], None]:
    """One guided reverse step (index 40 of 50) for `batch` candidates, as the pipeline calls it."""
    sampler = models.sampler(parts.dit)
    guidance = models.guidance(kind, sampler, parts.codec, parts.influence)
    x, labels, noise = models.candidates(batch)
    index = step_index(models.config.sampling.steps)

    def run() -> None:
        with torch.no_grad():  # the pipeline samples under no_grad; a guided step enables grad itself
            sampler.step(x, index, labels, noise, guidance, labels)
        guidance.nonfinite.pop_failed()

    return run


def first_call_fitting(make_run: Callable[[int], Callable], batch: int, group: int,
                       device: torch.device) -> tuple[int, Callable, float]:
    """(batch, its call, seconds of the first call) for `batch` candidates, halved (in whole
    groups of `group`) while the first call runs out of memory."""
    while True:
        run = make_run(batch)
        try:
            return batch, run, wall_s(run, device)
        except Exception as exc:
            if not is_out_of_memory(exc) or batch <= group:
                raise
        del run
        release(device)
        batch = max(group, batch // 2 // group * group)


def measure_step(ctx: Context, parts: Accelerated, variant: Variant, kind: str, flops: dict) -> dict:
    models, device, scale = ctx.models(), ctx.device, ctx.scale
    batch, run, first = first_call_fitting(lambda b: step_call(models, parts, kind, b), scale.batch,
                                           models.config.lgd.kappa, device)
    seconds = median_s(run, device, scale.reps)
    peak = peak_gib(run, device)
    if kind not in flops and not variant.compile:  # the other variants run the same ops
        flops[kind] = {"per_candidate": count_flops(run)["total"] / batch, "counted_on": variant.name}
    rate = flops[kind]["per_candidate"] * batch / seconds / 1e12 if kind in flops else None
    ceiling = ctx.result("environment").get("matmul", {}).get("tflops")
    return {"batch": batch, "halved_from": scale.batch if batch != scale.batch else None, "first_call_s": first,
            "step_s": seconds, "images_per_s": batch / seconds, "tflops": rate,
            "matmul_fraction": rate / ceiling if rate and ceiling else None, "peak_gib": peak,
            "backends": policy.status(device), "compiled": variant.compile and ctx.compiles}


@contextlib.contextmanager
def memory_limit(device: torch.device, limit_gib: float):
    """A card of limit_gib emulated on a larger one: the caching allocator may hold at most
    that much (the CUDA context comes on top). No limit on the CPU."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib * GiB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def batch_fits(ctx: Context, parts: Accelerated, batch: int, limit_gib: float, seconds_per_candidate: float,
               budget: Budget) -> bool | None:
    """Whether one LGD step of `batch` candidates runs within limit_gib; None: no time to try."""
    if not budget.allows(2 * seconds_per_candidate * batch + ctx.scale.estimates["eager_variant"] / 5):
        return None
    run = step_call(ctx.models(), parts, "lgd", batch)
    release(ctx.device)  # cached blocks of earlier tries would count against the limit
    with memory_limit(ctx.device, limit_gib):
        try:
            wall_s(run, ctx.device)
            fits = True
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            fits = False
    del run
    release(ctx.device)
    progress(f"guided_steps: {batch} candidates {'fit' if fits else 'do not fit'} in {limit_gib} GiB")
    return fits


def next_batch(fitting: int, failing: int | None, batch: int, group: int, cap: int) -> int | None:
    """The next batch to try, None once the answer is pinned down to one group."""
    if failing is None:  # everything tried fits: double
        return min(cap, 2 * batch) if batch < cap else None
    if not fitting:  # nothing fits yet: halve
        return max(group, batch // 2 // group * group) if batch > group else None
    if failing - fitting <= group:
        return None
    return (fitting + failing) // 2 // group * group


def largest_batch(fits: Callable[[int], bool | None], start: int, group: int, cap: int, tries: int,
                  fitting: int = 0) -> dict:
    """The largest multiple of `group` up to `cap` for which fits(batch) holds (what fits one
    batch fits every smaller one): doubling from `start`, or from `fitting` (known to fit),
    halving while nothing fits, then bisecting; at most `tries` calls. fits() -> None stops."""
    failing, log, stopped = None, [], None
    batch = min(cap, 2 * fitting) if fitting else start
    while batch is not None and len(log) < tries:
        result = fits(batch)
        if result is None:
            stopped = SKIPPED
            break
        log.append([batch, result])
        fitting, failing = (batch, failing) if result else (fitting, batch)
        batch = next_batch(fitting, failing, batch, group, cap)
    return {"largest_fitting": fitting or None, "smallest_failing": failing, "tries": log,
            "pinned": batch is None and stopped is None, "stopped": stopped}


def search_limit(ctx: Context, parts: Accelerated, row: dict, limit: float, fitting: int, budget: Budget) -> dict:
    """The largest LGD candidate batch within `limit` GiB, searched from the row's batch (or
    from `fitting`, known to fit)."""
    scale, device = ctx.scale, ctx.device
    per_candidate = row["step_s"] / row["batch"]
    found = largest_batch(lambda b: batch_fits(ctx, parts, b, limit, per_candidate, budget), row["batch"],
                          ctx.models().config.lgd.kappa, scale.search_cap, scale.search_tries, fitting)
    if device.type != "cuda":
        return {**found, "measured": False, "largest_fitting": None, "smallest_failing": None,
                "note": "not measured on CPU: no memory limit; the tries only ran the code path"}
    card = torch.cuda.get_device_properties(device).total_memory / GiB
    return {**found, "measured": True, "card_gib": card, "emulated": limit < card}


def memory_search(ctx: Context, parts: Accelerated, variant: Variant, row: dict, budget: Budget) -> list[dict]:
    """search_limit for each memory limit, smallest first: what fits it fits the larger ones,
    so their search starts there."""
    results, fitting = [], 0
    for limit in ctx.scale.memory_limits_gib:
        record = run_row(f"guided_steps: memory search, {variant.name}, {limit} GiB", 0, budget,
                         lambda: search_limit(ctx, parts, row, limit, fitting, budget),
                         variant=variant.name, kind="lgd", limit_gib=limit)
        fitting = record.get("largest_fitting") or fitting
        results.append(record)
    return results


def variant_rows(ctx: Context, variant: Variant, budget: Budget, flops: dict) -> list[dict]:
    """The LGD and IGD rows of one variant; its models die on return."""
    info = {k: v for k, v in dataclasses.asdict(variant).items() if k not in ("name", "memory_search")}
    estimate = ctx.scale.estimates["compiled_variant" if variant.compile else "eager_variant"]
    if not budget.allows(estimate):
        progress(f"guided_steps: {variant.name}: {SKIPPED}")
        return [{"kind": kind, "variant": variant.name, **info, "status": SKIPPED} for kind in KINDS]
    parts = try_accelerate(ctx, variant)
    if isinstance(parts, str):
        return [{"kind": kind, "variant": variant.name, **info, "status": parts} for kind in KINDS]
    with policy.kernel_mode(variant.kernels), tf32(True):
        return [run_row(f"guided_steps: {kind} {variant.name}", estimate, budget,
                        lambda: measure_step(ctx, parts, variant, kind, flops), kind=kind, variant=variant.name, **info)
                for kind in KINDS]


def variant_searches(ctx: Context, variant: Variant, rows: list[dict], budget: Budget) -> list[dict]:
    """The memory search of a variant whose LGD row ran (on a fresh copy of its models)."""
    row = next((r for r in rows if r["variant"] == variant.name and r["kind"] == "lgd" and r["status"] == "ok"), None)
    if row is None:
        return []
    parts = try_accelerate(ctx, variant)
    if isinstance(parts, str):
        return [{"variant": variant.name, "kind": "lgd", "status": parts}]
    with policy.kernel_mode(variant.kernels), tf32(True):
        return memory_search(ctx, parts, variant, row, budget)


def guided_section(ctx: Context, budget: Budget) -> dict:
    models = ctx.models()
    rows, searches, flops = [], [], {}
    for variant in VARIANTS:
        rows += variant_rows(ctx, variant, budget, flops)
        torch._dynamo.reset()  # compiled graphs keep the variant's modules alive
        release(ctx.device)
    for variant in (v for v in VARIANTS if v.memory_search):
        searches += variant_searches(ctx, variant, rows, budget)
        release(ctx.device)
    steps = models.config.sampling.steps
    return {"rows": rows, "memory_search": searches, "flops": flops, "step_index": step_index(steps),
            "steps": steps, "tf32": True}


# ---------------------------------------------------------------------------------------------
# 4. Sampling


def sampling_window(steps: int) -> tuple[int, int]:
    """The middle half of a short schedule (2 of 4 steps), as the LGD window is of the 50."""
    return steps // 4, steps // 4 + steps // 2 - 1


def preset_batch(ctx: Context) -> int:
    """The batch the preset's variant ran at in the guided steps (halved there if 30 did not fit)."""
    for row in ctx.result("guided_steps").get("rows", []):
        if row["variant"] == PRESET_VARIANT and row["kind"] == "lgd" and row["status"] == "ok":
            return row["batch"]
    return ctx.scale.batch


def final_decode(models: Models, codec: nn.Module, latents: torch.Tensor, labels: torch.Tensor, score: bool) -> None:
    """Decoding kept latents, and (for LGD candidates) the rank-selection scores on the images."""
    with torch.no_grad():
        images = codec.decode(latents)
        if score:
            learnability(models.student, models.reference, images, labels, models.config.lgd.omega)


def short_run(ctx: Context) -> dict:
    """Sampler.sample over a short schedule with LGD guiding half of it, then each kind of step
    and the final decode apart, in the preset's variant (eager bf16)."""
    models, device, reps = ctx.models(), ctx.device, ctx.scale.reps
    dit, codec = models.dit(), models.codec()
    apply_speedups(dit, codec, precision="bf16")
    steps, batch = ctx.scale.sampling_steps, preset_batch(ctx)
    window = sampling_window(steps)
    sampler = models.sampler(dit, steps)
    guidance = models.guidance("lgd", sampler, codec, window=window)
    x, labels, noise = models.candidates(batch)

    def whole() -> None:
        with torch.no_grad():
            sampler.sample(labels, NoiseStream(noise.seeds, device), guidance, targets=labels)
        guidance.nonfinite.pop_failed()

    def step(i: int) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                sampler.step(x, i, labels, noise, guidance, labels)
        return run

    first = wall_s(whole, device)
    total = wall_s(whole, device)
    return {"steps": steps, "window": list(window), "guided_steps": window[1] - window[0] + 1, "batch": batch,
            "first_run_s": first, "run_s": total, "images_per_s": batch / total,
            "guided_step_s": median_s(step(window[0]), device, reps),
            "unguided_step_s": median_s(step(steps - 1), device, reps),
            "decode_s": median_s(lambda: final_decode(models, codec, x, labels, score=False), device, reps),
            "decode_and_score_s": median_s(lambda: final_decode(models, codec, x, labels, score=True), device, reps)}


def compiled_unguided_step(ctx: Context, mode: str | None) -> dict:
    """An unguided bf16 step with the DiT's forward_with_cfg compiled in `mode` (None: the
    default; "reduce-overhead": inductor's CUDA graphs), on a fresh DiT."""
    from torch._dynamo.utils import counters

    models, device = ctx.models(), ctx.device
    torch._dynamo.reset()
    dit = models.dit()
    compiled = torch.compile(dit.forward_with_cfg, fullgraph=True, mode=mode)
    dit.forward_with_cfg = _autocast_fp32_out(compiled, device.type, torch.bfloat16, False)  # apply_speedups' bf16 wrapper
    sampler = models.sampler(dit)
    batch = preset_batch(ctx)
    x, labels, noise = models.candidates(batch)

    def run() -> None:
        with torch.no_grad():
            sampler.step(x, step_index(models.config.sampling.steps), labels, noise)

    skips = counters["inductor"]["cudagraph_skips"]
    first = wall_s(run, device)
    wall_s(run, device)  # CUDA graph trees record at the second call; both modes get the same warm-up
    seconds = median_s(run, device, ctx.scale.reps)
    return {"mode": mode or "default", "batch": batch, "first_call_s": first, "step_s": seconds,
            "images_per_s": batch / seconds, "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
            "compiled": ctx.compiles}


def sampling_section(ctx: Context, budget: Budget) -> dict:
    estimates = ctx.scale.estimates
    with policy.kernel_mode("torch"), tf32(True):
        run = run_row("sampling: short run", estimates["sampling"], budget, lambda: short_run(ctx))
        release(ctx.device)
        graphs = {}
        for mode in (None, "reduce-overhead"):
            graphs[mode or "default"] = run_row(f"sampling: unguided step, compile mode {mode or 'default'}",
                                                estimates["cuda_graph_mode"], budget,
                                                lambda: compiled_unguided_step(ctx, mode))
        torch._dynamo.reset()
        release(ctx.device)
    default, reduced = graphs["default"], graphs["reduce-overhead"]
    speedup = default["step_s"] / reduced["step_s"] if default["status"] == reduced["status"] == "ok" else None
    return {"variant": PRESET_VARIANT, "run": run, "cuda_graphs": {**graphs, "speedup": speedup}}


# ---------------------------------------------------------------------------------------------
# 5. Training


@dataclass(frozen=True)
class TrainCase:
    network: str  # the nette network; Scale.train_networks says what the scale trains for it
    precision: str
    members: int  # 1: one model; more: one vmap group
    compile: bool = False


GROUP = 4
NETTE_NETWORKS = ("convnet6", "resnet18", "resnet_ap10")
# bf16 first (the presets' precision on a GPU: the projection's inputs), ConvNet-6 compiled
# (the presets compile training; most of a run's trainings are ConvNet-6), fp32, then the
# other compiled rows (the first to be skipped for time).
TRAIN_CASES = (
    *(TrainCase(n, "bf16", m) for n in NETTE_NETWORKS for m in (1, GROUP)),
    *(TrainCase("convnet6", "bf16", m, compile=True) for m in (1, GROUP)),
    *(TrainCase(n, "fp32", m) for n in ("convnet6", "resnet18") for m in (1, GROUP)),
    *(TrainCase(n, "bf16", m, compile=True) for n in ("resnet18", "resnet_ap10") for m in (1, GROUP)),
)


def train_row(ctx: Context, case: TrainCase) -> dict:
    """train_classifiers (fast engine, hard-label recipe) on random images: a first call of one
    epoch (compiles), then a timed one of train_epochs, fresh models each time."""
    scale, device = ctx.scale, ctx.device
    name, overrides = scale.train_networks[case.network]
    section = TrainSection(network=name, width=overrides.get("width"), recipe="hard_label",
                           batch_size=scale.train_batch, engine="fast", compile=case.compile,
                           precision=case.precision, stacking="vmap")
    gen = torch.Generator().manual_seed(0)
    shape = (scale.train_images, 3, scale.train_size, scale.train_size)
    images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    labels = (torch.arange(scale.train_images) % NUM_CLASSES).to(device)

    def train(epochs: int) -> None:
        torch.manual_seed(0)
        members = [Member(build_classifier(name, 3, NUM_CLASSES, scale.train_size, **overrides), (images, labels), seed)
                   for seed in range(case.members)]
        train_classifiers(members, dataclasses.replace(section, epochs=epochs), device=device, progress=False)

    first = wall_s(lambda: train(1), device)
    seconds = wall_s(lambda: train(scale.train_epochs), device)
    per_model = scale.train_images * scale.train_epochs / seconds
    width = f" width {overrides['width']}" if "width" in overrides else ""
    return {"trains": f"{name}{width} at {scale.train_size} px",
            "images": scale.train_images, "epochs": scale.train_epochs, "batch_size": scale.train_batch,
            "first_call_s": first, "seconds": seconds, "images_per_s_per_model": per_model,
            "images_per_s": per_model * case.members, "compiled": case.compile and ctx.compiles}


def training_section(ctx: Context, budget: Budget) -> dict:
    rows = []
    for case in TRAIN_CASES:
        estimate = ctx.scale.estimates["train_compiled" if case.compile else "train_eager"]
        label = f"training: {case.network} {case.precision} x{case.members}{' compiled' if case.compile else ''}"
        rows.append(run_row(label, estimate, budget, lambda: train_row(ctx, case), **dataclasses.asdict(case)))
        release(ctx.device)
    return {"rows": rows, "recipe": "hard_label", "engine": "fast", "stacking": "vmap"}


# ---------------------------------------------------------------------------------------------
# 6. Projection of a whole nette run


TRAIN_IMAGES, TEST_IMAGES = 9469, 3925  # ImageNette train / val
PROJECTION_IPCS = (10, 50)
ANALYZE_NETWORK, ANALYZED_SETS = "convnet6", 3  # lgd analyze runs on the lgd, dit and igd sets


def generated_images(c: Config, ipc: int) -> dict[str, dict[str, int]]:
    """Images sampled by each method, split into the distillation's stages and the baselines
    (a baseline of the seed's method shares the initial stage's images)."""
    per_stage = NUM_CLASSES * c.stages.increment
    stages = {"lgd": (ipc // c.stages.increment - 1) * per_stage * c.lgd.kappa, "igd": 0, "dit": 0}
    if c.stages.initial in ("igd", "dit"):
        stages[c.stages.initial] = per_stage
    baselines = {name: NUM_CLASSES * ipc - (per_stage if name == c.stages.initial else 0)
                 for name in c.eval.baselines if name in ("igd", "dit")}
    return {"stages": stages, "baselines": {"lgd": 0, "igd": 0, "dit": 0, **baselines}}


def sampling_counts(c: Config, ipc: int) -> dict[str, dict[str, int]]:
    """Candidate-steps of each kind for the stages and the baselines, the count of
    projection.sampling (which leaves the baselines out): every LGD candidate takes
    the LGD window's guided steps, the rest unguided, and a final decode + rank score; IGD
    images likewise in the IGD window, then a decode; DiT images are never guided."""
    n = c.sampling.steps
    g_l = c.lgd.window[1] - c.lgd.window[0] + 1
    g_i = c.igd.window[1] - c.igd.window[0] + 1
    counts = {}
    for part, images in generated_images(c, ipc).items():
        counts[part] = {"lgd_step": images["lgd"] * g_l, "igd_step": images["igd"] * g_i,
                        "unguided_step": images["lgd"] * (n - g_l) + images["igd"] * (n - g_i) + images["dit"] * n,
                        "decode_and_score": images["lgd"], "decode": images["igd"] + images["dit"]}
    return counts


def training_image_steps(c: Config, ipc: int) -> dict[str, dict[str, float]]:
    """Training images through forward + backward of every classifier training of the run, by
    phase and network: projection.whole_run's count, except that the reference model
    is counted only where the pipeline trains it, when there are LGD stages (IPC > increment)."""
    epochs = lambda n_ipc: default_epochs("hard_label", n_ipc)
    inc = c.stages.increment
    stages = ipc // inc
    distill = c.igd.surrogate.epochs * TRAIN_IMAGES
    if stages > 1:
        distill += c.lgd.reference_model.epochs * TRAIN_IMAGES
    distill += sum(inc * k * NUM_CLASSES * epochs(inc * k) for k in range(1, stages))  # stage models on D_1..D_{K-1}
    per_training = ipc * NUM_CLASSES * epochs(ipc)
    sets = 1 + len(c.eval.baselines)
    evaluate = {net: sets * c.eval.runs * per_training for net in c.eval.networks}
    per_set = stages * inc * NUM_CLASSES * epochs(inc)  # cross-increment: one model per increment
    per_set += sum(epochs(ipc) // stages * inc * k * NUM_CLASSES for k in range(1, stages + 1))  # dynamics
    per_set += epochs(ipc) * TEST_IMAGES / 3  # dynamics scores the test set every epoch (forward: 1/3)
    per_set += per_training + epochs(ipc) * ipc * NUM_CLASSES / 3  # cartography and its per-epoch tracking
    return {"distill": {c.lgd.stage_model.network: distill}, "evaluate": evaluate,
            "analyze": {ANALYZE_NETWORK: ANALYZED_SETS * per_set}}


def measured(value: float, source: str) -> dict:
    return {"value": value, "source": source}


def not_measured(what: str) -> dict:
    return {"value": None, "source": f"not measured ({what} did not run)"}


def step_inputs(ctx: Context) -> dict[str, dict]:
    """Seconds per candidate of each kind of sampling work, with where each was measured."""
    rows = {(r["kind"], r["variant"]): r for r in ctx.result("guided_steps").get("rows", []) if r["status"] == "ok"}
    inputs = {}
    for kind in KINDS:
        row = rows.get((kind, PRESET_VARIANT))
        inputs[f"{kind}_step"] = (measured(row["step_s"] / row["batch"],
                                           f"guided_steps {kind} {PRESET_VARIANT}, batch {row['batch']}")
                                  if row else not_measured(f"the {kind} {PRESET_VARIANT} step"))
    run = ctx.result("sampling").get("run", {})
    for key in ("unguided_step", "decode", "decode_and_score"):
        inputs[key] = (measured(run[f"{key}_s"] / run["batch"], f"sampling {key}, {PRESET_VARIANT}, batch {run['batch']}")
                       if run.get("status") == "ok" else not_measured("the sampling run"))
    return inputs


def training_inputs(ctx: Context) -> dict[str, dict]:
    """Images/s per model of bf16 training, one model alone and in a group, per nette network:
    the compiled row where it ran (the presets compile), else the eager one."""
    rows = [r for r in ctx.result("training").get("rows", []) if r["status"] == "ok" and r["precision"] == "bf16"]
    inputs = {}
    for network in NETTE_NETWORKS:
        for members, how in ((1, "alone"), (GROUP, "group")):
            found = [r for r in rows if r["network"] == network and r["members"] == members]
            found.sort(key=lambda r: not r["compile"])
            inputs[f"{network}_{how}"] = (
                measured(found[0]["images_per_s_per_model"],
                         f"training {network} bf16 x{members} {'compiled' if found[0]['compile'] else 'eager'}")
                if found else not_measured(f"bf16 x{members} {network} training"))
    return inputs


def work_seconds(counts: dict[str, float], rates: dict[str, float | None], per_second: bool) -> float | None:
    """Sum of count x seconds per unit (or count / units per second); None if any rate is missing."""
    total = 0.0
    for key, count in counts.items():
        if not count:
            continue
        rate = rates.get(key)
        if rate is None:
            return None
        total += count / rate if per_second else count * rate
    return total


def hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def project(c: Config, ipc: int, steps: dict, train: dict) -> dict:
    """Hours of one whole run at `ipc`: sampling from measured seconds per candidate-step;
    training alone (every training one model at a time) and grouped (distill's trainings alone,
    evaluate's and analyze's in vmap groups, as the fast engine runs them on a GPU)."""
    step_rate = {k: v["value"] for k, v in steps.items()}
    sampling = {part: hours(work_seconds(counts, step_rate, per_second=False))
                for part, counts in sampling_counts(c, ipc).items()}
    image_steps = training_image_steps(c, ipc)
    alone = {n: train[f"{n}_alone"]["value"] for n in NETTE_NETWORKS}
    group = {n: train[f"{n}_group"]["value"] for n in NETTE_NETWORKS}
    distill = work_seconds(image_steps["distill"], alone, per_second=True)
    later = ("evaluate", "analyze")
    lone = [distill] + [work_seconds(image_steps[p], alone, per_second=True) for p in later]
    grouped = [distill] + [work_seconds(image_steps[p], group, per_second=True) for p in later]
    training = {"alone": hours(None if None in lone else sum(lone)),
                "grouped": hours(None if None in grouped else sum(grouped))}
    parts = (sampling["stages"], sampling["baselines"], training["grouped"])
    return {"ipc": ipc, "sampling_h": sampling, "training_h": training,
            "total_h": None if None in parts else sum(parts),
            "counts": {"sampling": sampling_counts(c, ipc), "training_image_steps": image_steps}}


def projection_section(ctx: Context, budget: Budget) -> dict:
    c = nette_config()
    steps, train = step_inputs(ctx), training_inputs(ctx)
    return {"inputs": {**steps, **train}, "rows": [project(c, ipc, steps, train) for ipc in PROJECTION_IPCS],
            "meaningful": not ctx.dry_run}


# ---------------------------------------------------------------------------------------------
# Recording, output, main


VALIDATED = Path(policy.__file__).with_name("validated.json")  # what lgd.kernels.policy reads


def record_validated(ctx: Context, path: Path = VALIDATED) -> dict:
    """Write this GPU's verdicts into validated.json: each kernel that passed gets this
    capability's entry (replacing an older one); a kernel checked completely that failed loses
    it (a stale validation must not keep it on under auto). Other capabilities stay as they are."""
    env, verdicts = ctx.result("environment"), ctx.result("kernels").get("verdicts", {})
    if not env or not verdicts:
        progress(f"nothing recorded in {path}: the environment or kernels section did not run")
        return {"path": str(path), "capability": env.get("capability"), "passed": []}
    data = json.loads(path.read_text())
    entry = {"gpu": env["gpu"], "capability": env["capability"], "torch": env["torch"], "triton": env["triton"],
             "date": datetime.date.today().isoformat()}
    for name, verdict in verdicts.items():
        if not verdict["complete"]:
            continue
        kept = [e for e in data["kernels"].get(name, []) if str(e.get("capability")) != entry["capability"]]
        if verdict["passed"]:
            kept.append({**entry, "speedup_min": round(verdict["speedup_min"], 3)})
        if kept:
            data["kernels"][name] = kept
        else:
            data["kernels"].pop(name, None)
    path.write_text(json.dumps(data, indent=2) + "\n")
    passed = sorted(n for n, v in verdicts.items() if v["passed"])
    progress(f"recorded in {path}: {', '.join(passed) or 'no kernel passed'}")
    return {"path": str(path), "capability": entry["capability"], "passed": passed}


SECTIONS = (  # name, function, share of the time left, the estimate its first row needs
    ("environment", environment_section, 0.02, "environment"),
    ("kernels", kernels_section, 0.25, "kernel_row"),
    ("guided_steps", guided_section, 0.42, "eager_variant"),
    ("sampling", sampling_section, 0.12, "sampling"),
    ("training", training_section, 0.18, "train_eager"),
    ("projection", projection_section, 0.01, None),
)


def run_section(ctx: Context, name: str, fn: Callable, budget: Budget, estimate_key: str | None) -> dict:
    progress(f"{name}: {budget.left():.0f} s of the budget")
    start = time.monotonic()
    if estimate_key is not None and not budget.allows(ctx.scale.estimates[estimate_key]):
        record = {"status": SKIPPED, "result": None}
    else:
        try:
            record = {"status": "ok", "result": fn(ctx, budget)}
        except Exception as exc:  # recorded; the next section still runs
            record = {"status": failure(exc), "result": None}
    return {**record, "seconds": time.monotonic() - start}


def cell(row: dict, key: str, digits: int = 3) -> str:
    value = row.get(key)
    return fmt(value, digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def status_or(row: dict, text: str) -> str:
    """The row's text when it ran, else its status (skipped, or the error)."""
    return text if row["status"] == "ok" else f"**{row['status']}**"


def render_environment(env: dict) -> list[str]:
    where = (f"{env['gpu']} (compute capability {env['capability']}, {env['memory_gib']:.0f} GiB)"
             if env["gpu"] else f"CPU: {env['cpu']}, {env['cores']} cores")
    m = env["matmul"]
    return [f"- Device: {where}",
            f"- Versions: Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
            f"diffusers {env['diffusers']}, lgd {env['lgd']}",
            f"- Triton interpreter: {env['triton_interpreter']}; torch.compile: {env['torch_compile']}",
            "- Kernels under sampling.kernels=auto before this run: "
            + ", ".join(f"{k} {v}" for k, v in env["kernels_under_auto"].items()),
            f"- Dense {m['dtype']} matmul {m['n']}^3: {m['ms']:.3g} ms, **{m['tflops']:.1f} TFLOP/s** (the ceiling below)"]


def render_kernels(result: dict) -> list[str]:
    rows = []
    for r in result["rows"]:
        failed = [k for k, ok in r.get("correct", {}).items() if not ok]
        worst = max((r["err"][k] / r["bound"][k] for k in r.get("err", {}) if r["bound"][k]), default=None)
        rows.append([r["kernel"], "x".join(map(str, r["shape"])), r["dtype"],
                     status_or(r, "yes" if r.get("all_correct") else f"**no: {', '.join(failed)}**"),
                     fmt(worst, 2) if worst is not None else "-", cell(r, "triton_ms"), cell(r, "baseline_ms"),
                     cell(r, "speedup")])
    lines = table(["kernel", "shape", "dtype", "correct", "worst err / bound", "Triton ms", "baseline ms",
                   "speedup"], rows)
    baselines = {r["baseline"] for r in result["rows"] if r["status"] == "ok"}
    lines += [f"Forward + backward per call. Baseline: {', '.join(sorted(baselines)) or '-'}. Correct: every output "
              "and gradient within the flash-attention bound (err / bound <= 1).", ""]
    for name, v in result["verdicts"].items():
        if not v["complete"]:
            verdict = "not judged: rows missing or failed"
        elif v["fast_enough"] is None:
            verdict = f"correct: {'yes' if v['correct'] else 'no'}; speed not judged (dry run)"
        else:
            verdict = (f"correct: {'yes' if v['correct'] else 'no'}, slowest row {v['speedup_min']:.2f}x inductor "
                       f"(needs {result['min_speedup']}x) -> **{'passed' if v['passed'] else 'not passed'}**")
        lines.append(f"- {name}: {verdict}")
    return lines


def render_guided(result: dict) -> list[str]:
    rows = [[r["kind"].upper(), r["variant"], status_or(r, str(r.get("batch"))), cell(r, "first_call_s"),
             cell(r, "step_s"), cell(r, "images_per_s"), cell(r, "tflops"),
             f"{100 * r['matmul_fraction']:.0f} %" if r.get("matmul_fraction") else "-", cell(r, "peak_gib")]
            for r in result["rows"]]
    counted = ", ".join(f"{k.upper()} {fmt(v['per_candidate'] / 1e9)} GFLOP per candidate (on {v['counted_on']})"
                        for k, v in result["flops"].items()) or "not counted"
    lines = [f"One reverse step at index {result['step_index']} of {result['steps']} (inside both windows); fp32 with "
             "TF32 matmuls (the pipeline default). FLOPs (FlopCounterMode, once): " + counted + ".", ""]
    lines += table(["guidance", "variant", "batch", "first call s", "s/step", "images/s", "TFLOP/s", "of matmul",
                    "peak GiB"], rows)
    if result["memory_search"]:
        search = [search_cells(s) for s in result["memory_search"]]
        lines += ["Largest LGD candidate batch per memory limit (tries: batch + fits, - does not):", ""]
        lines += table(["variant", "limit GiB", "largest fitting", "smallest failing", "tries", "pinned to kappa"],
                       search)
    return lines


def search_cells(s: dict) -> list:
    if s["status"] != "ok":
        return [s["variant"], s.get("limit_gib", "-"), f"**{s['status']}**", "-", "-", "-"]
    if not s["measured"]:
        return [s["variant"], s["limit_gib"], "not measured on CPU", "-", "-", "-"]
    tries = " ".join(f"{b}{'+' if fits else '-'}" for b, fits in s["tries"])
    if s["stopped"]:
        tries += f" ({s['stopped']})"
    return [s["variant"], s["limit_gib"], fmt(s["largest_fitting"]), fmt(s["smallest_failing"]), tries,
            "yes" if s["pinned"] else "no"]


def render_sampling(result: dict) -> list[str]:
    run = result["run"]
    lines = [f"Variant: {result['variant']}."]
    if run["status"] == "ok":
        lines += [f"- Sampler.sample, {run['steps']} steps, LGD window {run['window'][0]}..{run['window'][1]} "
                  f"({run['guided_steps']} guided), batch {run['batch']}: {run['run_s']:.3g} s "
                  f"(first run {run['first_run_s']:.3g} s), **{run['images_per_s']:.3g} images/s**",
                  f"- Per step: guided {run['guided_step_s']:.3g} s, unguided {run['unguided_step_s']:.3g} s; "
                  f"final decode {run['decode_s']:.3g} s, decode + rank scores {run['decode_and_score_s']:.3g} s"]
    else:
        lines.append(f"- Short run: **{run['status']}**")
    graphs = result["cuda_graphs"]
    for mode in ("default", "reduce-overhead"):
        g = graphs[mode]
        lines.append(f"- Unguided step, forward_with_cfg compiled in mode {mode}: " + status_or(
            g, f"{g.get('step_s', 0):.3g} s (first call {g.get('first_call_s', 0):.3g} s, "
               f"CUDA graph skips {g.get('cudagraph_skips')}, compiled: {g.get('compiled')})"))
    if graphs["speedup"]:
        lines.append(f"- CUDA graphs: **{graphs['speedup']:.2f}x** the default compile")
    return lines


def render_training(result: dict) -> list[str]:
    rows = [[r["network"], r["precision"], r["members"], "yes" if r["compile"] else "no",
             status_or(r, r.get("trains", "")), cell(r, "first_call_s"), cell(r, "images_per_s_per_model"),
             cell(r, "images_per_s")] for r in result["rows"]]
    return ([f"`train_classifiers`, {result['engine']} engine, {result['recipe']} recipe, {result['stacking']} "
             "stacking, random images; a first call of one epoch, then a timed call.", ""]
            + table(["network", "precision", "models", "compile", "trains", "first call s", "images/s per model",
                     "images/s"], rows))


def render_projection(result: dict) -> list[str]:
    lines = [] if result["meaningful"] else ["**Dry run: CPU and tiny shapes; these hours mean nothing.**", ""]
    rows = [[r["ipc"], fmt(r["sampling_h"]["stages"]), fmt(r["sampling_h"]["baselines"]),
             fmt(r["training_h"]["alone"]), fmt(r["training_h"]["grouped"]), fmt(r["total_h"])] for r in result["rows"]]
    lines += table(["IPC", "sampling h (stages)", "sampling h (DiT, IGD baselines)", "training h (one at a time)",
                    "training h (groups)", "total h (groups)"], rows)
    lines += ["Counts as in benchmarks/projection.py (sampling, whole_run); rates measured above:", ""]
    for key, value in result["inputs"].items():
        unit = "s per candidate" if key.endswith(("step", "decode", "score")) else "images/s per model"
        lines.append(f"- {key}: {fmt(value['value'])} {unit} ({value['source']})")
    return lines


RENDERERS = (
    ("environment", "Environment", render_environment),
    ("kernels", "Kernels", render_kernels),
    ("guided_steps", "Guided steps", render_guided),
    ("sampling", "Sampling", render_sampling),
    ("training", "Training", render_training),
    ("projection", "Projection", render_projection),
)


def render(report: dict) -> str:
    lines = ["# GPU check", "",
             f"`benchmarks/gpu_check.py`{' --dry-run' if report['dry_run'] else ''}, started {report['started']}, "
             f"{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget.", ""]
    if report["dry_run"]:
        lines += ["**Dry run**: CPU, tiny shapes, Triton interpreter, torch.compile run eagerly. It shows that the "
                  "code paths run; none of its numbers is a measurement of anything.", ""]
    for name, title, render_result in RENDERERS:
        record = report["sections"].get(name)
        lines += [f"## {title}", ""]
        if record is None:
            lines += ["not run", ""]
        elif record["status"] != "ok":
            lines += [f"**{record['status']}**", ""]
        else:
            lines += render_result(record["result"]) + [""]
    if report.get("recorded"):
        rec = report["recorded"]
        lines += ["## Recorded", "", f"{rec['path']}, capability {rec['capability']}: "
                  f"{', '.join(rec['passed']) or 'no kernel passed'}.", ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"  # tables end in a blank line already


def write_outputs(out: Path, report: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path.write_text(render(report))
    return json_path, md_path


def main(args: argparse.Namespace) -> int:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.compiler.set_stance("force_eager")  # compiling here takes minutes per graph
        # Tiny shapes gain nothing from threads, and on a loaded machine every parallel op waits
        # at its OpenMP barrier (measured: 94 s with 2 threads, 31 s with 1, under load 3 on 2 cores).
        torch.set_num_threads(1)
    ctx = Context(device, TINY if args.dry_run else REAL, args.dry_run)
    budget = Budget(args.budget_s - (time.monotonic() - LAUNCHED))
    report = {"script": "benchmarks/gpu_check.py", "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "budget_s": args.budget_s, "wall_s": 0.0, "sections": ctx.results,
              "recorded": None}
    for i, (name, fn, weight, estimate_key) in enumerate(SECTIONS):
        share = weight / sum(w for _, _, w, _ in SECTIONS[i:])
        ctx.results[name] = run_section(ctx, name, fn, budget.share(share), estimate_key)
        report["wall_s"] = time.monotonic() - LAUNCHED
        write_outputs(args.out, report)
    if args.record:
        report["recorded"] = record_validated(ctx)
    json_path, md_path = write_outputs(args.out, report)
    progress(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
