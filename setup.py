"""Build hook for the optional C++ extension in csrc/ (added with the fast path).

Until then setup.py only hands over to setuptools; all metadata lives in pyproject.toml.
"""
from setuptools import setup

setup()
