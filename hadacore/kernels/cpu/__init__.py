"""Native torch kernels for CPU (and any non-CUDA device)."""
