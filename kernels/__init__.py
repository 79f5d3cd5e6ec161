"""Fused ops: Triton kernels on CUDA, the compiled C++ op on CPU, plain torch references elsewhere.

Import from the op modules (`lgd.kernels.adaln_norm`, `lgd.kernels.learnability`); nothing is
re-exported here, so that no function shadows the submodule of the same name.
"""
