"""The adaLN input of several reverse DDPM steps at once: SiLU(time_embed(t) + cond_embed(z)).

    out[k, r, :] = SiLU(time[k, :] + cond[r, :])     fp32 math, stored in out's dtype

time: the time embeddings of K sampler steps (fp32 [K, W]); cond: cond_embed(z) of R net rows
(fp32 [R, W]); out: [K, R, W] in the head's weight dtype. The adaLN modulations of a step depend
only on t and z, never on x_t, so the fused sampling loop feeds this tensor, viewed as [K * R, W],
to one modulation GEMM for K steps: the modulation weights ((3D + 2) W x W, most of the head's
weight bytes) are then read once per K steps instead of once per step.

Layers: `_adaln_input_kernel` (Triton) and `adaln_input` (launcher with input checks).
"""
import torch
import triton
import triton.language as tl

from .linear_fused import (WEIGHT_DTYPES, _check_matrix, gpu_configs, interpreting, programmatic_launch,
                           wait_for_previous_grid)


@triton.jit
def _adaln_input_kernel(time_ptr, cond_ptr, out_ptr, rows, width,
                        stride_time_k, stride_cond_r, stride_out_k, stride_out_r,
                        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr):
    """Program (i, j, k) writes rows [i * BLOCK_R, ...) x columns [j * BLOCK_W, ...) of step k."""
    wait_for_previous_grid(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    k = tl.program_id(2).to(tl.int64)
    col_ok = c < width
    mask = (r < rows)[:, None] & col_ok[None, :]
    r64 = r.to(tl.int64)[:, None]
    time_row = tl.load(time_ptr + k * stride_time_k + c, mask=col_ok, other=0.0).to(tl.float32)
    cond = tl.load(cond_ptr + r64 * stride_cond_r + c[None, :], mask=mask, other=0.0).to(tl.float32)
    y = time_row[None, :] + cond
    tl.store(out_ptr + k * stride_out_k + r64 * stride_out_r + c[None, :],
             (y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty), mask=mask)


def adaln_input(time, cond, out):
    """out[k, r] = SiLU(time[k] + cond[r]) for K steps and R rows; returns out.

    time: float32 [K, W]; cond: float32 [R, W]; out: [K, R, W] with dtype in WEIGHT_DTYPES, unit
    column stride and rows of one stride (a contiguous buffer or a slice of one along K).
    """
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise ValueError(f"out must be a 3-D tensor [K, R, W], got {type(out).__name__} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    device = out.device
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels need a CUDA device or TRITON_INTERPRET=1, got tensors on {device}")
    if out.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"out dtype must be one of {WEIGHT_DTYPES}, got {out.dtype}")
    steps, rows, width = out.shape
    _check_matrix("time", time, steps, width, device, (torch.float32,))
    _check_matrix("cond", cond, rows, width, device, (torch.float32,))
    if width > 1 and out.stride(2) != 1:
        raise ValueError(f"out must have unit column stride, got strides {out.stride()}")
    if steps > 65535:
        raise ValueError(f"at most 65535 steps per launch (the grid's third dimension), got {steps}")
    if out.numel() == 0:
        return out
    block_r, block_w = (16, 256) if gpu_configs(device) else (16, min(64, triton.next_power_of_2(width)))
    _adaln_input_kernel[(triton.cdiv(rows, block_r), triton.cdiv(width, block_w), steps)](
        time, cond, out, rows, width, time.stride(0), cond.stride(0), out.stride(0), out.stride(1),
        BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4, **programmatic_launch(device))
    return out
