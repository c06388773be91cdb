"""Diffusion-head sampling: the whole 100-step reverse DDPM loop with CFG, per provider.

GPU: the three released head sizes (6x1024 Z=768, 8x1280 Z=1024, 12x1536 Z=1280; C=16) at 8, 64,
512, 4096 and 16384 rows, bf16 weights, fp32 state. CPU: a tiny head at 8 and 64 rows in fp32,
reference only (exercises the harness in CI).

"rows" counts the rows the denoiser sees per step: with CFG they are B conditional and B
unconditional rows, so tokens per call = rows / 2.

Providers, timed side by side in one run (reference first, so that the others' speedups use it):
- reference_eager: `DiffLoss(backend="torch").sample`, the plain loop calling the net once per step;
- torch_compile: the same loop (`ddpm_sample_loop_reference`) with `torch.compile(net, dynamic=True)`
  (default mode; one compilation per head size, excluded from the timings: it happens in warm-up);
- marfast_fused: `DiffLoss(backend="triton").sample`, skipped with the reason when the fused path is
  not present;
- marfast_fused_no_pdl (GPU, 64 rows or fewer, where the gaps between kernels matter most): the
  same with MARFAST_PDL=0, i.e. without programmatic dependent launch;
- marfast_fused_chain and marfast_fused_one_launch (GPU, 64 rows or fewer): the same with the
  packed head's loop_kernels forced to "chain" (a launch per kernel) or "one_launch" (the DDPM steps
  of each modulation chunk in one launch, `ddpm_sample_loop`); marfast_fused takes whichever it
  timed faster ("auto").
"""
import contextlib
import os
from unittest import mock

import pytest
import torch

from marfast.diffloss import ddpm_sample_loop_reference
from marfast.fused_head import packed_head

from marfast.kernels.linear_fused import PDL_ENV

from .harness import COMPILE, PROVIDER_ORDER, REFERENCE, Work, head_sampling_work
from .models import (DDPM_STEPS, RELEASED_HEADS, TINY_HEAD, build_head, fused_copy_or_reason,
                     require_finite_tokens)

CFG = 3.0
ON_GPU = torch.cuda.is_available()
GPU_ROWS = (8, 64, 512, 4096, 16384)
QUICK = {("6x1024", 8), ("6x1024", 4096), ("12x1536", 4096)}
FUSED_NO_PDL = "marfast_fused_no_pdl"
NO_PDL_MAX_ROWS = 64
LOOP_KERNEL_PROVIDERS = {"marfast_fused_chain": "chain", "marfast_fused_one_launch": "one_launch"}
FEW_ROW_PROVIDERS = (FUSED_NO_PDL,) + tuple(LOOP_KERNEL_PROVIDERS)


def _cases():
    if not ON_GPU:
        return [pytest.param(TINY_HEAD, rows, provider, id=f"{TINY_HEAD.name}-rows{rows}-{provider}")
                for rows in (8, 64) for provider in PROVIDER_ORDER]
    cases = []
    for spec in RELEASED_HEADS:
        for rows in GPU_ROWS:
            marks = () if (spec.name, rows) in QUICK else (pytest.mark.bench_extended,)
            providers = PROVIDER_ORDER + (FEW_ROW_PROVIDERS if rows <= NO_PDL_MAX_ROWS else ())
            for provider in providers:
                cases.append(pytest.param(spec, rows, provider, marks=marks, id=f"{spec.name}-rows{rows}-{provider}"))
    return cases


def _reference_head(bench, spec):
    key = ("head", spec)
    if key not in bench.cache:
        dtype = torch.bfloat16 if bench.on_gpu else torch.float32
        bench.cache[key] = build_head(spec, bench.device, dtype, backend="torch")
    return bench.cache[key]


def _compiled_net(bench, spec):
    return bench.cached(("compiled_net", spec), lambda: torch.compile(_reference_head(bench, spec).net, dynamic=True))


def _fused_head(bench, spec):
    """(head, None) with the fused backend, or (None, skip reason)."""
    return bench.cached(("fused_head", spec), lambda: fused_copy_or_reason(_reference_head(bench, spec), spec,
                                                                           spec.z_channels, bench.device, CFG))


def _sample_with_net(head, net, z, cfg):
    """`head.sample(z, 1.0, cfg)` with `net` (e.g. a compiled copy) in the reference loop."""
    rows = z.shape[0]
    state_dtype = torch.promote_types(z.dtype, torch.float32)
    x = torch.randn(rows // 2, head.in_channels, device=z.device, dtype=state_dtype)
    x = torch.cat([x, x])

    def draw_noise(step):
        return torch.randn(rows, head.in_channels, device=z.device, dtype=state_dtype)

    return ddpm_sample_loop_reference(net, head.gen_diffusion, z, x, 1.0, cfg, draw_noise)


def _pdl_off():
    """MARFAST_PDL=0 for the duration of a with-block; the environment is restored afterwards."""
    return mock.patch.dict(os.environ, {PDL_ENV: "0"})


@contextlib.contextmanager
def _loop_kernels(net, kernels):
    """The packed head's loop_kernels set to `kernels` for the duration of a with-block, then
    restored."""
    pack = packed_head(net)
    before, pack.loop_kernels = pack.loop_kernels, kernels
    try:
        yield
    finally:
        pack.loop_kernels = before


@pytest.mark.parametrize("spec, rows, provider", _cases())
@torch.no_grad()
def test_head_sample(benchmark, bench, spec, rows, provider):
    reference = _reference_head(bench, spec)
    dtype = reference.net.input_proj.weight.dtype
    z = torch.randn(rows, spec.z_channels, device=bench.device, dtype=dtype,
                    generator=torch.Generator(device=bench.device).manual_seed(rows))

    def reference_call():
        return reference.sample(z, temperature=1.0, cfg=CFG)

    if provider == REFERENCE:
        fn, detail = reference_call, "DiffLoss(backend='torch').sample: eager loop, net called once per DDPM step"
    elif provider == COMPILE:
        if not bench.on_gpu:
            pytest.skip("torch.compile is timed on CUDA only (inductor's CPU compile would exceed the CI budget)")
        compiled = _compiled_net(bench, spec)
        fn = lambda: _sample_with_net(reference, compiled, z, CFG)  # noqa: E731
        detail = "ddpm_sample_loop_reference with torch.compile(net, dynamic=True), default mode"
    else:
        if not bench.on_gpu:
            pytest.skip("the fused path is timed on CUDA only (the Triton CPU interpreter is a correctness tool)")
        fused, reason = _fused_head(bench, spec)
        if fused is None:
            pytest.skip(reason)
        if provider == FUSED_NO_PDL:
            setting, detail = _pdl_off, f" with {PDL_ENV}=0 (no programmatic dependent launch)"
        elif provider in LOOP_KERNEL_PROVIDERS:
            kernels = LOOP_KERNEL_PROVIDERS[provider]
            setting = lambda: _loop_kernels(fused.net, kernels)  # noqa: E731
            detail = f" with loop_kernels={kernels!r}"
        else:
            setting, detail = contextlib.nullcontext, ""

        def fn():
            with setting():
                return fused.sample(z, temperature=1.0, cfg=CFG)

        detail = "DiffLoss(backend='triton').sample" + detail

    weight_bytes = torch.finfo(dtype).bits // 8
    flops, bytes_min = head_sampling_work(reference.net, rows, DDPM_STEPS, weight_bytes)
    work = Work(flops=flops, bytes_min=bytes_min, items=rows * DDPM_STEPS, unit="rows*steps/s",
                other_items={"tokens/s": rows // 2})
    params = {"head": spec.name, "depth": spec.depth, "width": spec.width, "z_channels": spec.z_channels,
              "channels": spec.channels, "rows": rows, "tokens": rows // 2, "ddpm_steps": DDPM_STEPS,
              "cfg": CFG, "weight_dtype": str(dtype).replace("torch.", ""), "state_dtype": "float32"}
    bench.run_case(benchmark, case="head_sample", case_key=f"head_sample/{spec.name}/rows={rows}",
                   provider=provider, provider_detail=detail, fn=fn, work=work, params=params,
                   reference_fn=reference_call, check_output=require_finite_tokens(rows, spec.channels),
                   notes=["rows = denoiser rows per DDPM step (CFG: half conditional, half unconditional)",
                          "first_call_s includes compilation / CUDA-graph capture where the provider has any"])
