"""De-MAR's heads against the MLP head at the same MAR size: one AR step's head work per provider.

One AR step of MAR / De-MAR sampling at 256 px predicts P tokens of each of B images (P = 4: 256
tokens in 64 AR steps; P = 16 on the GPU as a second point), with CFG 3.0 and 100 DDPM steps.
The diffusion head then samples rows = 2 B P rows (conditional rows of the first B images, then
the unconditional ones); the Transformer head also attends to its image's L = 256 decoder outputs,
context [2B, L, Z]. Each MAR size compares its released MLP head with De-MAR's Transformer head at
the decoder width Z:

    demar_base:  MLP 6x1024  vs Transformer 4x1024, Z = 768
    demar_large: MLP 8x1280  vs Transformer 6x1280, Z = 1024
    demar_huge:  MLP 12x1536 vs Transformer 9x1280, Z = 1280

GPU: B = 1, 16, 256 and P = 4, 16; bf16 weights, float32 state. CPU: a tiny pair (MLP 2x64,
Transformer 2x64, Z = 32, L = 16) at B = 2, P = 4 in float32, reference providers only (it
exercises the code in CI; its numbers are not performance results).

Providers of `test_demar_head_sample`, timed side by side; mlp_reference is the reference, so
`speedup_vs_reference` is the MLP head's median over the provider's (below 1: slower than the MLP
head) and `extra_info["time_vs_mlp_reference"]` its inverse:
- mlp_reference: `DiffLoss(backend="torch").sample`, the eager loop (net called once per step);
- mlp_fused: `DiffLoss(backend="triton").sample` (CUDA only; skipped with the reason when the fused
  path is absent);
- transformer_reference: `TransformerDiffLoss.sample`, the same eager loop; keys and values of the
  context once per call; attention on PyTorch's flash SDPA kernel on CUDA (MARFAST_ATTENTION=sdpa_flash
  unless the variable names another backend), the math path on the CPU;
- transformer_compile: the same loop with `torch.compile(net, dynamic=True)` (default mode, CUDA
  only; compiled once per size in warm-up, excluded from the timings);
  `extra_info["dynamo_graph_breaks_in_case"]` counts the graph breaks met while it ran.

`test_demar_denoising_head`: the denoising head's work of the same AR step, `DenoisingHead.forward`
over the B (L - P) known tokens of the conditional images (once per AR step, eager);
`extra_info["time_vs_mlp_head_step"]` and `["time_vs_transformer_head_step"]` put it next to the
diffusion heads' medians of the same step when they ran earlier in the session.
"""
import pytest
import torch

from marfast.attention import ENV_VAR as ATTENTION_ENV_VAR
from marfast.attention import active_backend, requested_backend
from marfast.demar import ContextBoundDenoiser
from marfast.diffloss import initial_state, sample_with_fresh_noise

from .harness import (REFERENCE, Work, denoising_head_work, head_sampling_work,
                      transformer_head_sampling_work)
from .models import (DDPM_STEPS, DEMAR_HEAD_PAIRS, TINY_DEMAR_PAIR, build_denoising_head, build_head,
                     build_transformer_head, fused_copy_or_reason, require_finite_tokens)

CFG = 3.0
ON_GPU = torch.cuda.is_available()
MLP_REFERENCE = "mlp_reference"
MLP_FUSED = "mlp_fused"
TRANSFORMER_REFERENCE = "transformer_reference"
TRANSFORMER_COMPILE = "transformer_compile"
PROVIDERS = (MLP_REFERENCE, MLP_FUSED, TRANSFORMER_REFERENCE, TRANSFORMER_COMPILE)
GPU_BATCHES = (1, 16, 256)
GPU_TOKENS_PER_IMAGE = (4, 16)
QUICK = {("demar_base", 1, 4), ("demar_base", 256, 4), ("demar_huge", 256, 4)}
CPU_BATCH, CPU_TOKENS_PER_IMAGE = 2, 4


def _configs():
    """(pair, batch, tokens per image, marks) of every configuration on this machine."""
    if not ON_GPU:
        return [(TINY_DEMAR_PAIR, CPU_BATCH, CPU_TOKENS_PER_IMAGE, ())]
    return [(pair, batch, per_image, () if (pair.name, batch, per_image) in QUICK else (pytest.mark.bench_extended,))
            for pair in DEMAR_HEAD_PAIRS for per_image in GPU_TOKENS_PER_IMAGE for batch in GPU_BATCHES]


def _sample_cases():
    return [pytest.param(pair, batch, per_image, provider, marks=marks,
                         id=f"{pair.name}-b{batch}-p{per_image}-{provider}")
            for pair, batch, per_image, marks in _configs() for provider in PROVIDERS]


def _denoising_cases():
    return [pytest.param(pair, batch, per_image, marks=marks, id=f"{pair.name}-b{batch}-p{per_image}")
            for pair, batch, per_image, marks in _configs()]


def _weight_dtype(bench):
    return torch.bfloat16 if bench.on_gpu else torch.float32


def _sample_case_key(pair, batch, per_image):
    return f"demar_head_sample/{pair.name}/b={batch}/p={per_image}"


def _mlp_head(bench, pair):
    return bench.cached(("demar_mlp_head", pair),
                        lambda: build_head(pair.mlp, bench.device, _weight_dtype(bench), backend="torch"))


def _fused_mlp_head(bench, pair):
    """(head, None) with the fused backend and the reference MLP head's weights, or (None, skip reason)."""
    return bench.cached(("demar_fused_mlp_head", pair),
                        lambda: fused_copy_or_reason(_mlp_head(bench, pair), pair.mlp, pair.z_channels, bench.device,
                                                     CFG))


def _transformer_head(bench, pair):
    return bench.cached(("demar_transformer_head", pair),
                        lambda: build_transformer_head(pair, bench.device, _weight_dtype(bench)))


def _compiled_transformer_net(bench, pair):
    return bench.cached(("demar_compiled_transformer_net", pair),
                        lambda: torch.compile(_transformer_head(bench, pair).net, dynamic=True))


def _denoising_head(bench, pair):
    return bench.cached(("demar_denoising_head", pair),
                        lambda: build_denoising_head(pair, bench.device, _weight_dtype(bench)))


def _sample_with_net(head, net, z, context, cfg):
    """`head.sample(z, context, 1.0, cfg)` with `net` (e.g. a compiled copy of head.net) in the
    reference loop; keys and values come from head.net, eagerly, once per call."""
    x = initial_state(z, head.in_channels, cfg)
    keys_values = head.net.context_keys_values(context.to(head.param_dtype))
    bound = ContextBoundDenoiser(net, keys_values, context.shape[0])
    return sample_with_fresh_noise(bound, head.gen_diffusion, z, x, 1.0, cfg)


def _graph_breaks():
    """Graph breaks torch.compile has met so far in this process (TorchDynamo's counters)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _attention_backend(monkeypatch, bench, head):
    """The attention backend the Transformer head runs: sdpa_flash forced on CUDA unless
    MARFAST_ATTENTION names a backend (then that one; it raises if it cannot run here)."""
    if bench.on_gpu and requested_backend() == "auto":
        monkeypatch.setenv(ATTENTION_ENV_VAR, "sdpa_flash")
    return active_backend(bench.device, head.param_dtype, head.net.blocks[0].attn.head_dim)


def _step_inputs(bench, pair, batch, per_image):
    """z [2 B P, Z] (conditional rows first) and context [2 B, L, Z] in the weight dtype."""
    dtype = _weight_dtype(bench)
    gen = torch.Generator(device=bench.device).manual_seed(1000 * batch + per_image)
    images = 2 * batch
    z = torch.randn(images * per_image, pair.z_channels, device=bench.device, dtype=dtype, generator=gen)
    context = torch.randn(images, pair.seq_len, pair.z_channels, device=bench.device, dtype=dtype, generator=gen)
    return z, context


@pytest.mark.parametrize("pair, batch, per_image, provider", _sample_cases())
@torch.no_grad()
def test_demar_head_sample(benchmark, bench, monkeypatch, pair, batch, per_image, provider):
    dtype = _weight_dtype(bench)
    z, context = _step_inputs(bench, pair, batch, per_image)
    rows = z.shape[0]
    mlp = _mlp_head(bench, pair)

    def mlp_reference_call():
        return mlp.sample(z, temperature=1.0, cfg=CFG)

    extra, graph_breaks_before = {}, None
    if provider == MLP_REFERENCE:
        fn, net = mlp_reference_call, mlp.net
        detail = "DiffLoss(backend='torch').sample: eager loop, net called once per DDPM step"
    elif provider == MLP_FUSED:
        if not bench.on_gpu:
            pytest.skip("the fused path is timed on CUDA only (the Triton CPU interpreter is a correctness tool)")
        fused, reason = _fused_mlp_head(bench, pair)
        if fused is None:
            pytest.skip(reason)
        fn, net = (lambda: fused.sample(z, temperature=1.0, cfg=CFG)), mlp.net
        detail = "DiffLoss(backend='triton').sample"
    else:
        if provider == TRANSFORMER_COMPILE and not bench.on_gpu:
            pytest.skip("torch.compile is timed on CUDA only (inductor's CPU compile would exceed the CI budget)")
        head = _transformer_head(bench, pair)
        net = head.net
        extra["attention_backend"] = _attention_backend(monkeypatch, bench, head)
        if provider == TRANSFORMER_REFERENCE:
            fn = lambda: head.sample(z, context, temperature=1.0, cfg=CFG)  # noqa: E731
            detail = (f"TransformerDiffLoss.sample: eager loop, net called once per DDPM step, keys/values once; "
                      f"attention {extra['attention_backend']}")
        else:
            graph_breaks_before = _graph_breaks()
            compiled = _compiled_transformer_net(bench, pair)
            fn = lambda: _sample_with_net(head, compiled, z, context, CFG)  # noqa: E731
            detail = (f"the TransformerDiffLoss.sample loop with torch.compile(net, dynamic=True), default mode; "
                      f"attention {extra['attention_backend']}")

    weight_bytes = torch.finfo(dtype).bits // 8
    if provider in (MLP_REFERENCE, MLP_FUSED):
        flops, bytes_min = head_sampling_work(net, rows, DDPM_STEPS, weight_bytes)
    else:
        flops, bytes_min = transformer_head_sampling_work(net, 2 * batch, per_image, pair.seq_len, DDPM_STEPS,
                                                          weight_bytes)
    work = Work(flops=flops, bytes_min=bytes_min, items=rows * DDPM_STEPS, unit="rows*steps/s",
                other_items={"tokens/s": rows // 2})
    params = {"size": pair.name, "batch": batch, "tokens_per_image": per_image, "rows": rows,
              "context_len": pair.seq_len, "z_channels": pair.z_channels, "channels": pair.channels,
              "mlp_head": pair.mlp.name, "transformer_head": pair.transformer_name, "ddpm_steps": DDPM_STEPS,
              "cfg": CFG, "weight_dtype": str(dtype).replace("torch.", ""), "state_dtype": "float32"}
    info = bench.run_case(
        benchmark, case="demar_head_sample", case_key=_sample_case_key(pair, batch, per_image), provider=provider,
        provider_detail=detail, fn=fn, work=work, params=params, reference_fn=mlp_reference_call,
        reference_provider=MLP_REFERENCE, check_output=require_finite_tokens(rows, pair.channels),
        notes=["one AR step's head work: B images x P tokens, rows = 2 B P with CFG (conditional rows first)",
               "speedup_vs_reference < 1: slower than the MLP head (mlp_reference) of the same MAR size",
               "FLOPs and bytes_min follow each head's own work model (harness.head_sampling_work / "
               "transformer_head_sampling_work)",
               "first_call_s includes compilation where the provider has any"])
    speedup = info.get("speedup_vs_reference")
    extra["time_vs_mlp_reference"] = None if speedup is None else 1.0 / speedup
    if graph_breaks_before is not None:
        extra["dynamo_graph_breaks_in_case"] = _graph_breaks() - graph_breaks_before
    benchmark.extra_info.update(extra)


@pytest.mark.parametrize("pair, batch, per_image", _denoising_cases())
@torch.no_grad()
def test_demar_denoising_head(benchmark, bench, pair, batch, per_image):
    dtype = _weight_dtype(bench)
    head = _denoising_head(bench, pair)
    rows = batch * (pair.seq_len - per_image)
    gen = torch.Generator(device=bench.device).manual_seed(rows)
    noisy = torch.randn(rows, pair.channels, device=bench.device, dtype=dtype, generator=gen)
    z = torch.randn(rows, pair.z_channels, device=bench.device, dtype=dtype, generator=gen)

    flops, bytes_min = denoising_head_work(head, rows, torch.finfo(dtype).bits // 8)
    work = Work(flops=flops, bytes_min=bytes_min, items=rows, unit="rows/s")
    params = {"size": pair.name, "batch": batch, "tokens_per_image": per_image, "known_rows": rows,
              "z_channels": pair.z_channels, "channels": pair.channels, "width": head.refine_fc1.out_features,
              "weight_dtype": str(dtype).replace("torch.", "")}
    info = bench.run_case(
        benchmark, case="demar_denoising_head", case_key=f"demar_denoising_head/{pair.name}/b={batch}/p={per_image}",
        provider=REFERENCE,
        provider_detail="DenoisingHead.forward, eager, on the known tokens of the conditional images",
        fn=lambda: head(noisy, z), work=work, params=params, check_output=require_finite_tokens(rows, pair.channels),
        notes=["once per AR step: B (L - P) known tokens (the count when P tokens are still to predict)"])
    sample_key = _sample_case_key(pair, batch, per_image)
    for provider, name in ((MLP_REFERENCE, "time_vs_mlp_head_step"),
                           (TRANSFORMER_REFERENCE, "time_vs_transformer_head_step")):
        head_median = bench.medians.get((sample_key, provider))
        benchmark.extra_info[name] = None if head_median is None else info["median_s"] / head_median

