"""Run configuration: typed sections, YAML presets, dotted command-line overrides, validation.

A config is validated as a whole before any work starts; every default of docs/method.md that
the papers leave open is a field here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from lgd.errors import ConfigError


@dataclass
class ModelSection:
    dit: str = "demo"  # "demo" (embedded), or a path: official .pt, diffusers folder, lgd .safetensors
    vae: str = "demo"  # "demo", "identity", or an AutoencoderKL / pipeline folder
    dit_num_heads: int | None = None  # only if the checkpoint does not tell
    attention: str = "sdpa"  # DiT attention: sdpa | xformers (needs the xformers extra, CUDA, no compile) | math


@dataclass
class DataSection:
    name: str = "fashion_mnist_embedded"  # or fashion_mnist, imagenette, imagewoof, imagefolder
    root: str | None = None
    image_size: int = 32  # size the generator makes (and real images are resized to)
    classifier_size: int | None = None  # input size of the classifiers (None: image_size; 224 for Nette/Woof)
    # test: train on the training split, evaluate on the test split. validation: hold out
    # validation_per_class random training images per class, train on the rest and evaluate on
    # those: for choosing settings without ever looking at the test split.
    evaluate_on: str = "test"
    validation_per_class: int = 100

    @property
    def classifier_input(self) -> int:
        """The classifiers' input size (each classifier resizes what it is given to this)."""
        return self.classifier_size or self.image_size


@dataclass
class SamplingSection:
    steps: int = 50
    cfg_scale: float = 4.0
    # CFG of the unguided samples (the DiT baseline set, and a stages.initial=dit increment);
    # null: cfg_scale. Guidance shifts which scale serves a set best, so each may be chosen on validation.
    unguided_cfg_scale: float | None = None
    cfg_channels: int | None = None  # None: all latent channels; 3: the official DiT quirk
    method: str = "ddpm"
    eta: float = 0.0
    batch_size: int = 32  # candidates denoised together
    # Slots of every class generated per round. Deviation guidance sees the class memory as it
    # was before the round, so 1 reproduces the papers' memory (each image sees every earlier
    # image of its class); larger rounds hold more candidates (to fill many GPUs) but images
    # of the same round do not see each other. A round is cut into batches of batch_size.
    round_slots: int = 1
    engine: str = "fast"  # fast (batched) or reference (one image at a time, plain eager fp32)
    compile: bool = False  # torch.compile the DiT, the VAE decoder and IGD's influence gradient (fast engine only)
    precision: str = "auto"  # autocast of DiT/VAE: auto (bf16 on GPUs with bf16, else fp32) | fp32 | bf16 | fp16
    fp32_guidance: bool = False  # guided steps (gradients through DiT and VAE) in fp32, the rest in `precision`
    # Activation checkpointing of the VAE decoder's blocks in guided steps: about a third less
    # memory per candidate at 256 px for one more decoder forward (fast engine only).
    checkpoint_decoder: bool = False
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions of sampling in TF32; false for strict fp32
    # Fused kernels (lgd.kernels.policy; $LGD_KERNELS overrides): auto (only those validated for
    # the device: the C++ learnability op on CPU, Triton kernels a recorded GPU check passed) |
    # fused (all the device has) | torch (plain ops). The reference engine always uses torch.
    kernels: str = "auto"


@dataclass
class TrainSection:
    """One classifier-training recipe (docs/method.md §7).

    distributed: on a run of several processes, all of them train this classifier together
    (DDP over Accelerate's process group, lgd.training.trainer): each draws the same data
    order and augmentation parameters and computes its share of every global batch of
    batch_size images, so the recipe is that of one process -- but the weights are not
    bit-identical to a 1-process run (the gradient all-reduce adds floats in another order).
    Off by default: the stage models, theta* and IGD's surrogate are then trained by the main
    process alone, so the distilled set does not depend on the process count. For eval.recipe,
    off spreads the evaluation's independent trainings over the processes; on trains each of
    them on all processes together.

    soft_label (RDED / SRe2L evaluation, lgd.training.trainer): a teacher network labels every
    augmented batch and the student fits it by KL divergence at `temperature`, with AdamW
    (`lr`, `weight_decay`, none on biases and norm weights; `momentum` unused) under a quarter
    cosine LR schedule ending at 0.5x, 300 epochs by default. RDED's values are lr 0.001 and
    weight_decay 0.01 (set them: the defaults below are the SGD recipes'), temperature 20.
    It always trains with the reference loop: compile and precision=bf16 are refused.
    """

    network: str = "convnet6"
    width: int | None = None  # channel width override (None: the network's own, 128 for ConvNet)
    # hard_label (IDC/Minimax), dc (DC/DSA ConvNet protocol), plain (IGD's surrogate), augmented
    # (the official IGD surrogate's: hard-label augmentation, no CutMix, constant LR) or
    # soft_label (RDED/SRe2L: teacher soft labels, AdamW, see above)
    recipe: str = "hard_label"
    epochs: int | None = None  # None: the recipe's default (IPC-dependent for hard_label, 300 for dc and soft_label)
    lr: float = 0.01  # SGD's; soft_label (AdamW): RDED uses 0.001
    momentum: float = 0.9  # SGD recipes only
    weight_decay: float = 5e-4  # soft_label (AdamW, decoupled): RDED uses 0.01
    batch_size: int = 64  # the global batch, however many processes share it
    temperature: float = 20.0  # soft_label: softmax temperature of student and teacher (RDED's value with CutMix)
    distributed: bool = False  # DDP over all processes (see above)
    # How to compute it (lgd.training): the same models either way, up to float rounding.
    engine: str = "fast"  # fast (functional step, micro-batched, groups) or reference (plain eager loop)
    compile: bool = False  # torch.compile the fast engine's step (the presets turn it on)
    precision: str = "auto"  # fast engine: auto (bf16 autocast on GPUs with bf16, TF32 for fp32 on CUDA) | fp32 | bf16
    micro_batch: int | None = None  # fast engine: images per gradient pass (None: fit the CPU cache; GPU: whole batch)
    stacking: str = "auto"  # fast engine, several models: vmap (one stacked step) | loop (in turn) | auto (vmap on GPU)
    group_size: int | None = None  # most trainings run as one group (None: all on CPU; GPU: from free memory)

    def model_overrides(self) -> dict:
        """Classifier constructor arguments this section asks for (its channel width, if set)."""
        return {} if self.width is None else {"width": self.width}


@dataclass
class LGDSection:
    omega: float = 0.5
    lam: float = 15.0
    # Extra factor on rho_t. The paper's rho_t with lam = 15 moves x_{t-1} by 15x the norm of
    # eps_hat, which destroys samples; IGD's constant 0.0015 keeps the step in range.
    rho_scale: float = 0.0015
    window: tuple[int, int] = (10, 45)  # respaced step indices, inclusive; N-1 is noisiest
    gamma: float = 50.0  # deviation guidance
    memory: int = 64  # most recent kept latents per class
    kappa: int = 3  # candidates per slot
    stage_model: TrainSection = field(default_factory=TrainSection)
    reference_model: TrainSection = field(default_factory=lambda: TrainSection(epochs=50))


@dataclass
class IGDSection:
    k: float = 5.0
    window: tuple[int, int] = (30, 45)
    gamma: float = 120.0
    rho_scale: float = 0.0015
    checkpoints: int = 4
    cos_threshold: float = 0.7
    target_images: int = 200  # real images per class for the target gradients
    # "conditional": the influence loss sees each sample's decoded Tweedie estimate; "both": also
    # its null-class CFG row's, as the official IGD sampler does (docs/reproduce.md)
    decode_rows: str = "conditional"
    # "lgd": the surrogate trained as igd.surrogate says, at the classifiers' size, and guided on
    # the inputs it was trained on; "official": as the official IGD code trains it (the
    # `augmented` recipe -- hard-label augmentation, no CutMix, constant LR -- at data.image_size,
    # on ImageNet-normalised inputs) and guides it (on [-1, 1] inputs, i.e. normalised by 0.5/0.5)
    surrogate_protocol: str = "lgd"
    surrogate: TrainSection = field(default_factory=lambda: TrainSection(network="convnet6", recipe="plain", epochs=50))


@dataclass
class StagesSection:
    ipc: int = 50
    increment: int = 10
    initial: str = "igd"  # the method of the initial increment D_1: igd | dit | random


@dataclass
class EvalSection:
    networks: list[str] = field(default_factory=lambda: ["convnet6", "resnet_ap10", "resnet18"])
    runs: int = 3
    baselines: list[str] = field(default_factory=lambda: ["random", "dit", "igd"])
    recipe: TrainSection = field(default_factory=TrainSection)
    # Test evaluations spread over each training (every epochs // N epochs, Minimax's period:
    # 100), whose best is reported beside the last epoch's as "best-epoch (test-selected, as in
    # IGD/Minimax)"; 0: the last epoch only.
    periodic_tests: int = 100
    # CPU: `lgd evaluate` shares the trainings among this many processes it starts, each with
    # threads / N intra-op threads (the table is that of one process at threads / N). Small
    # networks train faster one thread each, side by side: the demo's evaluation took 310-355 s on
    # 2 processes against 447 s on one of 2 threads. GPUs: one process per GPU via accelerate launch.
    processes: int = 1
    # The real test images: "resize" to the classifier size (Minimax/IDC: Resize(224) +
    # CenterCrop(224)) or "crop" the classifier size out of data.image_size (resize 256, crop 224).
    test_view: str = "resize"
    # The soft_label recipe's teacher: "reference" (the run's theta*, RUN/models/reference.safetensors)
    # or a checkpoint: an lgd classifier (.safetensors) or a torchvision-format ResNet-18 state dict
    # (.pt / .pth, e.g. torchvision's ImageNet weights, RDED/SRe2L's teacher; a 1000-class teacher
    # on an ImageNet subset is read at the subset's classes)
    teacher: str = "reference"


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Minutes a process of a multi-process run waits for the others at a barrier: it must cover
    # what the main process does alone (training theta*, IGD's surrogate: hours at ImageNet scale).
    distributed_timeout: float = 180.0
    tracker: str = "none"  # none | tensorboard | wandb: stage rates and training losses through Accelerate's trackers
    # Intra-op CPU threads of distill, evaluate and analyze (None: torch's default, one per core;
    # eval.processes splits them).
    # The thread count changes the order of float reductions, so a fixed count makes machines
    # with other core counts compute the same bits.
    threads: int | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    stages: StagesSection = field(default_factory=StagesSection)
    lgd: LGDSection = field(default_factory=LGDSection)
    igd: IGDSection = field(default_factory=IGDSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """A (possibly partial) config dict; missing fields take their defaults, unknown keys
        are refused. Not validated: call `validate` for that."""
        return _build(cls, _renamed(data), "")


PRESETS = ("demo", "nette", "woof", "imagenet1k")
# Keys renamed since a run directory may have been written: old name -> new name.
RENAMED = {"stages.seed": "stages.initial"}  # "seed" also named the integer seed


def _renamed(data: dict) -> dict:
    """`data` with renamed keys under their new names (config files and old run directories)."""
    for old, new in RENAMED.items():
        section, key = old.split(".")
        values = data.get(section)
        if isinstance(values, dict) and key in values:
            values = dict(values)
            value = values.pop(key)
            values[new.split(".")[1]] = value
            data = {**data, section: values}
    return data


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls, data: dict, where: str):
    """Instantiate dataclass `cls` from a (possibly partial) dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = Problems()
    for key in sorted(set(data) - set(names), key=str):
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        problems.add(f"unknown config key {where}{key}" + (f" (did you mean {where}{close[0]}?)" if close else ""))
    kwargs = {}
    for name, value in data.items():
        if name in names:
            with problems.collect():
                kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    problems.raise_if_any()
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and isinstance(value, bool) or hint in (int, str) and type(value) is hint:
        return value
    raise ConfigError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    text = resources.files("lgd").joinpath("configs", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A preset name or a YAML path, then `section.key=value` overrides (values parsed as YAML)."""
    data: dict = {}
    if source is not None:
        path = Path(source)
        if str(source) in PRESETS:
            data = read_preset(str(source))
        elif path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except UnicodeDecodeError:
                raise ConfigError(f"{path} is not a text file: a config is YAML (see lgd/configs/demo.yaml)") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path} must hold a mapping of sections (sampling:, lgd:, ...), "
                                  f"not a {type(data).__name__}")
            if "preset" in data:
                data = _merge(read_preset(data.pop("preset")), data)
        else:
            raise ConfigError(f"config {source!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    config = _build(Config, _renamed(data), "")
    validate(config)
    return config


class Problems:
    """Collects config errors so that a command reports all of them in one message."""

    def __init__(self):
        self.messages: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.add(message)

    def add(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)

    @contextlib.contextmanager
    def collect(self, kinds: type[Exception] | tuple = ConfigError):
        """An error of `kinds` raised inside is one more problem; the block stops at its first one."""
        try:
            yield
        except kinds as exc:
            self.add(str(exc))

    def raise_if_any(self) -> None:
        if self.messages:
            raise ConfigError("; ".join(self.messages))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_network(name: str, where: str) -> None:
    from lgd.classifiers import canonical_name

    try:
        canonical_name(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_recipe(section: TrainSection, where: str) -> None:
    _check_network(section.network, f"{where}.network")
    _check(section.width is None or section.width >= 1, f"{where}.width must be at least 1")
    from lgd.training.recipes import RECIPES

    _check(section.recipe in RECIPES, f"{where}.recipe must be one of {', '.join(RECIPES)}, got {section.recipe!r}")
    _check(section.temperature > 0, f"{where}.temperature must be positive, got {section.temperature}")
    _check(section.epochs is None or section.epochs >= 1, f"{where}.epochs must be at least 1")
    _check(section.lr > 0, f"{where}.lr must be positive")
    _check(0 <= section.momentum < 1, f"{where}.momentum must be in [0, 1)")
    _check(section.weight_decay >= 0, f"{where}.weight_decay must be non-negative")
    _check(section.batch_size >= 1, f"{where}.batch_size must be at least 1")
    _check(section.engine in ("fast", "reference"), f"{where}.engine must be fast or reference, got {section.engine!r}")
    _check(section.precision in ("auto", "fp32", "bf16"),
           f"{where}.precision must be auto, fp32 or bf16, got {section.precision!r}")
    _check(section.stacking in ("auto", "vmap", "loop"),
           f"{where}.stacking must be auto, vmap or loop, got {section.stacking!r}")
    _check(section.micro_batch is None or section.micro_batch >= 1, f"{where}.micro_batch must be at least 1")
    _check(section.group_size is None or section.group_size >= 1, f"{where}.group_size must be at least 1")
    _check(section.recipe != "soft_label" or (not section.compile and section.precision in ("auto", "fp32")),
           f"{where}.recipe=soft_label always trains with the reference loop (eager fp32 AdamW): set "
           f"{where}.compile=false and precision auto or fp32")
    from lgd.classifiers import RUNNING_STATISTICS, canonical_name

    _check(canonical_name(section.network) not in RUNNING_STATISTICS or section.engine == "reference"
           or section.recipe == "soft_label",
           f"{where}.network={section.network} has batch-norm running statistics, which the fast engine's functional "
           f"step cannot update: set {where}.engine=reference")
    _check(section.engine == "fast" or (not section.compile and section.precision in ("auto", "fp32")),
           f"{where}.engine=reference is the plain eager fp32 loop: it cannot be combined with compile=true "
           f"or precision={section.precision}")


def _check_window(window: tuple[int, int], steps: int, where: str) -> None:
    lo, hi = window
    _check(0 <= lo <= hi < steps, f"{where}.window {list(window)} must satisfy 0 <= start <= end < sampling.steps ({steps})")


def _check_attention(config: Config) -> None:
    from lgd.models.dit import ATTENTION_BACKENDS

    backend = config.model.attention
    _check(backend in ATTENTION_BACKENDS,
           f"model.attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend != "xformers":
        return
    _check(not config.sampling.compile,
           "model.attention=xformers cannot be combined with sampling.compile=true (torch.compile cannot trace "
           "xformers); use model.attention=sdpa when compiling")
    try:
        import xformers.ops  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"model.attention=xformers needs the xformers package ({exc}); "
                          "install it with `pip install xformers` or use model.attention=sdpa") from None


def validate(config: Config) -> None:
    """Reject every bad value or combination before any work starts. Pure: files and folders
    are checked by the code that opens them (lgd distill opens them before it writes anything).
    Every problem found is reported, in one message."""
    problems = Problems()
    check = problems.check
    s = config.sampling
    from lgd.diffusion.sampler import SamplerSettings

    with problems.collect():
        SamplerSettings(s.steps, s.cfg_scale, s.cfg_channels, s.method, s.eta).validate()
    check(s.unguided_cfg_scale is None or 1.0 <= s.unguided_cfg_scale <= 50.0,
          f"sampling.unguided_cfg_scale must be in [1, 50] or null, got {s.unguided_cfg_scale}")
    check(s.batch_size >= 1, "sampling.batch_size must be at least 1")
    check(s.round_slots >= 1, f"sampling.round_slots must be at least 1, got {s.round_slots}")
    check(s.engine in ("fast", "reference"), f"sampling.engine must be fast or reference, got {s.engine!r}")
    from lgd.acceleration import PRECISIONS

    check(s.precision in PRECISIONS,
          f"sampling.precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    check(s.engine == "fast" or (not s.compile and s.precision in ("auto", "fp32") and not s.checkpoint_decoder),
          "sampling.engine=reference is plain eager fp32: it cannot be combined with sampling.compile=true, "
          f"sampling.checkpoint_decoder=true or sampling.precision={s.precision}")
    from lgd.kernels.policy import resolve_mode

    with problems.collect():
        resolve_mode(s.kernels)
    with problems.collect():
        _check_attention(config)
    with problems.collect():
        from lgd.tracking import check_tracker

        check_tracker(config.tracker)
    check(config.distributed_timeout > 0, f"distributed_timeout must be positive (minutes), got {config.distributed_timeout}")
    st = config.stages
    check(st.increment >= 1, f"stages.increment must be at least 1, got {st.increment}")
    check(st.increment < 1 or (st.ipc >= st.increment and st.ipc % st.increment == 0),
          f"stages.ipc ({st.ipc}) must be a positive multiple of stages.increment ({st.increment})")
    check(st.initial in ("igd", "dit", "random"), f"stages.initial must be igd, dit or random, got {st.initial!r}")
    g = config.lgd
    check(g.omega >= 0, f"lgd.omega must be non-negative, got {g.omega}")
    check(g.lam >= 0, f"lgd.lam must be non-negative, got {g.lam}")
    check(g.rho_scale > 0, f"lgd.rho_scale must be positive, got {g.rho_scale}")
    check(g.gamma >= 0, f"lgd.gamma must be non-negative, got {g.gamma}")
    check(g.kappa >= 1, f"lgd.kappa must be at least 1, got {g.kappa}")
    check(g.memory >= 1, f"lgd.memory must be at least 1, got {g.memory}")
    with problems.collect():
        _check_window(g.window, s.steps, "lgd")
    with problems.collect():
        _check_recipe(g.stage_model, "lgd.stage_model")
    with problems.collect():
        _check_recipe(g.reference_model, "lgd.reference_model")
    i = config.igd
    check(i.k >= 0 and i.gamma >= 0 and i.rho_scale > 0, "igd.k and igd.gamma must be >= 0, igd.rho_scale > 0")
    check(i.checkpoints >= 1, f"igd.checkpoints must be at least 1, got {i.checkpoints}")
    check(-1 <= i.cos_threshold <= 1, f"igd.cos_threshold must be in [-1, 1], got {i.cos_threshold}")
    check(i.target_images >= 1, "igd.target_images must be at least 1")
    check(i.decode_rows in ("conditional", "both"), f"igd.decode_rows must be conditional or both, got {i.decode_rows!r}")
    check(i.surrogate_protocol in ("lgd", "official"),
          f"igd.surrogate_protocol must be lgd or official, got {i.surrogate_protocol!r}")
    for where, section in (("lgd.stage_model", g.stage_model), ("lgd.reference_model", g.reference_model),
                           ("igd.surrogate", i.surrogate)):
        check(section.recipe != "soft_label",
              f"{where}.recipe=soft_label needs a teacher, which only evaluation has (eval.recipe)")
    with problems.collect():
        _check_window(i.window, s.steps, "igd")
    with problems.collect():
        _check_recipe(i.surrogate, "igd.surrogate")
    e = config.eval
    check(e.runs >= 1, f"eval.runs must be at least 1, got {e.runs}")
    check(e.processes >= 1, f"eval.processes must be at least 1, got {e.processes}")
    check(e.periodic_tests >= 0, f"eval.periodic_tests must be 0 (last epoch only) or more, got {e.periodic_tests}")
    check(e.test_view in ("resize", "crop"), f"eval.test_view must be resize or crop, got {e.test_view!r}")
    unknown = sorted(set(e.baselines) - {"random", "dit", "igd"})
    check(not unknown, f"eval.baselines: unknown {unknown}; choose from random, dit, igd")
    with problems.collect():
        _check_recipe(e.recipe, "eval.recipe")
    for network in e.networks:
        with problems.collect():
            _check_network(network, "eval.networks")
            _check_recipe(dataclasses.replace(e.recipe, network=network), "eval.recipe (for eval.networks)")
    check(bool(e.teacher), "eval.teacher must be reference or a checkpoint path")
    from lgd.data import DATASETS

    name = config.data.name.lower().replace("-", "_")
    check(name in DATASETS or name == "demo",
          f"data.name: unknown dataset {config.data.name!r}; valid names: {', '.join(DATASETS)}")
    check(config.data.image_size >= 8, "data.image_size must be at least 8")
    check(config.data.evaluate_on in ("test", "validation"),
          f"data.evaluate_on must be test or validation, got {config.data.evaluate_on!r}")
    check(config.data.validation_per_class >= 1, "data.validation_per_class must be at least 1")
    check(config.threads is None or config.threads >= 1, f"threads must be at least 1, got {config.threads}")
    check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.device) is not None,
          f"device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    for name, value in (("model.dit", config.model.dit), ("model.vae", config.model.vae)):
        check(bool(value), f"{name} is required: the path to the weights on disk")
    check(config.model.dit != "identity", "model.dit cannot be 'identity'")
    check(config.data.name not in ("imagenette", "imagewoof", "imagefolder") or config.data.root is not None,
          f"data.root is required for {config.data.name}")
    problems.raise_if_any()


def field_notes(cls) -> dict[str, str]:
    """A dataclass's field -> the comment written after it in this file (its meaning)."""
    import inspect

    notes, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        comment = re.match(r"\s+#\s*(.*)$", line)
        field_line = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
        if comment:
            above.append(comment.group(1))
        elif field_line:
            note = field_line.group(2) or " ".join(above)
            if note:
                notes[field_line.group(1)] = note
            above = []
        else:
            above = []
    return notes


def describe(config: Config) -> str:
    """The resolved config as YAML (loadable as a config file), each field with its meaning."""
    lines: list[str] = []

    def emit(obj, indent: str) -> None:
        notes = field_notes(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            note = f"  # {notes[f.name]}" if f.name in notes else ""
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:{note}")
                emit(value, indent + "  ")
            else:
                text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6).strip()
                text = text.removesuffix("\n...").removesuffix("...").strip()
                lines.append(f"{indent}{f.name}: {text}{note}")

    emit(config, "")
    return "\n".join(lines) + "\n"
