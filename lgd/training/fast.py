"""The fast training engine: a functional, compiled SGD step, for one model or a group.

The reference loop (lgd.training.trainer) calls `loss.backward()` and `optimizer.step()` on
an nn.Module. Here the same step is two pure functions of tensors,

    gradient: (params, buffers, images, targets, scale) -> (grads, scale * summed loss)
    update:   (params, momenta, grads, lr) -> (params, momenta)

the gradient by torch.func.grad_and_value over `functional_call(model, ...)`, the update
PyTorch's SGD rule written out (buf = momentum * buf + grad + weight_decay * p; p -= lr * buf;
lr a tensor, so the LR schedule never recompiles). With TrainSection.compile each is one
fullgraph graph. On CPU the batch goes through the gradient in micro-batches whose
activations fit the cache (their gradients summed, scale = 1 / batch), average pooling
becomes MeanPool, which inductor fuses better, and a convolution of one input channel
becomes OneChannelConv, which takes oneDNN's channels-last kernels.

Many independent models of one architecture (a group): `torch.vmap` of the same functions
over stacked parameters ("vmap" stacking), or the members' steps in turn ("loop"; measured
faster on CPU, where a batched-weight convolution becomes a slower grouped one). Either way
each member keeps its own data order, augmentation draws, initialisation and schedule, so
it equals its lone training.

Augmentation stays outside the compiled graphs: its random parameters come from a CPU
torch.Generator (which dynamo cannot trace) and DSA picks one transformation family per
batch (six graphs instead of one); it is ~2 % of a demo step (measured 0.4 of 22 ms). It
runs eagerly, with exactly the reference's draws, so both engines see the same batches.

Precision: fp32 on CPU; on CUDA `precision` auto autocasts the forward to bf16 where the GPU
has it (lgd.acceleration.resolve_precision) and fp32 work uses TF32; parameters, momenta and
the update stay fp32; `precision: fp32` turns TF32 off. The CUDA paths (bf16, TF32, channels_last, vmap by default, group
size from free memory) have not run on a GPU yet.
"""
from __future__ import annotations

import copy
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from lgd.classifiers.base import fit_input
from lgd.kernels.norm_relu_pool import NormReLUPool, mean_pool
from lgd.progress import progress_bar
from lgd.training.recipes import Source, TrainHistory, augmenter, lr_milestones, recipe_loss

STACKINGS = ("auto", "vmap", "loop")


# CPU micro-batch: the largest activation of a micro-batch should fit in about this many
# bytes, so forward and backward find it in cache. Measured on the demo network (ConvNet-3
# width 32 at 32 px, 2-core AVX2): 22 ms per 100 images in micro-batches of 25-50, 34 ms as
# one batch of 100 (compiled step). GPUs take the whole batch at once.
CPU_CACHE_BYTES = 4 << 20


class MeanPool(nn.Module):
    """AvgPool2d(k) (stride k, no padding, floor mode) as a reshape and a mean
    (lgd.kernels.norm_relu_pool.mean_pool): the same numbers, but its backward is a broadcast,
    which inductor fuses far better than avg_pool2d_backward (measured on the demo network's
    compiled step: 9 ms per 32 images against 11-14 ms). Its reference twin is nn.AvgPool2d
    (tests/test_fast_training.py)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_pool(x, self.k)


def channels_last_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-channel [N, 1, H, W] tensor, made contiguous, viewed with channels-last strides: the
    same memory and numbers. With one channel both layouts are contiguous, and oneDNN reads the default
    strides as NCHW."""
    t = t.contiguous()
    n, c, h, w = t.shape
    return t.as_strided(t.shape, (c * h * w, 1, w * c, c))


class OneChannelConv(nn.Conv2d):
    """Conv2d with one input channel, run on channels-last views of its input and weight: the
    same numbers up to rounding, but oneDNN's NCHW kernels are slow at one input channel
    (measured on the demo network's compiled CPU step, 25 images at 32 px, 2 cores: the first
    convolution's backward 2.8 -> 0.4 ms per micro-batch; side by side, the step of 100 images
    42-47 -> 23-25 ms). Its output comes channels-last,
    as the following layers' already do under inductor. Its reference twin is nn.Conv2d
    (tests/test_fast_training.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(channels_last_view(x), channels_last_view(self.weight), self.bias)

    @classmethod
    def of(cls, conv: nn.Conv2d) -> OneChannelConv:
        twin = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                   device=conv.weight.device, dtype=conv.weight.dtype)
        twin.load_state_dict(conv.state_dict())
        return twin


def _one_channel_conv(m: nn.Module) -> bool:
    """m is a plain 2-d convolution (zero padding) of one input channel."""
    return type(m) is nn.Conv2d and m.in_channels == 1 and m.padding_mode == "zeros"


def _plain_avg_pool(m: nn.Module) -> int | None:
    """k when m is AvgPool2d(k) with stride k and no padding (what MeanPool computes)."""
    if not isinstance(m, nn.AvgPool2d):
        return None
    k, stride = m.kernel_size, m.stride
    k = k if isinstance(k, int) else (k[0] if len(set(k)) == 1 else None)
    stride = stride if isinstance(stride, int) else (stride[0] if len(set(stride)) == 1 else None)
    plain = k is not None and stride == k and m.padding in (0, (0, 0)) and not m.ceil_mode
    return k if plain and m.divisor_override is None else None


def _norm_relu_pool_block(modules: list[nn.Module], i: int) -> tuple[int, int] | None:
    """(pool, modules covered) when modules[i:] start with instance norm (GroupNorm of one
    group per channel, affine), ReLU and optionally a plain AvgPool2d: ConvNet's block after
    its convolution, which NormReLUPool computes in one op."""
    norm = modules[i]
    if not (type(norm) is nn.GroupNorm and norm.num_groups == norm.num_channels and norm.affine):
        return None
    if i + 1 >= len(modules) or type(modules[i + 1]) is not nn.ReLU:
        return None
    k = _plain_avg_pool(modules[i + 2]) if i + 2 < len(modules) else None
    return (k, 3) if k is not None else (1, 2)


def _fuse_norm_relu_pool(seq: nn.Sequential) -> None:
    """Each norm -> ReLU (-> pool) run in `seq` becomes NormReLUPool in the norm's slot, which
    keeps its parameters' names, and Identity in the others."""
    modules = list(seq)
    i = 0
    while i < len(modules):
        block = _norm_relu_pool_block(modules, i)
        if block is None:
            i += 1
            continue
        (pool, covered), norm = block, modules[i]
        fused = NormReLUPool(norm.num_channels, pool, norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        fused.load_state_dict(norm.state_dict())
        seq[i] = fused
        for j in range(i + 1, i + covered):
            seq[j] = nn.Identity()
        i += covered


def fast_twin(model: nn.Module, stacked: bool = False) -> nn.Module:
    """A copy of `model` with every plain AvgPool2d replaced by MeanPool and, on CPU (where it
    was measured) unless `stacked` (vmap can neither restride a batched tensor nor run the
    fused op's autograd.Function), every one-input-channel Conv2d by OneChannelConv and every
    instance norm -> ReLU (-> pool) run of a Sequential by NormReLUPool (same parameters and
    names, so functional_call takes the original's state). NormReLUPool runs the C++ op where
    lgd.kernels.policy selects it (CPU, built) and the plain ops otherwise."""
    twin = copy.deepcopy(model)
    views = not stacked and all(p.device.type == "cpu" for p in twin.parameters())
    if views:
        for seq in [m for m in twin.modules() if isinstance(m, nn.Sequential)]:
            _fuse_norm_relu_pool(seq)
    for parent in twin.modules():
        for name, child in parent.named_children():
            k = _plain_avg_pool(child)
            if k is not None:
                setattr(parent, name, MeanPool(k))
            elif views and _one_channel_conv(child):
                setattr(parent, name, OneChannelConv.of(child))
    return twin


def make_gradient(template: nn.Module, dtype: torch.dtype = torch.float32) -> Callable:
    """(params, buffers, images, targets, scale) -> (gradient, loss) of scale * the recipe's
    summed loss, plain (uncompiled): scale = 1 / batch gives the batch mean over its
    micro-batches."""
    device_type = next(template.parameters()).device.type
    low = dtype != torch.float32

    def gradient(params: dict, buffers: dict, x: torch.Tensor, targets: tuple, scale: torch.Tensor):
        def loss_of(p):
            with torch.autocast(device_type, dtype=dtype, enabled=low):
                logits = functional_call(template, (p, buffers), (x,))
            return recipe_loss(logits.float(), targets, reduction="sum") * scale

        return grad_and_value(loss_of)(params)
    return gradient


def make_update(momentum: float, weight_decay: float) -> Callable:
    """(params, momenta, grads, lr) -> (params, momenta): torch.optim.SGD's rule (dampening 0,
    no Nesterov; a zero momentum buffer makes the first step buf = d_p, as SGD does)."""
    def update(params: dict, momenta: dict, grads: dict, lr: torch.Tensor):
        new_m = {k: momentum * momenta[k] + (grads[k] + weight_decay * params[k]) for k in params}
        return {k: params[k] - lr * new_m[k] for k in params}, new_m
    return update


_STEPS: dict[tuple, tuple[Callable, Callable]] = {}


def step_functions(template: nn.Module, momentum: float, weight_decay: float, *,
                   dtype: torch.dtype = torch.float32, stacked: bool = False,
                   compiled: bool = True) -> tuple[Callable, Callable]:
    """(gradient, update) for `template`'s architecture, vmapped over a leading member
    dimension when `stacked`, compiled (fullgraph) when `compiled`. Cached per architecture and
    recipe, so every model of that architecture reuses the same graphs."""
    device = next(template.parameters()).device
    key = (repr(template), str(device), momentum, weight_decay, dtype, stacked, compiled)
    if key not in _STEPS:
        # A private copy (the cache must not keep or see a caller's model); compiled, with the
        # pooling inductor fuses (eager, avg_pool2d's own kernels are the faster ones).
        gradient = make_gradient(fast_twin(template, stacked) if compiled else copy.deepcopy(template), dtype)
        update = make_update(momentum, weight_decay)
        if stacked:
            gradient = torch.vmap(gradient, in_dims=(0, 0, 0, 0, None))
            update = torch.vmap(update)
        if compiled:
            gradient = torch.compile(_own_code(gradient), fullgraph=True)
            update = torch.compile(_own_code(update), fullgraph=True)
        _STEPS[key] = (gradient, update)
    return _STEPS[key]


_FORWARDS: dict[tuple, Callable] = {}


def forward_function(template: nn.Module, *, stacked: bool = False, compiled: bool = True) -> Callable:
    """(params, buffers, images) -> logits for `template`'s architecture, for scoring under
    inference_mode: vmapped over stacked members (images shared) when `stacked`, compiled
    with the fused pooling when `compiled`. Cached per architecture like step_functions."""
    device = next(template.parameters()).device
    key = (repr(template), str(device), stacked, compiled)
    if key not in _FORWARDS:
        twin = fast_twin(template, stacked) if compiled else copy.deepcopy(template)

        def forward(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(twin, (params, buffers), (x,))
        if stacked:
            forward = torch.vmap(forward, in_dims=(0, 0, None))
        _FORWARDS[key] = torch.compile(_own_code(forward), fullgraph=True) if compiled else forward
    return _FORWARDS[key]


def _own_code(fn: Callable) -> Callable:
    """fn behind a trampoline with a code object of its own. Dynamo keeps its compiled graphs
    (and its recompile limit of 8) per code object; without this every architecture's step
    would share one cache, and a process training many architectures would hit the limit."""
    def call(*args):
        return fn(*args)
    return types.FunctionType(call.__code__.replace(), call.__globals__, "step", None, call.__closure__)


def resolve_stacking(stacking: str, device: torch.device) -> str:
    """auto: vmap on CUDA (one launch fills the GPU), the member loop on CPU (measured faster)."""
    if stacking not in STACKINGS:
        raise ValueError(f"stacking must be one of {', '.join(STACKINGS)}, got {stacking!r}")
    if stacking == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return stacking


def leaf_output_sizes(model: nn.Module, sample: torch.Tensor) -> list[int]:
    """Elements of every leaf module's output for one image (a shape probe, no grad)."""
    sizes = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    return sizes


def micro_batch(model: nn.Module, sample: torch.Tensor, setting: int | None, compiled: bool = True) -> int | None:
    """Images per micro-batch: the section's setting, else for a compiled step on CPU what fits
    CPU_CACHE_BYTES; None: the whole batch at once (GPUs; eager steps, where the extra
    dispatches cost more than the cache saves)."""
    if setting is not None:
        return setting
    if sample.device.type != "cpu" or not compiled:
        return None
    return max(1, CPU_CACHE_BYTES // (4 * max(leaf_output_sizes(model, sample))))


@dataclass
class _State:
    """The tensors one training (or a stack of them, along dim 0) carries between steps."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    momenta: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> _State:
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        return cls(params, {k: b.detach() for k, b in model.named_buffers()},
                   {k: torch.zeros_like(p) for k, p in params.items()})

    @classmethod
    def stack(cls, states: list[_State]) -> _State:
        def stacked(name: str) -> dict:
            parts = [getattr(s, name) for s in states]
            return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
        return cls(stacked("params"), stacked("buffers"), stacked("momenta"))

    def load_into(self, model: nn.Module, index: int | None = None) -> None:
        """Copy the parameters (member `index` of a stack) into `model`."""
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.params[k] if index is None else self.params[k][index])


def _canonical(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """x in one fixed layout with canonical strides. Dynamo guards on strides, and the
    augmentations return varying ones (DSA's crop permutes; a 1-channel image counts as
    contiguous in either layout but its strides differ), each of which would recompile."""
    want = torch.empty(x.shape, device="meta").contiguous(memory_format=layout).stride()
    if x.stride() == want:
        return x
    return torch.empty_strided(x.shape, want, dtype=x.dtype, device=x.device).copy_(x)


def _chunks(n: int, size: int | None) -> list[slice]:
    """n rows in micro-batches of at most `size`, as even as possible (100 by 32: 4 x 25, not
    3 x 32 + 4, whose small remainder costs a whole dispatch)."""
    count = -(-n // (size or n))
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _accumulate(total: dict | None, part: dict) -> dict:
    if total is None:
        return part
    torch._foreach_add_(list(total.values()), list(part.values()))
    return total


def _sgd_step(gradient: Callable, update: Callable, state: _State, x: torch.Tensor, targets: tuple,
              chunk: int | None, scale: torch.Tensor, lr: torch.Tensor, dim: int) -> torch.Tensor:
    """One SGD step of `state` (in place) on the batch x, whose images run along `dim` (0 for
    one model, 1 for a stack), in micro-batches of `chunk`; returns the batch's mean loss."""
    grads, loss = None, 0
    for part in _chunks(x.shape[dim], chunk):
        index = (slice(None),) * dim + (part,)
        g, value = gradient(state.params, state.buffers, x[index],
                            tuple(t[index] if t.dim() > dim else t for t in targets), scale)  # lam is not sliced
        grads, loss = _accumulate(grads, g), loss + value
    state.params, state.momenta = update(state.params, state.momenta, grads, lr)
    return loss


def _score(forward: Callable, fit: Callable, states: list[_State], data, device: torch.device,
           chunk: int | None, layout: torch.memory_format, what: str) -> list[torch.Tensor]:
    """Per state (a stack counts as one, scored for all its members at once) and under
    inference_mode, without a host sync: what="accuracy" the [members] top-1 on `data`,
    what="probability" each sample's true-class probability ([members, N] or [N])."""
    source = data if isinstance(data, Source) else Source(data, device)
    correct = [0 for _ in states]
    probs: list[list[torch.Tensor]] = [[] for _ in states]
    count = 0
    # Whole micro-batches per batch, so every chunk but the set's last has one shape (one graph:
    # 256-image batches in chunks of 25 would give chunks of 23 and 24, and compile twice).
    batch = chunk * max(1, 256 // chunk) if chunk else 256
    with torch.inference_mode():
        for x, y in source.batches(batch):
            x = _canonical(fit(x), layout)
            for part in _chunks(len(y), chunk):
                for i, state in enumerate(states):
                    logits = forward(state.params, state.buffers, x[part])
                    if what == "accuracy":
                        correct[i] = correct[i] + (logits.argmax(-1) == y[part]).sum(-1)
                    else:
                        p = logits.softmax(-1)
                        probs[i].append(p.gather(-1, y[part].expand(p.shape[:-1]).unsqueeze(-1)).squeeze(-1))
            count += len(y)
    if what == "accuracy":
        return [c / count for c in correct]
    return [torch.cat(p, -1) for p in probs]


def train_group(members, sources, section, *, epochs: int, batch_size: int,
                device: torch.device, eval_data, eval_every: int, progress: bool) -> list[TrainHistory]:
    """The fast engine's loop over a group of members (lgd.training.trainer.Member) with equal
    architecture and data size; called by lgd.training.train_classifiers."""
    from lgd.acceleration import resolve_precision, tf32
    from lgd.training.trainer import accuracies, true_class_probability

    models = [m.model for m in members]
    dtype = resolve_precision(section.precision, device)
    stacked = resolve_stacking(section.stacking, device) == "vmap" and len(members) > 1
    gradient, update = step_functions(models[0], section.momentum, section.weight_decay, dtype=dtype,
                                      stacked=stacked, compiled=section.compile)
    forward = forward_function(models[0], stacked=stacked, compiled=section.compile)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    milestones, factor = lr_milestones(section.recipe, epochs)
    generators = [torch.Generator().manual_seed(m.seed) for m in members]  # CPU, as the reference loop
    augments = [augmenter(section.recipe, model, g) for model, g in zip(models, generators)]
    fit = lambda x: fit_input(models[0], x)  # one architecture, one input size
    states = [_State.of(model) for model in models]
    group = _State.stack(states) if stacked else None
    tracked = [Source(m.track, device) if m.track is not None else None for m in members]
    confidences: list[list[torch.Tensor]] = [[] for _ in members]
    histories = [TrainHistory(epochs=epochs) for _ in members]
    chunk: int | None = None
    scored: list[torch.Tensor] = []  # [members] test accuracy per scored epoch
    lr = section.lr

    def sync_models() -> None:
        for i, model in enumerate(models):
            (group or states[i]).load_into(model, i if stacked else None)

    for m in members:
        if m.on_epoch is not None:
            m.on_epoch(0, m.model)
    bar = progress_bar(range(1, epochs + 1), desc=f"train {section.recipe}" + (f" x{len(members)}" if len(members) > 1 else ""),
               unit="epoch", leave=False, disable=not progress)
    with tf32(section.precision != "fp32"):  # strict fp32 only when asked for (CUDA reads it)
        for epoch in bar:
            lr_t = torch.full((len(members),) if stacked else (), lr, device=device)
            totals = [torch.zeros((), device=device) for _ in members]
            count = 0
            for batch in zip(*(s.batches(batch_size, g) for s, g in zip(sources, generators))):
                views, targets = [], []
                for (x, y), augment in zip(batch, augments):
                    x, t = augment(fit(x), y)
                    views.append(_canonical(x, layout))
                    targets.append(t)
                b = len(batch[0][1])
                if chunk is None:
                    chunk = micro_batch(models[0], views[0], section.micro_batch, section.compile) or b
                scale = torch.tensor(1.0 / b, device=device)
                if stacked:
                    loss = _sgd_step(gradient, update, group, torch.stack(views),
                                     tuple(torch.stack(parts) for parts in zip(*targets)), chunk, scale, lr_t, dim=1)
                    for i in range(len(members)):
                        totals[i] += loss[i].detach() * b
                else:
                    for i, (state, x, t) in enumerate(zip(states, views, targets)):
                        totals[i] += _sgd_step(gradient, update, state, x, t, chunk, scale, lr_t, dim=0).detach() * b
                count += b
            for h, total in zip(histories, torch.stack(totals).tolist()):  # one host sync per epoch
                h.lr.append(lr)
                h.loss.append(total / count)
            lr *= factor ** milestones.count(epoch)  # as MultiStepLR: the factor after each milestone epoch
            score = eval_data is not None and (epoch % eval_every == 0 or epoch == epochs)
            hooks = any(m.on_epoch is not None for m in members)
            eager_scoring = not section.compile and (score or any(t is not None for t in tracked))
            if hooks or eager_scoring or (stacked and any(t is not None for t in tracked)):
                sync_models()
            if score:  # kept on the device: the curves cost no host round trip until training ends
                if section.compile:
                    scored.append(torch.stack(_score(forward, fit, [group] if stacked else states, eval_data,
                                                     device, chunk, layout, "accuracy")).flatten())
                else:
                    scored.append(accuracies(models, eval_data, device, on_device=True))
                for h in histories:
                    h.test_epochs.append(epoch)
            for i, source in enumerate(tracked):
                if source is None:
                    continue
                if section.compile and not stacked:
                    confidences[i].append(_score(forward, fit, [states[i]], source, device, chunk, layout,
                                                 "probability")[0])
                else:
                    confidences[i].append(true_class_probability(models[i], source, device, on_device=True))
            for m in members:
                if m.on_epoch is not None:
                    m.on_epoch(epoch, m.model)
            bar.set_postfix(loss=f"{histories[0].loss[-1]:.3f}")
    sync_models()
    if scored:
        for h, curve in zip(histories, torch.stack(scored).T.tolist()):
            h.test_accuracy = curve
    for h, c, model in zip(histories, confidences, models):
        if c:
            h.confidence = torch.stack(c).cpu()
        model.eval()
    return histories


def default_group_size(section, device: torch.device, model: nn.Module | None = None,
                       sample: torch.Tensor | None = None, batch: int | None = None,
                       free_bytes: int | None = None) -> int:
    """How many trainings run as one group when section.group_size is unset.

    The member loop (CPU default) and the reference engine gain nothing from grouping and
    resume at finer grain one training at a time: 1. vmap stacking on CUDA: as many members as
    half the free memory holds, counting per member 4 copies of the parameters (weights,
    gradient, momentum, update) and the activations of one batch; 16 without a model to size.
    """
    if section.engine != "fast" or resolve_stacking(section.stacking, device) == "loop":
        return 1
    if device.type != "cuda" and free_bytes is None:
        return 16
    if model is None or sample is None:
        return 16
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    params = 4 * sum(p.numel() for p in model.parameters())
    per_member = 4 * params + (batch or section.batch_size) * 4 * sum(leaf_output_sizes(model, sample))  # fp32
    return int(max(1, min(64, free_bytes // 2 // per_member)))
