"""Root pytest configuration: Triton runs under its CPU interpreter when no GPU is present.

The variable must be set before any module that defines `@triton.jit` kernels is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: trains a small model for a few hundred steps")
