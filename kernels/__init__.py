"""Fused Triton kernels of marfast, installed as `marfast.kernels`."""
