"""Residual add + LayerNorm of the transformer blocks at inference, one pass over the rows.

    s   = x + update                                   (fp32; update upcast, as torch promotes it)
    out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias      (fp32 math, stored in out's dtype)

x: the fp32 residual stream [M, D]; update: the attention branch's output [M, D] (any float dtype,
bf16 under autocast) or None (plain LayerNorm of x, the first norm of a block); out: [M, D] in the
dtype the next GEMM reads (autocast's bf16/fp16), so the LayerNorm's fp32 output is never written
and cast again. Under bf16 autocast a pre-norm block otherwise reads and writes the residual stream
in separate passes for the add, the LayerNorm and the cast before the GEMM.

Layers: `_add_layernorm_kernel` (Triton, one program per BLOCK_M rows, whole rows in registers)
and `add_layernorm` (launcher with input checks). The plain-PyTorch reference is the torch branch of
`marfast.mar.Block.residual_branches`. Inference only (no backward).
"""
import torch
import triton
import triton.language as tl

from .linear_fused import WEIGHT_DTYPES, gpu_configs, interpreting, programmatic_launch, wait_for_previous_grid


@triton.jit
def _add_layernorm_kernel(x_ptr, update_ptr, weight_ptr, bias_ptr, sum_ptr, out_ptr, rows, width,
                          stride_x, stride_update, stride_sum, stride_out, eps,
                          HAS_UPDATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          PDL: tl.constexpr):
    """Rows [pid * BLOCK_M, ...): sum_out = x + update (if HAS_UPDATE), out = LayerNorm(sum)."""
    wait_for_previous_grid(PDL)
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    c = tl.arange(0, BLOCK_D)
    col_ok = c < width
    mask = (r < rows)[:, None] & col_ok[None, :]
    s = tl.load(x_ptr + r[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_UPDATE:
        s += tl.load(update_ptr + r[:, None] * stride_update + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + r[:, None] * stride_sum + c[None, :], s, mask=mask)
    mean = tl.sum(s, axis=1) / width
    centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / width + eps)
    weight = tl.load(weight_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(out_ptr + r[:, None] * stride_out + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_view(name, t, width, device):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1 or t.shape[-1] != width:
        raise ValueError(f"{name} must be a floating-point tensor [..., {width}], got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t.view(-1, width)


def add_layernorm(x, update, weight, bias, eps, out_dtype):
    """(x + update in fp32 [or x itself when update is None], LayerNorm of it in out_dtype).

    x: float32 [..., D] contiguous; update: float [..., D] of x's shape, or None; weight, bias: float
    [D] (the LayerNorm's affine parameters); eps: the LayerNorm's eps; out_dtype: one of
    WEIGHT_DTYPES. Returns two new tensors of x's shape.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point vector, got {getattr(weight, 'dtype', type(weight))}")
    device, width = weight.device, weight.shape[0]
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels need a CUDA device or TRITON_INTERPRET=1, got tensors on {device}")
    if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape or bias.device != device \
            or not bias.is_floating_point():
        raise ValueError(f"bias must be a floating-point vector of length {width} on {device}")
    if out_dtype not in WEIGHT_DTYPES:
        raise TypeError(f"out_dtype must be one of {WEIGHT_DTYPES}, got {out_dtype}")
    x_rows = _rows_view("x", x, width, device)
    if x.dtype != torch.float32:
        raise TypeError(f"x (the residual stream) must be float32, got {x.dtype}")
    if update is not None:
        if not isinstance(update, torch.Tensor) or update.shape != x.shape:
            raise ValueError(f"update must have x's shape {tuple(x.shape)}, got {tuple(getattr(update, 'shape', ()))}")
        update_rows = _rows_view("update", update, width, device)
    summed = torch.empty_like(x) if update is not None else x
    out = torch.empty(x.shape, device=device, dtype=out_dtype)
    rows = x_rows.shape[0]
    if rows == 0:
        return summed, out
    block_d = triton.next_power_of_2(width)
    block_m = max(1, min(16, 4096 // block_d)) if gpu_configs(device) else max(1, min(4, 1024 // block_d))
    summed_rows, out_rows = summed.view(-1, width), out.view(-1, width)
    _add_layernorm_kernel[(triton.cdiv(rows, block_m),)](
        x_rows, x_rows if update is None else update_rows, weight, bias, summed_rows, out_rows, rows, width,
        x_rows.stride(0), 0 if update is None else update_rows.stride(0), summed_rows.stride(0), out_rows.stride(0),
        float(eps), HAS_UPDATE=update is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=8 if block_d >= 2048 else 4, **programmatic_launch(device))
    return summed, out
