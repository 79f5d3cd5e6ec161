"""Package layout, and the optional C++ CPU extension in csrc/.

Metadata lives in pyproject.toml. `kernels/` is installed as `lgd.kernels` so that no
top-level `kernels` module shadows the PyPI project of that name.

The extension `lgd._C` needs torch at build time: install with
`pip install -e . --no-build-isolation` (build isolation would pull a CUDA torch). Without
torch the extension is skipped and lgd runs the plain torch reference op.
"""
import platform
import sys
from glob import glob

from setuptools import find_packages, setup


def _has_avx2() -> bool:
    """Build-host check; the extension is built from source on the machine that runs it."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def _extensions() -> dict:
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "lgd: torch is not importable at build time; skipping the C++ extension lgd._C "
            "(lgd will use the plain torch reference op). Install torch first and build with "
            "--no-build-isolation.",
            file=sys.stderr,
        )
        return {}

    cxx = ["-O3", "-Wno-unknown-pragmas"]  # ATen headers carry clang-only pragmas
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs serially.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _has_avx2():
        # Selects ATen's AVX2 Vectorized<float> (and Sleef exp) instead of the scalar fallback.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]

    # CPU only: the GPU ops are Triton kernels (kernels/), built at run time.
    ext = cpp_extension.CppExtension("lgd._C", sorted(glob("csrc/*.cpp")), extra_compile_args=cxx, extra_link_args=link)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    packages=find_packages(include=["lgd", "lgd.*"]) + ["lgd.kernels"],
    package_dir={"lgd.kernels": "kernels"},
    **_extensions(),
)
