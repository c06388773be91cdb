"""Gated residual of the adaLN block, forward and backward.

    out = x + gate * h

x, h, out: [N, W]; gate: [N, W] per row (e.g. the last column slice of the [N, 3W] adaLN
modulation output, read in place through its row stride, no chunk copy). Arithmetic is fp32;
tensors are float32, float16 or bfloat16 (one dtype). The backward writes dgate = dout * h
(optionally straight into a column slice of the modulation gradient), dh = dout * gate, and can
also reduce dh over rows, which is the bias gradient of the Linear that produced h; dx is dout.

Layers: `_gated_residual_fwd_kernel` / `_gated_residual_bwd_kernel` (Triton),
`gated_residual_forward` / `gated_residual_backward` (launchers with input checks),
`GatedResidualFunction` (autograd) and `gated_residual` (functional entry point).
"""
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .layernorm_modulate import SUPPORTED_DTYPES, check_rows, backward_programs

BLOCK_N_MAX = 1024
MIN_SPLIT_BLOCK_N = 128
TILE_ELEMENTS = 4096
NUM_WARPS = 8  # 16 elements per thread and tensor


@triton.jit
def _gated_residual_fwd_kernel(
    X, GATE, H, OUT,
    stride_x_row, stride_gate_row, stride_h_row, stride_out_row,
    n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (i, j) computes out = x + gate * h on the [BLOCK_M, BLOCK_N] tile (i, j)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + rows[:, None] * stride_gate_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + rows[:, None] * stride_h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_out_row + cols[None, :], (x + gate * h).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT, GATE, H, DGATE, DH, DH_COLSUM_PARTIAL, DGATE_COLSUM_PARTIAL,
    stride_dout_row, stride_gate_row, stride_h_row, stride_dgate_row, stride_dh_row,
    n_rows, n_cols, rows_per_program,
    STORE_DH_COLSUM: tl.constexpr, STORE_DGATE_COLSUM: tl.constexpr, DH_IS_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (p, j) handles rows [p * rows_per_program, ...) of column block j.

    dgate = dout * h; dh = dout * gate; DH_COLSUM_PARTIAL[p, cols] = sum over its rows of dh,
    DGATE_COLSUM_PARTIAL[p, cols] = of dgate. DH_IS_H (dh overwrites h in place) puts a barrier
    between the tile's loads and its stores.
    """
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    dh_colsum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # reduced over rows after the loop
    dgate_colsum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        dout = tl.load(DOUT + rows[:, None] * stride_dout_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + rows[:, None] * stride_gate_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + rows[:, None] * stride_h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = dout * gate
        dgate = dout * h
        if DH_IS_H:
            tl.debug_barrier()
        tl.store(DGATE + rows[:, None] * stride_dgate_row + cols[None, :], dgate.to(DGATE.dtype.element_ty), mask=mask)
        tl.store(DH + rows[:, None] * stride_dh_row + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        if STORE_DH_COLSUM:
            dh_colsum += dh
        if STORE_DGATE_COLSUM:
            dgate_colsum += dgate
    if STORE_DH_COLSUM:
        tl.store(DH_COLSUM_PARTIAL + pid * n_cols + cols, tl.sum(dh_colsum, axis=0), mask=col_mask)
    if STORE_DGATE_COLSUM:
        tl.store(DGATE_COLSUM_PARTIAL + pid * n_cols + cols, tl.sum(dgate_colsum, axis=0), mask=col_mask)


def launch_config(n_cols):
    """(BLOCK_M, BLOCK_N, num_warps) for the elementwise tiles."""
    block_n = min(triton.next_power_of_2(n_cols), BLOCK_N_MAX)
    while block_n > MIN_SPLIT_BLOCK_N and triton.cdiv(n_cols, block_n) * block_n * 8 > n_cols * 9:
        block_n //= 2  # keep the masked-off padding of the last column block under 1/8
    block_m = max(1, TILE_ELEMENTS // block_n)
    return block_m, block_n, NUM_WARPS


def check_same_rows(**tensors):
    """Check name=tensor pairs are [N, W] tensors of the first one's shape, dtype (float32, float16
    or bfloat16) and device, each with unit column stride; returns (shape, dtype, device)."""
    first_name, first = next(iter(tensors.items()))
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"{first_name} must be a torch.Tensor, got {type(first).__name__}")
    if first.dim() != 2:
        raise ValueError(f"{first_name} must have shape [N, W], got {tuple(first.shape)}")
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name} must be float32, float16 or bfloat16, got {first.dtype}")
    for name, tensor in tensors.items():
        check_rows(name, tensor, first.shape, first.dtype, first.device)
    return tuple(first.shape), first.dtype, first.device


def gated_residual_forward(x, gate, h, *, out=None):
    """x + gate * h for x, gate, h: [N, W] of one dtype with unit column stride. Returns out [N, W]."""
    shape, dtype, device = check_same_rows(x=x, gate=gate, h=h)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    check_rows("out", out, shape, dtype, device)
    n_rows, n_cols = shape
    if n_rows == 0 or n_cols == 0:
        return out
    block_m, block_n, num_warps = launch_config(n_cols)
    _gated_residual_fwd_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))](
        x, gate, h, out, x.stride(0), gate.stride(0), h.stride(0), out.stride(0), n_rows, n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


def gated_residual_backward(dout, gate, h, *, dgate=None, dh=None, dh_colsum=False, dgate_colsum=False):
    """Gradients of x + gate * h: returns (dgate, dh, dh.sum(0) or None, dgate.sum(0) or None).

    dout, gate, h: [N, W] of one dtype; dgate, dh: optional [N, W] output buffers (any row stride,
    unit column stride); dh may be h itself (overwritten in place). dx is dout itself. The
    optional row sums (the bias gradients of the Linears that produced h and gate) are reduced in
    fp32 and returned in h's dtype.
    """
    shape, dtype, device = check_same_rows(dout=dout, gate=gate, h=h)
    if dgate is None:
        dgate = torch.empty(shape, dtype=dtype, device=device)
    if dh is None:
        dh = torch.empty(shape, dtype=dtype, device=device)
    check_rows("dgate", dgate, shape, dtype, device)
    check_rows("dh", dh, shape, dtype, device)
    n_rows, n_cols = shape
    if n_rows == 0 or n_cols == 0:
        return (dgate, dh, torch.zeros(n_cols, dtype=dtype, device=device) if dh_colsum else None,
                torch.zeros(n_cols, dtype=dtype, device=device) if dgate_colsum else None)
    block_m, block_n, num_warps = launch_config(n_cols)
    programs, rows_per_program = backward_programs(n_rows, block_m, device)
    dh_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=device) if dh_colsum else dh
    dgate_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=device) if dgate_colsum else dh
    _gated_residual_bwd_kernel[(programs, triton.cdiv(n_cols, block_n))](
        dout, gate, h, dgate, dh, dh_partial, dgate_partial,
        dout.stride(0), gate.stride(0), h.stride(0), dgate.stride(0), dh.stride(0),
        n_rows, n_cols, rows_per_program,
        STORE_DH_COLSUM=dh_colsum, STORE_DGATE_COLSUM=dgate_colsum,
        DH_IS_H=dh.data_ptr() == h.data_ptr() and dh.stride() == h.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return (dgate, dh, dh_partial.sum(0).to(dtype) if dh_colsum else None,
            dgate_partial.sum(0).to(dtype) if dgate_colsum else None)


class GatedResidualFunction(torch.autograd.Function):
    """Autograd wrapper: apply(x [N, W], gate [N, W], h [N, W]) -> x + gate * h. Saves gate and h."""

    @staticmethod
    def forward(ctx, x, gate, h):
        out = gated_residual_forward(x, gate, h)
        ctx.save_for_backward(gate, h)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, h = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dh, _, _ = gated_residual_backward(dout, gate, h)
        return dout, dgate, dh


def gated_residual(x, gate, h):
    """Differentiable x + gate * h over [N, W] rows."""
    return GatedResidualFunction.apply(x, gate, h)
