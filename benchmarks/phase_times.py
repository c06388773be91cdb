"""Where the time of the one-launch DDPM loop goes: per phase, the work and the grid-barrier wait.

    python -m benchmarks.phase_times --head 6x1024 --rows 8 --out DIR

The fused head's sampling loop at `--rows` denoiser rows (CFG 3: half conditional, half
unconditional; 100 DDPM steps, bf16 weights, the head builders of the benchmarks) runs with its
DDPM steps in one launch per modulation chunk (`kernels/ddpm_sample_loop.py`), eagerly, with the
kernel recording the GPU's global timer at every grid barrier: when the last program arrived and
when program 0 left. For each kind of phase (input projection, fc1, fc2, final layer) the JSON
gives the median and mean work time (from leaving the previous barrier to the last arrival at this
one) and barrier time (from that arrival to leaving), in microseconds, and their sum per DDPM step:
what a kernel boundary of the launch chain would have to beat. `--calls` calls are recorded after
one warm-up call (compilation and tuning). Needs CUDA (exit status 3 otherwise); written to
--out as `profile-phase-times-<device>-head-<size>-rows<R>-<stamp>.json` (report.py skips
profile-* files), a summary to stdout.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from marfast.fused_head import _launch_loop, _Workspace, ddpm_sample_loop_fused, packed_head
from marfast.kernels.ddpm_sample_loop import MAX_ROWS, phase_spans

from .machine import device_label, software_info
from .models import RELEASED_HEADS, build_head
from .test_bench_head_sampling import CFG

HEADS = {spec.name: spec for spec in RELEASED_HEADS}


def record_phase_times(head, rows, calls):
    """[(hi, lo, int64 phase times)] of `calls` eager one-launch loops (after one warm-up call)."""
    net, diffusion = head.net, head.gen_diffusion
    pack = packed_head(net)
    pack.loop_kernels = "one_launch"
    device, channels = pack.device, pack.channels
    gen = torch.Generator(device=device).manual_seed(rows)
    z = torch.randn(rows, pack.z_channels, device=device, dtype=pack.dtype, generator=gen)
    x = torch.randn(rows // 2, channels, device=device, generator=gen).repeat(2, 1)
    noise = torch.randn(diffusion.num_timesteps, rows // 2, channels, device=device, generator=gen)
    ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, CFG, noise, use_cuda_graph=False)  # compile and tune
    records = []
    with torch.no_grad():
        for _ in range(calls):
            ws = _Workspace(pack, rows // 2, True, diffusion.num_timesteps)
            ws.load(z, x, noise, CFG, 1.0, None)
            _launch_loop(pack, ws, diffusion, False, records)
    torch.cuda.synchronize(device)
    return records


def summarise(records, depth):
    """{phase: {work_us, barrier_us: {median, mean}, count}} and the per-step totals of the means."""
    pooled = {}
    for _, _, times in records:
        for name, spans in phase_spans(times.cpu(), depth).items():
            pooled.setdefault(name, []).extend(spans)
    phases = {}
    for name, spans in pooled.items():
        work = [w / 1000 for w, _ in spans]
        wait = [b / 1000 for _, b in spans]
        phases[name] = {"count": len(spans),
                        "work_us": {"median": statistics.median(work), "mean": statistics.fmean(work)},
                        "barrier_us": {"median": statistics.median(wait), "mean": statistics.fmean(wait)}}
    per_step = {"input_projection": 1, "fc1": depth, "fc2": depth, "final_layer": 1}
    step = {part: sum(phases[name][part]["mean"] * n for name, n in per_step.items())
            for part in ("work_us", "barrier_us")}
    return phases, step


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", choices=tuple(HEADS), default="6x1024")
    parser.add_argument("--rows", type=int, default=8, help=f"denoiser rows (even, at most {MAX_ROWS})")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rows % 2 or not 2 <= args.rows <= MAX_ROWS:
        parser.error(f"--rows must be even and in 2..{MAX_ROWS}, got {args.rows}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("phase_times needs a CUDA device (the kernel reads the GPU's global timer)", file=sys.stderr)
        return 3
    device = torch.device("cuda")
    spec = HEADS[args.head]
    head = build_head(spec, device, torch.bfloat16, backend="triton")
    records = record_phase_times(head, args.rows, args.calls)
    phases, step = summarise(records, spec.depth)
    report = {"device": device_label(), "software": software_info(),
              "params": {"head": spec.name, "rows": args.rows, "cfg": CFG, "calls": args.calls,
                         "ddpm_steps": head.gen_diffusion.num_timesteps,
                         "launches_per_call": len(records) // args.calls},
              "phases": phases, "per_step_us": step,
              "definitions": "work: from program 0 leaving the previous grid barrier (or starting) to the last arrival "
                             "at this phase's barrier; barrier: from that arrival to program 0 leaving it; global "
                             "timer nanoseconds / 1000"}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"profile-phase-times-{report['device']}-head-{spec.name}-rows{args.rows}-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    for name, phase in phases.items():
        print(f"{name:17s} work {phase['work_us']['median']:8.2f} us  barrier {phase['barrier_us']['median']:8.2f} us"
              f"  (medians of {phase['count']})")
    print(f"per DDPM step: work {step['work_us']:.1f} us, barriers {step['barrier_us']:.1f} us; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
