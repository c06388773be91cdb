"""The benchmark harness: device-time measurement inside pytest-benchmark, the measured roofline,
work models (FLOPs, bytes) and the `extra_info` every case records.

Timing. pytest-benchmark measures a round as `timer()` after minus `timer()` before the target.
The benchmark timer of this suite (`device_clock`, installed by benchmarks/conftest.py through the
`benchmark(timer=...)` marker) is a virtual clock that advances only by the time `DeviceClock.measure`
measured for a call: CUDA events around the call on a GPU (then one synchronisation per round), a
perf_counter around the call on the CPU (where work is synchronous). So the statistics that
pytest-benchmark prints and saves are device times, never the host wall clock around asynchronous
work.

Adding a case (see test_bench_head_sampling.py for a full example):

    def test_my_case(benchmark, bench):
        work = Work(flops=..., bytes_min=..., items=..., unit="rows*steps/s")
        bench.run_case(benchmark, case="my_case", case_key="my_case/size=...", provider=FUSED,
                       fn=lambda: fused(...), work=work, params={...}, reference_fn=lambda: ref(...))

`run_case` warms up, picks the number of rounds from the first timings and the session's time
budget, times the rounds through `benchmark.pedantic`, and fills `benchmark.extra_info`.
"""
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import pytest
import torch

from .machine import nvml_state

REFERENCE = "reference_eager"
COMPILE = "torch_compile"
FUSED = "marfast_fused"
PROVIDER_ORDER = (REFERENCE, COMPILE, FUSED)

NVML_PER_CASE_KEYS = ("sm_clock_mhz", "mem_clock_mhz", "power_draw_w", "temperature_c", "throttle_reasons")


class DeviceClock:
    """Virtual clock in seconds that advances only by measured device time of `measure` calls."""

    def __init__(self):
        self.elapsed_s = 0.0
        self.samples_s = []

    def measure(self, fn, device):
        """Run fn() once and return its result; the call's device time is appended to samples_s.

        CUDA: events recorded on the current stream before and after the call, then one
        synchronisation on the end event. CPU: perf_counter around the (synchronous) call.
        """
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) * 1e-3
        else:
            begin = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - begin
        self.elapsed_s += seconds
        self.samples_s.append(seconds)
        return result


CLOCK = DeviceClock()


def device_clock():
    """pytest-benchmark timer: the virtual device clock (see module docstring)."""
    return CLOCK.elapsed_s


def timer_name(device):
    return "cuda_events" if device.type == "cuda" else "perf_counter (synchronous CPU work)"


# ---------------------------------------------------------------------------------------------
# roofline

@dataclass
class Roofline:
    """Rates measured on this device in this run: the denominators of every `roofline_fraction`."""

    device: str
    matmul_tflops: float
    matmul_dtype: str
    matmul_size: int
    copy_gbps: float
    copy_bytes: int
    reps: int
    method: str

    def floor_s(self, flops, bytes_min):
        """Lower bound on the time of a call: the slower of its arithmetic and its memory traffic."""
        return max(flops / (self.matmul_tflops * 1e12), bytes_min / (self.copy_gbps * 1e9))


def _median_seconds(fn, device, warmup, reps):
    clock = DeviceClock()
    for _ in range(warmup):
        clock.measure(fn, device)
    clock.samples_s.clear()
    for _ in range(reps):
        clock.measure(fn, device)
    return statistics.median(clock.samples_s)


def measure_roofline(device):
    """Measure the matmul rate and the device-to-device copy bandwidth on `device`.

    CUDA: an 8192^3 bf16 matrix product and a 1 GiB copy (bytes read plus written), medians of 20
    CUDA-event timings after 5 warm-up calls. CPU: a 1024^3 fp32 product and a 64 MiB copy
    (the CPU cases run in fp32), medians of 5 timings.
    """
    if device.type == "cuda":
        size, dtype, copy_bytes, warmup, reps = 8192, torch.bfloat16, 2**30, 5, 20
    else:
        size, dtype, copy_bytes, warmup, reps = 1024, torch.float32, 2**26, 1, 5
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    matmul_s = _median_seconds(lambda: torch.mm(a, b), device, warmup, reps)
    del a, b
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).uniform_(generator=gen)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, warmup, reps)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Roofline(
        device=str(device), matmul_tflops=2 * size**3 / matmul_s / 1e12, matmul_dtype=str(dtype).replace("torch.", ""),
        matmul_size=size, copy_gbps=2 * copy_bytes / copy_s / 1e9, copy_bytes=copy_bytes, reps=reps,
        method=f"median of {reps} timings ({timer_name(device)}) after {warmup} warm-up calls; "
               f"copy bandwidth counts bytes read plus written",
    )


# ---------------------------------------------------------------------------------------------
# work models

def head_flops_per_row_step(depth, width, channels):
    """FLOPs of one denoiser pass for one row, excluding the per-call condition embedding.

    2 * ((5 * depth + 2) * W^2 + 3 * W * C): per block 3 W^2 (adaLN modulation) + 2 W^2 (MLP), the
    final layer's 2 W^2 modulation, input_proj (W * C) and the final linear (2C * W). The time
    embedding is per timestep, not per row, and is left out.
    """
    return 2 * ((5 * depth + 2) * width**2 + 3 * width * channels)


def head_flops_per_row_call(width, z_channels):
    """FLOPs of cond_embed(z) for one row, needed once per sampling call."""
    return 2 * width * z_channels


def head_weight_split(net):
    """(per-step parameters, per-call parameters) of an MLP head (`SimpleMLPAdaLN`) when sampling.

    The adaLN modulations and the time and condition embeddings depend only on t and z, never on
    x_t, so one sampling call can compute them for all its DDPM steps while reading their weights
    once (the fused loop does, in GEMMs of many steps each); the input projection, the block MLPs
    and the final linear act on x_t and are needed at every step.
    """
    per_call = sum(p.numel() for name, p in net.named_parameters()
                   if "adaLN_modulation" in name or name.startswith(("time_embed.", "cond_embed.")))
    return sum(p.numel() for p in net.parameters()) - per_call, per_call


def head_sampling_work(net, rows, steps, weight_bytes_per_param, state_bytes=4):
    """(flops, bytes_min) of one `DiffLoss.sample` call over `rows` rows and `steps` DDPM steps.

    bytes_min: the per-step weights (`head_weight_split`) read once per step and the per-call
    weights once, plus x read and written per step in the state dtype, plus z read once.
    """
    depth, width = net.num_res_blocks, net.model_channels
    channels, z_channels = net.in_channels, net.cond_embed.in_features
    flops = rows * (steps * head_flops_per_row_step(depth, width, channels) + head_flops_per_row_call(width, z_channels))
    per_step, per_call = head_weight_split(net)
    bytes_min = steps * (per_step * weight_bytes_per_param + 2 * rows * channels * state_bytes) \
        + (per_call + rows * z_channels) * weight_bytes_per_param
    return float(flops), float(bytes_min)


def transformer_head_flops(depth, width, channels, z_channels, context_len, hidden, frequency_channels=256):
    """(FLOPs per row per DDPM step, FLOPs per image per sampling call) of De-MAR's Transformer head.

    Per row and step, as `marfast.demar.TransformerDenoiser` computes them: the time embedding
    (F -> W -> W, F = frequency_channels; t is per row), cond_embed (Z -> W), the shared adaLN
    projection (W -> 4W), input_proj (C -> W), per block q and proj (2 W^2), the FFN (2 W hidden)
    and the attention of the row to its image's L context tokens (q k^T and p v: 4 L W), and the
    final linear (W -> 2C). Per image and call: each block's key/value projection of the context
    (L x Z -> 2W), computed once per sampling call. Unlike `head_flops_per_row_step` (MLP head),
    the time embedding and cond_embed count per row and step, because this net runs them so.
    """
    linear_per_row = (frequency_channels * width + width**2 + z_channels * width + 4 * width**2 + channels * width
                      + depth * (2 * width**2 + 2 * width * hidden) + 2 * channels * width)
    per_row_step = 2 * linear_per_row + depth * 4 * context_len * width
    per_image_call = depth * 2 * context_len * z_channels * 2 * width
    return per_row_step, per_image_call


def transformer_head_sampling_work(net, groups, rows_per_image, context_len, steps, weight_bytes_per_param,
                                   state_bytes=4):
    """(flops, bytes_min) of one `TransformerDiffLoss.sample` call: `groups` images (CFG: both
    halves counted), `rows_per_image` rows each, `context_len` context tokens per image.

    net: a `marfast.demar.TransformerDenoiser`. bytes_min, in the weight dtype unless said: the
    weights used per step read once per step, the key/value projection weights and the context
    [G, L, Z] read once, the keys and values [G, L, 2W] of every block written once and read once
    per step (they are per image: at large batches they outweigh the weights), the state x read
    and written per step in the state dtype, and z read once.
    """
    depth, width = len(net.blocks), net.model_channels
    channels, z_channels = net.in_channels, net.z_channels
    hidden = net.blocks[0].mlp[0].out_features
    per_row_step, per_image_call = transformer_head_flops(depth, width, channels, z_channels, context_len, hidden,
                                                          net.time_embed.frequency_embedding_size)
    rows = groups * rows_per_image
    flops = steps * rows * per_row_step + groups * per_image_call
    kv_params = sum(p.numel() for block in net.blocks for p in block.attn.kv.parameters())
    step_params = sum(p.numel() for p in net.parameters()) - kv_params
    kv_elements = depth * groups * context_len * 2 * width
    bytes_min = steps * (step_params * weight_bytes_per_param + kv_elements * weight_bytes_per_param
                         + 2 * rows * channels * state_bytes) \
        + (kv_params + groups * context_len * z_channels + kv_elements + rows * z_channels) * weight_bytes_per_param
    return float(flops), float(bytes_min)


def denoising_head_work(head, rows, bytes_per_element):
    """(flops, bytes_min) of one `marfast.demar.DenoisingHead` forward over `rows` rows.

    FLOPs: its four linear layers per row (refinement C+Z -> W -> C, assessment 2C+Z -> W -> 2).
    bytes_min: the weights once, the noisy tokens [rows, C] and z [rows, Z] read and the mixed
    tokens [rows, C] written, all in `bytes_per_element`.
    """
    layers = (head.refine_fc1, head.refine_fc2, head.assess_fc1, head.assess_fc2)
    flops = rows * sum(2 * layer.in_features * layer.out_features for layer in layers)
    channels = head.refine_fc2.out_features
    z_channels = head.refine_fc1.in_features - channels
    params = sum(p.numel() for p in head.parameters())
    bytes_min = (params + rows * (2 * channels + z_channels)) * bytes_per_element
    return float(flops), float(bytes_min)


def transformer_block_flops(dim, tokens, mlp_ratio):
    """FLOPs of one pre-norm ViT block over `tokens` tokens of one sequence (projections + attention)."""
    return (8 + 4 * mlp_ratio) * dim**2 * tokens + 4 * tokens**2 * dim


def mar_schedule(seq_len, num_iter):
    """The reference AR schedule: per step (tokens known when it starts, tokens it predicts)."""
    from marfast.mar import next_mask_len

    steps, masked_now = [], seq_len
    for step in range(num_iter):
        masked_after = next_mask_len(seq_len, step, num_iter, masked_now) if step < num_iter - 1 else 0
        steps.append((seq_len - masked_now, masked_now - masked_after))
        masked_now = masked_after
    return steps


def mar_sampling_flops_per_image(config, num_iter, cfg_on, steps=None):
    """FLOPs to sample one image with `sample_tokens(num_iter=...)`, split by part.

    config: a MAR `model.config` dict (constructor keywords). Follows the reference schedule: at
    each AR step the encoder sees buffer + known tokens, the decoder buffer + seq_len; the head
    denoises each predicted token once per DDPM step; CFG doubles all. steps: the AR step indices
    to count (default all). Returns {"encoder", "decoder", "head", "total"} in FLOPs.
    """
    from marfast.diffusion import parse_num_steps

    seq_len = (config["img_size"] // config["vae_stride"] // config["patch_size"]) ** 2
    token_channels = config["vae_embed_dim"] * config["patch_size"] ** 2
    buffer, mlp_ratio = config["buffer_size"], config["mlp_ratio"]
    ddpm_steps, width = parse_num_steps(config["num_sampling_steps"]), config["diffloss_w"]
    head_per_token = ddpm_steps * head_flops_per_row_step(config["diffloss_d"], width, token_channels) \
        + head_flops_per_row_call(width, config["decoder_embed_dim"])
    schedule = mar_schedule(seq_len, num_iter)
    copies = 2 if cfg_on else 1
    parts = {"encoder": 0.0, "decoder": 0.0, "head": 0.0}
    for step in range(num_iter) if steps is None else steps:
        known, predicted = schedule[step]
        parts["encoder"] += copies * config["encoder_depth"] * transformer_block_flops(
            config["encoder_embed_dim"], buffer + known, mlp_ratio)
        parts["decoder"] += copies * config["decoder_depth"] * transformer_block_flops(
            config["decoder_embed_dim"], buffer + seq_len, mlp_ratio)
        parts["head"] += copies * predicted * head_per_token
    parts["total"] = sum(parts.values())
    return parts


def mar_sampling_bytes(model, num_ar_steps, weight_bytes_per_param):
    """Lower bound on bytes moved by `num_ar_steps` AR steps of sampling (any batch): per AR step
    the transformer weights and the head's per-call weights once, and the head's per-step weights
    once per DDPM step (`head_weight_split`)."""
    blocks = list(model.encoder_blocks) + list(model.decoder_blocks)
    transformer_params = sum(p.numel() for block in blocks for p in block.parameters())
    per_step, per_call = head_weight_split(model.diffloss.net)
    steps = model.diffloss.num_sampling_steps
    return float(num_ar_steps * (transformer_params + per_call + steps * per_step) * weight_bytes_per_param)


@dataclass
class Work:
    """What one call of a case does: FLOPs, a lower bound on bytes moved, and its natural unit.

    items: how many `unit`s one call produces (e.g. rows * steps for "rows*steps/s");
    other_items: further {unit: count per call} rates to report (e.g. {"tokens/s": ...}).
    """

    flops: float
    bytes_min: float
    items: float
    unit: str
    other_items: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the session

class Budget:
    """Wall-clock budget for the whole benchmark session (None: unlimited).

    Cases that would not fit are skipped with a reason naming their estimated cost, never timed
    with fewer rounds than one real call.
    """

    def __init__(self, total_s):
        self.total_s = total_s
        self.deadline = None if total_s is None else time.monotonic() + total_s

    def remaining_s(self):
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def require(self, needed_s, what):
        left = self.remaining_s()
        if needed_s > left:
            pytest.skip(f"{what}: needs about {needed_s:.3g} s but {max(left, 0):.3g} s are left of the "
                        f"{self.total_s:.0f} s session budget (--bench-budget-s); run it in a call of its own with -k")


def summarize(samples_s):
    data = sorted(samples_s)
    median = statistics.median(data)
    if len(data) >= 4:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1, q3 = data[0], data[-1]
    return {
        "median_s": median,
        "mean_s": statistics.fmean(data),
        "min_s": data[0],
        "max_s": data[-1],
        "stddev_s": statistics.stdev(data) if len(data) > 1 else 0.0,
        "iqr_s": q3 - q1,
        "spread_pct": 100.0 * (q3 - q1) / median if median > 0 else 0.0,
        "rounds": len(data),
    }


def choose_rounds(estimate_s, target_s, max_rounds, budget_left_s):
    """Rounds to time: enough to fill target_s (3 at least when that costs under target_s), at most
    max_rounds, and no more than 80% of the remaining budget allows. 0 means not even one fits."""
    if estimate_s <= 0:
        wanted = max_rounds
    elif 3 * estimate_s <= target_s:
        wanted = min(max_rounds, max(3, int(target_s / estimate_s)))
    else:
        wanted = max(1, min(3, int(target_s / estimate_s)))
    if math.isfinite(budget_left_s):
        wanted = min(wanted, int(0.8 * budget_left_s / max(estimate_s, 1e-9)))
    return max(wanted, 0)


class BenchSession:
    """Per-run state shared by all cases: device, clock, roofline, budget and same-run results."""

    def __init__(self, device, budget, target_s, max_rounds, quick):
        self.device = device
        self.budget = budget
        self.target_s = target_s
        self.max_rounds = max_rounds
        self.quick = quick
        self.clock = CLOCK
        self._roofline = None
        self.medians = {}
        self.cache = {}
        self.options = {}
        self.last_samples_s = []

    @property
    def on_gpu(self):
        return self.device.type == "cuda"

    def cached(self, key, make):
        """self.cache[key], made by make() on first use (models, compiled nets, inputs of a run)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    @property
    def roofline(self):
        if self._roofline is None:
            self._roofline = measure_roofline(self.device)
        return self._roofline

    def measure(self, fn):
        return self.clock.measure(fn, self.device)

    def time_rounds(self, benchmark, fn, rounds):
        """Time `rounds` calls of fn through pytest-benchmark (device clock); returns their seconds."""
        first = len(self.clock.samples_s)
        benchmark.pedantic(lambda: self.measure(fn), rounds=rounds, warmup_rounds=0, iterations=1)
        return list(self.clock.samples_s[first:])

    def warm_up(self, fn, warmup_calls, expected_s, target_s, what, check_output=None):
        """Run the untimed warm-up calls and pick the rounds to time: (first_call_s, rounds).

        With warmup_calls == 0 the rounds come from expected_s and are capped at 3 (the estimate is
        rough); the budget check asks for (warmup_calls + 1) calls up front.
        """
        if warmup_calls == 0 and expected_s is None:
            raise ValueError(f"{what}: expected_s is needed when warmup_calls is 0")
        self.budget.require((warmup_calls + 1) * (expected_s or 0.0), what)
        first_call_s, estimate_s = None, expected_s
        for index in range(warmup_calls):
            result = self.measure(fn)
            estimate_s = self.clock.samples_s[-1]
            if index == 0:
                first_call_s = estimate_s
                if check_output is not None:
                    check_output(result)
            del result
        rounds = choose_rounds(estimate_s, target_s or self.target_s, self.max_rounds, self.budget.remaining_s())
        if rounds == 0:
            self.budget.require(estimate_s / 0.8, f"{what} timed rounds")
            rounds = 1
        if warmup_calls == 0:
            rounds = min(rounds, 3)
        return first_call_s, rounds

    def time_reference_within_case(self, reference_fn, case_key, warmup_calls, expected_s, target_s,
                                   reference_provider=REFERENCE):
        """Time the reference in this case (when its own case did not run in this session)."""
        first_s, rounds = self.warm_up(reference_fn, warmup_calls, expected_s, target_s,
                                       f"timing the reference of {case_key} within the case")
        for _ in range(rounds):
            self.measure(reference_fn)
        median = statistics.median(self.clock.samples_s[-rounds:])
        self.medians[(case_key, reference_provider)] = median
        first = f", first call {first_s:.4g} s" if first_s is not None else ""
        return median, f"timed within this case ({rounds} rounds after {warmup_calls} warm-up calls{first})"

    def run_case(self, benchmark, *, case, case_key, provider, fn, work, params, provider_detail="",
                 warmup_calls=None, expected_s=None, target_s=None, check_output=None, notes=(),
                 reference_fn=None, reference_warmup_calls=None, reference_expected_s=None,
                 reference_provider=REFERENCE):
        """Warm up, time and record one (case, provider) pair; returns the extra_info dict.

        fn: the call to time (one full unit of work, e.g. a whole 100-step sampling loop).
        warmup_calls: untimed calls before the rounds (compilation, CUDA-graph capture, caches);
        default 2 on a GPU, 1 on the CPU.
        expected_s: a rough cost of one call, to skip the case up front when (warmup_calls + 1)
        calls would not fit the budget; with warmup_calls=0 it also sets the number of rounds.
        target_s: timed seconds to aim for (default: the session's --bench-target-s).
        check_output: callable(result) that raises on a wrong result (shape, non-finite values);
        applied to the first call.
        reference_fn, reference_warmup_calls, reference_expected_s: the reference provider's call
        for the same case and how to warm it up; it is timed here only when the reference case did
        not run earlier in this session (e.g. filtered out by -k).
        reference_provider: the provider whose median the speedups of this case divide (default
        REFERENCE; a case comparing two models names one of its own providers).
        """
        benchmark.group = case_key
        if warmup_calls is None:
            warmup_calls = 2 if self.on_gpu else 1
        what = f"{case_key} [{provider}]"
        first_call_s, rounds = self.warm_up(fn, warmup_calls, expected_s, target_s, what, check_output)
        first_results = []

        def timed_call():
            result = fn()
            if not first_results:
                first_results.append(result)
            return result

        samples = self.time_rounds(benchmark, timed_call, rounds)
        self.last_samples_s = samples
        if warmup_calls == 0 and check_output is not None:
            check_output(first_results[0])
        first_results.clear()
        stats = summarize(samples)
        median = stats["median_s"]
        self.medians[(case_key, provider)] = median

        info = {
            "case": case,
            "case_key": case_key,
            "provider": provider,
            "provider_detail": provider_detail,
            "params": params,
            "device": torch.cuda.get_device_name(self.device) if self.on_gpu else "cpu",
            "timer": timer_name(self.device),
            "warmup_calls": warmup_calls,
            "first_call_s": first_call_s,
            **stats,
            "throughput": work.items / median,
            "throughput_unit": work.unit,
            "other_rates": {unit: count / median for unit, count in work.other_items.items()},
            "flops": work.flops,
            "tflops_per_s": work.flops / median / 1e12,
            "bytes_min": work.bytes_min,
            "gb_per_s": work.bytes_min / median / 1e9,
        }
        info.update(self.roofline_fields(work, median))
        info["reference_provider"] = reference_provider
        if provider == reference_provider:
            info.update(speedup_vs_reference=1.0, reference_median_s=median, reference_source="this case")
        else:
            reference = self.medians.get((case_key, reference_provider))
            source = "same run, reference case of this group"
            if reference is None and reference_fn is not None:
                if reference_warmup_calls is None:
                    reference_warmup_calls = 2 if self.on_gpu else 1
                reference, source = self.time_reference_within_case(
                    reference_fn, case_key, reference_warmup_calls, reference_expected_s, target_s,
                    reference_provider)
            if reference is None:
                info.update(speedup_vs_reference=None, reference_source="reference not timed in this run")
            else:
                info.update(speedup_vs_reference=reference / median, reference_median_s=reference,
                            reference_source=source)
            compiled = self.medians.get((case_key, COMPILE))
            if provider != COMPILE and compiled is not None:
                info["speedup_vs_compile"] = compiled / median
        info["notes"] = list(notes)
        if self.on_gpu:
            state = nvml_state()
            info["gpu_state_after"] = {key: state[key] for key in NVML_PER_CASE_KEYS if key in state} or state
        benchmark.extra_info.update(info)
        return info

    def roofline_fields(self, work, median):
        roof = self.roofline
        compute_s = work.flops / (roof.matmul_tflops * 1e12)
        memory_s = work.bytes_min / (roof.copy_gbps * 1e9)
        floor_s = max(compute_s, memory_s)
        return {
            "roofline": asdict(roof),
            "floor_s": floor_s,
            "bound": "compute" if compute_s >= memory_s else "memory",
            "roofline_fraction": floor_s / median,
            "flop_fraction": compute_s / median,
            "bandwidth_fraction": memory_s / median,
        }
