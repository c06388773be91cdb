"""Fused LayerNorm + adaLN modulate, forward and backward.

    out = LayerNorm(x; weight, bias, eps) * (1 + scale) + shift

x, scale, shift, out: [N, W] (scale and shift per row, e.g. column slices of the adaLN
modulation output); weight, bias: [W] or None (the final layer's LayerNorm has no parameters).
Statistics and all arithmetic are fp32; inputs and outputs are float32, float16 or bfloat16.
The forward keeps only the per-row mean and 1/std (fp32 [N]); the backward recomputes the
normalised x from x and those statistics.

Layers: `_layernorm_modulate_fwd_kernel` / `_layernorm_modulate_bwd_kernel` (Triton),
`layernorm_modulate_forward` / `layernorm_modulate_backward` (launchers with input checks),
`LayerNormModulateFunction` (autograd) and `layernorm_modulate` (functional entry point).
"""
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE_ELEMENTS = 2048  # elements of one [BLOCK_M, BLOCK_N] tile
MAX_BLOCK_N = 65536
CPU_BACKWARD_PROGRAMS = 4


@triton.jit
def _layernorm_modulate_fwd_kernel(
    X, WEIGHT, BIAS, SCALE, SHIFT, OUT, MEAN, RSTD,
    stride_x_row, stride_scale_row, stride_shift_row, stride_out_row,
    n_rows, n_cols, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program normalises BLOCK_M whole rows (BLOCK_N >= n_cols).

    mean = x.mean(-1); rstd = 1 / sqrt(x.var(-1, unbiased=False) + eps)
    out = ((x - mean) * rstd * weight + bias) * (1 + scale) + shift
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / n_cols
    rstd = tl.rsqrt(var + eps)
    normed = centered * rstd[:, None]
    if HAS_WEIGHT:
        weight = tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)
        normed = normed * weight[None, :]
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
        normed = normed + bias[None, :]
    scale = tl.load(SCALE + rows[:, None] * stride_scale_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + rows[:, None] * stride_shift_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = normed * (1.0 + scale) + shift
    tl.store(OUT + rows[:, None] * stride_out_row + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(MEAN + rows, mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layernorm_modulate_bwd_kernel(
    DOUT, X, WEIGHT, BIAS, SCALE, SHIFT, MEAN, RSTD, DRESIDUAL,
    DX, DSCALE, DSHIFT, DWEIGHT_PARTIAL, DBIAS_PARTIAL, DSCALE_PARTIAL, DSHIFT_PARTIAL, OUT,
    stride_dout_row, stride_x_row, stride_scale_row, stride_shift_row, stride_dresidual_row,
    stride_dx_row, stride_dscale_row, stride_dshift_row, stride_out_row,
    n_rows, n_cols, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRESIDUAL: tl.constexpr,
    RECOMPUTE_OUT: tl.constexpr, OUT_IS_DOUT: tl.constexpr, MODULATION_COLSUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program handles rows [pid * rows_per_program, ...) in BLOCK_M-row tiles.

    xhat = (x - mean) * rstd; ln = xhat * weight + bias
    dshift = dout; dscale = dout * ln; dln = dout * (1 + scale)
    dxhat = dln * weight; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) (+ dresidual)
    DWEIGHT_PARTIAL[pid] = sum over the program's rows of dln * xhat; DBIAS_PARTIAL[pid] = of dln;
    with MODULATION_COLSUMS, DSCALE_PARTIAL[pid] / DSHIFT_PARTIAL[pid] = of dscale / dshift. These
    column sums accumulate in [BLOCK_M, BLOCK_N] registers and are reduced over rows once, after
    the loop: the tile's rows lie in different warps, and a reduction per tile would put shared
    memory round trips and barriers between every tile's loads.
    With RECOMPUTE_OUT the forward output ln * (1 + scale) + shift is written to OUT as well;
    OUT_IS_DOUT (OUT and DOUT are one buffer) puts a barrier between the tile's loads and that store.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        weight = tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    dweight_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dscale_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dshift_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dout = tl.load(DOUT + rows[:, None] * stride_dout_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + rows[:, None] * stride_scale_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ln = xhat
        if HAS_WEIGHT:
            ln = ln * weight[None, :]
        if HAS_BIAS:
            ln = ln + bias[None, :]
        dscale = dout * ln
        tl.store(DSHIFT + rows[:, None] * stride_dshift_row + cols[None, :],
                 dout.to(DSHIFT.dtype.element_ty), mask=mask)
        tl.store(DSCALE + rows[:, None] * stride_dscale_row + cols[None, :],
                 dscale.to(DSCALE.dtype.element_ty), mask=mask)
        if MODULATION_COLSUMS:
            dshift_acc += dout
            dscale_acc += dscale
        dln = dout * (1.0 + scale)
        dxhat = dln
        if HAS_WEIGHT:
            dweight_acc += dln * xhat
            dxhat = dln * weight[None, :]
        if HAS_BIAS:
            dbias_acc += dln
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / n_cols
        mean_dxhat = tl.sum(dxhat, axis=1) / n_cols
        dx = (dxhat - xhat * mean_dxhat_xhat[:, None] - mean_dxhat[:, None]) * rstd[:, None]
        if HAS_DRESIDUAL:
            dres = tl.load(DRESIDUAL + rows[:, None] * stride_dresidual_row + cols[None, :], mask=mask, other=0.0)
            dx += dres.to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx_row + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if RECOMPUTE_OUT:
            shift = tl.load(SHIFT + rows[:, None] * stride_shift_row + cols[None, :], mask=mask, other=0.0)
            out = ln * (1.0 + scale) + shift.to(tl.float32)
            if OUT_IS_DOUT:
                tl.debug_barrier()
            tl.store(OUT + rows[:, None] * stride_out_row + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DWEIGHT_PARTIAL + pid * n_cols + cols, tl.sum(dweight_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DBIAS_PARTIAL + pid * n_cols + cols, tl.sum(dbias_acc, axis=0), mask=col_mask)
    if MODULATION_COLSUMS:
        tl.store(DSCALE_PARTIAL + pid * n_cols + cols, tl.sum(dscale_acc, axis=0), mask=col_mask)
        tl.store(DSHIFT_PARTIAL + pid * n_cols + cols, tl.sum(dshift_acc, axis=0), mask=col_mask)


def launch_config(n_cols):
    """(BLOCK_M, BLOCK_N, num_warps) for row-wise kernels over n_cols columns."""
    block_n = triton.next_power_of_2(n_cols)
    if block_n > MAX_BLOCK_N:
        raise ValueError(f"rows wider than {MAX_BLOCK_N} columns are not supported, got {n_cols}")
    block_m = max(1, TILE_ELEMENTS // block_n)
    num_warps = min(16, max(4, block_m * block_n // 256))  # 8 elements per thread and tensor
    return block_m, block_n, num_warps


def backward_programs(n_rows, block_m, device):
    """Number of programs (each owning a contiguous run of rows) and rows per program.

    Rows per program is a multiple of block_m; on CUDA about four programs per SM.
    """
    tiles = triton.cdiv(max(n_rows, 1), block_m)
    if device.type == "cuda":
        max_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        max_programs = CPU_BACKWARD_PROGRAMS
    programs = min(tiles, max_programs)
    rows_per_program = triton.cdiv(tiles, programs) * block_m
    return triton.cdiv(max(n_rows, 1), rows_per_program), rows_per_program


def check_rows(name, tensor, shape, dtype, device):
    """A [N, W] float tensor with unit column stride (any row stride), matching shape/dtype/device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    if tensor.shape[1] > 1 and tensor.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {tensor.stride()}")


def _check_vector(name, tensor, n_cols, device):
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    if tuple(tensor.shape) != (n_cols,):
        raise ValueError(f"{name} must have shape ({n_cols},), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_main(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [N, W], got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("x must have at least one column")


def _check_stats(name, tensor, n_rows, device):
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tuple(tensor.shape) != (n_rows,):
        raise ValueError(f"{name} must be a float32 tensor of shape ({n_rows},)")
    if tensor.device != device or not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous on {device}")


def layernorm_modulate_forward(x, weight, bias, scale, shift, eps, *, out=None, store_stats=True):
    """LayerNorm(x) * (1 + scale) + shift.

    x, scale, shift: [N, W] of one dtype (float32/float16/bfloat16), unit column stride;
    weight, bias: [W] or None; out: optional [N, W] buffer in x's dtype.
    Returns (out [N, W] x.dtype, mean [N] float32, rstd [N] float32); mean and rstd are None
    when store_stats is False.
    """
    _check_main(x)
    shape, dtype, device = tuple(x.shape), x.dtype, x.device
    check_rows("x", x, shape, dtype, device)
    check_rows("scale", scale, shape, dtype, device)
    check_rows("shift", shift, shape, dtype, device)
    _check_vector("weight", weight, shape[1], device)
    _check_vector("bias", bias, shape[1], device)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    check_rows("out", out, shape, dtype, device)
    n_rows, n_cols = shape
    if store_stats:
        mean = torch.empty(n_rows, dtype=torch.float32, device=device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=device)
    else:
        mean = rstd = None
    if n_rows == 0:
        return out, mean, rstd
    block_m, block_n, num_warps = launch_config(n_cols)
    _layernorm_modulate_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x, weight if weight is not None else x, bias if bias is not None else x, scale, shift, out,
        mean if store_stats else out, rstd if store_stats else out,
        x.stride(0), scale.stride(0), shift.stride(0), out.stride(0),
        n_rows, n_cols, float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, STORE_STATS=store_stats,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, mean, rstd


def layernorm_modulate_backward(dout, x, weight, bias, scale, mean, rstd, *, dresidual=None, shift=None,
                                recompute_out=False, modulation_colsums=False, dx=None, dscale=None, dshift=None,
                                out=None):
    """Gradients of layernorm_modulate_forward, optionally fused with a residual gradient.

    dout, x, scale (and dresidual, shift): [N, W] of x's dtype; mean, rstd: float32 [N] from the
    forward. dx = d(out)/dx + dresidual. dx, dscale, dshift, out: optional [N, W] buffers (any row
    stride, e.g. column slices of one [N, 3W] gradient). With recompute_out (needs shift) the
    forward output is rewritten into `out`, which may be `dout` itself (overwritten in place) but
    must not otherwise overlap an input.
    With modulation_colsums, dscale and dshift are also summed over rows (fp32, returned in x's
    dtype): the bias gradient of the Linear that produced scale and shift.
    Returns (dx, dweight or None, dbias or None, dscale, dshift, out or None, colsums or None) with
    colsums = (dscale.sum(0), dshift.sum(0)); dweight and dbias have the dtype of weight and bias,
    summed over rows in fp32.
    """
    _check_main(x)
    shape, dtype, device = tuple(x.shape), x.dtype, x.device
    n_rows, n_cols = shape
    for name, tensor in (("dout", dout), ("x", x), ("scale", scale)):
        check_rows(name, tensor, shape, dtype, device)
    if dresidual is not None:
        check_rows("dresidual", dresidual, shape, dtype, device)
    if recompute_out and shift is None:
        raise ValueError("recompute_out needs shift")
    if shift is not None:
        check_rows("shift", shift, shape, dtype, device)
    _check_vector("weight", weight, n_cols, device)
    _check_vector("bias", bias, n_cols, device)
    _check_stats("mean", mean, n_rows, device)
    _check_stats("rstd", rstd, n_rows, device)
    if dx is None:
        dx = torch.empty(shape, dtype=dtype, device=device)
    if dscale is None:
        dscale = torch.empty(shape, dtype=dtype, device=device)
    if dshift is None:
        dshift = torch.empty(shape, dtype=dtype, device=device)
    for name, tensor in (("dx", dx), ("dscale", dscale), ("dshift", dshift)):
        check_rows(name, tensor, shape, dtype, device)
    if recompute_out:
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=device)
        check_rows("out", out, shape, dtype, device)
    else:
        out = None
    out_is_dout = out is not None and out.data_ptr() == dout.data_ptr() and out.stride() == dout.stride()
    if n_rows == 0:
        dweight = torch.zeros_like(weight) if weight is not None else None
        dbias = torch.zeros_like(bias) if bias is not None else None
        zeros = torch.zeros(n_cols, dtype=dtype, device=device)
        return dx, dweight, dbias, dscale, dshift, out, ((zeros, zeros.clone()) if modulation_colsums else None)

    block_m, block_n, num_warps = launch_config(n_cols)
    programs, rows_per_program = backward_programs(n_rows, block_m, device)

    def partial_sums():
        return torch.empty((programs, n_cols), dtype=torch.float32, device=device)

    dweight_partial = partial_sums() if weight is not None else None
    dbias_partial = partial_sums() if bias is not None else None
    if modulation_colsums:
        dscale_partial, dshift_partial = partial_sums(), partial_sums()
    else:
        dscale_partial = dshift_partial = mean
    placeholder = x
    _layernorm_modulate_bwd_kernel[(programs,)](
        dout, x, weight if weight is not None else placeholder, bias if bias is not None else placeholder,
        scale, shift if shift is not None else placeholder, mean, rstd,
        dresidual if dresidual is not None else placeholder,
        dx, dscale, dshift,
        dweight_partial if dweight_partial is not None else mean,
        dbias_partial if dbias_partial is not None else mean,
        dscale_partial, dshift_partial, out if out is not None else placeholder,
        dout.stride(0), x.stride(0), scale.stride(0), shift.stride(0) if shift is not None else 0,
        dresidual.stride(0) if dresidual is not None else 0,
        dx.stride(0), dscale.stride(0), dshift.stride(0), out.stride(0) if out is not None else 0,
        n_rows, n_cols, rows_per_program,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_DRESIDUAL=dresidual is not None,
        RECOMPUTE_OUT=recompute_out, OUT_IS_DOUT=out_is_dout, MODULATION_COLSUMS=modulation_colsums,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    dweight = dweight_partial.sum(0).to(weight.dtype) if weight is not None else None
    dbias = dbias_partial.sum(0).to(bias.dtype) if bias is not None else None
    colsums = (dscale_partial.sum(0).to(dtype), dshift_partial.sum(0).to(dtype)) if modulation_colsums else None
    return dx, dweight, dbias, dscale, dshift, out, colsums


class LayerNormModulateFunction(torch.autograd.Function):
    """Autograd wrapper: apply(x [N, W], weight [W] or None, bias [W] or None, scale [N, W],
    shift [N, W], eps) -> [N, W]. Saves x, scale, mean and rstd (not the normalised x)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, eps):
        out, mean, rstd = layernorm_modulate_forward(x, weight, bias, scale, shift, eps)
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias, dscale, dshift, _, _ = layernorm_modulate_backward(
            dout.contiguous(), x, weight, bias, scale, mean, rstd)
        return dx, dweight, dbias, dscale, dshift, None


def layernorm_modulate(x, weight, bias, scale, shift, eps=1e-6):
    """Differentiable LayerNorm(x; weight, bias, eps) * (1 + scale) + shift over rows of x [N, W]."""
    return LayerNormModulateFunction.apply(x, weight, bias, scale, shift, eps)
