"""Full MAR sampling (`sample_tokens`): images per second, fraction of the roofline, head/transformer split.

GPU: mar_base, mar_large and mar_huge with their released heads (6x1024, 8x1280, 12x1536), batch 1,
16 and 256, 64 and 256 AR steps, 100 DDPM steps, CFG on (released scales, linear schedule), under
bf16 autocast (as the official evaluation runs) with fp32 transformer weights and bf16 head weights
for every provider (the bf16 head computes what autocast computes, without casting its weights again
at every DDPM step; the fused head computes in its weights' dtype). Random weights: the cost does
not depend on their values. CPU: a tiny MAR (16 tokens, 1+1 blocks, 2x64 head, 10 DDPM steps) at
batch 1 and 4, 4 and 8 AR steps, fp32.

Small configurations are timed as complete `sample_tokens` runs. A configuration whose eager
reference is expected to take longer than --bench-mar-full-max-s (default 10 s) is timed on a
stratified subset of its AR steps instead, the same subset for every provider: with stride s, steps
s/2, s/2 + s, ... each run with the shapes and mask state the complete loop has at that step. The
FLOPs and bytes of exactly those steps give TFLOP/s and the roofline fraction, the speedups compare
the same steps, and images/s is estimated as batch / (s x the subset's time); extra_info["timing"]
says which steps ran. --bench-mar-stride forces a stride (1: complete runs). Cases that would not
fit the session budget (--bench-budget-s) are skipped with their estimated cost; run them in calls
of their own with -k (e.g. -k "test_mar_sample_tokens and mar_huge").

Providers, side by side in one run (reference first):
- reference_eager: `MAR.sample_tokens`, the reference loop, with the reference head (backend "torch")
  and the blocks' torch LayerNorms (norm backend "torch");
- marfast_fused_head: the same reference loop and LayerNorms with the fused head (`DiffLoss` backend
  "triton"), skipped when the fused sampling path is not present;
- marfast_fused: the fast sampling loop (`MAR.sample_tokens_fast` or `marfast.sampler.sample_tokens_fast`)
  with the head backend "auto" and the norm backend "auto" (on CUDA the fused add + LayerNorm,
  and fc1 + GELU as one Triton GEMM where timed faster),
  skipped when no fast loop exists;
- marfast_fused_graphs (GPU, batch 16 or less, where the transformer steps' host work matters):
  marfast_fused with MARFAST_CUDA_GRAPHS=1, the transformer steps replayed as CUDA graphs (captured
  in the warm-up call).
"""
import contextlib
import os
import time
from unittest import mock

import pytest
import torch

from marfast.mar import set_norm_backend
from marfast.sampler import CUDA_GRAPHS_ENV_VAR

from .harness import FUSED, REFERENCE, Work, mar_sampling_bytes, mar_sampling_flops_per_image
from .models import (MAR_PRESET_BUILDERS, RELEASED_CFG, build_mar, fast_ar_steps, fused_head_absence,
                     reference_ar_steps)

FUSED_HEAD = "marfast_fused_head"
FUSED_GRAPHS = "marfast_fused_graphs"
PROVIDERS = (REFERENCE, FUSED_HEAD, FUSED)
GRAPHS_MAX_BATCH = 16
ON_GPU = torch.cuda.is_available()

GPU_MODELS = tuple(MAR_PRESET_BUILDERS)
GPU_BATCHES = (1, 16, 256)
GPU_ITERS = (64, 256)
QUICK = {("mar_base", 1, 64), ("mar_base", 256, 64)}
CPU_BATCHES = (1, 4)
CPU_ITERS = (4, 8)
# Rough per-op launch cost of the eager reference on a GPU, used only to budget the run.
EAGER_OP_S = 8e-6


def _cases():
    if not ON_GPU:
        return [pytest.param("tiny_mar", batch, iters, provider, id=f"tiny_mar-b{batch}-iters{iters}-{provider}")
                for iters in CPU_ITERS for batch in CPU_BATCHES for provider in PROVIDERS]
    cases = []
    for iters in GPU_ITERS:
        for name in GPU_MODELS:
            for batch in GPU_BATCHES:
                marks = () if (name, batch, iters) in QUICK else (pytest.mark.bench_extended,)
                for provider in PROVIDERS + ((FUSED_GRAPHS,) if batch <= GRAPHS_MAX_BATCH else ()):
                    cases.append(pytest.param(name, batch, iters, provider, marks=marks,
                                              id=f"{name}-b{batch}-iters{iters}-{provider}"))
    return cases


def _model(bench, name):
    """The MAR model `name` (one held at a time), eval mode, random weights, on the bench device."""
    held = bench.cache.get("mar")
    if held is not None and held[0] == name:
        return held[1]
    bench.cache.pop("mar", None)
    if bench.on_gpu:
        torch.cuda.empty_cache()
    model = build_mar(name, bench.device)
    bench.cache["mar"] = (name, model)
    return model


class HeadTimer:
    """Times every `model.diffloss.sample` call of a sampling run (CUDA events / perf_counter).

    `wrap(fn)` returns fn instrumented: each call of the wrapped fn keeps its own list of head
    intervals. Calls made while a CUDA graph is being captured are not timed and invalidate the split.
    """

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.calls = []

    def wrap(self, fn):
        def run():
            head = self.model.diffloss
            original = head.sample
            intervals = []
            record = {"intervals": intervals, "captured": False}

            def timed_sample(*args, **kwargs):
                if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    record["captured"] = True
                    return original(*args, **kwargs)
                if self.device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    result = original(*args, **kwargs)
                    end.record()
                    intervals.append((start, end))
                else:
                    begin = time.perf_counter()
                    result = original(*args, **kwargs)
                    intervals.append(time.perf_counter() - begin)
                return result

            head.sample = timed_sample
            try:
                return fn()
            finally:
                del head.sample
                self.calls.append(record)
        return run

    def split(self, last_calls, totals_s, num_iter):
        """Head seconds per call and its share, over the last `last_calls` calls (the timed rounds)."""
        records = self.calls[-last_calls:]
        if any(r["captured"] for r in records):
            return {"measured": False, "why": "the head ran inside a CUDA-graph capture"}
        counts = {len(r["intervals"]) for r in records}
        if counts != {num_iter}:
            return {"measured": False,
                    "why": f"diffloss.sample was called {sorted(counts)} times per run, expected {num_iter}"}
        head_s = []
        for r in records:
            if self.device.type == "cuda":
                head_s.append(sum(start.elapsed_time(end) * 1e-3 for start, end in r["intervals"]))
            else:
                head_s.append(sum(r["intervals"]))
        shares = [h / t for h, t in zip(head_s, totals_s)]
        return {"measured": True, "head_s_mean": sum(head_s) / len(head_s),
                "head_share": sum(shares) / len(shares), "transformer_and_rest_share": 1 - sum(shares) / len(shares)}


def _expected_reference_s(model, flops, num_iter, roofline):
    """Rough cost of the eager reference on a GPU (budgeting only): launches plus arithmetic at 35% of peak."""
    head_ops = 12 * model.diffloss.net.num_res_blocks + 40
    transformer_ops = 15 * (len(model.encoder_blocks) + len(model.decoder_blocks))
    launches_s = num_iter * (model.diffloss.num_sampling_steps * head_ops + transformer_ops) * EAGER_OP_S
    return launches_s + flops / (0.35 * roofline.matmul_tflops * 1e12)


def choose_stride(expected_s, num_iter, full_max_s):
    """Power-of-two stride that brings the expected time under full_max_s, timing >= 4 AR steps."""
    stride = 1
    while expected_s / stride > full_max_s and 2 * stride <= num_iter // 4:
        stride *= 2
    return stride


@pytest.mark.parametrize("name, batch, num_iter, provider", _cases())
@torch.no_grad()
def test_mar_sample_tokens(benchmark, bench, name, batch, num_iter, provider):
    model = _model(bench, name)
    cfg = RELEASED_CFG.get(name, 3.0)
    labels = torch.arange(batch, device=bench.device) % model.num_classes
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bench.on_gpu else contextlib.nullcontext()
    case_key = f"mar_sample/{name}/b{batch}/iters{num_iter}"
    full_flops = mar_sampling_flops_per_image(model.config, num_iter, cfg_on=True)["total"] * batch
    expected_ref = _expected_reference_s(model, full_flops, num_iter, bench.roofline) if bench.on_gpu else None
    stride = bench.options.get("mar_stride")
    if stride is None:
        stride = choose_stride(expected_ref, num_iter, bench.options["mar_full_max_s"]) if bench.on_gpu else 1
    steps = list(range(stride // 2, num_iter, stride)) if stride > 1 else None

    if provider == REFERENCE:
        backend, detail = "torch", "reference loop (MAR.sample_tokens), reference head, norm backend 'torch'"
    elif provider == FUSED_HEAD:
        if not bench.on_gpu:
            pytest.skip("the fused head is timed on CUDA only (the Triton CPU interpreter is a correctness tool)")
        model.diffloss.backend = backend = "triton"
        with autocast:
            reason = fused_head_absence(model.diffloss, model.diffloss.z_channels, bench.device, torch.float32, cfg)
        if reason:
            pytest.skip(reason)
        detail = "reference loop (MAR.sample_tokens), DiffLoss backend 'triton'"
    else:
        backend = "auto"
        detail = "fast loop (MAR.sample_tokens_fast), DiffLoss backend 'auto', norm backend 'auto'"
        if provider == FUSED_GRAPHS:
            detail += f"; transformer steps replayed as CUDA graphs ({CUDA_GRAPHS_ENV_VAR}=1)"
        if steps is not None:
            detail += "; timed steps run through marfast.sampler.plan_steps + run_ar_loop"
    fast = provider in (FUSED, FUSED_GRAPHS)
    model.diffloss.backend = backend
    set_norm_backend(model, "auto" if fast else "torch")

    def fast_loop_setting():
        if provider == FUSED_GRAPHS:
            return mock.patch.dict(os.environ, {CUDA_GRAPHS_ENV_VAR: "1"})
        return contextlib.nullcontext()

    def sample_call(bsz=batch, iters=num_iter):
        with autocast, fast_loop_setting():
            if fast:
                return model.sample_tokens_fast(bsz=bsz, num_iter=iters, cfg=cfg, cfg_schedule="linear",
                                                labels=labels[:bsz], temperature=1.0)
            return model.sample_tokens(bsz=bsz, num_iter=iters, cfg=cfg, cfg_schedule="linear", labels=labels[:bsz],
                                       temperature=1.0)

    def steps_call(step_list=steps):
        with autocast, fast_loop_setting():
            if fast:
                return fast_ar_steps(model, batch, num_iter, cfg, "linear", labels, 1.0, step_list)
            return reference_ar_steps(model, batch, num_iter, cfg, "linear", labels, 1.0, step_list)

    def reference_call():
        previous, model.diffloss.backend = model.diffloss.backend, "torch"
        set_norm_backend(model, "torch")
        try:
            with autocast:
                if steps is None:
                    return model.sample_tokens(bsz=batch, num_iter=num_iter, cfg=cfg, cfg_schedule="linear",
                                               labels=labels, temperature=1.0)
                return reference_ar_steps(model, batch, num_iter, cfg, "linear", labels, 1.0, steps)
        finally:
            model.diffloss.backend = previous
            set_norm_backend(model, "auto" if fast else "torch")

    timed_steps = num_iter if steps is None else len(steps)
    flops_parts = mar_sampling_flops_per_image(model.config, num_iter, cfg_on=True, steps=steps)
    weight_bytes = 2 if bench.on_gpu else 4
    work = Work(flops=flops_parts["total"] * batch, bytes_min=mar_sampling_bytes(model, timed_steps, weight_bytes),
                items=batch / stride, unit="images/s", other_items={"tokens/s": batch * model.seq_len / stride})
    params = {"model": name, "batch": batch, "num_iter": num_iter, "ddpm_steps": model.diffloss.num_sampling_steps,
              "cfg": cfg, "cfg_schedule": "linear", "temperature": 1.0,
              "precision": "bf16 autocast, fp32 transformer weights, bf16 head weights" if bench.on_gpu else "fp32",
              "head": f"{model.diffloss.net.num_res_blocks}x{model.diffloss.net.model_channels}",
              "timed_tflop_per_image": {part: value / 1e12 for part, value in flops_parts.items()}}
    if steps is None:
        timing = {"mode": "complete sample_tokens runs", "stride": 1}
    else:
        timing = {"mode": "stratified AR steps", "stride": stride, "timed_steps": steps,
                  "timed_flop_fraction": flops_parts["total"] * batch / full_flops,
                  "estimate": f"images/s = batch / ({stride} x measured time of the {len(steps)} timed steps)"}

    def check(result):
        expected = (batch, model.vae_embed_dim, model.seq_h, model.seq_w) if steps is None \
            else (batch, model.seq_len, model.token_embed_dim)
        if tuple(result.shape) != expected:
            raise AssertionError(f"expected {expected}, got {tuple(result.shape)}")
        if not torch.isfinite(result).all():
            raise AssertionError("the sampled tokens contain NaN or inf")

    fn = sample_call if steps is None else steps_call
    warmup_calls, expected_s = None, None
    reference_expected = None if expected_ref is None else expected_ref / stride
    notes = ["complete sample_tokens runs" if steps is None else f"timed AR steps {steps[0]}, {steps[0] + stride}, ... "
             f"of {num_iter} (stride {stride}); images/s is an estimate, TFLOP/s and % roofline are measured "
             "on exactly those steps"]
    if bench.on_gpu:
        if provider == REFERENCE:
            bench.budget.require(reference_expected, f"{case_key} [{provider}]")
            if steps is None:
                bench.measure(lambda: sample_call(min(batch, 2), 2))
            else:
                bench.measure(lambda: steps_call(steps[:1]))
            warmup_calls, expected_s = 0, reference_expected
            notes.append("warm-up: one short call (2 AR steps at batch <= 2, or the first timed step); "
                         "the eager reference has nothing to compile")
        else:
            warmup_calls, expected_s = 1, bench.medians.get((case_key, REFERENCE), reference_expected)
            notes.append("warm-up: one complete call (compilation, CUDA-graph capture)")

    timer = HeadTimer(model, bench.device)
    info = bench.run_case(benchmark, case="mar_sample", case_key=case_key, provider=provider, provider_detail=detail,
                          fn=timer.wrap(fn), work=work, params=params, warmup_calls=warmup_calls,
                          expected_s=expected_s, target_s=(3 if bench.on_gpu else 1) * bench.target_s,
                          check_output=check, notes=notes, reference_fn=reference_call,
                          reference_warmup_calls=0 if bench.on_gpu else None, reference_expected_s=reference_expected)
    benchmark.extra_info["timing"] = timing
    benchmark.extra_info["time_split"] = timer.split(info["rounds"], bench.last_samples_s, timed_steps)
    attention = getattr(model.encoder_blocks[0].attn, "last_backend", None)
    benchmark.extra_info["attention_backend"] = attention if attention is not None else "not reported by the model"
