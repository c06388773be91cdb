"""The diffusion head's final layer fused with one reverse DDPM step: x_t -> x_{t-1}.

For state rows r in [0, B) (one program per BLOCK_M rows: `final_layer_ddpm_item`, which the
one-launch DDPM loop of ddpm_sample_loop.py runs too), in fp32:

    a_c   = modulate(LayerNorm(h[r]), shift[r], scale[r])          (parameter-free LN, eps 1e-6)
    eps_c = a_c @ W[:C]^T + b[:C];   v = a_c @ W[C:2C]^T + b[C:2C]  (final linear, 2C outputs)
    with CFG (net row r + uncond_row_offset holds the unconditional twin of row r):
      eps = eps_u + cfg * (eps_c - eps_u),  eps_u from the unconditional row; v stays conditional
    frac    = (v + 1) / 2
    log_var = frac * log(beta_t) + (1 - frac) * posterior_log_variance_clipped_t
    x0      = sqrt(1 / abar_t) * x_t - sqrt(1 / abar_t - 1) * eps     [clamped to (lo, hi) if CLIP_X0]
    x_{t-1} = coef1_t * x0 + coef2_t * x_t  [+ exp(log_var / 2) * noise * temperature   if t > 0]

h is the fp32 residual stream after the last block with its LayerNorm group statistics (see
kernels/linear_fused.py). At few rows one row block is the whole grid, so the launcher also tries
splitting the width (K) over SPLIT_K programs (given a `SplitKWorkspace`): each stores its partial
eps_c, v and eps_u tiles, and the last to arrive sums them in split order and runs the update, as
the split-K GEMMs of linear_fused do; the step's table values are scalar arguments (fixed per step, so a
captured CUDA graph bakes them), while cfg, temperature and the clip range are read from a small
device tensor so that one graph serves every value.
"""
import torch
import triton
import triton.language as tl

from .linear_fused import (SKINNY_MAX_ROWS, STATS_GROUP, WEIGHT_DTYPES, _check_matrix, _check_stats,
                           _check_vector, _ln_modulate_tile, _row_layernorm_stats, _split_k_arrive, _split_k_reset,
                           _split_k_store, _split_k_total, _tuned_config, check_split_k, dot_precision, gpu_configs,
                           interpreting, programmatic_launch, split_k_range, split_length, split_parts, stats_chunk,
                           wait_for_previous_grid)

SCALARS = ("cfg", "temperature", "clip_lo", "clip_hi")
SPLIT_K_PARTS = (4, 16)  # K-split candidates at few rows (each capped by the width's K steps)


@triton.jit
def final_layer_ddpm_item(
    pid, split, k_begin, k_end,
    residual_ptr, stats_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr,
    state_ptr, noise_ptr, out_ptr, scalars_ptr, partials_ptr, counters_ptr,
    rows, width, channels, uncond_row_offset,
    stride_rm, stride_stats_m, stride_mod_m, stride_wn, stride_wk, stride_xm, stride_nm, stride_om,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2,
    log_beta, posterior_log_variance_clipped, ln_eps, add_noise,
    USE_CFG: tl.constexpr, CLIP_X0: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    STATS_GROUP: tl.constexpr, STATS_CHUNK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Row block `pid` (K range [k_begin, k_end), part `split` of SPLIT_K) of x_{t-1} [B, C] from
    state x_t [B, C], the last residual h and the final layer, once the inputs are ready; see the
    module docstring. add_noise (t > 0; a constant or a runtime flag) adds the step's noise.

    SPLIT_K > 1: SPLIT_K items share a row block, each over part of the width; partial slots of
    row block p: 3 * SPLIT_K from p * 3 * SPLIT_K (eps_c, v, eps_u, split-major)."""
    cond_rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = cond_rows < rows
    uncond_rows = cond_rows + uncond_row_offset
    channel = tl.arange(0, BLOCK_C)
    channel_ok = channel < channels
    # the update's inputs, loaded (in every program) before the K loop, whose time hides their latency
    rows64 = cond_rows.to(tl.int64)[:, None]
    tile_mask = row_ok[:, None] & channel_ok[None, :]
    bias_eps = tl.load(bias_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)
    bias_v = tl.load(bias_ptr + channels + channel, mask=channel_ok, other=0.0).to(tl.float32)
    x_t = tl.load(state_ptr + rows64 * stride_xm + channel[None, :], mask=tile_mask, other=0.0)
    if USE_CFG:
        cfg = tl.load(scalars_ptr)
    temperature = tl.load(scalars_ptr + 1)
    noise = tl.load(noise_ptr + rows64 * stride_nm + channel[None, :], mask=tile_mask & add_noise, other=0.0)
    if CLIP_X0:
        clip_lo = tl.load(scalars_ptr + 2)
        clip_hi = tl.load(scalars_ptr + 3)

    if USE_CFG:  # both rows of each pair in one read of the statistics (one round trip, not two)
        pair = tl.arange(0, 2 * BLOCK_M)
        pair_rows = pid * BLOCK_M + pair // 2
        mean, rstd = _row_layernorm_stats(stats_ptr, stride_stats_m, pair_rows + (pair % 2) * uncond_row_offset,
                                          pair_rows < rows, width, ln_eps, 2 * BLOCK_M, STATS_GROUP, STATS_CHUNK)
        mean_c, mean_u = tl.split(tl.reshape(mean, [BLOCK_M, 2]))
        rstd_c, rstd_u = tl.split(tl.reshape(rstd, [BLOCK_M, 2]))
    else:
        mean_c, rstd_c = _row_layernorm_stats(stats_ptr, stride_stats_m, cond_rows, row_ok, width, ln_eps,
                                              BLOCK_M, STATS_GROUP, STATS_CHUNK)

    eps_c = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    v_c = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    eps_u = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < width
        w_mask = k_ok[:, None] & channel_ok[None, :]
        w_eps = tl.load(weight_ptr + ks[:, None] * stride_wk + channel[None, :] * stride_wn, mask=w_mask, other=0.0)
        w_v = tl.load(weight_ptr + ks[:, None] * stride_wk + (channel + channels)[None, :] * stride_wn,
                      mask=w_mask, other=0.0)
        a_c = _ln_modulate_tile(residual_ptr, stride_rm, cond_rows, row_ok, ks, k_ok, mean_c, rstd_c,
                                residual_ptr, residual_ptr, shift_ptr, scale_ptr, stride_mod_m, False).to(w_eps.dtype)
        eps_c = tl.dot(a_c, w_eps, eps_c, input_precision=DOT_PRECISION)
        v_c = tl.dot(a_c, w_v, v_c, input_precision=DOT_PRECISION)
        if USE_CFG:
            a_u = _ln_modulate_tile(residual_ptr, stride_rm, uncond_rows, row_ok, ks, k_ok, mean_u, rstd_u,
                                    residual_ptr, residual_ptr, shift_ptr, scale_ptr, stride_mod_m,
                                    False).to(w_eps.dtype)
            eps_u = tl.dot(a_u, w_eps, eps_u, input_precision=DOT_PRECISION)
    if SPLIT_K > 1:
        first = pid * 3 * SPLIT_K
        _split_k_store(eps_c, partials_ptr, first + split, BLOCK_M, BLOCK_C)
        _split_k_store(v_c, partials_ptr, first + SPLIT_K + split, BLOCK_M, BLOCK_C)
        if USE_CFG:
            _split_k_store(eps_u, partials_ptr, first + 2 * SPLIT_K + split, BLOCK_M, BLOCK_C)
        last = _split_k_arrive(counters_ptr, pid, SPLIT_K)
        eps_c = _split_k_total(partials_ptr, first, last, SPLIT_K, BLOCK_M, BLOCK_C)
        v_c = _split_k_total(partials_ptr, first + SPLIT_K, last, SPLIT_K, BLOCK_M, BLOCK_C)
        if USE_CFG:
            eps_u = _split_k_total(partials_ptr, first + 2 * SPLIT_K, last, SPLIT_K, BLOCK_M, BLOCK_C)
        _split_k_reset(counters_ptr, pid, last)
        row_ok = cond_rows < rows * last.to(tl.int32)  # only the last program writes

    eps = eps_c + bias_eps[None, :]
    if USE_CFG:
        eps_uncond = eps_u + bias_eps[None, :]
        eps = eps_uncond + cfg * (eps - eps_uncond)
    v = v_c + bias_v[None, :]

    frac = (v + 1.0) * 0.5
    log_var = frac * log_beta + (1.0 - frac) * posterior_log_variance_clipped
    x0 = sqrt_recip_alphas_cumprod * x_t - sqrt_recipm1_alphas_cumprod * eps
    if CLIP_X0:
        x0 = tl.minimum(tl.maximum(x0, clip_lo), clip_hi)
    x_prev = posterior_mean_coef1 * x0 + posterior_mean_coef2 * x_t
    x_prev = tl.where(add_noise, x_prev + tl.exp(0.5 * log_var) * noise * temperature, x_prev)
    tl.store(out_ptr + rows64 * stride_om + channel[None, :], x_prev, mask=row_ok[:, None] & channel_ok[None, :])


@triton.jit
def _final_layer_ddpm_step_kernel(
    residual_ptr, stats_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr,
    state_ptr, noise_ptr, out_ptr, scalars_ptr, partials_ptr, counters_ptr,
    rows, width, channels, uncond_row_offset, k_split_len,
    stride_rm, stride_stats_m, stride_mod_m, stride_wn, stride_wk, stride_xm, stride_nm, stride_om,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2,
    log_beta, posterior_log_variance_clipped, ln_eps,
    USE_CFG: tl.constexpr, ADD_NOISE: tl.constexpr, CLIP_X0: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    STATS_GROUP: tl.constexpr, STATS_CHUNK: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    """out[B, C] = x_{t-1}, one row block (or one width part of it) per program
    (`final_layer_ddpm_item`); see the module docstring."""
    wait_for_previous_grid(PDL)
    pid, split, k_begin, k_end = split_k_range(tl.program_id(0), width, k_split_len, SPLIT_K)
    final_layer_ddpm_item(
        pid, split, k_begin, k_end, residual_ptr, stats_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr,
        state_ptr, noise_ptr, out_ptr, scalars_ptr, partials_ptr, counters_ptr, rows, width, channels,
        uncond_row_offset, stride_rm, stride_stats_m, stride_mod_m, stride_wn, stride_wk, stride_xm, stride_nm,
        stride_om, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
        posterior_mean_coef2, log_beta, posterior_log_variance_clipped, ln_eps, ADD_NOISE, USE_CFG, CLIP_X0,
        DOT_PRECISION, BLOCK_M, BLOCK_C, BLOCK_K, STATS_GROUP, STATS_CHUNK, SPLIT_K)


STEP_COEFFICIENTS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                     "posterior_mean_coef2", "log_beta", "posterior_log_variance_clipped")  # the kernel's names


def coefficient_tables(diffusion):
    """The float64 [S] tables of a GaussianDiffusion behind STEP_COEFFICIENTS, in that order."""
    return (diffusion.sqrt_recip_alphas_cumprod, diffusion.sqrt_recipm1_alphas_cumprod, diffusion.posterior_mean_coef1,
            diffusion.posterior_mean_coef2, diffusion.log_betas, diffusion.posterior_log_variance_clipped)


def step_coefficients(diffusion, step):
    """The per-step table values the kernel takes as scalars (python floats, rounded to fp32)."""
    return {name: float(table[step]) for name, table in zip(STEP_COEFFICIENTS, coefficient_tables(diffusion))}


def _candidate_block_sizes(rows, width, channels, gpu, has_workspace=False):
    """(BLOCK_M, BLOCK_C, BLOCK_K, num_warps, SPLIT_K) candidates, the last a fallback (see
    `_tuned_config`).

    The grid has one program per BLOCK_M state rows, each walking the whole width one K step
    after another, waiting on its LayerNorm and modulation loads. At few rows wider K steps (more
    loads in flight per step) are tried, and (with a split-K workspace) the width split over
    SPLIT_K_PARTS programs: one row block is then the whole grid. At more rows also narrower row
    blocks: 64-row programs give 2048 state rows only 32 programs, a quarter of an H100's SMs."""
    block_c = max(16, triton.next_power_of_2(channels))
    block_k = min(64, max(16, triton.next_power_of_2(width)))
    if not gpu:
        return [(min(64, max(16, triton.next_power_of_2(rows))), block_c, block_k, 4, 1)]
    block_m = 16 if rows <= 16 else 32 if rows <= 1024 else 64
    shapes = [(block_m, block_k, 4, 1)]
    if rows <= SKINNY_MAX_ROWS:
        widest = max(16, triton.next_power_of_2(width))
        shapes += [(block_m, min(k, widest), warps, 1) for k, warps in ((128, 8), (256, 8))]
        k_steps = triton.cdiv(width, block_k)
        for parts in SPLIT_K_PARTS if has_workspace else ():
            split = split_parts(k_steps, parts)
            if split > 1:
                shapes.append((block_m, block_k, 4, split))
    else:
        shapes += [(m, block_k, 4, 1) for m in (16, 32) if m < block_m]
    candidates = []
    for m, k, warps, split in shapes + [(block_m, min(32, block_k), 4, 1)]:
        if (m, block_c, k, warps, split) not in candidates:
            candidates.append((m, block_c, k, warps, split))
    return candidates


def final_layer_ddpm_step(residual, stats, shift, scale, weight, bias, state, noise, out, scalars, coefficients, *,
                          use_cfg, uncond_row_offset=0, add_noise=True, clip_x0=False, ln_eps=1e-6, split_k=None):
    """Write x_{t-1} [B, C] (fp32) into `out` from x_t `state` [B, C]; returns out.

    residual: fp32 [R, W] last residual stream (R >= B; with CFG row r + uncond_row_offset is the
    unconditional twin of row r) and its LayerNorm group statistics `stats` (fp32
    stats_shape(R, W)); shift, scale: [R, W] views of the final layer's adaLN modulation (one row
    stride); weight [2C, W] (fp32/bf16/fp16), bias float [2C]; state, noise, out: fp32 [B, C]
    (out distinct from state); scalars: fp32 device tensor [4] = (cfg, temperature, clip_lo,
    clip_hi); coefficients: `step_coefficients(diffusion, step)`. add_noise: t > 0; clip_x0:
    clamp the x0 prediction to (clip_lo, clip_hi). split_k: a `SplitKWorkspace` lets the tuner
    also try splitting the width over several programs (at most SKINNY_MAX_ROWS rows, on CUDA).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be a 2-D tensor with dtype in {WEIGHT_DTYPES}")
    device = weight.device
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels need a CUDA device or TRITON_INTERPRET=1, got tensors on {device}")
    if weight.shape[0] % 2:
        raise ValueError(f"weight must have 2C rows (eps, v), got {tuple(weight.shape)}")
    channels, width = weight.shape[0] // 2, weight.shape[1]
    net_rows = residual.shape[0] if isinstance(residual, torch.Tensor) and residual.dim() == 2 else None
    _check_matrix("residual", residual, net_rows, width, device, (torch.float32,))
    _check_stats("stats", stats, net_rows, width, device)
    for name, t in (("shift", shift), ("scale", scale)):
        _check_matrix(name, t, net_rows, width, device)
    if shift.stride(0) != scale.stride(0):
        raise ValueError("shift and scale must share one row stride (views of the modulation buffer)")
    _check_vector("bias", bias, 2 * channels, device)
    rows = state.shape[0] if isinstance(state, torch.Tensor) and state.dim() == 2 else None
    for name, t in (("state", state), ("noise", noise), ("out", out)):
        _check_matrix(name, t, rows, channels, device, (torch.float32,))
    if out.data_ptr() == state.data_ptr():
        raise ValueError("out must not alias state")
    check_split_k(split_k, device)
    if not isinstance(scalars, torch.Tensor) or scalars.dtype != torch.float32 or tuple(scalars.shape) != (4,) \
            or scalars.device != device or not scalars.is_contiguous():
        raise ValueError(f"scalars must be a contiguous float32 tensor [4] {SCALARS} on {device}")
    last_row = rows + (uncond_row_offset if use_cfg else 0)
    if uncond_row_offset < 0 or last_row > net_rows or (use_cfg and uncond_row_offset < rows):
        raise ValueError(f"{rows} state rows with uncond_row_offset={uncond_row_offset} do not fit {net_rows} net rows")
    if rows == 0:
        return out

    def run(config):
        block_m, block_c, block_k, warps, split = config
        tiles = triton.cdiv(rows, block_m)
        if split > 1:
            split_k.reserve(tiles * 3 * split * block_m * block_c, tiles)
        _final_layer_ddpm_step_kernel[(tiles * split,)](
            residual, stats, shift, scale, weight, bias, state, noise, out, scalars,
            split_k.partials if split > 1 else out, split_k.counters if split > 1 else out,
            rows, width, channels, uncond_row_offset, split_length(width, block_k, split),
            residual.stride(0), stats.stride(0), shift.stride(0), weight.stride(0), weight.stride(1),
            state.stride(0), noise.stride(0), out.stride(0),
            **coefficients, ln_eps=float(ln_eps),
            USE_CFG=bool(use_cfg), ADD_NOISE=bool(add_noise), CLIP_X0=bool(clip_x0),
            DOT_PRECISION=dot_precision(weight.dtype), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k,
            STATS_GROUP=STATS_GROUP, STATS_CHUNK=stats_chunk(width, 2 * block_m if use_cfg else block_m),
            SPLIT_K=split, num_warps=warps, num_stages=2, **programmatic_launch(device))

    candidates = _candidate_block_sizes(rows, width, channels, gpu_configs(device), split_k is not None)
    key = ("final_layer_ddpm_step", rows, net_rows, width, channels, weight.dtype, bool(use_cfg), bool(add_noise),
           bool(clip_x0), str(device), split_k is not None)
    run(_tuned_config(key, candidates, run, "final_layer_ddpm_step"))
    return out
