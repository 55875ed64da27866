"""Attention over the paged KV cache: torch references (the CPU path) and Triton kernels (GPU)."""
