"""Root pytest configuration: Triton runs under its CPU interpreter when no GPU is present.

The variable must be set before any module that defines `@triton.jit` kernels is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU tests run tiny tensors, where a second intra-op thread only adds OpenMP synchronisation
# (on a busy 2-core machine it made small ops ~100x slower); MARFAST_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MARFAST_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: trains a small model for a few hundred steps")
