"""Bidirectional (non-causal) multi-head attention with a backend chosen per call.

Inputs and output use the BSHD layout: q [B, Nq, H, Dh], k and v [B, Nk, H, Dh] (the last dimension
contiguous; Nq = Nk for self-attention, Nq != Nk for cross-attention), output [B, Nq, H, Dh] in the
input dtype. Backends:

- "fa2": FlashAttention-2, `flash_attn.flash_attn_func` (optional `flash-attn` package);
  CUDA compute capability >= 8.0, fp16/bf16, head dim <= 256.
- "fa4": FlashAttention-4, `flash_attn.cute.flash_attn_func` (optional); Hopper and datacenter
  Blackwell (capability 9.x to 11.x, the range every release of it supports), fp16/bf16, head dim a multiple of 8 in 8..128, no attention dropout.
- "sdpa_flash": `F.scaled_dot_product_attention` restricted to PyTorch's flash kernel; CUDA
  capability >= 8.0, fp16/bf16, head dim a multiple of 8 up to 256.
- "math": softmax(q k^T / sqrt(Dh)) v written out in PyTorch (fp16/bf16 inputs are computed in
  float32); runs anywhere.

"auto" takes the first of fa2, fa4, sdpa_flash that is installed and accepts the inputs, and the
math path otherwise (always on CPU and for float32/float64). The environment variable
MARFAST_ATTENTION (auto | fa2 | fa4 | sdpa_flash | math) forces a backend; a forced backend that is
not installed or cannot take the inputs raises a RuntimeError instead of falling back.
"""
import importlib
import math
import os
import sys
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ENV_VAR = "MARFAST_ATTENTION"
BACKENDS = ("auto", "fa2", "fa4", "sdpa_flash", "math")
AUTO_ORDER = ("fa2", "fa4", "sdpa_flash")
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MODULES = {"fa2": "flash_attn", "fa4": "flash_attn.cute"}

_import_errors = {}


def requested_backend():
    """The backend asked for by MARFAST_ATTENTION ("auto" when unset)."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def flash_attn_func(backend):
    """The `flash_attn_func` of "fa2" or "fa4", or None when its package cannot be imported.

    A module already in sys.modules is used as is; a failed import is remembered (with its error,
    see `unavailable_reason`) and not retried.
    """
    module_name = FLASH_MODULES[backend]
    module = sys.modules.get(module_name)
    if module is None:
        if module_name in _import_errors:
            return None
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            _import_errors[module_name] = f"{type(error).__name__}: {error}"
            return None
    return getattr(module, "flash_attn_func", None)


def unavailable_reason(backend):
    """Why the package of "fa2"/"fa4" is not usable, or None when it is."""
    if flash_attn_func(backend) is not None:
        return None
    module_name = FLASH_MODULES[backend]
    error = _import_errors.get(module_name, f"{module_name} has no flash_attn_func")
    return f"`{module_name}` is not importable ({error}); install the optional flash-attn extra"


@lru_cache(maxsize=None)
def _cuda_capability(index):
    return torch.cuda.get_device_capability(index)


def device_capability(device):
    """CUDA compute capability (major, minor) of `device`, or None for a non-CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def rejection(backend, device, dtype, head_dim, dropout_p=0.0):
    """Why `backend` cannot take inputs of this device, dtype, head dim and dropout, or None."""
    if backend == "math":
        return None
    if backend in FLASH_MODULES:
        reason = unavailable_reason(backend)
        if reason is not None:
            return reason
    capability = device_capability(device)
    min_capability = (9, 0) if backend == "fa4" else (8, 0)
    if capability is None:
        return f"{backend} needs a CUDA device, got {torch.device(device)}"
    if capability < min_capability:
        return f"{backend} needs CUDA compute capability >= {min_capability}, got {capability}"
    if backend == "fa4" and capability[0] > 11:
        return f"fa4 supports CUDA compute capabilities 9.x to 11.x, got {capability}"
    if dtype not in HALF_DTYPES:
        return f"{backend} needs float16 or bfloat16 inputs, got {dtype} (use bf16 autocast)"
    if backend == "fa2" and head_dim > 256:
        return f"fa2 supports head dims up to 256, got {head_dim}"
    if backend == "fa4":
        if head_dim % 8 or not 8 <= head_dim <= 128:
            return f"fa4 supports head dims that are multiples of 8 in 8..128, got {head_dim}"
        if dropout_p > 0.0:
            return "fa4 has no attention dropout"
    if backend == "sdpa_flash" and (head_dim % 8 or head_dim > 256):
        return f"sdpa_flash supports head dims that are multiples of 8 up to 256, got {head_dim}"
    return None


def active_backend(device, dtype, head_dim=64, dropout_p=0.0):
    """The backend a call with inputs of this device, dtype and head dim runs now.

    Raises RuntimeError when MARFAST_ATTENTION forces a backend that cannot take such inputs.
    """
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    requested = requested_backend()
    if requested != "auto":
        reason = rejection(requested, device, dtype, head_dim, dropout_p)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={requested} cannot run here: {reason}")
        return requested
    for backend in AUTO_ORDER:
        if rejection(backend, device, dtype, head_dim, dropout_p) is None:
            return backend
    return "math"


def check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, N, H, Dh], got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q [B, Nq, H, Dh] and k, v [B, Nk, H, Dh] must agree in B, H and Dh (k and v in shape), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def math_attention(q, k, v, dropout_p=0.0):
    """softmax(q k^T / sqrt(Dh)) v for BSHD inputs; fp16/bf16 are computed in float32."""
    dtype = q.dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)
    q, k, v = (t.transpose(1, 2).to(compute_dtype) for t in (q, k, v))
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the matmuls in its low dtype
        scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
        probs = scores.softmax(dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        return torch.matmul(probs, v).transpose(1, 2).to(dtype)


def sdpa_flash_attention(q, k, v, dropout_p=0.0):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    except RuntimeError as error:
        raise RuntimeError(f"PyTorch's flash SDPA kernel rejected q of shape {tuple(q.shape)} "
                           f"({q.dtype}, {q.device}): {error}") from error
    return out.transpose(1, 2)


def fa2_attention(q, k, v, dropout_p=0.0):
    return flash_attn_func("fa2")(q, k, v, dropout_p=dropout_p, causal=False)


def fa4_attention(q, k, v, dropout_p=0.0):
    out, _ = flash_attn_func("fa4")(q, k, v, causal=False)
    return out


RUNNERS = {"fa2": fa2_attention, "fa4": fa4_attention, "sdpa_flash": sdpa_flash_attention, "math": math_attention}


def run_attention(backend, q, k, v, dropout_p=0.0):
    """Run `backend` (as returned by `active_backend` for these inputs) without re-checking them."""
    return RUNNERS[backend](q, k, v, dropout_p)


def attention(q, k, v, dropout_p=0.0, backend=None):
    """Non-causal attention, q [B, Nq, H, Dh], k, v [B, Nk, H, Dh] -> [B, Nq, H, Dh] in q's dtype
    (Nq = Nk for self-attention; cross-attention when they differ).

    backend: "fa2", "fa4", "sdpa_flash" or "math" (checked against the inputs), or None to use
    `active_backend` for these inputs (MARFAST_ATTENTION or auto). dropout_p applies
    to the attention probabilities (training only; pass 0.0 at inference).
    """
    check_qkv(q, k, v)
    if backend is None:
        backend = active_backend(q.device, q.dtype, q.shape[-1], dropout_p)
    else:
        if backend not in RUNNERS:
            raise ValueError(f"backend must be one of {tuple(RUNNERS)}, got {backend!r}")
        reason = rejection(backend, q.device, q.dtype, q.shape[-1], dropout_p)
        if reason is not None:
            raise RuntimeError(f"attention backend {backend} cannot run these inputs: {reason}")
    return RUNNERS[backend](q, k, v, dropout_p)
