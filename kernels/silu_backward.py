"""SiLU backward with the bias gradient reduced on the way, in one pass.

For act = SiLU(a) = a * sigmoid(a) between two Linear layers (the adaLN block's MLP), given
d_act [N, W] and the saved pre-activation a [N, W]:
    d_a = d_act * sigmoid(a) * (1 + a * (1 - sigmoid(a)))
    d_a.sum(0)                          (optional: the bias gradient of the first Linear)
d_a may be written over d_act in place. Arithmetic is fp32; tensors are float32, float16 or
bfloat16 (one dtype).

Layers: `_silu_backward_kernel` (Triton), `silu_backward` (launcher with input checks) and
`SiLUFunction` (autograd; forward in torch, backward with this kernel).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .gated_residual import check_same_rows, launch_config
from .layernorm_modulate import check_rows, backward_programs


@triton.jit
def _silu_backward_kernel(
    D_ACT, PRE_ACT, D_PRE_ACT, D_PRE_ACT_COLSUM_PARTIAL,
    stride_d_act_row, stride_pre_act_row, stride_d_pre_act_row,
    n_rows, n_cols, rows_per_program,
    STORE_COLSUM: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (p, j) handles rows [p * rows_per_program, ...) of column block j. IN_PLACE
    (D_PRE_ACT is D_ACT) puts a barrier between each tile's loads and its store."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    colsum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # reduced over rows after the loop
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        d_act = tl.load(D_ACT + rows[:, None] * stride_d_act_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        pre_act = tl.load(PRE_ACT + rows[:, None] * stride_pre_act_row + cols[None, :], mask=mask, other=0.0)
        pre_act = pre_act.to(tl.float32)
        sig = tl.sigmoid(pre_act)
        d_pre_act = d_act * sig * (1.0 + pre_act * (1.0 - sig))
        if IN_PLACE:
            tl.debug_barrier()
        tl.store(D_PRE_ACT + rows[:, None] * stride_d_pre_act_row + cols[None, :],
                 d_pre_act.to(D_PRE_ACT.dtype.element_ty), mask=mask)
        if STORE_COLSUM:
            colsum += d_pre_act
    if STORE_COLSUM:
        tl.store(D_PRE_ACT_COLSUM_PARTIAL + pid * n_cols + cols, tl.sum(colsum, axis=0), mask=col_mask)


def silu_backward(d_act, pre_act, *, d_pre_act=None, colsum=False):
    """Gradient of SiLU at pre_act for upstream gradient d_act; returns (d_pre_act, colsum or None).

    d_act, pre_act: [N, W] of one dtype, unit column stride. d_pre_act: optional output buffer,
    which may be d_act itself (overwritten in place). With colsum, d_pre_act.sum(0) is reduced in
    fp32 and returned in the input dtype.
    """
    shape, dtype, device = check_same_rows(d_act=d_act, pre_act=pre_act)
    if d_pre_act is None:
        d_pre_act = torch.empty(shape, dtype=dtype, device=device)
    check_rows("d_pre_act", d_pre_act, shape, dtype, device)
    n_rows, n_cols = shape
    if n_rows == 0 or n_cols == 0:
        return d_pre_act, (torch.zeros(n_cols, dtype=dtype, device=device) if colsum else None)
    block_m, block_n, num_warps = launch_config(n_cols)
    programs, rows_per_program = backward_programs(n_rows, block_m, device)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=device) if colsum else d_pre_act
    _silu_backward_kernel[(programs, triton.cdiv(n_cols, block_n))](
        d_act, pre_act, d_pre_act, partial,
        d_act.stride(0), pre_act.stride(0), d_pre_act.stride(0),
        n_rows, n_cols, rows_per_program,
        STORE_COLSUM=colsum,
        IN_PLACE=d_pre_act.data_ptr() == d_act.data_ptr() and d_pre_act.stride() == d_act.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return d_pre_act, (partial.sum(0).to(dtype) if colsum else None)


class SiLUFunction(torch.autograd.Function):
    """Autograd wrapper: apply(a [N, W]) -> SiLU(a); saves a, backward with `silu_backward`."""

    @staticmethod
    def forward(ctx, pre_act):
        ctx.save_for_backward(pre_act)
        return F.silu(pre_act)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_act):
        (pre_act,) = ctx.saved_tensors
        d_pre_act, _ = silu_backward(d_act.contiguous(), pre_act)
        return d_pre_act
