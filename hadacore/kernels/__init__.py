"""Kernels: the leaves of hadacore. They import torch, triton, the matrices
(:mod:`hadacore.hadamard`), the tensor layouts (:mod:`hadacore.formats`) and each other,
nothing above (checked by tests/test_layering.py).

- :mod:`.checks`: argument checks shared by the ops and the kernels (metadata only).
- :mod:`.fp8`: the FP8 attention math shared by the CPU emulation and the Triton kernel.
- :mod:`.cpu`: native torch implementations (BLAS-backed Hadamard, torch's int4 GEMM).
- :mod:`.triton`: Triton kernels and their launch tables (CUDA; CPU under TRITON_INTERPRET=1).
"""
