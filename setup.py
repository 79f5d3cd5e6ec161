"""Package layout, and (with the fast path) the optional C++ extension in csrc/.

Metadata lives in pyproject.toml. `kernels/` is installed as `lgd.kernels` so that no
top-level `kernels` module shadows the PyPI project of that name.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["lgd", "lgd.*"]) + ["lgd.kernels"],
    package_dir={"lgd.kernels": "kernels"},
)
