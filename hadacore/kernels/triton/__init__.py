"""Triton kernels and their launch tables (CUDA; the CPU interpreter under TRITON_INTERPRET=1)."""
