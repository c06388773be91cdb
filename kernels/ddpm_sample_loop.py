"""Several reverse DDPM steps of the diffusion head in one launch, for few rows (a persistent grid).

At a few rows (MAR at batch 1 to 8 with CFG: 8 to 64 net rows) a DDPM step of the fused head is a
chain of small weight-streaming kernels (`fused_head`: input projection, two GEMMs per block, the
final layer), and the time between them (kernel boundaries, each kernel's start-up and first
memory round trips) is a large part of the step. Here one launch runs steps hi, hi - 1, ..., lo:

    for each step:  input projection  | block 0 fc1 | block 0 fc2 | ... | final layer + DDPM update
                    ^ phases, separated by grid barriers instead of kernel boundaries

A grid of P programs (at most one per SM, so all are resident at once) walks the same phases as
the launch chain, with the same per-item code (`linear_fused_item`, `final_layer_ddpm_item`): each
phase's work items (output tiles x K parts) are dealt to the programs round-robin, and a grid
barrier (an arrival counter, release-acquire) separates consecutive phases. Before waiting at a
barrier a program asks L2 for the weights of its items in the next phase. The DDPM state x never
leaves the GPU between steps (two [S, C] fp32 buffers in L2, swapped every step); the weights are
streamed once per step; the adaLN modulations of all the steps come from the modulation GEMM run
before the launch (`fused_head`), read from `modulation` [K, R, (3D + 2) W] at step minus the
step of its first entry. The launcher tunes the block configuration (K parts, K step) on
one-step launches, which read one state buffer and write the other, so reruns are harmless.

Barrier safety: the programs must all be resident, so P is at most the number of SMs and every
program fits an SM (one block per SM). A barrier wait that exceeds MAX_BARRIER_SPINS polls (about
a second: only possible when other work holds SMs for that long) stops waiting, sets the timeout
flag `sync[2]`, and that program waits at no later barrier of the launch (it still arrives at each),
so the launch ends after one such wait; at its end the state it wrote is overwritten with NaN: a
wrong result is never silent, and the GPU never hangs. The flag stays set (every later launch
on the same `sync` also writes NaN) until the caller clears it; `barrier_timed_out(sync)` reads it.
Under the Triton CPU interpreter (programs run one after another) the grid is one program, which
runs every work item of every phase; the barriers then pass at once.

Layers: `_ddpm_sample_loop_kernel` (Triton), `LoopWeights` (the head's weights arranged for it,
built once) and `ddpm_sample_loop` (launcher with input checks and a tuned configuration).
"""
import torch
import triton
import triton.language as tl

from .ddpm_step import SCALARS, STEP_COEFFICIENTS, coefficient_tables, final_layer_ddpm_item
from .linear_fused import (STATS_GROUP, WEIGHT_DTYPES, _check_matrix, _check_stats, _check_vector,
                           _prefetch_weights_to_l2, _tuned_config, check_split_k, dot_precision, gemm_item_coords,
                           gpu_configs, interpreting, linear_fused_item, programmatic_launch, split_k_range,
                           split_length, split_parts, stats_chunk, wait_for_previous_grid)

MAX_ROWS = 64  # net rows: one row tile per GEMM (the persistent grid is for the weight-streaming regime)
MAX_BARRIER_SPINS = 1 << 21
ALIGN_BYTES = 16


@triton.jit
def _grid_barrier(sync_ptr, generation, spin_limit, num_programs, times_ptr, TIMESTAMPS: tl.constexpr):
    """Wait until all num_programs programs have arrived here for the (generation + 1)-th time;
    returns (generation + 1, the spin limit for the next barrier). A CTA barrier first, then one
    release-acquire arrival on sync[0] and acquire polls: every write a program made before the
    barrier is visible to every program after it. A wait longer than spin_limit polls gives up,
    sets the timeout flag sync[2] and sets this program's later spin limits to 0 (it still
    arrives at every barrier, but waits at none: a launch with a timeout ends after one wait, not
    one per barrier). TIMESTAMPS: row generation + 1 of times [phases + 1, 2] gets the global time
    of the last arrival (column 0) and of program 0's departure (column 1)."""
    tl.debug_barrier()
    if TIMESTAMPS:
        tl.atomic_max(times_ptr + 2 * (generation + 1), tl.extra.cuda.globaltimer(), sem="relaxed")
    target = (generation + 1) * num_programs
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel") + 1
    spins = 0
    while (arrived < target) & (spins < spin_limit):
        arrived = tl.atomic_add(sync_ptr, 0, sem="acquire")
        spins += 1
    gave_up = arrived < target
    tl.store(sync_ptr + 2, 1, mask=gave_up)
    tl.debug_barrier()
    if TIMESTAMPS:
        tl.store(times_ptr + 2 * (generation + 1) + 1, tl.extra.cuda.globaltimer(), mask=tl.program_id(0) == 0)
    return generation + 1, spin_limit * (1 - gave_up.to(tl.int32))


@triton.jit
def _block_pointer(offsets_ptr, which, block, depth, base_ptr, ALIGN: tl.constexpr):
    """base_ptr + the element offset of tensor `which` of block `block`: `LoopWeights.offsets` rows
    0-3 (fc1 weight, fc1 bias, fc2 weight, fc2 bias) from block 0's fc1 weight, rows 4-5 (LayerNorm
    weight, bias) from block 0's LayerNorm weight.
    ALIGN > 1: every offset is a multiple of ALIGN elements (16 bytes), so vector loads stay possible."""
    offset = tl.load(offsets_ptr + which * depth + block)
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return base_ptr + offset


@triton.jit
def _prefetch_phase_weights(weight_ptr, pid, num_programs, items, rows, width, k_split_len, stride_wk, stride_wn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT_K: tl.constexpr, PREFETCH_K: tl.constexpr):
    """Ask L2 for the weight slabs of this program's items of the next [width, width] GEMM phase."""
    if PREFETCH_K > 0:
        for item in range(pid, items, num_programs):
            tile, split, k_begin, k_end, pid_n, row_ids, row_ok, cols, col_ok = gemm_item_coords(
                item, rows, width, width, k_split_len, BLOCK_M, BLOCK_N, 1, SPLIT_K)
            _prefetch_weights_to_l2(weight_ptr, cols, col_ok, k_begin, k_end, stride_wk, stride_wn, BLOCK_K,
                                    PREFETCH_K)


@triton.jit(do_not_specialize=["step_hi", "step_lo", "modulation_step", "first_state"])  # one compile per shape
def _ddpm_sample_loop_kernel(
    states_ptr, noise_ptr, scalars_ptr, coefficients_ptr, sync_ptr, times_ptr,
    input_weight_ptr, input_bias_ptr, weights_ptr, ln_ptr, offsets_ptr, final_weight_ptr, final_bias_ptr,
    residuals_ptr, hidden_ptr, stats_ptr, modulation_ptr, partials_ptr, counters_ptr,
    step_hi, step_lo, modulation_step, first_state, state_rows, net_rows, width, channels, depth, uncond_row_offset,
    k_split_len, final_k_split_len,
    stride_state, stride_xm, stride_noise_step, stride_nm, stride_in_wn, stride_in_wk, stride_wn, stride_wk,
    stride_fwn, stride_fwk, stride_residual, stride_rm, stride_hm, stride_stats_m, stride_mod_step, stride_mod_m,
    ln_eps, final_ln_eps,
    USE_CFG: tl.constexpr, CLIP_X0: tl.constexpr, AFFINE: tl.constexpr, WEIGHT_ALIGN: tl.constexpr,
    LN_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C_IN: tl.constexpr, SPLIT_K: tl.constexpr, FINAL_BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    FINAL_BLOCK_K: tl.constexpr, FINAL_SPLIT: tl.constexpr, STATS_GROUP: tl.constexpr,
    STATS_CHUNK: tl.constexpr, FINAL_STATS_CHUNK: tl.constexpr, PREFETCH_K: tl.constexpr,
    MAX_SPINS: tl.constexpr, TIMESTAMPS: tl.constexpr, PDL: tl.constexpr,
):
    """Steps step_hi .. step_lo of the reverse DDPM loop (see the module docstring); step s reads
    state buffer (first_state + step_hi - s) % 2 and writes the other."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    tiles_n = tl.cdiv(width, BLOCK_N)
    gemm_items = tiles_n * SPLIT_K
    final_items = tl.cdiv(state_rows, FINAL_BLOCK_M) * FINAL_SPLIT
    wait_for_previous_grid(PDL)
    if TIMESTAMPS:  # the launch's start: row 0, column 1
        tl.store(times_ptr + 1, tl.extra.cuda.globaltimer(), mask=pid == 0)
    generation = 0
    spin_limit = MAX_SPINS
    for step in range(step_hi, step_lo - 1, -1):
        current = (first_state + step_hi - step) % 2
        state = states_ptr + current * stride_state
        next_state = states_ptr + (1 - current) * stride_state
        mod = modulation_ptr + (step - modulation_step) * stride_mod_step

        for item in range(pid, tiles_n, num_programs):  # residual = x_t @ W_in^T + b, and its statistics
            tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok = gemm_item_coords(
                item, net_rows, width, channels, channels, BLOCK_M, BLOCK_N, 1, 1)
            linear_fused_item(
                tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok,
                state, input_weight_ptr, input_bias_ptr, residuals_ptr, state, state, state, state, state, state,
                state, stats_ptr, state, state, net_rows, width, channels, state_rows,
                stride_xm, stride_in_wn, stride_in_wk, stride_rm, 0, 0, 0, stride_stats_m, ln_eps,
                0, 0, True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_C_IN, STATS_GROUP, STATS_CHUNK, 1, True)
        _prefetch_phase_weights(weights_ptr, pid, num_programs, gemm_items, net_rows, width, k_split_len, stride_wk,
                                stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, PREFETCH_K)  # block 0's fc1
        generation, spin_limit = _grid_barrier(sync_ptr, generation, spin_limit, num_programs, times_ptr,
                                               TIMESTAMPS)

        for block in range(depth):
            residual = residuals_ptr + (block % 2) * stride_residual
            residual_out = residuals_ptr + ((block + 1) % 2) * stride_residual
            shift = mod + 3 * block * width
            fc1_weight = _block_pointer(offsets_ptr, 0, block, depth, weights_ptr, WEIGHT_ALIGN)
            fc1_bias = _block_pointer(offsets_ptr, 1, block, depth, weights_ptr, WEIGHT_ALIGN)
            fc2_weight = _block_pointer(offsets_ptr, 2, block, depth, weights_ptr, WEIGHT_ALIGN)
            fc2_bias = _block_pointer(offsets_ptr, 3, block, depth, weights_ptr, WEIGHT_ALIGN)
            ln_weight = ln_ptr
            ln_bias = ln_ptr
            if AFFINE:
                ln_weight = _block_pointer(offsets_ptr, 4, block, depth, ln_ptr, LN_ALIGN)
                ln_bias = _block_pointer(offsets_ptr, 5, block, depth, ln_ptr, LN_ALIGN)
            for item in range(pid, gemm_items, num_programs):  # hidden = SiLU(LN-modulate(residual) @ fc1^T + b)
                tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok = gemm_item_coords(
                    item, net_rows, width, width, k_split_len, BLOCK_M, BLOCK_N, 1, SPLIT_K)
                linear_fused_item(
                    tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok,
                    residual, fc1_weight, fc1_bias, hidden_ptr, stats_ptr, ln_weight, ln_bias, shift, shift + width,
                    hidden_ptr, hidden_ptr, hidden_ptr, partials_ptr, counters_ptr, net_rows, width, width, net_rows,
                    stride_rm, stride_wn, stride_wk, stride_hm, stride_mod_m, 0, stride_stats_m, 0, ln_eps,
                    2 if AFFINE else 1, 1, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STATS_GROUP, STATS_CHUNK,
                    SPLIT_K, True)
            _prefetch_phase_weights(fc2_weight, pid, num_programs, gemm_items, net_rows, width, k_split_len, stride_wk,
                                    stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, PREFETCH_K)
            generation, spin_limit = _grid_barrier(sync_ptr, generation, spin_limit, num_programs, times_ptr,
                                                   TIMESTAMPS)

            for item in range(pid, gemm_items, num_programs):  # residual_out = residual + gate * (hidden @ fc2^T + b)
                tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok = gemm_item_coords(
                    item, net_rows, width, width, k_split_len, BLOCK_M, BLOCK_N, 1, SPLIT_K)
                linear_fused_item(
                    tile, split, k_begin, k_end, pid_n, rows, row_ok, cols, col_ok,
                    hidden_ptr, fc2_weight, fc2_bias, residual_out, hidden_ptr, hidden_ptr, hidden_ptr, hidden_ptr,
                    hidden_ptr, shift + 2 * width, residual, stats_ptr, partials_ptr, counters_ptr,
                    net_rows, width, width, net_rows,
                    stride_hm, stride_wn, stride_wk, stride_rm, stride_mod_m, stride_rm, 0, stride_stats_m, ln_eps,
                    0, 2, True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STATS_GROUP, STATS_CHUNK, SPLIT_K, True)
            if block + 1 < depth:
                next_fc1 = _block_pointer(offsets_ptr, 0, block + 1, depth, weights_ptr, WEIGHT_ALIGN)
                _prefetch_phase_weights(next_fc1, pid, num_programs, gemm_items, net_rows, width, k_split_len,
                                        stride_wk, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, PREFETCH_K)
            generation, spin_limit = _grid_barrier(sync_ptr, generation, spin_limit, num_programs, times_ptr,
                                                   TIMESTAMPS)

        coefficients = coefficients_ptr + step * 6
        final_mod = mod + 3 * depth * width
        for item in range(pid, final_items, num_programs):  # x_{t-1} from the last residual
            row_block, split, k_begin, k_end = split_k_range(item, width, final_k_split_len, FINAL_SPLIT)
            final_layer_ddpm_item(
                row_block, split, k_begin, k_end,
                residuals_ptr + (depth % 2) * stride_residual, stats_ptr, final_mod, final_mod + width,
                final_weight_ptr, final_bias_ptr, state, noise_ptr + step * stride_noise_step, next_state,
                scalars_ptr, partials_ptr, counters_ptr, state_rows, width, channels, uncond_row_offset,
                stride_rm, stride_stats_m, stride_mod_m, stride_fwn, stride_fwk, stride_xm, stride_nm, stride_xm,
                tl.load(coefficients), tl.load(coefficients + 1), tl.load(coefficients + 2),
                tl.load(coefficients + 3), tl.load(coefficients + 4), tl.load(coefficients + 5), final_ln_eps,
                step > 0, USE_CFG, CLIP_X0, DOT_PRECISION, FINAL_BLOCK_M, BLOCK_C, FINAL_BLOCK_K, STATS_GROUP,
                FINAL_STATS_CHUNK, FINAL_SPLIT)
        generation, spin_limit = _grid_barrier(sync_ptr, generation, spin_limit, num_programs, times_ptr,
                                               TIMESTAMPS)

    # the last program out resets the counters for the next launch; after a barrier timeout it
    # overwrites the launch's result with NaN
    tl.debug_barrier()
    last = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == num_programs - 1
    tl.atomic_xchg(sync_ptr, 0, mask=last, sem="relaxed")
    tl.atomic_xchg(sync_ptr + 1, 0, mask=last, sem="relaxed")
    timed_out = tl.atomic_add(sync_ptr + 2, 0, mask=last, sem="acquire") != 0
    poisoned_rows = state_rows * (last & timed_out).to(tl.int32)  # all rows after a timeout, else none
    result = states_ptr + ((first_state + step_hi - step_lo + 1) % 2) * stride_state
    channel = tl.arange(0, BLOCK_C)
    for r0 in range(0, state_rows, FINAL_BLOCK_M):
        rows = r0 + tl.arange(0, FINAL_BLOCK_M)
        tl.store(result + rows[:, None] * stride_xm + channel[None, :],
                 tl.full([FINAL_BLOCK_M, BLOCK_C], float("nan"), tl.float32),
                 mask=(rows < poisoned_rows)[:, None] & (channel < channels)[None, :])


class LoopWeights:
    """The head's weights arranged for `ddpm_sample_loop` (build once per weight version).

    input_weight [W, C], input_bias float [W]; blocks: per block (ln_weight, ln_bias, fc1_weight,
    fc1_bias, fc2_weight, fc2_bias, ln_eps): GEMM weights [W, W] and their biases [W] in the
    weight dtype (fp32, bf16 or fp16; one dtype and strides for all), LayerNorm weight and bias
    fp32 [W] (both None for a parameter-free LayerNorm, in every block); final_weight [2C, W],
    final_bias float [2C], final_ln_eps. Nothing is copied: `offsets` (int64 [6, D] on the
    device) addresses each block's tensors from those of block 0.
    """

    def __init__(self, input_weight, input_bias, blocks, final_weight, final_bias, final_ln_eps):
        if not blocks:
            raise ValueError("the head needs at least one block")
        dtype, device = input_weight.dtype, input_weight.device
        if dtype not in WEIGHT_DTYPES:
            raise TypeError(f"weights must have dtype in {WEIGHT_DTYPES}, got {dtype}")
        width, channels = input_weight.shape
        _check_matrix("input_weight", input_weight, width, channels, device, (dtype,))
        _check_vector("input_bias", input_bias, width, device)
        affine = blocks[0][0] is not None
        ln_eps = float(blocks[0][6])
        gemm_tensors, ln_tensors = [], []
        for i, (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps) in enumerate(blocks):
            for name, w in ((f"blocks[{i}] fc1 weight", fc1_weight), (f"blocks[{i}] fc2 weight", fc2_weight)):
                _check_matrix(name, w, width, width, device, (dtype,))
                if w.stride() != blocks[0][2].stride():
                    raise ValueError(f"{name} must have the strides of blocks[0]'s fc1 weight, got {w.stride()}")
            for name, b in ((f"blocks[{i}] fc1 bias", fc1_bias), (f"blocks[{i}] fc2 bias", fc2_bias)):
                _check_vector(name, b, width, device)
                if b.dtype != dtype:
                    raise TypeError(f"{name} must have the weight dtype {dtype}, got {b.dtype}")
            if (ln_weight is not None) != affine or (ln_bias is not None) != affine:
                raise ValueError("every block's LayerNorm must be affine, or none")
            if affine:
                for name, t in ((f"blocks[{i}] LayerNorm weight", ln_weight), (f"blocks[{i}] LayerNorm bias", ln_bias)):
                    _check_vector(name, t, width, device)
                    if t.dtype != torch.float32:
                        raise TypeError(f"{name} must be float32, got {t.dtype}")
            if float(eps) != ln_eps:
                raise ValueError(f"every block's LayerNorm must share one eps, got {ln_eps} and {eps}")
            gemm_tensors.append((fc1_weight, fc1_bias, fc2_weight, fc2_bias))
            ln_tensors.append((ln_weight, ln_bias) if affine else (blocks[0][2], blocks[0][2]))
        _check_matrix("final_weight", final_weight, 2 * channels, width, device, (dtype,))
        _check_vector("final_bias", final_bias, 2 * channels, device)
        self.dtype, self.device, self.width, self.channels, self.depth = dtype, device, width, channels, len(blocks)
        self.affine, self.ln_eps, self.final_ln_eps = affine, ln_eps, float(final_ln_eps)
        self.input_weight, self.input_bias = input_weight, input_bias
        self.final_weight, self.final_bias = final_weight, final_bias
        self.base = blocks[0][2]
        self.ln_base = blocks[0][0] if affine else self.base
        self.stride_w = blocks[0][2].stride()
        table = [[_element_offset(t[j], self.base) for t in gemm_tensors] for j in range(4)]
        table += [[_element_offset(t[j], self.ln_base) for t in ln_tensors] for j in range(2)]
        tensors = [t for group in gemm_tensors + ln_tensors for t in group]
        self.aligned = all(t.data_ptr() % ALIGN_BYTES == 0 for t in tensors)
        self.offsets = torch.tensor(table, dtype=torch.int64, device=device)
        self._tensors = tensors  # the table addresses them: keep them alive


def _element_offset(t, base):
    distance = t.data_ptr() - base.data_ptr()
    if distance % t.element_size():
        raise ValueError("block tensors must be aligned to their element size")
    return distance // t.element_size()


def coefficient_table(diffusion, device):
    """fp32 [S, 6] per-step table values (ddpm_step.STEP_COEFFICIENTS order) of a GaussianDiffusion."""
    columns = [torch.as_tensor(table, dtype=torch.float64) for table in coefficient_tables(diffusion)]
    return torch.stack(columns, dim=1).float().to(device)


def new_sync(device):
    """The int32 [3] barrier state a launch needs (arrivals, departures, timeout flag), zeroed."""
    return torch.zeros(3, dtype=torch.int32, device=device)


def phases_per_step(depth):
    """Phases of one DDPM step: the input projection, fc1 and fc2 of each block, the final layer."""
    return 2 * depth + 2


def phase_spans(phase_times, depth):
    """From a `ddpm_sample_loop` launch's phase_times: {phase name: [(work_ns, barrier_ns), ...]}
    over the launch's steps, phase names "input_projection", "fc1", "fc2", "final_layer" (the
    blocks' phases pooled). work: from program 0 leaving the previous barrier (or starting) to
    the last arrival at this phase's barrier; barrier: from that arrival to program 0 leaving."""
    rows = phase_times.tolist()
    per_step = phases_per_step(depth)
    names = ["input_projection"] + ["fc1", "fc2"] * depth + ["final_layer"]
    spans = {name: [] for name in ("input_projection", "fc1", "fc2", "final_layer")}
    for phase in range(1, len(rows)):
        arrival, departure = rows[phase]
        spans[names[(phase - 1) % per_step]].append((arrival - rows[phase - 1][1], departure - arrival))
    return spans


def resident_programs(device):
    """How many programs of the one-launch loop may run at once on `device` (one per SM on CUDA;
    the interpreter runs one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def barrier_timed_out(sync):
    """True if a launch on `sync` gave up waiting at a grid barrier (reads the device: synchronises)."""
    return bool(sync[2].item())


def _candidates(net_rows, width, element_bytes, gpu, programs):
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, FINAL_BLOCK_K, FINAL_SPLIT) candidates, the last a
    fallback (see `_tuned_config`): K parts so that the GEMM phases have about `programs` work
    items, and one unsplit (the interpreter: two parts, to run the split code)."""
    tiles_n = triton.cdiv(width, 32)
    if not gpu:
        block_k = min(64, max(16, triton.next_power_of_2(width)))
        k_steps = triton.cdiv(width, block_k)
        return [(32, block_k, split_parts(k_steps, 2), 4, block_k, split_parts(k_steps, 2))]
    # 64-row tiles: 8 warps, and K steps of at most 64 (the LN-modulate prologue's three fp32 A tiles
    # spill registers with 128 on sm_90)
    warps, block_ks = (4, (128, 64, 32)) if net_rows <= 32 else (8, (64, 32, 16))
    if element_bytes != 2:
        block_ks = (32, 16)
    final = (64, split_parts(triton.cdiv(width, 64), 16))
    candidates = []
    for block_k in block_ks:  # the last: the fallback
        k_steps = triton.cdiv(width, block_k)
        candidates.append((32, block_k, split_parts(k_steps, max(1, programs // tiles_n)), warps) + final)
    # unsplit: fewer programs stream the weights, but an item needs no arrival and partial-sum round trips
    return candidates[:1] + [(32, block_ks[0], 1, warps) + final] + candidates[1:]


def ddpm_sample_loop(weights, states, first_state, step_hi, step_lo, noise, scalars, coefficients, residuals, hidden,
                     stats, modulation, sync, split_k, *, use_cfg, clip_x0=False, modulation_step=None,
                     phase_times=None):
    """Run reverse DDPM steps step_hi, step_hi - 1, ..., step_lo in one launch; returns the state
    buffer index holding x after step_lo ((first_state + number of steps) % 2).

    weights: `LoopWeights`; states: fp32 [2, S, C], x_t of step_hi in states[first_state];
    noise: fp32 [T, S, C] (noise[s] is step s's; T > step_hi); scalars: fp32 [4] (cfg,
    temperature, clip_lo, clip_hi; see ddpm_step); coefficients: `coefficient_table` fp32 [T, 6];
    residuals: fp32 [2, R, W] and hidden [R, W] (weight dtype): scratch; stats: fp32
    stats_shape(R, W) scratch; modulation: [K, R, (3D + 2) W] (weight dtype), the adaLN
    modulations of steps m .. m + K - 1, m = modulation_step (default step_lo; m <= step_lo and
    K > step_hi - m); sync: `new_sync` (see the module docstring); split_k: a `SplitKWorkspace`.
    R = 2S with CFG (row r + S is the unconditional twin of row r), else S; R <= MAX_ROWS.
    phase_times (CUDA only: the interpreter has no global timer): int64 [(step_hi - step_lo + 1)
    * phases_per_step(D) + 1, 2], zeros, to record when each phase's barrier saw its last arrival
    and when program 0 left it, in nanoseconds (row 0: program 0's start; see `phase_spans`).
    """
    if not isinstance(weights, LoopWeights):
        raise TypeError(f"weights must be LoopWeights, got {type(weights).__name__}")
    device, width, channels, depth = weights.device, weights.width, weights.channels, weights.depth
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels need a CUDA device or TRITON_INTERPRET=1, got tensors on {device}")
    f32 = (torch.float32,)
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[0] != 2:
        raise ValueError(f"states must be a [2, S, C] tensor, got {tuple(getattr(states, 'shape', ()))}")
    state_rows = states.shape[1]
    net_rows = 2 * state_rows if use_cfg else state_rows
    if not 0 < net_rows <= MAX_ROWS:
        raise ValueError(f"ddpm_sample_loop runs 1 to {MAX_ROWS} net rows, got {net_rows}")
    for i in range(2):
        _check_matrix(f"states[{i}]", states[i], state_rows, channels, device, f32)
    if not 0 <= step_lo <= step_hi:
        raise ValueError(f"need 0 <= step_lo <= step_hi, got {step_lo} and {step_hi}")
    if first_state not in (0, 1):
        raise ValueError(f"first_state must be 0 or 1, got {first_state}")
    steps_total = coefficients.shape[0] if isinstance(coefficients, torch.Tensor) and coefficients.dim() == 2 else 0
    _check_matrix("coefficients", coefficients, None, len(STEP_COEFFICIENTS), device, f32)
    if step_hi >= steps_total or not coefficients.is_contiguous():
        raise ValueError(f"coefficients must be a contiguous [T, 6] table with T > {step_hi}, got "
                         f"{tuple(coefficients.shape)}")
    if not isinstance(noise, torch.Tensor) or noise.dim() != 3 or noise.shape[0] < steps_total:
        raise ValueError(f"noise must be fp32 [{steps_total}, {state_rows}, {channels}], got "
                         f"{tuple(getattr(noise, 'shape', ()))}")
    _check_matrix("noise[0]", noise[0], state_rows, channels, device, f32)
    if not isinstance(scalars, torch.Tensor) or scalars.dtype != torch.float32 or tuple(scalars.shape) != (4,) \
            or scalars.device != device or not scalars.is_contiguous():
        raise ValueError(f"scalars must be a contiguous float32 tensor [4] {SCALARS} on {device}")
    if not isinstance(residuals, torch.Tensor) or residuals.dim() != 3 or residuals.shape[0] != 2:
        raise ValueError(f"residuals must be a [2, R, W] tensor, got {tuple(getattr(residuals, 'shape', ()))}")
    for i in range(2):
        _check_matrix(f"residuals[{i}]", residuals[i], net_rows, width, device, f32)
    _check_matrix("hidden", hidden, net_rows, width, device, (weights.dtype,))
    _check_stats("stats", stats, net_rows, width, device)
    mod_width = (3 * depth + 2) * width
    modulation_step = step_lo if modulation_step is None else modulation_step
    if not 0 <= modulation_step <= step_lo:
        raise ValueError(f"need 0 <= modulation_step <= step_lo, got {modulation_step} and {step_lo}")
    if not isinstance(modulation, torch.Tensor) or modulation.dim() != 3 \
            or modulation.shape[0] <= step_hi - modulation_step:
        raise ValueError(f"modulation must be [K, {net_rows}, {mod_width}] with K > {step_hi - modulation_step}, "
                         f"got {tuple(getattr(modulation, 'shape', ()))}")
    _check_matrix("modulation[0]", modulation[0], net_rows, mod_width, device, (weights.dtype,))
    if not isinstance(sync, torch.Tensor) or sync.dtype != torch.int32 or tuple(sync.shape) != (3,) \
            or sync.device != device or not sync.is_contiguous():
        raise ValueError(f"sync must be a contiguous int32 tensor [3] on {device} (new_sync)")
    check_split_k(split_k, device)
    if split_k is None:
        raise ValueError("ddpm_sample_loop needs a SplitKWorkspace")
    if phase_times is not None:
        expected = ((step_hi - step_lo + 1) * phases_per_step(depth) + 1, 2)
        if device.type != "cuda":
            raise ValueError("phase_times needs a CUDA device (the Triton interpreter has no global timer)")
        if not isinstance(phase_times, torch.Tensor) or phase_times.dtype != torch.int64 \
                or tuple(phase_times.shape) != expected or phase_times.device != device \
                or not phase_times.is_contiguous():
            raise ValueError(f"phase_times must be a contiguous int64 tensor {expected} on {device}")

    gpu = gpu_configs(device)
    programs = resident_programs(device)
    block_m = max(16, triton.next_power_of_2(net_rows))
    final_block_m = max(16, triton.next_power_of_2(state_rows))
    block_c = max(16, triton.next_power_of_2(channels))
    pdl = programmatic_launch(device)
    args = dict(
        states_ptr=states, noise_ptr=noise, scalars_ptr=scalars, coefficients_ptr=coefficients, sync_ptr=sync,
        input_weight_ptr=weights.input_weight, input_bias_ptr=weights.input_bias, weights_ptr=weights.base,
        ln_ptr=weights.ln_base, offsets_ptr=weights.offsets, final_weight_ptr=weights.final_weight,
        final_bias_ptr=weights.final_bias, residuals_ptr=residuals, hidden_ptr=hidden, stats_ptr=stats,
        modulation_ptr=modulation, state_rows=state_rows, net_rows=net_rows, width=width,
        channels=channels, depth=depth, uncond_row_offset=state_rows if use_cfg else 0,
        stride_state=states.stride(0), stride_xm=states.stride(1), stride_noise_step=noise.stride(0),
        stride_nm=noise.stride(1), stride_in_wn=weights.input_weight.stride(0),
        stride_in_wk=weights.input_weight.stride(1), stride_wn=weights.stride_w[0], stride_wk=weights.stride_w[1],
        stride_fwn=weights.final_weight.stride(0), stride_fwk=weights.final_weight.stride(1),
        stride_residual=residuals.stride(0), stride_rm=residuals.stride(1), stride_hm=hidden.stride(0),
        stride_stats_m=stats.stride(0), stride_mod_step=modulation.stride(0), stride_mod_m=modulation.stride(1),
        ln_eps=weights.ln_eps, final_ln_eps=weights.final_ln_eps,
        USE_CFG=bool(use_cfg), CLIP_X0=bool(clip_x0), AFFINE=weights.affine,
        WEIGHT_ALIGN=ALIGN_BYTES // weights.base.element_size() if weights.aligned else 1,
        LN_ALIGN=ALIGN_BYTES // 4 if weights.aligned else 1,
        DOT_PRECISION=dot_precision(weights.dtype), BLOCK_M=block_m, BLOCK_C_IN=block_c,
        FINAL_BLOCK_M=final_block_m, BLOCK_C=block_c, STATS_GROUP=STATS_GROUP,
        STATS_CHUNK=stats_chunk(width, block_m),
        FINAL_STATS_CHUNK=stats_chunk(width, 2 * final_block_m if use_cfg else final_block_m),
        MAX_SPINS=MAX_BARRIER_SPINS, **pdl)

    def run(config, hi=step_hi, lo=step_lo, times=None):
        block_n, block_k, split, warps, final_k, final_split = config
        gemm_tiles = triton.cdiv(width, block_n)
        final_tiles = triton.cdiv(state_rows, final_block_m)
        split_k.reserve(max(gemm_tiles * split * block_m * block_n, final_tiles * 3 * final_split * final_block_m
                            * block_c), max(gemm_tiles, final_tiles))
        grid = min(programs, max(gemm_tiles * split, final_tiles * final_split))
        prefetch_k = min(block_k, 128 // weights.base.element_size()) if pdl["PDL"] else 0
        _ddpm_sample_loop_kernel[(grid,)](
            **args, times_ptr=sync if times is None else times, TIMESTAMPS=times is not None,
            partials_ptr=split_k.partials, counters_ptr=split_k.counters, step_hi=hi, step_lo=lo,
            modulation_step=modulation_step, first_state=first_state, k_split_len=split_length(width, block_k, split),
            final_k_split_len=split_length(width, final_k, final_split), BLOCK_N=block_n, BLOCK_K=block_k,
            SPLIT_K=split, FINAL_BLOCK_K=final_k, FINAL_SPLIT=final_split, PREFETCH_K=prefetch_k,
            num_warps=warps, num_stages=2)

    candidates = _candidates(net_rows, width, weights.base.element_size(), gpu, programs)
    key = ("ddpm_sample_loop", net_rows, use_cfg, bool(clip_x0), width, channels, depth, weights.dtype,
           dot_precision(weights.dtype), str(device))
    # tuned on one-step launches (x_t is read from one buffer and x_{t-1} written to the other: repeatable)
    config = _tuned_config(key, candidates, lambda c: run(c, step_hi, step_hi), "ddpm_sample_loop")
    run(config, times=phase_times)
    return (first_state + step_hi - step_lo + 1) % 2
