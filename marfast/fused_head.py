"""Fused sampling path of the diffusion head: the whole reverse DDPM loop through Triton launchers.

`ddpm_sample_loop_fused(net, diffusion, z, x, temperature, cfg, step_noise, clip_x0=None)` computes
what `diffloss.ddpm_sample_loop_reference` computes, with these kernels per DDPM step
(depth D, width W, R net rows; with CFG R = 2B and only the B conditional state rows are carried):

1. the adaLN modulations of all D blocks and the final layer, for K steps at once: they depend
   only on t and z, never on x_t, so before the first step of each chunk of K steps
   `adaln_input` (Triton) writes SiLU(time_embed(t) + cond_embed(z)) for those K steps ([K, R, W] in
   the weight dtype; the time embeddings of all sampler steps are computed once and cached,
   cond_embed(z) once per call by the Triton `linear` launcher) and ONE GEMM computes their
   modulations ([K R, W] x [W, (3D + 2) W], `modulation_gemm`: cuBLAS `torch.addmm` or the Triton
   `linear` launcher, whichever is timed faster for the shape). K = `modulation_steps_per_gemm`:
   enough steps that the GEMM has about `MODULATION_GEMM_ROWS` rows. The modulation weights are most
   of the head's weight bytes (20 of 32 W^2 at depth 6), and at a few rows a GEMM reads its weights
   in the same time whatever its row count up to a few hundred, so at 16 rows the loop streams them
   once per 50 steps (two GEMMs for 100 steps) instead of once per step; at thousands of rows
   K = 1 (the GEMM is compute bound either way, and the buffer stays one step's size);
2. `input_projection` (Triton): residual = x_t @ W_in^T + b (fp32 [R, W]) plus its LayerNorm
   group statistics;
3. per block, two Triton GEMMs: `linear_ln_modulate_silu` (LayerNorm + modulate prologue, bias +
   SiLU epilogue) and `linear_gated_residual` (bias + gate * h + residual epilogue, which also
   writes the next LayerNorm's group statistics); where a GEMM has fewer than 128 output tiles
   (up to a few hundred rows) their tuner also tries K-split configurations (the workspace's
   `SplitKWorkspace`): a [R, W] x [W, W] GEMM has only W / 32 output tiles at up to 64 rows, too
   few to stream its weights from every SM; above 64 rows each is also timed as
   a cuBLAS GEMM followed by its epilogue as a separate pass (the product then rounded to the
   weight dtype, as the official bf16 head rounds it), and the faster way is kept;
4. `final_layer_ddpm_step` (Triton): final LayerNorm + modulate + linear, CFG eps mixing,
   learned-range variance, posterior mean and noise * temperature, writing x_{t-1} in fp32; at up
   to 64 rows its tuner also tries the width split over several programs (one row block is
   otherwise the whole grid).

Items 2-4 are the launch chain (`_chain_steps`, about 2D + 2 kernels per DDPM step). At up to
ONE_LAUNCH_MAX_ROWS (64) net rows the same work can instead run as one launch per chunk of steps
(`_one_launch_steps`, `kernels/ddpm_sample_loop.py`): a persistent grid, one program per SM, that
walks the same per-item code with grid barriers where the chain has kernel boundaries. The packed
head's `loop_kernels` picks: "chain", "one_launch", or "auto" (default: the chain off CUDA and
above 64 rows; otherwise whichever runs one step faster, timed once per shape in the eager run,
after checking that one step of each agrees within rounding: a fault of the one-launch kernel on
some GPU raises there rather than reaching a sample). A grid barrier that times out (only if
other work holds the SMs for about a second) makes the result NaN instead of hanging; the eager
runs check for it and raise.

On CUDA the loop (cond_embed and the modulation GEMMs included) is captured once per (bucketed
row count (`bucket_rows`), CFG on/off, clip on/off, number of steps) as a CUDA graph and
replayed: no host synchronisation and no Python work per step. On sm_90+ every Triton kernel of
the loop is launched with programmatic dependent launch (`linear_fused.programmatic_launch`;
MARFAST_PDL=0 turns it off): a kernel's blocks are scheduled while its predecessor drains and wait
for it on the device, which hides most of the gap between consecutive kernels (about 14 per DDPM
step); at up to 64 rows the GEMMs' blocks first ask L2 for their weights, so each weight stream
overlaps the kernel before. The first call for a bucket runs the loop eagerly (compiling, tuning
and timing the kernels; its result is returned) and then captures. Under the Triton CPU
interpreter the loop runs eagerly through the same launchers.

The loop computes with the net's weights, or under autocast on the net's device with a cast copy
of them in autocast's dtype (`compute_dtype`), as autocast computes the reference head's Linear
layers. Packed weights (the concatenated adaLN weight, fp32 biases, cached time embeddings, graphs)
are cached per net and dtype and rebuilt when any parameter's storage or version counter changes
(optimizer steps, load_state_dict, `.to()`); writes through `.data` bypass version counters, so call
`release_fused_cache(net)` after those. Nothing is registered on the module: the state dict does
not change.
"""
import contextlib
import copy
import math
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .diffloss import as_cfg_scale, check_temperature
from .diffusion import GaussianDiffusion, timestep_embedding
from .kernels.adaln_input import adaln_input
from .kernels.ddpm_sample_loop import MAX_ROWS as ONE_LAUNCH_MAX_ROWS
from .kernels.ddpm_sample_loop import (LoopWeights, barrier_timed_out, coefficient_table, ddpm_sample_loop, new_sync,
                                       phases_per_step)
from .kernels.ddpm_step import final_layer_ddpm_step, step_coefficients
from .kernels.linear_fused import (WEIGHT_DTYPES, SplitKWorkspace, fastest_way, gpu_configs, input_projection,
                                   interpreting, linear, linear_gated_residual, linear_ln_modulate_silu,
                                   programmatic_launch, stats_shape)

MAX_GRAPHS_PER_HEAD = 8
MIN_BUCKET_ROWS = 16
MODULATION_GEMM_ROWS = 1024


def bucket_rows(rows):
    """Row count a CUDA graph is captured for: the smallest power of two, or 1.5 times a power of
    two, that holds `rows`, and at least MIN_BUCKET_ROWS. At most a third of a bucket is padding
    (powers of two alone: up to half, 31% of the head's rows at batch 256 with 64 AR steps), and
    MAR's cosine schedule meets at most MAX_GRAPHS_PER_HEAD buckets per call."""
    if rows <= MIN_BUCKET_ROWS:
        return MIN_BUCKET_ROWS
    power = 1 << (rows - 1).bit_length()
    return power * 3 // 4 if rows <= power * 3 // 4 else power


class _Block:
    def __init__(self, block):
        ln = block.in_ln
        self.ln_weight = None if ln.weight is None else ln.weight.detach().float()
        self.ln_bias = None if ln.bias is None else ln.bias.detach().float()
        self.ln_eps = float(ln.eps)
        self.fc1_weight = block.mlp[0].weight.detach()
        self.fc1_bias = block.mlp[0].bias.detach()  # the weight dtype: the cuBLAS ways add it without a cast
        self.fc2_weight = block.mlp[2].weight.detach()
        self.fc2_bias = block.mlp[2].bias.detach()


class PackedHead:
    """The net's weights arranged for the fused loop (built once per weight version).

    ada_weight [(3D + 2) W, W] is the concatenation of the adaLN linears of all blocks (shift,
    scale, gate each) and of the final layer (shift, scale); biases used only by Triton epilogues
    are fp32 copies; GEMM weights and the blocks' MLP biases (also read by the cuBLAS ways of the
    block launchers, and exactly representable either way) are the parameters themselves (no
    copy). Settings: modulation_provider, "auto", "cublas" or "triton" (see `modulation_gemm`);
    modulation_gemm_rows, the row count the step-batched modulation GEMM aims at (see
    `modulation_steps_per_gemm`); loop_kernels, "auto", "chain" or "one_launch" (see
    `_uses_one_launch`).
    """

    def __init__(self, net, signature):
        self.signature = signature
        weight = net.input_proj.weight
        self.dtype, self.device = weight.dtype, weight.device
        if self.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"the fused head supports {WEIGHT_DTYPES} weights, got {self.dtype}; use backend='torch'")
        for name, p in net.named_parameters():
            if p.dtype != self.dtype or p.device != self.device:
                raise TypeError(f"all net parameters must share dtype {self.dtype} and device {self.device}; "
                                f"{name} is {p.dtype} on {p.device}")
        self.width, self.channels = weight.shape
        self.z_channels = net.cond_embed.weight.shape[1]
        self.depth = len(net.res_blocks)
        self.input_weight = weight.detach()
        self.input_bias = net.input_proj.bias.detach().float()
        self.cond_weight = net.cond_embed.weight.detach()
        self.cond_bias = net.cond_embed.bias.detach().float()
        adaln = [block.adaLN_modulation[1] for block in net.res_blocks] + [net.final_layer.adaLN_modulation[1]]
        self.ada_weight = torch.cat([m.weight.detach() for m in adaln])
        self.ada_bias = torch.cat([m.bias.detach() for m in adaln])
        self.modulation_provider = "auto"
        self.modulation_gemm_rows = MODULATION_GEMM_ROWS
        self.blocks = [_Block(block) for block in net.res_blocks]
        final = net.final_layer
        if getattr(final.norm_final, "weight", None) is not None:
            raise ValueError("the final layer's LayerNorm must be parameter-free, as in the official head")
        self.final_eps = float(final.norm_final.eps)
        self.final_weight = final.linear.weight.detach()
        self.final_bias = final.linear.bias.detach().float()
        if self.final_weight.shape[0] != 2 * self.channels:
            raise ValueError(f"final layer must output 2C = {2 * self.channels} channels, got {self.final_weight.shape[0]}")
        mlp = net.time_embed.mlp
        self._time_mlp = [t.detach().float() for t in (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)]
        self._time_embeddings = {}
        self._coefficients = {}
        self._coefficient_tables = {}
        self._loop_weights = None
        self.loop_kernels = "auto"
        self.graphs = OrderedDict()

    def time_embeddings(self, diffusion):
        """fp32 [S, W]: time_embed of the original timestep of every respaced step (cached)."""
        key = tuple(diffusion.timestep_map.tolist())
        if key not in self._time_embeddings:
            w0, b0, w2, b2 = self._time_mlp
            t = diffusion.timestep_map.to(self.device)
            features = timestep_embedding(t, w0.shape[1]).float()
            self._time_embeddings[key] = F.linear(F.silu(F.linear(features, w0, b0)), w2, b2).contiguous()
        return self._time_embeddings[key]

    def coefficients(self, diffusion):
        """Per-step scalar table values for the final DDPM kernel (cached per diffusion schedule)."""
        key = diffusion.num_timesteps
        if key not in self._coefficients:
            self._coefficients[key] = [step_coefficients(diffusion, s) for s in range(diffusion.num_timesteps)]
        return self._coefficients[key]

    def coefficient_table(self, diffusion):
        """The same values as a device table fp32 [S, 6] (`ddpm_sample_loop`; cached per schedule)."""
        key = diffusion.num_timesteps
        if key not in self._coefficient_tables:
            self._coefficient_tables[key] = coefficient_table(diffusion, self.device)
        return self._coefficient_tables[key]

    def loop_weights(self):
        """The weights arranged for the one-launch loop (`LoopWeights`, built on first use)."""
        if self._loop_weights is None:
            blocks = [(b.ln_weight, b.ln_bias, b.fc1_weight, b.fc1_bias, b.fc2_weight, b.fc2_bias, b.ln_eps)
                      for b in self.blocks]
            self._loop_weights = LoopWeights(self.input_weight, self.input_bias, blocks, self.final_weight,
                                             self.final_bias, self.final_eps)
        return self._loop_weights


_PACKS = weakref.WeakKeyDictionary()


def _signature(net):
    return tuple((p.data_ptr(), None if p.is_inference() else p._version, p.dtype, p.device, tuple(p.shape))
                 for p in net.parameters())


def _forget_pack(net, incompatible_keys):
    _PACKS.pop(net, None)


def packed_head(net, dtype=None):
    """The cached `PackedHead` of `net` with weights in `dtype` (default: the parameters' own, packed
    without copies; another dtype packs a cast copy, as autocast computes the head's Linear layers),
    rebuilt if any parameter changed since it was packed: replaced, updated in place (version
    counters), or loaded by `load_state_dict` (a post-hook: a load under inference_mode writes
    inference tensors, which have no version counter)."""
    signature = _signature(net)
    own = net.input_proj.weight.dtype
    dtype = dtype or own
    packs = _PACKS.setdefault(net, {})
    pack = packs.get(dtype)
    if pack is None or pack.signature != signature:
        if pack is not None:
            packs.clear()  # every pack of the old weights is stale
        with torch.inference_mode(False), torch.no_grad():
            pack = PackedHead(net if dtype == own else copy.deepcopy(net).to(dtype), signature)
        packs[dtype] = pack
        if _forget_pack not in net._load_state_dict_post_hooks.values():
            net.register_load_state_dict_post_hook(_forget_pack)
    return pack


def compute_dtype(net):
    """The weight dtype the fused loop computes with: autocast's when autocast is on for the net's
    device (the official sampler runs under autocast, which computes the head's Linear layers in its
    dtype, as the reference backend does), else (and for float64 weights, which autocast leaves
    alone) the parameters' own (None)."""
    weight = net.input_proj.weight
    if weight.dtype == torch.float64 or not torch.is_autocast_enabled(weight.device.type):
        return None
    return torch.get_autocast_dtype(weight.device.type)


def release_fused_cache(net):
    """Drop the packed weights and captured CUDA graphs of `net` (frees their memory)."""
    _PACKS.pop(net, None)


def modulation_steps_per_gemm(net_rows, num_steps, gemm_rows=MODULATION_GEMM_ROWS):
    """K: how many DDPM steps share one modulation GEMM of about `gemm_rows` rows (1 <= K <= S).

    The S steps split into ceil(S / K) chunks of nearly equal size (see `modulation_chunks`).
    """
    if gemm_rows < 1:
        raise ValueError(f"modulation_gemm_rows must be >= 1, got {gemm_rows}")
    most = max(1, min(num_steps, gemm_rows // net_rows))
    chunks = math.ceil(num_steps / most)
    return math.ceil(num_steps / chunks)


def modulation_chunks(num_steps, steps_per_gemm):
    """(lo, hi) step ranges, in loop order (hi = S - 1 first): the steps whose modulations one GEMM makes."""
    chunks, hi = [], num_steps - 1
    while hi >= 0:
        lo = max(0, hi - steps_per_gemm + 1)
        chunks.append((lo, hi))
        hi = lo - 1
    return chunks


class _Workspace:
    """Every buffer the loop reads or writes, for `state_rows` carried rows (static under a graph)."""

    def __init__(self, pack, state_rows, use_cfg, num_steps):
        net_rows = 2 * state_rows if use_cfg else state_rows
        width, channels = pack.width, pack.channels
        f32 = dict(device=pack.device, dtype=torch.float32)
        low = dict(device=pack.device, dtype=pack.dtype)
        self.state_rows, self.net_rows, self.use_cfg = state_rows, net_rows, use_cfg
        self.steps_per_gemm = modulation_steps_per_gemm(net_rows, num_steps, pack.modulation_gemm_rows)
        self.z = torch.zeros(net_rows, pack.z_channels, **low)
        self.state_pair = torch.zeros(2, state_rows, channels, **f32)
        self.states = list(self.state_pair.unbind(0))
        self.noise = torch.zeros(num_steps, state_rows, channels, **f32)
        self.scalars = torch.zeros(4, **f32)
        self.cond = torch.empty(net_rows, width, **f32)
        self.adaln_input = torch.empty(self.steps_per_gemm, net_rows, width, **low)
        self.modulation = torch.empty(self.steps_per_gemm, net_rows, (3 * pack.depth + 2) * width, **low)
        self.residual_pair = torch.empty(2, net_rows, width, **f32)
        self.residuals = list(self.residual_pair.unbind(0))
        self.hidden = torch.empty(net_rows, width, **low)
        self.stats = torch.empty(stats_shape(net_rows, width), **f32)
        self.split_k = SplitKWorkspace(pack.device)
        self.sync = new_sync(pack.device)

    def modulate_steps(self, pack, time_embeddings, lo, hi):
        """Fill modulation[: hi - lo + 1] with the modulations of steps lo..hi (one GEMM)."""
        steps = hi - lo + 1
        adaln_input(time_embeddings[lo:hi + 1], self.cond, self.adaln_input[:steps])
        modulation_gemm(pack, self.adaln_input[:steps].view(steps * self.net_rows, -1),
                        self.modulation[:steps].view(steps * self.net_rows, -1))

    def load(self, z, x, step_noise, cfg, temperature, clip_x0):
        """Copy one call's inputs in (device-side copies and fills only: no host sync)."""
        rows = x.shape[0] // 2 if self.use_cfg else x.shape[0]
        if self.use_cfg:
            self.z[:rows].copy_(z[:rows])
            self.z[self.state_rows:self.state_rows + rows].copy_(z[rows:])
        else:
            self.z[:rows].copy_(z)
        self.states[0][:rows].copy_(x[:rows])
        self.noise[:, :rows].copy_(step_noise)
        lo, hi = clip_x0 if clip_x0 is not None else (0.0, 0.0)
        for i, value in enumerate((cfg, temperature, lo, hi)):
            self.scalars[i].fill_(value)


MODULATION_PROVIDERS = ("auto", "cublas", "triton")
_MODULATION_CHOICE = {}


def modulation_gemm(pack, silu_cond, out):
    """out [M, (3D + 2) W] = silu_cond [M, W] @ ada_weight^T + ada_bias, in the weight dtype
    (M = K steps x R net rows in the loop).

    pack.modulation_provider "cublas" (torch.addmm) or "triton" (the `linear` launcher) forces one;
    "auto" takes cuBLAS off CUDA and, on CUDA, the faster of the two for this shape, timed once
    (never during CUDA graph capture: the loop's eager first run, before its capture, decides).
    """
    runs = {"cublas": lambda: torch.addmm(pack.ada_bias, silu_cond, pack.ada_weight.t(), out=out),
            "triton": lambda: linear(silu_cond, pack.ada_weight, pack.ada_bias, out)}
    provider = pack.modulation_provider
    if provider not in MODULATION_PROVIDERS:
        raise ValueError(f"modulation_provider must be one of {MODULATION_PROVIDERS}, got {provider!r}")
    if provider == "auto" and pack.device.type != "cuda":
        provider = "cublas"
    elif provider == "auto":
        key = (tuple(silu_cond.shape), tuple(pack.ada_weight.shape), pack.dtype, str(pack.device),
               torch.get_float32_matmul_precision())
        provider = fastest_way(_MODULATION_CHOICE, key, runs, "the modulation GEMM")
    return runs[provider]()


LOOP_KERNELS = ("auto", "chain", "one_launch")
_LOOP_CHOICE = {}
# the chain's step is about 2D + 2 eager launches of tens of microseconds of host work each: the
# GPU sleeps long enough (about 20 ms) for all the timed repeats to be queued before they run
LOOP_CHOICE_QUEUE_CYCLES = 40_000_000
ONE_LAUNCH_AGREEMENT = 1e-2


def _chain_steps(pack, ws, diffusion, mod_step, hi, lo, current, clip):
    """Steps hi .. lo as the launch chain (module docstring, items 2-4), from ws.states[current];
    modulation[0] holds step mod_step's modulations. Returns the state index holding the result."""
    width, depth = pack.width, pack.depth
    coefficients = pack.coefficients(diffusion)
    for step in range(hi, lo - 1, -1):
        mod = ws.modulation[step - mod_step]
        state, next_state = ws.states[current], ws.states[1 - current]
        input_projection(state, pack.input_weight, pack.input_bias, ws.residuals[0], ws.stats)
        res = 0
        for i, block in enumerate(pack.blocks):
            base = 3 * width * i
            linear_ln_modulate_silu(ws.residuals[res], ws.stats, block.ln_weight, block.ln_bias,
                                    mod[:, base:base + width], mod[:, base + width:base + 2 * width],
                                    block.fc1_weight, block.fc1_bias, ws.hidden, block.ln_eps, ws.split_k)
            linear_gated_residual(ws.hidden, block.fc2_weight, block.fc2_bias,
                                  mod[:, base + 2 * width:base + 3 * width], ws.residuals[res],
                                  ws.residuals[1 - res], ws.stats, ws.split_k)
            res = 1 - res
        base = 3 * width * depth
        final_layer_ddpm_step(ws.residuals[res], ws.stats, mod[:, base:base + width],
                              mod[:, base + width:base + 2 * width], pack.final_weight, pack.final_bias, state,
                              ws.noise[step], next_state, ws.scalars, coefficients[step], use_cfg=ws.use_cfg,
                              uncond_row_offset=ws.state_rows if ws.use_cfg else 0, add_noise=step > 0,
                              clip_x0=clip, ln_eps=pack.final_eps, split_k=ws.split_k)
        current = 1 - current
    return current


def _one_launch_steps(pack, ws, diffusion, mod_step, hi, lo, current, clip, phase_times=None):
    """Steps hi .. lo in one launch (`ddpm_sample_loop`, which describes phase_times); arguments and
    result as `_chain_steps`."""
    return ddpm_sample_loop(pack.loop_weights(), ws.state_pair, current, hi, lo, ws.noise, ws.scalars,
                            pack.coefficient_table(diffusion), ws.residual_pair, ws.hidden, ws.stats, ws.modulation,
                            ws.sync, ws.split_k, use_cfg=ws.use_cfg, clip_x0=clip, modulation_step=mod_step,
                            phase_times=phase_times)


def _check_one_launch_agrees(one_chain_step, one_launch_step, step_result):
    """Run one step each way from the same state (step_result() is the state they write) and raise
    unless they agree within ONE_LAUNCH_AGREEMENT (relative to the result's largest magnitude, + 1):
    the two ways compute the same function and differ by rounding only, and a grid-barrier or
    memory-ordering fault on a new GPU shows as a gross difference, loudly, before it can reach a
    sample. Reads the device: only where the choice is timed (the eager runs)."""
    one_chain_step()
    expected = step_result().clone()
    one_launch_step()
    error = ((step_result() - expected).abs().max() / (expected.abs().max() + 1)).item()
    if not error <= ONE_LAUNCH_AGREEMENT:
        raise RuntimeError(f"the one-launch DDPM loop disagrees with the launch chain on one step (relative "
                           f"difference {error:.3g} > {ONE_LAUNCH_AGREEMENT}); packed_head(net).loop_kernels = "
                           "'chain' avoids it (please report it)")


def _uses_one_launch(pack, ws, clip, one_chain_step, one_launch_step, step_result):
    """Whether the loop's steps run as one launch per modulation chunk (`ddpm_sample_loop`) or as
    the launch chain. pack.loop_kernels "chain" or "one_launch" forces one (the latter only up to
    ONE_LAUNCH_MAX_ROWS net rows); "auto" takes the chain off CUDA and above ONE_LAUNCH_MAX_ROWS
    rows, and otherwise whichever runs a step faster, timed once per shape (one_chain_step and
    one_launch_step each run one step, repeatably, into step_result()), after checking that the
    two agree (`_check_one_launch_agrees`)."""
    kernels = pack.loop_kernels
    if kernels not in LOOP_KERNELS:
        raise ValueError(f"loop_kernels must be one of {LOOP_KERNELS}, got {kernels!r}")
    if kernels == "one_launch" and ws.net_rows > ONE_LAUNCH_MAX_ROWS:
        raise ValueError(f"loop_kernels='one_launch' runs at most {ONE_LAUNCH_MAX_ROWS} net rows, got {ws.net_rows} "
                         "(bucketed); use 'auto' or 'chain'")
    if kernels != "auto":
        return kernels == "one_launch"
    if not gpu_configs(pack.device) or ws.net_rows > ONE_LAUNCH_MAX_ROWS:
        return False
    # not keyed on PDL: the ways round differently, and the loop must give the same result with PDL on and off
    key = (ws.net_rows, ws.use_cfg, clip, pack.width, pack.depth, pack.dtype, str(pack.device),
           torch.get_float32_matmul_precision())
    if key not in _LOOP_CHOICE and not torch.cuda.is_current_stream_capturing():  # fastest_way refuses capture
        _check_one_launch_agrees(one_chain_step, one_launch_step, step_result)
    ways = {"chain": one_chain_step, "one_launch": one_launch_step}
    return fastest_way(_LOOP_CHOICE, key, ways, "the DDPM steps (launch chain or one launch)",
                       queue_cycles=LOOP_CHOICE_QUEUE_CYCLES) == "one_launch"


def _launch_loop(pack, ws, diffusion, clip, phase_times=None):
    """Launch the whole sampling loop on ws's buffers; returns the state buffer holding x_0.

    phase_times (eager runs on CUDA, for profiling): a list to which every one-launch chunk of
    steps appends (hi, lo, its phase times: see `ddpm_sample_loop`)."""
    time_embeddings = pack.time_embeddings(diffusion)
    linear(ws.z, pack.cond_weight, pack.cond_bias, ws.cond)
    current = 0
    for lo, hi in modulation_chunks(diffusion.num_timesteps, ws.steps_per_gemm):
        ws.modulate_steps(pack, time_embeddings, lo, hi)

        def run(way, first, last, start=current, mod_step=lo, **options):
            return way(pack, ws, diffusion, mod_step, first, last, start, clip, **options)

        one_launch = _uses_one_launch(pack, ws, clip, lambda: run(_chain_steps, hi, hi),
                                      lambda: run(_one_launch_steps, hi, hi),
                                      lambda start=current: ws.states[1 - start])
        options = {}
        if one_launch and phase_times is not None:
            options["phase_times"] = torch.zeros((hi - lo + 1) * phases_per_step(pack.depth) + 1, 2,
                                                 dtype=torch.int64, device=pack.device)
            phase_times.append((hi, lo, options["phase_times"]))
        current = run(_one_launch_steps if one_launch else _chain_steps, hi, lo, **options)
    return ws.states[current]


def _check_barriers(ws):
    """Raise if a one-launch loop on ws gave up waiting at a grid barrier (reads the device, so only
    after eager runs; a replayed graph's results are NaN then, see `ddpm_sample_loop`)."""
    if barrier_timed_out(ws.sync):
        raise RuntimeError("the one-launch DDPM loop timed out at a grid barrier (its programs could not all run "
                           "at once: other work held the GPU's SMs) and returned NaN; "
                           "packed_head(net).loop_kernels = 'chain' avoids it")


class _CapturedLoop:
    def __init__(self, workspace, graph, result):
        self.workspace, self.graph, self.result = workspace, graph, result


def _sample_with_graph(pack, diffusion, z, x, step_noise, rows, use_cfg, cfg, temperature, clip_x0):
    key = (bucket_rows(rows), use_cfg, clip_x0 is not None, tuple(diffusion.timestep_map.tolist()),
           torch.get_float32_matmul_precision(),  # fp32 dots bake IEEE vs TF32 into the graph
           pack.modulation_provider, pack.modulation_gemm_rows, pack.loop_kernels,
           programmatic_launch(pack.device)["PDL"])  # a graph keeps the launch attributes it was captured with
    captured = pack.graphs.get(key)
    if captured is not None:
        pack.graphs.move_to_end(key)
        captured.workspace.load(z, x, step_noise, cfg, temperature, clip_x0)
        captured.graph.replay()
        return captured.result[:rows].clone()
    ws = _Workspace(pack, key[0], use_cfg, diffusion.num_timesteps)
    ws.load(z, x, step_noise, cfg, temperature, clip_x0)
    side = torch.cuda.Stream(device=pack.device)
    side.wait_stream(torch.cuda.current_stream(pack.device))
    with torch.cuda.stream(side):
        result = _launch_loop(pack, ws, diffusion, clip_x0 is not None)  # compiles, tunes, and computes this call
        _check_barriers(ws)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured_result = _launch_loop(pack, ws, diffusion, clip_x0 is not None)
    torch.cuda.current_stream(pack.device).wait_stream(side)
    out = result[:rows].clone()  # capture recorded work without running it: result still holds the eager run
    if captured_result is not result:
        raise RuntimeError("internal error: captured loop ends in a different state buffer")
    pack.graphs[key] = _CapturedLoop(ws, graph, result)
    while len(pack.graphs) > MAX_GRAPHS_PER_HEAD:
        pack.graphs.popitem(last=False)
    return out


def _check_inputs(pack, diffusion, z, x, step_noise, use_cfg, clip_x0):
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a marfast GaussianDiffusion, got {type(diffusion).__name__}")
    for name, t in (("z", z), ("x", x)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {getattr(t, 'dtype', type(t))} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if z.dtype == torch.float64:
        raise TypeError("the fused head computes in float32; float64 z needs backend='torch'")
    if x.dtype != torch.float32:
        raise TypeError(f"x (the DDPM state) must be float32, got {x.dtype}")
    if z.shape[1] != pack.z_channels or x.shape[1] != pack.channels:
        raise ValueError(f"z must be [R, {pack.z_channels}] and x [R, {pack.channels}], got {tuple(z.shape)} and "
                         f"{tuple(x.shape)}")
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"z and x must have the same number of rows, got {z.shape[0]} and {x.shape[0]}")
    if use_cfg and z.shape[0] % 2:
        raise ValueError(f"with cfg != 1, z must hold an even number of rows (conditional, then unconditional), "
                         f"got {z.shape[0]}")
    rows = z.shape[0] // 2 if use_cfg else z.shape[0]
    expected = (diffusion.num_timesteps, rows, pack.channels)
    if not isinstance(step_noise, torch.Tensor) or tuple(step_noise.shape) != expected or step_noise.dtype != torch.float32:
        raise ValueError(f"step_noise must be float32 of shape {expected}, got {getattr(step_noise, 'dtype', None)} "
                         f"{tuple(getattr(step_noise, 'shape', ()))}")
    for name, t in (("z", z), ("x", x), ("step_noise", step_noise)):
        if t.device != pack.device:
            raise ValueError(f"{name} is on {t.device} but the net is on {pack.device}")
    if pack.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the fused head needs a CUDA device or TRITON_INTERPRET=1, got {pack.device}")
    if clip_x0 is not None:
        if len(clip_x0) != 2 or not all(math.isfinite(float(v)) for v in clip_x0) or float(clip_x0[0]) > float(clip_x0[1]):
            raise ValueError(f"clip_x0 must be a finite (lo, hi) pair with lo <= hi, got {clip_x0}")
        clip_x0 = (float(clip_x0[0]), float(clip_x0[1]))
    return rows, clip_x0


def ddpm_sample_loop_fused(net, diffusion, z, x, temperature, cfg, step_noise, clip_x0=None, *, use_cuda_graph=True):
    """The reverse DDPM loop of `ddpm_sample_loop_reference`, fused (stable API, used by benchmarks).

    net: a SimpleMLPAdaLN-structured denoiser (official names) with fp32, bf16 or fp16 weights, on
    CUDA (or on CPU under TRITON_INTERPRET=1), computed in autocast's dtype when autocast is on for
    its device (`compute_dtype`); diffusion: the sampling GaussianDiffusion (S steps);
    z: [R, Z] conditions in any float dtype but float64 (with cfg != 1, R = 2B: conditional rows
    first, then unconditional); x: float32 [R, C] initial x_T (with CFG only the first B rows are
    read: both halves start equal); temperature >= 0; cfg: number or one-element tensor;
    step_noise: float32 [S, rows_out, C] with rows_out = B with CFG, else R; step_noise[s] is the
    noise of respaced step s (the loop runs s = S-1 .. 0; step_noise[0] is unused since t = 0 adds
    no noise); it plays the role of the first rows_out rows of `draw_noise(s)` in the reference.
    clip_x0: optional (lo, hi) clamp of the x0 prediction. use_cuda_graph: on CUDA, capture and
    replay the loop (default); False launches every kernel eagerly (for testing).

    Returns float32 [R, C]. Without CFG: x_0. With CFG only B state rows are carried: the first B
    rows are the guided samples (same as the reference's first half) and the second half is a copy
    of the first (the official head's second half is a by-product the caller discards).
    """
    pack = packed_head(net, compute_dtype(net))
    temperature = check_temperature(temperature)
    cfg = as_cfg_scale(cfg)
    use_cfg = cfg != 1.0
    rows, clip_x0 = _check_inputs(pack, diffusion, z, x, step_noise, use_cfg, clip_x0)
    if rows == 0:
        return torch.empty(0, pack.channels, device=pack.device, dtype=torch.float32)
    # past the choice of the pack's dtype, the kernels fix their own precisions: autocast must not
    # change the dtype of the cached time embeddings or of the modulation GEMM
    on_device = torch.cuda.device(pack.device) if pack.device.type == "cuda" else contextlib.nullcontext()
    with on_device, torch.inference_mode(False), torch.no_grad(), torch.autocast(pack.device.type, enabled=False):
        if pack.device.type == "cuda" and use_cuda_graph:
            out = _sample_with_graph(pack, diffusion, z, x, step_noise, rows, use_cfg, cfg, temperature, clip_x0)
        else:
            ws = _Workspace(pack, rows, use_cfg, diffusion.num_timesteps)
            ws.load(z, x, step_noise, cfg, temperature, clip_x0)
            out = _launch_loop(pack, ws, diffusion, clip_x0 is not None).clone()
            _check_barriers(ws)
    return torch.cat([out, out]) if use_cfg else out
