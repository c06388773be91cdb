"""Diffusion-head training: `DiffLoss` forward + backward at 65,536 rows, per provider, with peak memory.

GPU: the three released head sizes (6x1024 Z=768, 8x1280 Z=1024, 12x1536 Z=1280; C=16), bf16
weights, 65,536 rows (a MAR batch of 64 x 256 tokens x diffusion_batch_mul 4), fixed timesteps
and noise. CPU: a tiny head at 256 rows, reference only (exercises the harness in CI).

One call: zero the gradients (set to None), `loss = head(target, z, mask, t=t, noise=noise)`,
`loss.backward()`. Providers, timed side by side in one run (reference first):
- reference_eager: `DiffLoss(backend="torch")`, the plain module (as the official code trains);
- torch_compile: the same head with `torch.compile(head.net)` (default mode, compiled in warm-up);
- marfast_fused: `DiffLoss(backend="triton")`, the fused training path (marfast.fused_training);
  skipped with the reason when the denoiser's plain forward still runs.
Peak memory: `torch.cuda.max_memory_allocated` over one extra untimed call, minus the memory held
before it (weights, inputs), in `extra_info["peak_memory_gib"]`, with the ratio to the reference's
in `extra_info["peak_memory_vs_reference"]`. Targets (issue 3): >= 1.5x the reference's speed and
<= 0.6x its peak memory.
"""
import copy

import pytest
import torch

from .harness import COMPILE, FUSED, PROVIDER_ORDER, REFERENCE, Work, head_flops_per_row_step
from .models import RELEASED_HEADS, TINY_HEAD, build_head, training_inputs, training_step

ON_GPU = torch.cuda.is_available()
GPU_ROWS, CPU_ROWS = 65536, 256
QUICK = {"6x1024"}


def _cases():
    if not ON_GPU:
        return [pytest.param(TINY_HEAD, CPU_ROWS, REFERENCE, id=f"{TINY_HEAD.name}-rows{CPU_ROWS}-{REFERENCE}")]
    return [pytest.param(spec, GPU_ROWS, provider, marks=() if spec.name in QUICK else (pytest.mark.bench_extended,),
                         id=f"{spec.name}-rows{GPU_ROWS}-{provider}")
            for spec in RELEASED_HEADS for provider in PROVIDER_ORDER]


def _head(bench, spec, backend):
    """The case's head for `backend` ("torch", "compile" or "triton"), in train mode, same weights."""
    key = ("training_head", spec, backend)
    if key not in bench.cache:
        if backend == "torch":
            dtype = torch.bfloat16 if bench.on_gpu else torch.float32
            head = build_head(spec, bench.device, dtype, backend="torch")
        else:
            head = copy.deepcopy(_head(bench, spec, "torch"))
            if backend == "compile":
                head.net = torch.compile(head.net)
            else:
                head.backend = "triton"
        bench.cache[key] = head.train()
    return bench.cache[key]


def _inputs(bench, spec, rows):
    dtype = torch.bfloat16 if bench.on_gpu else torch.float32
    return bench.cached(("training_inputs", spec, rows), lambda: training_inputs(spec, rows, bench.device, dtype))


def plain_forward_calls(head, inputs):
    """How often the denoiser's plain forward runs in one training call of `head`."""
    calls = []
    hook = head.net.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        training_step(head, inputs)
    finally:
        hook.remove()
    return len(calls)


def peak_memory_bytes(device, fn):
    """Peak bytes allocated on the CUDA `device` during one fn() call above what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def training_work(spec, rows, weight_bytes):
    """(flops, bytes_min): 3x the forward FLOPs (forward + backward: input and weight gradients)
    of every row's denoiser pass and condition embedding; bytes_min: the weights read twice and
    their gradients written once, plus the inputs read once."""
    forward = rows * (head_flops_per_row_step(spec.depth, spec.width, spec.channels) + 2 * spec.width * spec.z_channels)
    params = (5 * spec.depth + 2) * spec.width**2 + spec.width * (256 + spec.z_channels + 3 * spec.channels)
    bytes_min = 3 * params * weight_bytes + rows * (spec.z_channels * weight_bytes + 3 * spec.channels * 4 + 12)
    return 3.0 * forward, float(bytes_min)


@pytest.mark.parametrize("spec, rows, provider", _cases())
def test_head_training_step(benchmark, bench, spec, rows, provider):
    if provider != REFERENCE and not bench.on_gpu:
        pytest.skip(f"{provider} is timed on CUDA only")
    backend = {REFERENCE: "torch", COMPILE: "compile", FUSED: "triton"}[provider]
    head = _head(bench, spec, backend)
    inputs = _inputs(bench, spec, rows)
    if provider == FUSED:
        plain_calls = plain_forward_calls(head, inputs)
        if plain_calls:
            pytest.skip(f"DiffLoss(backend='triton').forward ran the plain denoiser forward {plain_calls} time(s)")

    def step(model=head):
        return training_step(model, inputs)

    def check(loss):
        if not torch.isfinite(loss):
            raise AssertionError(f"non-finite training loss {loss.item()}")

    dtype = head.net.input_proj.weight.dtype
    flops, bytes_min = training_work(spec, rows, torch.finfo(dtype).bits // 8)
    detail = {REFERENCE: "DiffLoss(backend='torch') forward + backward",
              COMPILE: "DiffLoss(backend='torch') with torch.compile(net), default mode; forward + backward",
              FUSED: "DiffLoss(backend='triton') forward + backward (marfast.fused_training)"}[provider]
    bench.run_case(
        benchmark, case="head_training", case_key=f"head_training/{spec.name}/rows={rows}", provider=provider,
        provider_detail=detail, fn=step, work=Work(flops=flops, bytes_min=bytes_min, items=rows, unit="rows/s"),
        params={"head": spec.name, "depth": spec.depth, "width": spec.width, "z_channels": spec.z_channels,
                "channels": spec.channels, "rows": rows, "weight_dtype": str(dtype).replace("torch.", "")},
        check_output=check, reference_fn=lambda: step(_head(bench, spec, "torch")),
        notes=["one call: zero_grad(set_to_none) + DiffLoss forward (masked loss) + backward",
               "flops: 3x forward (time embedding excluded: it is per timestep)"])
    if bench.on_gpu:
        peak = peak_memory_bytes(bench.device, step)
        bench.cache[("training_peak", spec, rows, provider)] = peak
        benchmark.extra_info["peak_memory_gib"] = peak / 2**30
        reference_peak = bench.cache.get(("training_peak", spec, rows, REFERENCE))
        if reference_peak is None and provider != REFERENCE:
            reference_peak = peak_memory_bytes(bench.device, lambda: step(_head(bench, spec, "torch")))
            bench.cache[("training_peak", spec, rows, REFERENCE)] = reference_peak
        benchmark.extra_info["peak_memory_vs_reference"] = peak / reference_peak
