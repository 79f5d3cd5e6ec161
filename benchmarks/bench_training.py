"""Classifier-training throughput: the reference loop against the fast engine (eager,
compiled) and groups of models (member loop, vmap), at the demo and nette configurations.

    pytest benchmarks/bench_training.py --benchmark-only -q

A call is `lgd.training.train_classifiers` for a few epochs from fresh models; images/s counts
every member's training images per epoch. extra_info records the FLOPs of one training image
(forward + backward of the network, FlopCounterMode on the meta device: convolutions and
matmuls, elementwise ops count zero), so images/s converts to achieved FLOP/s against the
fp32 matmul ceiling of bench_matmul.py.

demo: ConvNet-3 width 32 at 32 px, 1 channel, 10 classes, IPC 10 of the embedded Fashion-MNIST
  images (100 = one DC batch),
  the DC recipe (DSA augmentation), 10 epochs per call; groups of 5 members.
nette: ConvNet-6 width 128 at 224 px, 3 channels, batch 64 (one batch per call), the
  hard-label recipe. A step is ~1 TFLOP, seconds on a CPU: one epoch of 64 images per call.
compiled providers compile in a separate first call (extra_info first_call_s). "compiled, plain
norm" runs the step with the kernel policy at torch: inductor's own kernels for instance norm,
ReLU and pooling instead of the C++ op NormReLUPool runs (lgd.kernels.norm_relu_pool).
"""
import dataclasses
import time

import pytest
import torch

from _measure import count_flops, environment

from lgd.classifiers import build_classifier
from lgd.config import TrainSection
from lgd.kernels import policy
from lgd.training import Member, train_classifiers

CONFIGS = {
    "demo": dict(network="convnet3", width=32, size=32, channels=1, images=100, recipe="dc", epochs=10, rounds=3),
    "nette": dict(network="convnet6", width=128, size=224, channels=3, images=64, recipe="hard_label", epochs=1,
                  rounds=2),
}
PROVIDERS = {  # name -> (section fields, members)
    "reference": (dict(engine="reference"), 1),
    "fast": (dict(), 1),
    "compiled": (dict(compile=True), 1),
    "compiled, plain norm": (dict(compile=True), 1),  # LGD_KERNELS=torch: inductor's norm/ReLU/pool
    "group-loop x5": (dict(compile=True, stacking="loop"), 5),
    "group-vmap x5": (dict(compile=True, stacking="vmap"), 5),
}
SKIP = {("nette", "group-loop x5"), ("nette", "group-vmap x5"), ("nette", "fast"), ("nette", "compiled, plain norm")}  # minutes per call on a CPU


def training_flops(c: dict) -> int:
    """FLOPs of forward + backward for one training image (shapes only, meta device)."""
    overrides = {} if c["width"] is None else {"width": c["width"]}
    model = build_classifier(c["network"], c["channels"], 10, c["size"], **overrides).to("meta")
    x = torch.zeros(1, c["channels"], c["size"], c["size"], device="meta")

    def step():
        model(x).sum().backward()
    return count_flops(step)["total"]


def data(c: dict, seed: int):
    """demo: a random IPC-10 subset of the embedded Fashion-MNIST images (real images: the
    reference loop measured up to 1.5x faster on them than on uniform noise); nette: noise at
    224 px (no real colour data ships with the package)."""
    g = torch.Generator().manual_seed(seed)
    if c["channels"] == 1:
        from lgd.data import load_dataset, per_class_subset

        real = load_dataset("fashion_mnist_embedded", "train", None, c["size"])
        chosen = per_class_subset(real, c["images"] // 10, g)
        return real.images[chosen], real.labels[chosen]
    x = torch.randint(0, 256, (c["images"], c["channels"], c["size"], c["size"]), generator=g, dtype=torch.uint8)
    return x, torch.arange(c["images"]) % 10


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training(benchmark, config, provider):
    if (config, provider) in SKIP:
        pytest.skip("minutes per call on this CPU")
    c = CONFIGS[config]
    fields, count = PROVIDERS[provider]
    section = TrainSection(network=c["network"], width=c["width"], recipe=c["recipe"], epochs=c["epochs"],
                           batch_size=64, **fields)
    datas = [data(c, s) for s in range(count)]

    mode = "torch" if provider == "compiled, plain norm" else policy.current_mode()

    def run(epochs: int = c["epochs"]):
        members = []
        for s, d in enumerate(datas):
            torch.manual_seed(s)
            members.append(Member(build_classifier(c["network"], c["channels"], 10, c["size"], width=c["width"]), d, s))
        with policy.kernel_mode(mode):
            train_classifiers(members, dataclasses.replace(section, epochs=epochs), progress=False)

    benchmark.group = f"training | {config}"
    benchmark.extra_info.update(kernel="training", provider=provider, config=config, members=count, kernels=mode,
                                images_per_call=count * c["images"] * c["epochs"],
                                flops_per_image=training_flops(c), **{k: v for k, v in c.items() if k != "rounds"},
                                **environment())
    if section.compile:
        start = time.perf_counter()
        run(1)
        benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    benchmark.pedantic(run, rounds=c["rounds"], iterations=1, warmup_rounds=0)


NETTE_NETWORKS = ("convnet6", "resnet_ap10", "resnet18")


def test_training_flops_at_nette_scale(benchmark):
    """Per-image training FLOPs of the nette preset's classifiers at 224 px (meta device): the
    input of BENCHMARKS.md's whole-run projection. The timed call is the counting itself."""
    counts = {}

    def count():
        for name in NETTE_NETWORKS:
            counts[name] = training_flops(dict(network=name, channels=3, size=224, width=None))
    benchmark.group = "training | FLOP count"
    benchmark.extra_info.update(kernel="training_flop_count", provider="meta", **environment())
    benchmark.pedantic(count, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["flops_per_image"] = counts
