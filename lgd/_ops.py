"""Loads the optional compiled extension `lgd._C` (csrc/), which registers torch.ops.lgd.*.

The package works without it: callers ask `has_learnability_op()` and fall back to the
torch reference, warning once (`warn_missing_once`) so a slow CPU path is never silent.
"""
import warnings

try:
    from lgd import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    _LOAD_ERROR: str | None = None
except (ImportError, OSError) as err:  # not built, or built against another torch
    _LOAD_ERROR = str(err)

_warned = False


def has_learnability_op() -> bool:
    """True when the compiled CPU op `torch.ops.lgd.learnability` is registered."""
    return _LOAD_ERROR is None


def warn_missing_once() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        "lgd: the compiled extension lgd._C is not available "
        f"({_LOAD_ERROR}); the learnability op runs as plain torch on CPU (slower). "
        "Build it with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=3,
    )
