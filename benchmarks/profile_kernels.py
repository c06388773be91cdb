"""Where the time of one benchmark case goes: a kernel-level profile under `torch.profiler`.

    python -m benchmarks.profile_kernels --case head --head 6x1024 --rows 8 --out DIR
    python -m benchmarks.profile_kernels --case mar --head 6x1024 --batch 1 --cuda-graphs --out DIR
    python -m benchmarks.profile_kernels --case training --head 6x1024 --rows 65536 --out DIR

Cases (built with the benchmark suite's builders, benchmarks/models.py, with the same weights,
dtypes and CFG scales as the benchmarks):
- head: `DiffLoss.sample` of a head size (`--head`) over `--rows` denoiser rows (CFG 3: half
  conditional, half unconditional), 100 DDPM steps, bf16 weights and a float32 state on CUDA;
- mar: `sample_tokens` of the MAR preset whose released head `--head` names (6x1024: mar_base,
  8x1280: mar_large, 12x1536: mar_huge; tiny: the suite's 16-token CPU model) at `--batch` images,
  `--num-iter` AR steps, the released CFG scale with the linear schedule, bf16 autocast on CUDA;
- training: one `DiffLoss` training call of a head size at `--rows` rows (default 65,536 on CUDA:
  a MAR batch of 64 x 256 tokens x diffusion_batch_mul 4), bf16 weights: zero_grad, the masked
  loss, its backward, as the training benchmark (benchmarks/test_bench_training.py) times it; the
  JSON adds the matmul floor of its FLOPs and the call's peak memory.
Providers: `fused` (head: `DiffLoss(backend="triton").sample`; mar: `MAR.sample_tokens_fast` with
the fused head; training: `DiffLoss(backend="triton")`, marfast.fused_training), `reference` (the
plain-PyTorch loops and modules with the reference head) and, for training only, `compile`
(`torch.compile` of the reference denoiser); for the fused head and mar cases `--loop-kernels
chain|one_launch|auto` sets how the fused head runs its DDPM steps (`marfast.fused_head`: a launch
chain, one launch per modulation chunk at up to 64 rows, or the faster of the two). On the CPU only
`--head tiny` with `--provider reference` is accepted (the Triton interpreter is a correctness tool,
not something to profile); anything else exits with status 2 and says why.

The case is warmed up first (Triton compilation and autotuning, CUDA-graph capture), then timed
for `--calls` calls without the profiler (CUDA events), then profiled for `--calls` calls, each
inside a `record_function("marfast/profiled_call_<i>")` range that ends with a synchronisation, so
every kernel is assigned to the call that launched it (CUPTI timestamps share the host clock).
Kernels replayed from CUDA graphs are recorded by CUPTI like any other kernel; the JSON says
whether graphs were in use, and warns when graphs ran but the device looks nearly idle (kernels
missing from the trace). The graphs are captured before the profiler starts; older CUDA/CUPTI
stacks could crash when such graphs were replayed under a profiler started later, and
--init-profiler-early (an empty profiler session before the case is built) is PyTorch's
workaround for that. Written to --out: `profile-<device>-<case label>-<stamp>.json` (and,
with --trace, the Chrome trace next to it); a table of the top 15 kernels goes to stdout.

"Device time" is the sum of the durations of the GPU activities (kernels, memcpy, memset) on
CUDA; on the CPU, the self time of the profiled operators (there the operators are the work).
"Busy" is the union of those intervals; gap = wall - busy is host, launch and idle time.
Durations come from each event's time range, which every torch version has; the CPU operators'
attributed device time is read as `self_device_time_total`, falling back to
`self_cuda_time_total` (torch renamed it).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from marfast.fused_head import LOOP_KERNELS, packed_head
from marfast.mar import set_norm_backend
from marfast.sampler import CUDA_GRAPHS_ENV_VAR, cuda_graphs_requested

from .harness import head_sampling_work, head_weight_split, mar_sampling_bytes, measure_roofline
from .machine import device_label, kernel_timings, nvml_state, software_info
from .models import (RELEASED_CFG, RELEASED_HEAD_OF, RELEASED_HEADS, TINY_HEAD, build_head, build_mar,
                     fused_head_absence, training_inputs, training_step)
from .report import describe_timed_choice
from .test_bench_head_sampling import CFG as HEAD_CFG
from .test_bench_mar_sampling import HeadTimer
from .test_bench_training import peak_memory_bytes, plain_forward_calls, training_work

H100_COPY_GBPS = 2987.0  # device-to-device copy bandwidth measured by harness.measure_roofline on the H100
H100_MATMUL_TFLOPS = 801.0  # bf16 matmul rate measured by harness.measure_roofline on the H100
HEADS = {**{spec.name: spec for spec in RELEASED_HEADS}, "tiny": TINY_HEAD}
MAR_OF_HEAD = {**{spec.name: name for name, spec in RELEASED_HEAD_OF.items()}, "tiny": "tiny_mar"}
PROVIDERS = ("fused", "reference", "compile")
CASES = ("head", "mar", "training")
TRAINING_ROWS = {"cuda": 65536, "cpu": 256}
CALL_RANGE_PREFIX = "marfast/profiled_call_"
TABLE_ROWS = 15
HOST_OPS_KEPT = 30
DEVICE_TIME_ATTRIBUTES = ("self_device_time_total", "self_cuda_time_total")
GRAPH_LAUNCH_NAMES = ("cudaGraphLaunch", "cuGraphLaunch")


class CaseUnavailable(RuntimeError):
    """The requested fast path does not run on this machine (the reason is the message)."""


class BadOption(ValueError):
    """An option that does not fit the case it builds (found only once the model exists)."""


# ---------------------------------------------------------------------------------------------
# cases

class ProfileCase:
    """One profiled workload: `call()` runs one complete unit (a whole sampling or training call).

    kind: one of CASES; label: part of the output file name; params: the case's parameters for
    the JSON; steps: the inner loop's steps per call (DDPM steps for the head, AR steps for MAR, 1
    for training) and step_unit its name; cuda_graphs: {"used": bool, "detail": str}; extra(wall_s): further JSON fields (floors, time
    splits), computed right after the unprofiled calls from their wall times in seconds.
    """

    def __init__(self, kind, label, params, call, steps, step_unit, warmup_calls, cuda_graphs, extra):
        self.kind, self.label, self.params, self.call = kind, label, params, call
        self.steps, self.step_unit, self.warmup_calls = steps, step_unit, warmup_calls
        self.cuda_graphs, self.extra = cuda_graphs, extra


def roofline_rates(args, device):
    """(copy GB/s, bf16 matmul TFLOP/s, source) of the floors: measured by harness.measure_roofline
    with --measure-roofline, else --hbm-gbps and --matmul-tflops."""
    if args.measure_roofline:
        roofline = measure_roofline(device)
        return roofline.copy_gbps, roofline.matmul_tflops, f"measured in this run: {roofline.method}"
    return args.hbm_gbps, args.matmul_tflops, "--hbm-gbps and --matmul-tflops"


def _loop_kernels_suffix(args):
    """A profile label's mark of a forced --loop-kernels (only fused cases take one: parse_args)."""
    return "" if args.loop_kernels == "auto" else f"-{args.loop_kernels}"


def build_head_case(args, device):
    spec = HEADS[args.head]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused = args.provider == "fused"
    head = build_head(spec, device, dtype, backend="triton" if fused else "torch")
    if fused:
        reason = fused_head_absence(head, spec.z_channels, device, dtype, HEAD_CFG)
        if reason:
            raise CaseUnavailable(reason)
        packed_head(head.net).loop_kernels = args.loop_kernels
    z = torch.randn(args.rows, spec.z_channels, device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(args.rows))
    steps = head.num_sampling_steps
    weight_bytes = torch.finfo(dtype).bits // 8
    params = {"head": spec.name, "depth": spec.depth, "width": spec.width, "z_channels": spec.z_channels,
              "channels": spec.channels, "rows": args.rows, "tokens": args.rows // 2, "ddpm_steps": steps,
              "cfg": HEAD_CFG, "weight_dtype": str(dtype).replace("torch.", ""), "state_dtype": "float32",
              "provider": args.provider, "loop_kernels": args.loop_kernels if fused else None,
              "call": "DiffLoss(backend='triton').sample" if fused else "DiffLoss(backend='torch').sample"}
    graphs = {"used": fused and device.type == "cuda",
              "detail": "the fused loop replays one CUDA graph of all DDPM steps per row bucket "
                        "(marfast.fused_head)" if fused else "none: the eager reference loop"}

    def extra(wall_s):
        gbps, _, source = roofline_rates(args, device)
        weight_bytes_per_step = head_weight_split(head.net)[0] * weight_bytes
        _, bytes_min = head_sampling_work(head.net, args.rows, steps, weight_bytes)
        floor_us = bytes_min / steps / (gbps * 1e9) * 1e6
        wall_us = statistics.median(wall_s) / steps * 1e6
        return {"weight_streaming_floor": {
            "weight_bytes_per_step": weight_bytes_per_step,
            "bytes_min_per_step": bytes_min / steps,
            "bytes_min_counts": "the head's per-step weights once per DDPM step and its per-call weights (adaLN, "
                                "time and condition embeddings) once per call, in the weight dtype, the float32 "
                                "state read and written, z once per call (harness.head_sampling_work / steps)",
            "hbm_gbps": gbps, "hbm_gbps_source": source,
            "floor_us_per_step": floor_us,
            "wall_us_per_step_unprofiled": wall_us,
            "wall_over_floor": wall_us / floor_us}}

    label = f"head-{spec.name}-rows{args.rows}-{args.provider}" + _loop_kernels_suffix(args)
    return ProfileCase("head", label, params, lambda: head.sample(z, temperature=1.0, cfg=HEAD_CFG), steps,
                       "DDPM step", args.warmup if args.warmup is not None else 2, graphs, extra)


def build_mar_case(args, device):
    name = MAR_OF_HEAD[args.head]
    on_gpu = device.type == "cuda"
    if args.cuda_graphs:
        os.environ[CUDA_GRAPHS_ENV_VAR] = "1"
    model = build_mar(name, device)
    num_iter = args.num_iter if args.num_iter is not None else min(64, model.seq_len)
    if not 1 <= num_iter <= model.seq_len:
        raise BadOption(f"--num-iter must be in 1..{model.seq_len} for {name}, got {num_iter}")
    cfg = RELEASED_CFG.get(name, 3.0)
    labels = torch.arange(args.batch, device=device) % model.num_classes
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    fused = args.provider == "fused"
    if fused:
        model.diffloss.backend = "triton"
        with autocast:
            reason = fused_head_absence(model.diffloss, model.diffloss.z_channels, device, torch.float32, cfg)
        if reason:
            raise CaseUnavailable(reason)
        packed_head(model.diffloss.net).loop_kernels = args.loop_kernels
        description = "MAR.sample_tokens_fast"
    else:
        model.diffloss.backend = "torch"
        description = "MAR.sample_tokens (reference loop)"
    set_norm_backend(model, "auto" if fused else "torch")

    def sample():
        kwargs = dict(bsz=args.batch, num_iter=num_iter, cfg=cfg, cfg_schedule="linear", labels=labels,
                      temperature=1.0)
        with autocast, torch.no_grad():
            return model.sample_tokens_fast(**kwargs) if fused else model.sample_tokens(**kwargs)

    timer = HeadTimer(model, device)
    step_graphs = fused and on_gpu and cuda_graphs_requested()
    head_graphs = fused and on_gpu
    graphs = {"used": step_graphs or head_graphs,
              "transformer_steps": step_graphs, "head_loop": head_graphs,
              "detail": ("transformer steps replayed as CUDA graphs (MARFAST_CUDA_GRAPHS=1); " if step_graphs
                         else "transformer steps eager; ")
              + ("the fused head replays one CUDA graph per row bucket" if head_graphs else "reference head, eager")}
    params = {"model": name, "head": f"{model.diffloss.net.num_res_blocks}x{model.diffloss.net.model_channels}",
              "batch": args.batch, "num_iter": num_iter, "ddpm_steps": model.diffloss.num_sampling_steps,
              "cfg": cfg, "cfg_schedule": "linear", "temperature": 1.0,
              "precision": "bf16 autocast, fp32 transformer weights, bf16 head weights" if on_gpu else "fp32",
              "provider": args.provider, "loop_kernels": args.loop_kernels if fused else None,
              "call": f"{description}, DiffLoss backend {model.diffloss.backend!r}, "
                      f"norm backend {model.encoder_blocks[0].norm_backend!r}",
              "marfast_cuda_graphs_env": os.environ.get(CUDA_GRAPHS_ENV_VAR, "unset")}

    def extra(wall_s):
        gbps, _, source = roofline_rates(args, device)
        weight_bytes = 2 if on_gpu else 4
        bytes_min = mar_sampling_bytes(model, num_iter, weight_bytes)
        floor_s = bytes_min / (gbps * 1e9)
        return {"head_time_split": timer.split(len(wall_s), wall_s, num_iter),
                "weight_streaming_floor": {
                    "bytes_min_per_call": bytes_min,
                    "bytes_min_counts": "transformer weights once per AR step, head weights once per DDPM step "
                                        "(harness.mar_sampling_bytes)",
                    "hbm_gbps": gbps, "hbm_gbps_source": source, "floor_s_per_call": floor_s,
                    "wall_over_floor": statistics.median(wall_s) / floor_s}}

    label = (f"mar-{name}-b{args.batch}-iters{num_iter}-{args.provider}" + ("-graphs" if step_graphs else "")
             + _loop_kernels_suffix(args))
    return ProfileCase("mar", label, params, timer.wrap(sample), num_iter, "AR step",
                       args.warmup if args.warmup is not None else 1, graphs, extra)


def build_training_case(args, device):
    spec = HEADS[args.head]
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    head = build_head(spec, device, dtype, backend="torch").train()
    if args.provider == "compile":
        head.net = torch.compile(head.net)
    inputs = training_inputs(spec, args.rows, device, dtype)
    if args.provider == "fused":
        head.backend = "triton"
        plain_calls = plain_forward_calls(head, inputs)
        if plain_calls:
            raise CaseUnavailable(f"DiffLoss(backend='triton').forward ran the plain denoiser forward "
                                  f"{plain_calls} time(s): the fused training path is not in use")
    flops, _ = training_work(spec, args.rows, torch.finfo(dtype).bits // 8)
    params = {"head": spec.name, "depth": spec.depth, "width": spec.width, "z_channels": spec.z_channels,
              "channels": spec.channels, "rows": args.rows, "weight_dtype": str(dtype).replace("torch.", ""),
              "provider": args.provider,
              "call": {"fused": "DiffLoss(backend='triton')", "reference": "DiffLoss(backend='torch')",
                       "compile": "DiffLoss(backend='torch') with torch.compile(net)"}[args.provider]
              + ": zero_grad(set_to_none), masked loss, backward"}

    def call():
        return training_step(head, inputs)

    def extra(wall_s):
        _, tflops, source = roofline_rates(args, device)
        floor_us = flops / (tflops * 1e12) * 1e6
        wall_us = statistics.median(wall_s) * 1e6
        return {"matmul_floor": {"flops_per_call": flops,
                                 "flops_counts": "3x the forward FLOPs of every row's denoiser pass and condition "
                                                 "embedding (benchmarks/test_bench_training.training_work)",
                                 "matmul_tflops": tflops, "matmul_tflops_source": source,
                                 "floor_us_per_call": floor_us, "wall_us_per_call_unprofiled": wall_us,
                                 "wall_over_floor": wall_us / floor_us},
                "peak_memory_gib": peak_memory_bytes(device, call) / 2**30 if on_gpu else None}

    label = f"training-{spec.name}-rows{args.rows}-{args.provider}"
    graphs = {"used": False, "detail": "none: forward and backward launch eagerly"}
    return ProfileCase("training", label, params, call, 1, "training call",
                       args.warmup if args.warmup is not None else 2, graphs, extra)


CASE_BUILDERS = {"head": build_head_case, "mar": build_mar_case, "training": build_training_case}


# ---------------------------------------------------------------------------------------------
# timing and profiling

def timed_call(fn, device):
    """Run fn() once; seconds of wall time (CUDA events on the current stream, then a synchronisation)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def profiler_activities(device):
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def run_profile(case, device, calls, trace_path=None):
    """Warm up, time `calls` calls, then profile `calls` calls.

    Returns (unprofiled seconds per call, profiled seconds per call, the profiler's events,
    case.extra of the unprofiled calls).
    """
    for _ in range(case.warmup_calls):
        timed_call(case.call, device)
    unprofiled = [timed_call(case.call, device) for _ in range(calls)]
    extra = case.extra(unprofiled)
    profiled = []
    with profile(activities=profiler_activities(device)) as prof:
        for index in range(calls):
            with record_function(f"{CALL_RANGE_PREFIX}{index}"):
                profiled.append(timed_call(case.call, device))
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return unprofiled, profiled, list(prof.events()), extra


def device_time_attributed_us(event):
    """Device time the profiler attributes to a CPU operator itself (µs), across torch versions."""
    for name in DEVICE_TIME_ATTRIBUTES:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def interval_union(intervals):
    """Merged, sorted [(start, end)] of possibly overlapping intervals."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def percentile(values, fraction):
    data = sorted(values)
    return data[min(len(data) - 1, int(fraction * len(data)))] if data else 0.0


def group_by_name(items, calls, total_us):
    """[(name, µs)] -> rows sorted by time: calls and µs per profiled call, average µs, share of total_us."""
    totals, counts = defaultdict(float), defaultdict(int)
    for name, duration in items:
        totals[name] += duration
        counts[name] += 1
    rows = [{"name": name, "calls_per_call": counts[name] / calls, "us_per_call": totals[name] / calls,
             "avg_us": totals[name] / counts[name], "share": totals[name] / total_us if total_us > 0 else 0.0}
            for name in totals]
    return sorted(rows, key=lambda row: row["us_per_call"], reverse=True)


def analyse(events, calls, on_gpu):
    """Device work per profiled call from the profiler's events (see the module docstring)."""
    bounds = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith(CALL_RANGE_PREFIX):
            start, end = bounds.get(e.name, (e.time_range.start, e.time_range.end))
            bounds[e.name] = (min(start, e.time_range.start), max(end, e.time_range.end))
    call_ranges = sorted(bounds.values())
    if len(call_ranges) != calls:
        raise RuntimeError(f"expected {calls} '{CALL_RANGE_PREFIX}*' ranges in the profile, found {len(call_ranges)}")
    annotation_names = {e.name for e in events if getattr(e, "is_user_annotation", False)
                        or e.name.startswith(CALL_RANGE_PREFIX)}
    host_ops = [e for e in events if e.device_type == DeviceType.CPU and e.name not in annotation_names]
    if on_gpu:
        work = [(e.name, e.time_range.start, e.time_range.end, e.time_range.elapsed_us()) for e in events
                if e.device_type == DeviceType.CUDA and e.name not in annotation_names]
    else:
        work = [(e.name, e.time_range.start, e.time_range.end, float(e.self_cpu_time_total)) for e in host_ops]

    per_call = [[] for _ in range(calls)]
    unassigned = 0
    for item in work:
        index = next((i for i, (start, end) in enumerate(call_ranges) if start <= item[1] <= end), None)
        if index is None:
            unassigned += 1
        else:
            per_call[index].append(item)

    call_stats, gaps = [], []
    for items in per_call:
        busy = interval_union([(start, end) for _, start, end, _ in items])
        busy_us = sum(end - start for start, end in busy) if on_gpu else sum(d for *_, d in items)
        gaps.extend(busy[i + 1][0] - busy[i][1] for i in range(len(busy) - 1))
        call_stats.append({"device_time_us": sum(d for *_, d in items), "busy_us": busy_us,
                           "activities": len(items),
                           "span_us": busy[-1][1] - busy[0][0] if busy else 0.0})
    device_us = statistics.fmean(s["device_time_us"] for s in call_stats)
    assigned = [(name, duration) for items in per_call for name, _, _, duration in items]
    result = {
        "device_time_us_per_call": device_us,
        "device_busy_us_per_call": statistics.fmean(s["busy_us"] for s in call_stats),
        "activities_per_call": statistics.fmean(s["activities"] for s in call_stats),
        "per_call": call_stats,
        "unassigned_activities": unassigned,
        "kernels": group_by_name(assigned, calls, device_us * calls),
    }
    if on_gpu:
        result["idle_gaps_between_kernels"] = {
            "count_per_call": len(gaps) / calls, "sum_us_per_call": sum(gaps) / calls,
            "median_us": statistics.median(gaps) if gaps else 0.0, "p90_us": percentile(gaps, 0.9)}
        host_in_calls = [e for e in host_ops
                         if any(start <= e.time_range.start <= end for start, end in call_ranges)]
        host_rows = group_by_name([(e.name, float(e.self_cpu_time_total)) for e in host_in_calls], calls,
                                  sum(float(e.self_cpu_time_total) for e in host_in_calls))
        attributed = defaultdict(float)
        for e in host_in_calls:
            attributed[e.name] += device_time_attributed_us(e) / calls
        for row in host_rows:
            row["self_cpu_us_per_call"] = row.pop("us_per_call")
            row["attributed_device_us_per_call"] = attributed[row["name"]]
        result["host_ops"] = host_rows[:HOST_OPS_KEPT]
        result["runtime_calls_per_call"] = {
            row["name"]: row["calls_per_call"] for row in host_rows
            if row["name"].startswith("cuda") or (row["name"].startswith("cu") and row["name"][2:3].isupper())}
    return result


# ---------------------------------------------------------------------------------------------
# report

def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def build_report(case, device, calls, unprofiled, profiled, analysis, extra):
    wall_us = statistics.fmean(profiled) * 1e6
    busy_us = analysis["device_busy_us_per_call"]
    software = software_info()
    report = {
        "kind": "marfast kernel profile",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_name(device),
        "torch": software["torch"], "triton": software["triton"],
        "software": software,
        "nvml": nvml_state() if device.type == "cuda" else "unavailable: no CUDA device",
        "case": case.kind, "label": case.label, "params": case.params,
        "cuda_graphs": case.cuda_graphs,
        "warmup_calls": case.warmup_calls, "profiled_calls": calls,
        "wall_timer": "CUDA events around each call" if device.type == "cuda" else "perf_counter around each call",
        "wall_us_per_call_unprofiled": {"median": statistics.median(unprofiled) * 1e6,
                                        "all": [s * 1e6 for s in unprofiled]},
        "wall_us_per_call": wall_us,
        "wall_us_per_call_profiled_all": [s * 1e6 for s in profiled],
        "device_time_kind": ("sum of the GPU activities' durations (kernels, memcpy, memset; CUPTI)"
                             if device.type == "cuda" else "self CPU time of the profiled operators"),
        "device_time_us_per_call": analysis["device_time_us_per_call"],
        "device_busy_us_per_call": busy_us,
        "gap_us_per_call": wall_us - busy_us,
        "gap_meaning": "profiled wall time minus the union of device activity: host, launch and idle time",
        "steps_per_call": case.steps, "step_unit": case.step_unit,
        "per_step": {"wall_us": wall_us / case.steps,
                     "wall_us_unprofiled": statistics.median(unprofiled) * 1e6 / case.steps,
                     "device_time_us": analysis["device_time_us_per_call"] / case.steps,
                     "gap_us": (wall_us - busy_us) / case.steps,
                     "activities": analysis["activities_per_call"] / case.steps},
        **{key: value for key, value in analysis.items() if key not in ("device_time_us_per_call",
                                                                         "device_busy_us_per_call")},
        **extra,
        "timed_choices": kernel_timings(),
    }
    warnings = []
    graph_launches = sum(analysis.get("runtime_calls_per_call", {}).get(name, 0.0) for name in GRAPH_LAUNCH_NAMES)
    if case.cuda_graphs["used"] and graph_launches and busy_us < 0.1 * wall_us:
        warnings.append("CUDA graphs were replayed but the device was busy for under 10% of the wall time: "
                        "kernels replayed from graphs may be missing from the trace on this driver/CUPTI")
    if analysis["unassigned_activities"]:
        warnings.append(f"{analysis['unassigned_activities']} activities started outside every profiled call")
    if not analysis["kernels"]:
        warnings.append("the profile recorded no device activity")
    report["warnings"] = warnings
    return report


def shorten(name, width):
    return name if len(name) <= width else name[: width - 3] + "..."


def print_table(report, stream=None):
    """The stdout summary: totals, per-step figures and the top kernels (stream: default sys.stdout)."""
    unit = "kernels" if report["device"] != "cpu" else "operators (self CPU time)"
    step = report["per_step"]
    lines = [
        f"{report['label']} on {report['device']} (torch {report['torch']}, triton {report['triton']}); "
        f"CUDA graphs: {report['cuda_graphs']['detail']}",
        f"wall {report['wall_us_per_call']:.1f} us/call under the profiler "
        f"({report['wall_us_per_call_unprofiled']['median']:.1f} without), device time "
        f"{report['device_time_us_per_call']:.1f}, busy {report['device_busy_us_per_call']:.1f}, "
        f"gap {report['gap_us_per_call']:.1f} us/call",
        f"per {report['step_unit']} ({report['steps_per_call']} per call): wall {step['wall_us']:.2f} us, "
        f"device {step['device_time_us']:.2f} us, gap {step['gap_us']:.2f} us, {step['activities']:.1f} activities",
    ]
    floor = report.get("weight_streaming_floor", {})
    if "floor_us_per_step" in floor:
        lines.append(f"weight-streaming floor {floor['floor_us_per_step']:.2f} us/step "
                     f"({floor['bytes_min_per_step'] / 1e6:.2f} MB at {floor['hbm_gbps']:.0f} GB/s); "
                     f"unprofiled wall / floor = {floor['wall_over_floor']:.1f}x")
    elif "floor_s_per_call" in floor:
        lines.append(f"weight-streaming floor {floor['floor_s_per_call'] * 1e3:.2f} ms/call "
                     f"({floor['bytes_min_per_call'] / 1e9:.3f} GB at {floor['hbm_gbps']:.0f} GB/s); "
                     f"unprofiled wall / floor = {floor['wall_over_floor']:.1f}x")
    matmul = report.get("matmul_floor")
    if matmul:
        lines.append(f"matmul floor {matmul['floor_us_per_call']:.1f} us/call ({matmul['flops_per_call'] / 1e12:.2f} "
                     f"TFLOP at {matmul['matmul_tflops']:.0f} TFLOP/s); unprofiled wall / floor = "
                     f"{matmul['wall_over_floor']:.2f}x")
    if report.get("peak_memory_gib") is not None:
        lines.append(f"peak memory of one call: {report['peak_memory_gib']:.2f} GiB")
    gaps = report.get("idle_gaps_between_kernels")
    if gaps:
        lines.append(f"idle gaps between kernels: {gaps['count_per_call']:.0f} per call, "
                     f"median {gaps['median_us']:.2f} us, "
                     f"p90 {gaps['p90_us']:.2f} us, {gaps['sum_us_per_call']:.1f} us/call in all")
    runtime = sorted(report.get("runtime_calls_per_call", {}).items(), key=lambda item: -item[1])
    if runtime:
        lines.append("runtime calls per call: " + ", ".join(f"{name} {count:.0f}" for name, count in runtime[:6]))
    split = report.get("head_time_split")
    if split and split.get("measured"):
        lines.append(f"diffusion head: {100 * split['head_share']:.1f}% of the wall time")
    lines.append(f"top {TABLE_ROWS} {unit} by time:")
    lines.append(f"{'us/call':>11} {'share':>6} {'calls/call':>10} {'avg us':>9}  name")
    for row in report["kernels"][:TABLE_ROWS]:
        lines.append(f"{row['us_per_call']:11.1f} {100 * row['share']:5.1f}% {row['calls_per_call']:10.1f} "
                     f"{row['avg_us']:9.2f}  {shorten(row['name'], 90)}")
    choices = report.get("timed_choices")
    if isinstance(choices, list) and choices:
        lines.append(f"timed choices ({len(choices)}): kept candidate and its ms per call, then the others")
        for decision in choices[:TABLE_ROWS]:
            what, key, kept, others = describe_timed_choice(decision)
            lines.append(f"  {shorten(what, 60)} [{shorten(key, 70)}]: {kept}; {shorten(others, 160)}")
    lines.extend(f"warning: {text}" for text in report["warnings"])
    print("\n".join(lines), file=stream or sys.stdout)


# ---------------------------------------------------------------------------------------------
# command line

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--head", choices=tuple(HEADS), default=None,
                        help="head size; for --case mar the MAR preset with that released head "
                             f"({', '.join(f'{h}: {m}' for h, m in MAR_OF_HEAD.items())}); "
                             "default 6x1024 on CUDA, tiny on the CPU")
    parser.add_argument("--rows", type=int, default=None,
                        help="head case: denoiser rows, even (CFG), default 8; training case: rows of the "
                             f"training batch, default {TRAINING_ROWS['cuda']} on CUDA, {TRAINING_ROWS['cpu']} on the CPU")
    parser.add_argument("--batch", type=int, default=1, help="mar case: images per call, default 1")
    parser.add_argument("--num-iter", type=int, default=None,
                        help="mar case: AR steps, default 64 (at most the model's token count)")
    parser.add_argument("--provider", choices=PROVIDERS, default=None,
                        help="default fused on CUDA, reference on the CPU")
    parser.add_argument("--loop-kernels", choices=LOOP_KERNELS, default="auto",
                        help="head and mar cases, fused: the fused head's DDPM steps as a launch chain, in one launch "
                             "per modulation chunk (up to 64 rows), or whichever is timed faster (default auto)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="mar case: replay the transformer steps as CUDA graphs (sets MARFAST_CUDA_GRAPHS=1)")
    parser.add_argument("--calls", type=int, default=3, help="profiled calls (and as many unprofiled timed calls)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls, default 2 (head) or 1 (mar)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON (created if missing)")
    parser.add_argument("--hbm-gbps", type=float, default=H100_COPY_GBPS,
                        help=f"memory bandwidth of the weight-streaming floor, default {H100_COPY_GBPS:g} "
                             "(the copy bandwidth measured on the H100)")
    parser.add_argument("--matmul-tflops", type=float, default=H100_MATMUL_TFLOPS,
                        help=f"bf16 matmul rate of the training case's floor, default {H100_MATMUL_TFLOPS:g} "
                             "(measured on the H100)")
    parser.add_argument("--measure-roofline", action="store_true",
                        help="measure the copy bandwidth and matmul rate here (harness.measure_roofline) instead "
                             "of --hbm-gbps and --matmul-tflops")
    parser.add_argument("--trace", action="store_true", help="also write the Chrome trace (large for --case mar)")
    parser.add_argument("--init-profiler-early", action="store_true",
                        help="run an empty profiler session before building the case, so that CUDA graphs are "
                             "captured after CUPTI is initialised (a workaround for crashes on older CUDA stacks)")
    args = parser.parse_args(argv)
    if args.provider == "compile" and args.case != "training":
        parser.error("--provider compile applies to --case training")

    on_gpu = torch.cuda.is_available()
    args.head = args.head or ("6x1024" if on_gpu else "tiny")
    args.provider = args.provider or ("fused" if on_gpu else "reference")
    if not on_gpu:
        refused = [text for text, bad in (
            (f"--head {args.head} (only --head tiny)", args.head != "tiny"),
            (f"--provider {args.provider} (only --provider reference)", args.provider != "reference"),
            ("--cuda-graphs", args.cuda_graphs)) if bad]
        if refused:
            parser.error(f"no CUDA device: {', '.join(refused)} cannot be profiled on the CPU (the fused paths "
                         "run only under the Triton interpreter there, a correctness tool)")
    if args.rows is None:
        args.rows = TRAINING_ROWS["cuda" if on_gpu else "cpu"] if args.case == "training" else 8
    if args.case == "head" and (args.rows < 2 or args.rows % 2):
        parser.error(f"--rows must be even and >= 2 (CFG: conditional and unconditional halves), got {args.rows}")
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    if args.batch < 1 or args.calls < 1 or (args.warmup is not None and args.warmup < 0):
        parser.error("--batch and --calls must be >= 1 and --warmup >= 0")
    if args.loop_kernels != "auto" and (args.case == "training" or args.provider != "fused"):
        parser.error("--loop-kernels applies to the fused head and mar cases")
    if args.cuda_graphs and args.case != "mar":
        parser.error("--cuda-graphs applies to --case mar (the fused head always replays its own graphs)")
    if args.hbm_gbps <= 0 or args.matmul_tflops <= 0:
        parser.error("--hbm-gbps and --matmul-tflops must be positive")
    return args


def main(argv=None):
    """Run the profile; returns 0, 2 on bad options (argparse's errors exit with 2 as well), 3 when
    the requested fast path is not available here (an exception propagates: exit status 1)."""
    args = parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":  # as the benchmark suite (benchmarks/conftest.py): one thread unless told otherwise
        torch.set_num_threads(int(os.environ.get("MARFAST_BENCH_CPU_THREADS", "1")))
    activities = profiler_activities(device)
    if args.init_profiler_early:
        with profile(activities=activities):
            pass
    try:
        case = CASE_BUILDERS[args.case](args, device)
    except CaseUnavailable as error:
        print(f"profile_kernels: {error}", file=sys.stderr)
        return 3
    except BadOption as error:
        print(f"profile_kernels: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{device_label()}-{case.label}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    trace_path = args.out / f"{stem}.trace.json" if args.trace else None
    case.cuda_graphs["profiler_session_before_capture"] = args.init_profiler_early
    unprofiled, profiled, events, extra = run_profile(case, device, args.calls, trace_path)
    analysis = analyse(events, args.calls, device.type == "cuda")
    report = build_report(case, device, args.calls, unprofiled, profiled, analysis, extra)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    print(f"written: {path}" + (f" and {trace_path}" if trace_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
