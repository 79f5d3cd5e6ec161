"""Loads the optional compiled extension `lgd._C` (csrc/), which registers torch.ops.lgd.*.

The package works without it: callers ask `has_op(name)` and fall back to the torch
reference, warning once (`warn_missing_once`) so a slow CPU path is never silent.
"""
import warnings

import torch

try:
    from lgd import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    _LOAD_ERROR: str | None = None
except (ImportError, OSError) as err:  # not built, or built against another torch
    _LOAD_ERROR = str(err)
# The C++ ops, read once here (a set lookup is cheap to trace under torch.compile). Read before
# lgd.kernels registers its Triton ops in the same namespace.
_CPP_OPS = frozenset() if _LOAD_ERROR else frozenset(
    name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("lgd::"))

_warned = False


def has_op(name: str) -> bool:
    """True when the compiled CPU op `torch.ops.lgd.<name>` is registered (an extension built
    from an older checkout may lack the newer ops)."""
    return name in _CPP_OPS


def warn_missing_once(name: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"lgd: the compiled CPU op torch.ops.lgd.{name} is not available "
        f"({_LOAD_ERROR or 'lgd._C was built from an older checkout'}); lgd's C++ ops run as "
        "plain torch on CPU (slower). Build them with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=3,
    )
