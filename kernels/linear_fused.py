"""Fused GEMM of the diffusion head's sampling path: out = epilogue(prologue(A) @ W^T + b).

One Triton kernel, `_linear_fused_kernel`, with constexpr-selected stages; each program runs one
work item (an output tile, or a K part of one: `gemm_item_coords`, `linear_fused_item`, which the
one-launch DDPM loop of ddpm_sample_loop.py runs too):

prologue on A [M, K] (applied to each [BLOCK_M, BLOCK_K] tile in registers before the dot):
  NONE        A as stored (any float dtype), cast to the weight dtype;
  LN_MODULATE ((A - mean) * rstd [* ln_weight + ln_bias]) * (1 + scale) + shift, in fp32, where
              A is the fp32 residual stream, mean/rstd come from the per-group LayerNorm partial
              statistics written by the kernel that produced A (see "statistics"), and shift/scale
              are per-row [M, K] views into the adaLN modulation buffer.
epilogue on the fp32 accumulator [BLOCK_M, BLOCK_N] (bias in fp32 first):
  BIAS            y = acc + b
  BIAS_SILU       y = SiLU(acc + b)
  GATED_RESIDUAL  y = residual + gate * (acc + b)     (residual fp32, gate a per-row view)
  BIAS_GELU       y = GELU(acc + b), the exact (erf) GELU of nn.GELU()
optional epilogue side output:
  statistics  for each row and each STATS_GROUP-column group of y: (mean, sum of squared
              deviations from that mean), fp32 [M, cdiv(N, STATS_GROUP), 2]; a consumer combines the
              groups exactly (Chan's parallel formula) into the row's LayerNorm mean and variance.

Accumulation is fp32; the dot inputs are the weight dtype (fp32, bf16 or fp16). fp32 dots follow
torch's matmul precision setting (IEEE under "highest", TF32 otherwise), as cuBLAS does.

programmatic dependent launch (PDL constexpr, `programmatic_launch(device)`: CUDA sm_90+, unless
MARFAST_PDL=0): the kernel is launched with `launch_pdl` and starts with `wait_for_previous_grid`,
so its blocks can be scheduled while the previous kernel on the stream drains (hiding the launch
gap between the ~14 kernels of each DDPM step) and touch memory only once that kernel is done. At
up to SKINNY_MAX_ROWS rows the blocks first ask L2 for their weight slab (PREFETCH_K > 0), so
the weight stream of a skinny GEMM overlaps the tail of the kernel before it, and they load their
epilogue operands (bias, gate, residual tiles) right after the wait (PRELOAD_EPILOGUE): a skinny
GEMM is a chain of memory round trips, and the epilogue's would otherwise follow the K loop's.

split K (SPLIT_K > 1, for GEMMs of few output tiles given a `SplitKWorkspace`): SPLIT_K programs
share an output tile, each over a part of K; each stores its fp32 partial tile, and the last to
arrive (an arrival counter per tile, release-acquire) sums the partials in split order and runs
the epilogue.
No program waits for another, so the Triton interpreter (programs one after another) runs it too.

Launchers (the model layer calls only these): `linear`, `linear_gelu`, `input_projection`,
`linear_ln_modulate_silu`, `linear_gated_residual`. On CUDA each distinct (kernel variant, M, N, K,
dtype) is tuned once over a few block configurations (and K splits), timed with CUDA events,
outside any CUDA graph capture (M above TUNE_EXACT_ROWS in power-of-two buckets: the transformer's
row count changes at every AR step); under the Triton interpreter one small configuration runs.
Above SKINNY_MAX_ROWS the two block launchers also time a cuBLAS GEMM followed by their epilogue
as a separate pass, and keep the faster (`_GEMM_WAY_CHOICE`; `timed_choices` lists every timing).
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

STATS_GROUP = 32
MAX_STATS_CHUNK = 64  # statistics groups read per load: rows up to 2048 wide are read in one
STATS_TILE_ELEMENTS = 1024  # at most this many groups x rows per load (more spills registers on sm_90)
GROUP_M = 8

PROLOGUE_NONE = 0
PROLOGUE_LN_MODULATE = 1
PROLOGUE_LN_AFFINE_MODULATE = 2

EPILOGUE_BIAS = 0
EPILOGUE_BIAS_SILU = 1
EPILOGUE_GATED_RESIDUAL = 2
EPILOGUE_BIAS_GELU = 3
PROLOGUE_NAMES = {PROLOGUE_NONE: "", PROLOGUE_LN_MODULATE: "LN-modulate prologue, ",
                  PROLOGUE_LN_AFFINE_MODULATE: "affine LN-modulate prologue, "}
EPILOGUE_NAMES = {EPILOGUE_BIAS: "bias", EPILOGUE_BIAS_SILU: "bias + SiLU",
                  EPILOGUE_GATED_RESIDUAL: "gated residual", EPILOGUE_BIAS_GELU: "bias + GELU"}

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Column tiles are at least STATS_GROUP wide (the statistics epilogue works on whole groups).
# Above this many rows the LN-modulate prologue is written once to a buffer in the weight dtype and
# the GEMM reads it plainly: fused into the prologue, the fp32 residual and the two modulation
# tiles would be re-read by every column tile of the GEMM (4x a plain GEMM's A traffic, without
# asynchronous copies). The dot inputs are identical either way. At up to this many rows on CUDA
# both ways are timed once per shape and the faster kept (_PROLOGUE_CHOICE): the fused prologue saves
# a kernel and a round trip of A, but every column tile's K loop then loads three A-sized tiles
# (fp32 residual, shift, scale) instead of one and does the LayerNorm arithmetic itself.
PROLOGUE_MAX_ROWS = 64
_PROLOGUE_CHOICE = {}
# Above SKINNY_MAX_ROWS on CUDA the block GEMMs are also timed as a cuBLAS GEMM (bias added there,
# the product rounded to the weight dtype as the official bf16 head rounds it) followed by the
# epilogue as its own pass, and the faster way kept (_GEMM_WAY_CHOICE): the Triton GEMM saves that
# round trip of the product, cuBLAS may run the matrix product itself faster.
_GEMM_WAY_CHOICE = {}

PDL_ENV = "MARFAST_PDL"
# Triton releases before grid dependency control (gdc_wait) launch without PDL.
HAS_GRID_DEPENDENCY_CONTROL = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
# GEMMs of at most this many rows are weight-streaming bound (a few output tiles walk all of K):
# with PDL they prefetch their weight slab into L2 before the grid dependency wait, i.e. while the
# previous kernel still runs, and they load their epilogue operands before the K loop. (K splits
# are tried by output-tile count, `_with_split_k`.)
SKINNY_MAX_ROWS = 64


@triton.jit
def _row_layernorm_stats(stats_ptr, stride_stats_m, rows, row_ok, width, eps,
                         BLOCK_M: tl.constexpr, STATS_GROUP: tl.constexpr, STATS_CHUNK: tl.constexpr):
    """Row mean and 1/sqrt(var + eps) [BLOCK_M] from per-group (mean, M2) statistics.

    stats: fp32 [rows, cdiv(width, STATS_GROUP), 2]; group g holds min(STATS_GROUP, width - g*G)
    columns. One load of (mean, M2) per STATS_CHUNK groups (`stats_chunk`: the whole row at the
    head's widths at few rows, so the kernel waits for one round trip): each chunk's mean and
    centred M2 sum come from its groups in registers, and chunks merge by Chan's formula.
    """
    num_groups = tl.cdiv(width, STATS_GROUP)
    row_base = stats_ptr + rows.to(tl.int64)[:, None] * stride_stats_m
    n = 0.0
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for g0 in range(0, num_groups, STATS_CHUNK):
        groups = g0 + tl.arange(0, STATS_CHUNK)
        counts = tl.minimum(tl.maximum(width - groups * STATS_GROUP, 0), STATS_GROUP).to(tl.float32)
        ok = row_ok[:, None] & (groups < num_groups)[None, :]
        group_mean = tl.load(row_base + groups[None, :] * 2, mask=ok, other=0.0)
        group_m2 = tl.load(row_base + groups[None, :] * 2 + 1, mask=ok, other=0.0)
        chunk_n = tl.sum(counts, axis=0)
        chunk_mean = tl.sum(group_mean * counts[None, :], axis=1) / chunk_n
        delta = group_mean - chunk_mean[:, None]
        chunk_m2 = tl.sum(tl.where(ok, group_m2 + counts[None, :] * delta * delta, 0.0), axis=1)
        merged_n = n + chunk_n
        mean_gap = chunk_mean - mean
        mean += mean_gap * (chunk_n / merged_n)
        m2 += chunk_m2 + mean_gap * mean_gap * (n * chunk_n / merged_n)
        n = merged_n
    rstd = tl.rsqrt(m2 / width + eps)
    return mean, rstd


@triton.jit
def _store_group_stats(y, rows, row_ok, n0, width, stats_ptr, stride_stats_m,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATS_GROUP: tl.constexpr):
    """Store (mean, M2) of each STATS_GROUP-column group of the fp32 tile y [BLOCK_M, BLOCK_N].

    The tile starts at column n0 (a multiple of STATS_GROUP); columns >= width are ignored.
    """
    GROUPS: tl.constexpr = BLOCK_N // STATS_GROUP
    cols = n0 + tl.arange(0, GROUPS)[:, None] * STATS_GROUP + tl.arange(0, STATS_GROUP)[None, :]
    valid = cols < width
    counts = tl.sum(valid.to(tl.float32), axis=1)
    y3 = tl.where(valid[None, :, :], tl.reshape(y, [BLOCK_M, GROUPS, STATS_GROUP]), 0.0)
    group_mean = tl.sum(y3, axis=2) / tl.maximum(counts, 1.0)[None, :]
    deviation = tl.where(valid[None, :, :], y3 - group_mean[:, :, None], 0.0)
    group_m2 = tl.sum(deviation * deviation, axis=2)
    groups = n0 // STATS_GROUP + tl.arange(0, GROUPS)
    ok = row_ok[:, None] & (counts > 0)[None, :]
    ptr = stats_ptr + rows.to(tl.int64)[:, None] * stride_stats_m + groups[None, :] * 2
    tl.store(ptr, group_mean, mask=ok)
    tl.store(ptr + 1, group_m2, mask=ok)


@triton.jit
def _ln_modulate_inputs(x_ptr, stride_xm, rows, row_ok, cols, col_ok, ln_weight_ptr, ln_bias_ptr, shift_ptr,
                        scale_ptr, stride_mod_m, AFFINE: tl.constexpr):
    """The fp32 inputs of an LN-modulate tile: x, shift, scale [BLOCK_M, BLOCK_K] (zero outside
    the mask) and, when AFFINE, the LayerNorm's weight and bias [BLOCK_K] (0.0 placeholders
    otherwise). x: fp32 [rows, width] residual stream; shift/scale: per-row views (row stride
    stride_mod_m)."""
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    ln_weight = 0.0
    ln_bias = 0.0
    if AFFINE:
        ln_weight = tl.load(ln_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        ln_bias = tl.load(ln_bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + rows64 * stride_mod_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + rows64 * stride_mod_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, shift, scale, ln_weight, ln_bias


@triton.jit
def _ln_modulate_apply(x, shift, scale, ln_weight, ln_bias, mean, rstd, mask, AFFINE: tl.constexpr):
    """fp32 tile ((x - mean) * rstd [* w + b]) * (1 + scale) + shift, zero outside the mask."""
    normed = (x - mean[:, None]) * rstd[:, None]
    if AFFINE:
        normed = normed * ln_weight[None, :] + ln_bias[None, :]
    return tl.where(mask, normed * (1.0 + scale) + shift, 0.0)


@triton.jit
def _ln_modulate_tile(x_ptr, stride_xm, rows, row_ok, cols, col_ok, mean, rstd,
                      ln_weight_ptr, ln_bias_ptr, shift_ptr, scale_ptr, stride_mod_m, AFFINE: tl.constexpr):
    """`_ln_modulate_apply` of `_ln_modulate_inputs` (see both)."""
    x, shift, scale, ln_weight, ln_bias = _ln_modulate_inputs(x_ptr, stride_xm, rows, row_ok, cols, col_ok,
                                                              ln_weight_ptr, ln_bias_ptr, shift_ptr, scale_ptr,
                                                              stride_mod_m, AFFINE)
    return _ln_modulate_apply(x, shift, scale, ln_weight, ln_bias, mean, rstd, row_ok[:, None] & col_ok[None, :],
                              AFFINE)


@triton.jit
def _ln_modulate_kernel(x_ptr, stats_ptr, ln_weight_ptr, ln_bias_ptr, shift_ptr, scale_ptr, out_ptr,
                        M, K, stride_xm, stride_stats_m, stride_mod_m, stride_om, ln_eps,
                        AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        STATS_GROUP: tl.constexpr, STATS_CHUNK: tl.constexpr, PDL: tl.constexpr):
    """out[M, K] = the LN_MODULATE prologue of A, stored once in out's dtype (the weight dtype). The
    tile's loads are issued before the statistics' (they do not depend on them): one round trip."""
    wait_for_previous_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    x, shift, scale, ln_weight, ln_bias = _ln_modulate_inputs(x_ptr, stride_xm, rows, row_ok, cols, col_ok,
                                                              ln_weight_ptr, ln_bias_ptr, shift_ptr, scale_ptr,
                                                              stride_mod_m, AFFINE)
    mean, rstd = _row_layernorm_stats(stats_ptr, stride_stats_m, rows, row_ok, K, ln_eps,
                                      BLOCK_M, STATS_GROUP, STATS_CHUNK)
    mask = row_ok[:, None] & col_ok[None, :]
    h = _ln_modulate_apply(x, shift, scale, ln_weight, ln_bias, mean, rstd, mask, AFFINE)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], h.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _gated_residual_stats_kernel(h_ptr, gate_ptr, residual_ptr, out_ptr, stats_ptr, M, N,
                                 stride_hm, stride_gm, stride_rm, stride_om, stride_stats_m,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATS_GROUP: tl.constexpr,
                                 PDL: tl.constexpr):
    """out = residual + gate * h (fp32) and its LayerNorm group statistics: the GATED_RESIDUAL
    epilogue as its own pass over a GEMM output h [M, N] (BLOCK_N a multiple of STATS_GROUP)."""
    wait_for_previous_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(h_ptr + rows64 * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + rows64 * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0)
    y = residual + gate * h
    tl.store(out_ptr + rows64 * stride_om + cols[None, :], y, mask=mask)
    _store_group_stats(y, rows, row_ok, n0, N, stats_ptr, stride_stats_m, BLOCK_M, BLOCK_N, STATS_GROUP)


@triton.jit
def _epilogue_operands(bias_ptr, gate_ptr, residual_ptr, rows, row_ok, cols, col_ok, stride_mod_m, stride_rm,
                       GATED: tl.constexpr):
    """The epilogue's fp32 inputs: bias [BLOCK_N] and, when GATED, the gate and residual tiles
    [BLOCK_M, BLOCK_N] (zero outside the mask; 0.0 placeholders otherwise)."""
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    gate = 0.0
    residual = 0.0
    if GATED:
        rows64 = rows.to(tl.int64)[:, None]
        mask = row_ok[:, None] & col_ok[None, :]
        gate = tl.load(gate_ptr + rows64 * stride_mod_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        residual = tl.load(residual_ptr + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return bias, gate, residual


@triton.jit
def wait_for_previous_grid(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel on the stream has finished and its writes are
    visible, then let the next kernel's blocks launch (they wait in turn). Call it before any
    global memory access. Without PDL (and under the interpreter, which has no grid dependency
    control) it does nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_weights_to_l2(weight_ptr, cols, col_ok, k_begin, k_end, stride_wk, stride_wn,
                            BLOCK_K: tl.constexpr, PREFETCH_K: tl.constexpr):
    """Ask L2 for this program's weight slab (rows `cols` of W, K range [k_begin, k_end)): one
    `prefetch.global.L2::evict_last` per PREFETCH_K weights along K (a 128-byte line when W is
    K-contiguous). A hint with no effect on results; touches no memory the program depends on."""
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K // PREFETCH_K) * PREFETCH_K
        ok = (ks < k_end)[:, None] & col_ok[None, :]
        lines = tl.where(ok, weight_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, weight_ptr)
        tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2::evict_last [$1];", "=r,l", [lines],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def split_k_range(pid, K, k_split_len, SPLIT_K: tl.constexpr):
    """(tile, split, k_begin, k_end) of program `pid`: SPLIT_K consecutive programs share a tile,
    each over k_split_len of K (the whole of K without a split)."""
    if SPLIT_K > 1:
        split = pid % SPLIT_K
        tile = pid // SPLIT_K
        k_begin = split * k_split_len
        k_end = tl.minimum(K, k_begin + k_split_len)
    else:
        split = 0
        tile = pid
        k_begin = 0
        k_end = K
    return tile, split, k_begin, k_end


@triton.jit
def _split_k_store(acc, partials_ptr, slot, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store this program's fp32 partial tile acc [BLOCK_M, BLOCK_N] into partial slot `slot`."""
    offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(partials_ptr + slot.to(tl.int64) * (BLOCK_M * BLOCK_N) + offsets, acc)


@triton.jit
def _split_k_arrive(counters_ptr, tile, SPLIT_K: tl.constexpr):
    """Count this program's arrival on `tile`'s counter once its partials are stored (a CTA barrier
    first, then one release-acquire atomic: the partials of every thread are visible to whichever
    program arrives last). True in the program that arrives last."""
    tl.debug_barrier()
    return tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1


@triton.jit
def _split_k_total(partials_ptr, first_slot, last, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """In the last program: the sum of partial slots first_slot .. first_slot + SPLIT_K - 1 in slot
    order (bitwise the same whichever split arrives last), read from L2; zeros in the others."""
    tile_elements: tl.constexpr = BLOCK_M * BLOCK_N
    offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    readable = offsets < tile_elements * last.to(tl.int32)  # all of the tile in the last program, none elsewhere
    base = partials_ptr + first_slot.to(tl.int64) * tile_elements
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        total += tl.load(base + s * tile_elements + offsets, mask=readable, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _split_k_reset(counters_ptr, tile, last):
    """In the last program: set `tile`'s arrival counter back to zero for the next launch."""
    tl.atomic_xchg(counters_ptr + tile, 0, mask=last, sem="relaxed")


@triton.jit
def _split_k_sum(acc, partials_ptr, counters_ptr, tile, split,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(sum of the SPLIT_K partial tiles of `tile`, True in the program that arrived last).

    Every program stores its partial tile and arrives on the tile's counter; the last one sums the
    partials and resets the counter to zero for the next launch; the others get a zero tile and False.
    """
    _split_k_store(acc, partials_ptr, tile * SPLIT_K + split, BLOCK_M, BLOCK_N)
    last = _split_k_arrive(counters_ptr, tile, SPLIT_K)
    total = _split_k_total(partials_ptr, tile * SPLIT_K, last, SPLIT_K, BLOCK_M, BLOCK_N)
    _split_k_reset(counters_ptr, tile, last)
    return total, last


@triton.jit
def gemm_item_coords(item, M, N, K, k_split_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    """Where work item `item` of a GEMM lies: (tile, split, k_begin, k_end, pid_n, rows, row_ok,
    cols, col_ok). SPLIT_K consecutive items share an output tile, each over k_split_len of K;
    tiles are ordered so that GROUP_M row tiles sweep the column tiles together (a band of A stays
    in L2)."""
    tile, split, k_begin, k_end = split_k_range(item, K, k_split_len, SPLIT_K)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = tile // (GROUP_M * tiles_n)
    band_rows = tl.minimum(tiles_m - band * GROUP_M, GROUP_M)
    within = tile - band * GROUP_M * tiles_n
    pid_m = band * GROUP_M + within % band_rows
    pid_n = within // band_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return tile, split, k_begin, k_end, pid_n, rows, rows < M, cols, cols < N


@triton.jit
def linear_fused_item(
    tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok,
    a_ptr, weight_ptr, bias_ptr, out_ptr,
    stats_in_ptr, ln_weight_ptr, ln_bias_ptr, shift_ptr, scale_ptr,
    gate_ptr, residual_ptr, stats_out_ptr, partials_ptr, counters_ptr,
    M, N, K, a_row_period,
    stride_am, stride_wn, stride_wk, stride_om, stride_mod_m, stride_rm,
    stride_stats_in_m, stride_stats_out_m,
    ln_eps,
    PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, WRITE_STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATS_GROUP: tl.constexpr, STATS_CHUNK: tl.constexpr, SPLIT_K: tl.constexpr,
    PRELOAD_EPILOGUE: tl.constexpr,
):
    """One work item of out[M, N] = epilogue(prologue(A)[M, K] @ W[N, K]^T + b[N]) (coordinates
    from `gemm_item_coords`; see the module docstring), once the inputs are ready.

    A rows are read at (row % a_row_period) (the CFG input projection reuses the B state rows for
    both halves); A, out, residual and the modulation views have unit column stride. SPLIT_K > 1:
    the last of the tile's SPLIT_K items to finish sums their partial tiles (`_split_k_sum`) and
    applies the epilogue, the others store nothing. PRELOAD_EPILOGUE (small tiles) loads the
    epilogue's operands before the K loop instead of after it.
    """
    a_rows = (rows % a_row_period).to(tl.int64)
    if PRELOAD_EPILOGUE:  # issued before the K loop: their latency hides behind it instead of following it
        bias, gate, residual = _epilogue_operands(bias_ptr, gate_ptr, residual_ptr, rows, row_ok, cols, col_ok,
                                                  stride_mod_m, stride_rm, EPILOGUE == 2)
    if PROLOGUE != 0:
        mean, rstd = _row_layernorm_stats(stats_in_ptr, stride_stats_in_m, rows, row_ok, K, ln_eps,
                                          BLOCK_M, STATS_GROUP, STATS_CHUNK)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if PROLOGUE != 0:
            a = _ln_modulate_tile(a_ptr, stride_am, rows, row_ok, ks, k_ok, mean, rstd, ln_weight_ptr, ln_bias_ptr,
                                  shift_ptr, scale_ptr, stride_mod_m, PROLOGUE == 2)
        else:
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    if SPLIT_K > 1:
        acc, last = _split_k_sum(acc, partials_ptr, counters_ptr, tile, split, SPLIT_K, BLOCK_M, BLOCK_N)
        row_ok = rows < M * last.to(tl.int32)  # no rows outside the last program: the others store nothing
    if not PRELOAD_EPILOGUE:
        bias, gate, residual = _epilogue_operands(bias_ptr, gate_ptr, residual_ptr, rows, row_ok, cols, col_ok,
                                                  stride_mod_m, stride_rm, EPILOGUE == 2)

    y = acc + bias[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE == 1:
        y = y * tl.sigmoid(y)
    if EPILOGUE == 3:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    if EPILOGUE == 2:
        y = residual + gate * y
    tl.store(out_ptr + rows64 * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_STATS:
        _store_group_stats(y, rows, row_ok, pid_n * BLOCK_N, N, stats_out_ptr, stride_stats_out_m,
                           BLOCK_M, BLOCK_N, STATS_GROUP)


@triton.jit
def _linear_fused_kernel(
    a_ptr, weight_ptr, bias_ptr, out_ptr,
    stats_in_ptr, ln_weight_ptr, ln_bias_ptr, shift_ptr, scale_ptr,
    gate_ptr, residual_ptr, stats_out_ptr, partials_ptr, counters_ptr,
    M, N, K, a_row_period, k_split_len,
    stride_am, stride_wn, stride_wk, stride_om, stride_mod_m, stride_rm,
    stride_stats_in_m, stride_stats_out_m,
    ln_eps,
    PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, WRITE_STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STATS_GROUP: tl.constexpr, STATS_CHUNK: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
    PREFETCH_K: tl.constexpr, PRELOAD_EPILOGUE: tl.constexpr,
):
    """out[M, N] = epilogue(prologue(A)[M, K] @ W[N, K]^T + b[N]), one work item per program
    (`linear_fused_item`); see the module docstring."""
    tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok = gemm_item_coords(
        tl.program_id(0), M, N, K, k_split_len, BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K)
    if PREFETCH_K > 0:  # the weights are never written by the previous kernel: fetch them while it drains
        _prefetch_weights_to_l2(weight_ptr, cols, col_ok, k_begin, k_end, stride_wk, stride_wn, BLOCK_K, PREFETCH_K)
    wait_for_previous_grid(PDL)
    linear_fused_item(
        tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok,
        a_ptr, weight_ptr, bias_ptr, out_ptr, stats_in_ptr, ln_weight_ptr, ln_bias_ptr, shift_ptr, scale_ptr,
        gate_ptr, residual_ptr, stats_out_ptr, partials_ptr, counters_ptr, M, N, K, a_row_period,
        stride_am, stride_wn, stride_wk, stride_om, stride_mod_m, stride_rm, stride_stats_in_m, stride_stats_out_m,
        ln_eps, PROLOGUE, EPILOGUE, WRITE_STATS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STATS_GROUP, STATS_CHUNK,
        SPLIT_K, PRELOAD_EPILOGUE)


def interpreting():
    """True when this process's Triton kernels run under the CPU interpreter: TRITON_INTERPRET=1
    was set when they were defined (Triton reads it then; setting it after import changes nothing)."""
    return isinstance(wait_for_previous_grid, InterpretedFunction)


def gpu_configs(device):
    """True when launches on `device` use the GPU block configurations (CUDA); False: the small
    configurations the Triton CPU interpreter runs quickly."""
    return device.type == "cuda"


def programmatic_launch(device):
    """Launch options {PDL, launch_pdl} for kernels on `device` (pass both: a kernel launched with
    launch_pdl must start with `wait_for_previous_grid`). On for CUDA devices of compute
    capability 9.0 or newer (Hopper's grid dependency control) unless MARFAST_PDL=0; results are
    the same either way, only the gaps between kernels change."""
    setting = os.environ.get(PDL_ENV, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{PDL_ENV} must be 0 or 1, got {setting!r}")
    on = (setting == "1" and device.type == "cuda" and HAS_GRID_DEPENDENCY_CONTROL
          and torch.cuda.get_device_capability(device)[0] >= 9)
    return {"PDL": on, "launch_pdl": on}


def dot_precision(weight_dtype):
    """tl.dot input precision: IEEE fp32 unless torch allows TF32 matmuls (as cuBLAS would)."""
    if weight_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def stats_chunk(width, block_m):
    """STATS_CHUNK for block_m rows `width` wide: all their statistics groups (a power of two), at
    most MAX_STATS_CHUNK and STATS_TILE_ELEMENTS / block_m."""
    return max(1, min(_pow2(triton.cdiv(width, STATS_GROUP)), MAX_STATS_CHUNK, STATS_TILE_ELEMENTS // block_m))


def stats_shape(rows, width):
    """Shape of the LayerNorm partial-statistics buffer for a [rows, width] residual stream."""
    return (rows, triton.cdiv(width, STATS_GROUP), 2)


def _pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


def _candidate_configs(M, N, K, element_bytes, gpu, heavy_epilogue=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidates for this problem size
    (gpu: `gpu_configs(device)`; otherwise one small interpreter configuration).

    The last one is a fallback small enough for any device's shared memory, tried only when no
    other candidate fits; fp32 operands (element_bytes 4) take half the K depth per stage.
    heavy_epilogue (gated residual or LayerNorm statistics: the accumulator, the gate and the
    residual tiles live together; GELU: erf's temporaries) keeps at most 64 fp32 accumulator values
    per thread with 8 warps and 32 with 4: tiles beyond that spill registers on sm_90
    (tests/test_sm90_compile.py).
    """
    k_cap = max(16, _pow2(K)) if element_bytes == 2 else max(16, min(_pow2(K), 32))
    small_m = min(64, max(16, _pow2(M)))
    if not gpu:
        return [(small_m, min(64, max(32, _pow2(N))), min(64, max(16, _pow2(K))), 4, 1)]
    if M <= 64:  # weight-streaming bound: many narrow column tiles
        shapes = [(small_m, 32, 128, 4, 4), (small_m, 64, 64, 4, 4), (small_m, 32, 256, 4, 3)]
    elif M <= 512:
        shapes = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3)]
    else:  # matmul bound: large tiles
        shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4)]
    n_cap = max(32, _pow2(N))
    picked = []
    for bm, bn, bk, warps, stages in shapes + [(small_m, 64, 32, 4, 2)]:
        bn = min(bn, n_cap)
        if heavy_epilogue and bm * bn > 32 * 32 * warps:
            if bm * bn > 64 * 32 * 8:
                continue
            warps = 8
        config = (bm, bn, min(bk, k_cap), warps, stages)
        if config not in picked:
            picked.append(config)
    return picked


_TUNED = {}
_TIMINGS = {}  # (what, key) -> {config or way: ms per call, or the reason it could not run}
TUNE_REPEATS = 10
TUNE_EXACT_ROWS = 4096
TUNE_QUEUE_CYCLES = 5_000_000


def tuning_rows(rows):
    """The row count a tuning or timing decision is keyed on: exact up to TUNE_EXACT_ROWS, then the
    next power of two."""
    return rows if rows <= TUNE_EXACT_ROWS else triton.next_power_of_2(rows)


def time_launches(run, repeats=TUNE_REPEATS, queue_cycles=TUNE_QUEUE_CYCLES):
    """Milliseconds of `repeats` back-to-back calls of run() on the current CUDA stream (events; the
    GPU sleeps for queue_cycles clock cycles while the launches queue up, so kernels are timed, not
    Python: enough for all of them to be queued)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(queue_cycles)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _tuned_config(key, candidates, launch, what):
    """The fastest fitting candidate for `key` (timed once with CUDA events), or the only candidate.

    launch(config) runs the kernel; every launcher's kernel is idempotent (outputs never alias
    inputs), so timing reruns are harmless. what: the kernel's name in errors and `timed_choices`.
    """
    if len(candidates) == 1:
        return candidates[0]
    if key in _TUNED:
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what}: configuration for {key} was not tuned before CUDA graph capture; "
                           "run the same launch once eagerly first")
    timings, record = {}, {}
    for i, config in enumerate(candidates):
        if timings and i == len(candidates) - 1:
            break  # the fallback is for devices where nothing else fits
        try:
            launch(config)
        except triton.runtime.errors.OutOfResources as error:
            record[config] = f"out of resources: {error}"
            continue
        timings[config] = record[config] = time_launches(lambda: launch(config)) / TUNE_REPEATS
    if not timings:
        raise RuntimeError(f"{what}: no block configuration fits the device for {key}")
    _TUNED[key] = min(timings, key=timings.get)
    _TIMINGS[what, key] = record
    return _TUNED[key]


def fastest_way(choices, key, ways, what, queue_cycles=TUNE_QUEUE_CYCLES):
    """The name of the fastest of `ways` ({name: run}) for `key`, timed once with CUDA events
    (`time_launches`, queue_cycles: for ways of many launches) and remembered in the dict
    `choices`. Each run is called once untimed first (compiling and tuning its kernels). Never
    times during CUDA graph capture: a key first met there is an error naming `what` (run the
    same launch once eagerly first)."""
    if key not in choices:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{what}: the choice for {key} was not timed before CUDA graph capture; "
                               "run the same launch once eagerly first")
        for run in ways.values():
            run()
        timings = {name: time_launches(run, queue_cycles=queue_cycles) / TUNE_REPEATS for name, run in ways.items()}
        choices[key] = min(timings, key=timings.get)
        _TIMINGS[what, key] = timings
    return choices[key]


def timed_choices():
    """Every timing decision made in this process, for profiles and benchmark records: a list of
    {"what", "key", "ms_per_call": {candidate: ms or why it could not run}, "chosen"} (candidates are
    block configurations (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K]) or way names)."""
    decisions = []
    for (what, key), record in _TIMINGS.items():
        timed = {name: ms for name, ms in record.items() if not isinstance(ms, str)}
        decisions.append({"what": what, "key": [str(part) for part in key],
                          "ms_per_call": {str(name): ms for name, ms in record.items()},
                          "chosen": str(min(timed, key=timed.get))})
    return decisions


def _check_matrix(name, t, rows, cols, device, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        raise ValueError(f"{name} must have shape ({rows}, {cols}), got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {t.stride()}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_vector(name, t, length, device):
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != length or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point vector of length {length}, got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.stride(0) != 1 and length > 1:
        raise ValueError(f"{name} must be contiguous")


def _check_stats(name, t, rows, width, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != stats_shape(rows, width) or t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 of shape {stats_shape(rows, width)}, got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device or t.stride(2) != 1 or t.stride(1) != 2:
        raise ValueError(f"{name} must be on {device} with packed (group, 2) layout")


def _check_no_alias(out_name, out, in_name, inp):
    if out.data_ptr() == inp.data_ptr():
        raise ValueError(f"{out_name} must not alias {in_name} (the launch must be repeatable)")


SPLIT_K_PROGRAMS = 128


def split_parts(k_steps, wanted):
    """How many parts to split k_steps K steps into: about `wanted` (at most k_steps), none empty."""
    return triton.cdiv(k_steps, triton.cdiv(k_steps, min(wanted, k_steps)))


def split_length(K, block_k, split):
    """K elements per part when K is split into `split` parts of whole BLOCK_K steps."""
    return triton.cdiv(triton.cdiv(K, block_k), split) * block_k


def check_split_k(split_k, device):
    """split_k must be None or a SplitKWorkspace on `device`."""
    if split_k is not None and (not isinstance(split_k, SplitKWorkspace) or split_k.device != device):
        raise ValueError(f"split_k must be a SplitKWorkspace on {device}, got {split_k!r}")


def _with_split_k(configs, M, N, K, gpu, has_workspace):
    """Each configuration as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K): unsplit,
    and (with a split-K workspace, on a GPU, all but the fallback) where it has fewer than
    SPLIT_K_PROGRAMS output tiles also split along K into enough parts that about
    SPLIT_K_PROGRAMS programs run. A GEMM of few rows has few output tiles (32 for N = 1024 in
    32-column tiles at up to 64 rows, or in 64 x 64 tiles at 128 rows): split, more SMs stream its
    weights, each over fewer K steps; the tuner keeps whichever runs faster.
    """
    *tuned, fallback = configs
    out = []
    for bm, bn, bk, warps, stages in tuned:
        out.append((bm, bn, bk, warps, stages, 1))
        tiles, k_steps = triton.cdiv(M, bm) * triton.cdiv(N, bn), triton.cdiv(K, bk)
        if gpu and has_workspace and tiles < SPLIT_K_PROGRAMS:
            split = split_parts(k_steps, triton.cdiv(SPLIT_K_PROGRAMS, tiles))
            if split > 1:
                out.append((bm, bn, bk, warps, stages, split))
    return out + [fallback + (1,)]


class SplitKWorkspace:
    """Scratch of split-K launches on one device: fp32 partial tiles and int32 per-tile arrival
    counters, zero between launches (the last program of each tile resets its counter). Launches
    sharing a workspace must run one after another on one stream. The buffers grow on demand,
    never during CUDA graph capture (the tuner's eager launches size them first)."""

    def __init__(self, device):
        self.partials = torch.empty(0, device=device, dtype=torch.float32)
        self.counters = torch.zeros(0, device=device, dtype=torch.int32)
        self.device = self.partials.device  # "cuda" resolves to the current device, as tensors' devices do

    def reserve(self, partial_elements, tiles):
        if self.partials.numel() >= partial_elements and self.counters.numel() >= tiles:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("SplitKWorkspace must be sized before CUDA graph capture; run the launch once eagerly")
        self.partials = torch.empty(max(partial_elements, self.partials.numel()), device=self.device,
                                    dtype=torch.float32)
        self.counters = torch.zeros(max(tiles, self.counters.numel()), device=self.device, dtype=torch.int32)


def _launch(a, weight, bias, out, *, a_row_period=None, prologue=PROLOGUE_NONE, stats_in=None, ln_weight=None,
            ln_bias=None, shift=None, scale=None, ln_eps=1e-6, epilogue=EPILOGUE_BIAS, gate=None, residual=None,
            stats_out=None, split_k=None):
    M, N = out.shape
    K = weight.shape[1]
    check_split_k(split_k, out.device)
    mod = shift if shift is not None else gate
    dummy = out
    args = dict(
        a_ptr=a, weight_ptr=weight, bias_ptr=bias, out_ptr=out,
        stats_in_ptr=dummy if stats_in is None else stats_in,
        ln_weight_ptr=dummy if ln_weight is None else ln_weight,
        ln_bias_ptr=dummy if ln_bias is None else ln_bias,
        shift_ptr=dummy if shift is None else shift, scale_ptr=dummy if scale is None else scale,
        gate_ptr=dummy if gate is None else gate, residual_ptr=dummy if residual is None else residual,
        stats_out_ptr=dummy if stats_out is None else stats_out,
        M=M, N=N, K=K, a_row_period=a.shape[0] if a_row_period is None else a_row_period,
        stride_am=a.stride(0), stride_wn=weight.stride(0), stride_wk=weight.stride(1), stride_om=out.stride(0),
        stride_mod_m=0 if mod is None else mod.stride(0), stride_rm=0 if residual is None else residual.stride(0),
        stride_stats_in_m=0 if stats_in is None else stats_in.stride(0),
        stride_stats_out_m=0 if stats_out is None else stats_out.stride(0),
        ln_eps=float(ln_eps),
        PROLOGUE=prologue, EPILOGUE=epilogue, WRITE_STATS=stats_out is not None,
        DOT_PRECISION=dot_precision(weight.dtype), GROUP_M=GROUP_M, STATS_GROUP=STATS_GROUP,
        **programmatic_launch(out.device),
    )
    if M == 0 or N == 0:
        return out

    def run(config):
        block_m, block_n, block_k, warps, stages, split = config
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        k_split_len = split_length(K, block_k, split)
        if split > 1:
            split_k.reserve(tiles * split * block_m * block_n, tiles)
        prefetch_k = min(block_k, 128 // weight.element_size()) if args["PDL"] and M <= SKINNY_MAX_ROWS else 0
        _linear_fused_kernel[(tiles * split,)](
            **args, partials_ptr=split_k.partials if split > 1 else dummy,
            counters_ptr=split_k.counters if split > 1 else dummy, k_split_len=k_split_len,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, PREFETCH_K=prefetch_k,
            STATS_CHUNK=stats_chunk(K, block_m), PRELOAD_EPILOGUE=M <= SKINNY_MAX_ROWS, num_warps=warps,
            num_stages=stages)

    gpu = gpu_configs(out.device)
    configs = _candidate_configs(M, N, K, weight.element_size(), gpu,
                                 epilogue in (EPILOGUE_GATED_RESIDUAL, EPILOGUE_BIAS_GELU) or stats_out is not None)
    configs = _with_split_k(configs, M, N, K, gpu, split_k is not None)
    key = (prologue, epilogue, stats_out is not None, tuning_rows(M), N, K, a.dtype, weight.dtype, out.dtype,
           args["DOT_PRECISION"], str(out.device), split_k is not None)
    run(_tuned_config(key, configs, run, f"GEMM ({PROLOGUE_NAMES[prologue]}{EPILOGUE_NAMES[epilogue]} epilogue)"))
    return out


def _check_linear(a, weight, bias, out, a_dtypes=None):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {weight.dtype}")
    device = weight.device
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels need a CUDA device or TRITON_INTERPRET=1, got tensors on {device}")
    n, k = weight.shape
    _check_matrix("a", a, None, k, device, a_dtypes)
    _check_vector("bias", bias, n, device)
    _check_matrix("out", out, None, n, device)
    return device, n, k


def linear(a, weight, bias, out):
    """out[M, N] = a[M, K] @ weight[N, K]^T + bias[N] (fp32 accumulation, out in its own dtype).

    a: any float dtype (cast to weight dtype before the dot); weight: fp32/bf16/fp16 [N, K];
    bias: float [N]; out: preallocated [M, N], unit column stride. Returns out.
    """
    return _linear_with_epilogue(a, weight, bias, out, EPILOGUE_BIAS)


def linear_gelu(a, weight, bias, out):
    """out[M, N] = GELU(a[M, K] @ weight[N, K]^T + bias[N]), the exact GELU in the fp32 epilogue;
    arguments as in `linear`. Returns out."""
    return _linear_with_epilogue(a, weight, bias, out, EPILOGUE_BIAS_GELU)


def _linear_with_epilogue(a, weight, bias, out, epilogue):
    _check_linear(a, weight, bias, out)
    if out.shape[0] != a.shape[0]:
        raise ValueError(f"out must have {a.shape[0]} rows, got {out.shape[0]}")
    _check_no_alias("out", out, "a", a)
    return _launch(a, weight, bias, out, epilogue=epilogue)


def input_projection(state, weight, bias, residual_out, stats_out):
    """The first layer of a diffusion step: the residual stream and its LayerNorm statistics.

    residual_out[r] = state[r % S] @ weight^T + bias   (fp32 [R, W]; S = state rows, R a multiple
    of S: with CFG R = 2S and both halves start from the same state), and its LayerNorm group
    statistics into stats_out (fp32 stats_shape(R, W)). state: [S, C] float; weight [W, C];
    bias: float [W].
    """
    device, width, _ = _check_linear(state, weight, bias, residual_out)
    rows = residual_out.shape[0]
    if residual_out.dtype != torch.float32:
        raise TypeError(f"residual_out must be float32, got {residual_out.dtype}")
    if state.shape[0] == 0 or rows % state.shape[0]:
        raise ValueError(f"residual_out rows ({rows}) must be a positive multiple of state rows ({state.shape[0]})")
    _check_stats("stats_out", stats_out, rows, width, device)
    return _launch(state, weight, bias, residual_out, a_row_period=state.shape[0], stats_out=stats_out)


def linear_ln_modulate_silu(residual, stats, ln_weight, ln_bias, shift, scale, weight, bias, out, ln_eps=1e-6,
                            split_k=None):
    """out = SiLU(modulate(LayerNorm(residual), shift, scale) @ weight^T + bias), one GEMM.

    residual: fp32 [M, K] with its group statistics `stats` (stats_shape(M, K)); ln_weight,
    ln_bias: float [K] (both None for a parameter-free LayerNorm); shift, scale: [M, K] views
    sharing one row stride (the adaLN modulation buffer); weight [N, K]; out [M, N]. split_k:
    a `SplitKWorkspace` lets the tuner also try K-split configurations (for fewer output tiles
    than SPLIT_K_PROGRAMS, on CUDA). The LN-modulate runs in the GEMM's prologue or as its own pass before a plain
    GEMM (above PROLOGUE_MAX_ROWS; at fewer rows on CUDA whichever is timed faster); above
    PROLOGUE_MAX_ROWS on CUDA that GEMM is the Triton one (bias + SiLU epilogue) or cuBLAS followed
    by an in-place SiLU, whichever is timed faster (the latter needs out in the weight dtype).
    Returns out.
    """
    device, _, k = _check_linear(residual, weight, bias, out, (torch.float32,))
    rows = residual.shape[0]
    _check_stats("stats", stats, rows, k, device)
    for name, t in (("shift", shift), ("scale", scale)):
        _check_matrix(name, t, rows, k, device)
    if shift.stride(0) != scale.stride(0):
        raise ValueError("shift and scale must share one row stride (views of the modulation buffer)")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must be given together")
    if ln_weight is not None:
        _check_vector("ln_weight", ln_weight, k, device)
        _check_vector("ln_bias", ln_bias, k, device)
    _check_matrix("out", out, rows, None, device)
    _check_no_alias("out", out, "residual", residual)

    def modulated():
        """The LN-modulate of residual, written once in the weight dtype."""
        buffer = torch.empty(rows, k, device=device, dtype=weight.dtype)
        block_m, block_k = 32, 128
        _ln_modulate_kernel[(triton.cdiv(rows, block_m), triton.cdiv(k, block_k))](
            residual, stats, residual if ln_weight is None else ln_weight, residual if ln_bias is None else ln_bias,
            shift, scale, buffer, rows, k, residual.stride(0), stats.stride(0), shift.stride(0), buffer.stride(0),
            float(ln_eps), AFFINE=ln_weight is not None, BLOCK_M=block_m, BLOCK_K=block_k,
            STATS_GROUP=STATS_GROUP, STATS_CHUNK=stats_chunk(k, block_m),
            num_warps=8, **programmatic_launch(device))  # the tile and the statistics are in flight together
        return buffer

    def two_pass():
        return _launch(modulated(), weight, bias, out, epilogue=EPILOGUE_BIAS_SILU, split_k=split_k)

    def two_pass_cublas():
        torch.addmm(bias.to(weight.dtype), modulated(), weight.t(), out=out)
        return F.silu(out, inplace=True)

    def fused_prologue():
        prologue = PROLOGUE_LN_MODULATE if ln_weight is None else PROLOGUE_LN_AFFINE_MODULATE
        return _launch(residual, weight, bias, out, prologue=prologue, stats_in=stats, ln_weight=ln_weight,
                       ln_bias=ln_bias, shift=shift, scale=scale, ln_eps=ln_eps, epilogue=EPILOGUE_BIAS_SILU,
                       split_k=split_k)

    if not gpu_configs(device):
        return two_pass() if rows > PROLOGUE_MAX_ROWS else fused_prologue()
    # not keyed on PDL: the ways round differently, and the loop must give the same result with PDL on and off
    key = (tuning_rows(rows), k, out.shape[1], weight.dtype, out.dtype, dot_precision(weight.dtype),
           ln_weight is not None, str(device), split_k is not None)
    if rows <= PROLOGUE_MAX_ROWS:
        ways = {"fused_prologue": fused_prologue, "two_pass": two_pass}
        return ways[fastest_way(_PROLOGUE_CHOICE, key, ways, "linear_ln_modulate_silu's LayerNorm-modulate prologue")]()
    if out.dtype != weight.dtype:
        return two_pass()
    ways = {"two_pass": two_pass, "two_pass_cublas": two_pass_cublas}
    return ways[fastest_way(_GEMM_WAY_CHOICE, ("linear_ln_modulate_silu",) + key, ways,
                            "linear_ln_modulate_silu's GEMM (Triton or cuBLAS)")]()


def linear_gated_residual(hidden, weight, bias, gate, residual, residual_out, stats_out, split_k=None):
    """residual_out = residual + gate * (hidden @ weight^T + bias), with LayerNorm group statistics.

    hidden: [M, K] float; weight [N, K]; gate: [M, N] view (modulation buffer); residual,
    residual_out: fp32 [M, N], distinct buffers; stats_out: fp32 stats_shape(M, N); split_k: as
    in `linear_ln_modulate_silu`. Above SKINNY_MAX_ROWS on CUDA, one Triton GEMM with this
    epilogue or a cuBLAS GEMM followed by the epilogue as its own pass
    (`_gated_residual_stats_kernel`), whichever is timed faster. Returns residual_out.
    """
    device, n, _ = _check_linear(hidden, weight, bias, residual_out)
    rows = hidden.shape[0]
    _check_matrix("gate", gate, rows, n, device)
    _check_matrix("residual", residual, rows, n, device, (torch.float32,))
    _check_matrix("residual_out", residual_out, rows, n, device, (torch.float32,))
    _check_stats("stats_out", stats_out, rows, n, device)
    _check_no_alias("residual_out", residual_out, "residual", residual)

    def fused_epilogue():
        return _launch(hidden, weight, bias, residual_out, epilogue=EPILOGUE_GATED_RESIDUAL, gate=gate,
                       residual=residual, stats_out=stats_out, split_k=split_k)

    def cublas_gemm():
        h = torch.addmm(bias.to(weight.dtype), hidden.to(weight.dtype), weight.t())
        block_m, block_n = 16, 4 * STATS_GROUP
        _gated_residual_stats_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n))](
            h, gate, residual, residual_out, stats_out, rows, n, h.stride(0), gate.stride(0), residual.stride(0),
            residual_out.stride(0), stats_out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, STATS_GROUP=STATS_GROUP,
            num_warps=4, **programmatic_launch(device))
        return residual_out

    if rows <= SKINNY_MAX_ROWS or not gpu_configs(device):
        return fused_epilogue()
    key = ("linear_gated_residual", tuning_rows(rows), n, hidden.shape[1], hidden.dtype, weight.dtype, gate.dtype,
           dot_precision(weight.dtype), str(device))  # not keyed on PDL, as in linear_ln_modulate_silu
    ways = {"fused_epilogue": fused_epilogue, "cublas_gemm": cublas_gemm}
    return ways[fastest_way(_GEMM_WAY_CHOICE, key, ways, "linear_gated_residual's GEMM (Triton or cuBLAS)")]()
