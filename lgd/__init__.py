"""lgd: Learnability-Guided Diffusion dataset distillation (see README.md and docs/)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lgd")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "unknown"
