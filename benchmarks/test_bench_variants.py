"""Sampling speed of the MAR family at equal model size: images per second of each variant.

Variants (the providers of one case, timed side by side):
- mar_diffloss: `MAR.sample_tokens` (the reference AR loop) with the Diffusion Loss head;
- mar_cross_entropy: `marfast.discrete.CrossEntropyMAR.sample_tokens`: the same transformer and
  loop with a softmax head over a VQ vocabulary;
- discrete_mar_maskgit: `marfast.discrete.iterative_decode` (mode "maskgit") of a `DiscreteMAR`
  with one bidirectional stack as deep as MAR's encoder and decoder together;
- ar_raster_kv / ar_random_kv: `marfast.ar.CausalAR.sample_tokens` (raster / random order), one
  token per step with a KV cache, Diffusion Loss head;
- ar_raster_recompute: the raster AR recomputing the whole prefix at every step (no KV cache),
  to show what the cache saves.

Equal size: the same width, heads and total depth for every transformer, the same diffusion head
for the three Diffusion Loss variants. MAR-style variants run `num_iter` steps; the AR variants
run one step per token. No CFG (DiscreteMAR has none), temperature 1. Random weights: the cost does
not depend on their values. The Diffusion Loss heads run with backend "auto" (the fused Triton
path on CUDA, the reference on the CPU).

GPU: MAR-B size (width 768, 12 + 12 blocks, 12 heads, 256 tokens of 16 channels, head 6x1024,
100 DDPM steps, a 16384-code vocabulary), batch 16 and 64, 64 MAR steps, bf16 autocast with fp32
transformer weights and bf16 head weights. CPU: a tiny size (width 64, 1 + 1 blocks, 16 tokens,
head 2x64, 10 DDPM steps, 64 codes), batch 4, 4 MAR steps, fp32; it exercises the code, and its
numbers are not performance results.

There is no reference provider: `extra_info["relative_to_mar"]` is mar_diffloss's median over the
variant's (above 1: faster than MAR), when mar_diffloss ran earlier in the same session.
TFLOP/s counts useful arithmetic: for the AR variants the cached computation (the recomputing
variant does more), for every variant the head's work on each predicted token.
"""
import contextlib

import pytest
import torch

from marfast import MAR
from marfast.ar import CausalAR
from marfast.discrete import CrossEntropyMAR, DiscreteMAR, iterative_decode
from marfast.diffusion import parse_num_steps

from .harness import Work, head_flops_per_row_call, head_flops_per_row_step, transformer_block_flops
from .harness import mar_sampling_flops_per_image
from .models import randomize_

ON_GPU = torch.cuda.is_available()
VARIANTS = ("mar_diffloss", "mar_cross_entropy", "discrete_mar_maskgit", "ar_raster_kv", "ar_random_kv",
            "ar_raster_recompute")
DIFFLOSS_VARIANTS = ("mar_diffloss", "ar_raster_kv", "ar_random_kv", "ar_raster_recompute")

GPU_SIZE = dict(name="mar_base_size", img_size=256, vae_stride=16, vae_embed_dim=16, width=768, depth=12, heads=12,
                diffloss_d=6, diffloss_w=1024, ddpm_steps=100, vocab=16384, buffer_size=64, num_iter=64)
CPU_SIZE = dict(name="tiny", img_size=64, vae_stride=16, vae_embed_dim=16, width=64, depth=1, heads=2,
                diffloss_d=2, diffloss_w=64, ddpm_steps=10, vocab=64, buffer_size=4, num_iter=4)
SIZE = GPU_SIZE if ON_GPU else CPU_SIZE
GPU_BATCHES = (16, 64)
CPU_BATCHES = (4,)


def _cases():
    batches = GPU_BATCHES if ON_GPU else CPU_BATCHES
    cases = []
    for batch in batches:
        marks = (pytest.mark.bench_extended,) if ON_GPU and batch != GPU_BATCHES[0] else ()
        cases += [pytest.param(batch, variant, marks=marks, id=f"{SIZE['name']}-b{batch}-{variant}")
                  for variant in VARIANTS]
    return cases


def mar_keywords(size):
    return dict(img_size=size["img_size"], vae_stride=size["vae_stride"], patch_size=1,
                encoder_embed_dim=size["width"], encoder_depth=size["depth"], encoder_num_heads=size["heads"],
                decoder_embed_dim=size["width"], decoder_depth=size["depth"], decoder_num_heads=size["heads"],
                mlp_ratio=4.0, class_num=10)


def diffloss_keywords(size):
    return dict(vae_embed_dim=size["vae_embed_dim"], diffloss_d=size["diffloss_d"], diffloss_w=size["diffloss_w"],
                num_sampling_steps=str(size["ddpm_steps"]))


def build(variant, size, device):
    """The variant's model in eval mode on `device` (random weights)."""
    with torch.device(device):
        if variant == "mar_diffloss":
            model = MAR(**mar_keywords(size), **diffloss_keywords(size), buffer_size=size["buffer_size"])
        elif variant == "mar_cross_entropy":
            model = CrossEntropyMAR(size["vocab"], code_embed_dim=size["vae_embed_dim"], **mar_keywords(size),
                                    buffer_size=size["buffer_size"])
        elif variant == "discrete_mar_maskgit":
            seq_len = (size["img_size"] // size["vae_stride"]) ** 2
            model = DiscreteMAR(size["vocab"] + 1, embed_dim=size["width"], num_layers=2 * size["depth"],
                                num_heads=size["heads"], seq_len=seq_len, dropout=0.0, mode="maskgit", num_classes=10)
        else:
            order = "random" if variant == "ar_random_kv" else "raster"
            model = CausalAR(order, **mar_keywords(size), **diffloss_keywords(size))
    if variant in DIFFLOSS_VARIANTS:
        randomize_(model.diffloss, seed=1)
        if device.type == "cuda":
            model.diffloss.to(torch.bfloat16)
    return model.eval()


def sampling_work(variant, size, batch):
    """Work of one sampling call of `batch` images: useful FLOPs, weights read per step, items."""
    seq_len = (size["img_size"] // size["vae_stride"]) ** 2
    width, depth, num_iter = size["width"], size["depth"], size["num_iter"]
    ddpm_steps = parse_num_steps(str(size["ddpm_steps"]))
    head_per_token = ddpm_steps * head_flops_per_row_step(size["diffloss_d"], size["diffloss_w"], size["vae_embed_dim"]) \
        + head_flops_per_row_call(size["diffloss_w"], width)
    block_params = 12 * width**2
    head_params = (5 * size["diffloss_d"] + 2) * size["diffloss_w"] ** 2
    weight_bytes = 2 if ON_GPU else 4
    if variant in ("mar_diffloss", "mar_cross_entropy"):
        config = dict(mar_keywords(size), vae_embed_dim=size["vae_embed_dim"], buffer_size=size["buffer_size"],
                      diffloss_d=size["diffloss_d"], diffloss_w=size["diffloss_w"], num_sampling_steps=size["ddpm_steps"])
        parts = mar_sampling_flops_per_image(config, num_iter, cfg_on=False)
        flops = parts["encoder"] + parts["decoder"]
        if variant == "mar_diffloss":
            flops += parts["head"]
            bytes_min = num_iter * (2 * depth * block_params + ddpm_steps * head_params) * weight_bytes
        else:
            flops += num_iter * seq_len * 2 * width * size["vocab"]
            bytes_min = num_iter * (2 * depth * block_params + width * size["vocab"]) * weight_bytes
    elif variant == "discrete_mar_maskgit":
        flops = num_iter * (2 * depth * transformer_block_flops(width, seq_len + 1, 4.0) + seq_len * 2 * width * size["vocab"])
        bytes_min = num_iter * (2 * depth * block_params + width * size["vocab"]) * weight_bytes
    else:
        per_token_blocks = sum(2 * depth * ((8 + 4 * 4.0) * width**2 + 4 * (step + 1) * width) for step in range(seq_len))
        flops = per_token_blocks + seq_len * head_per_token
        bytes_min = seq_len * (2 * depth * block_params + ddpm_steps * head_params) * weight_bytes
    return Work(flops=float(flops * batch), bytes_min=float(bytes_min), items=batch, unit="images/s",
                other_items={"tokens/s": batch * seq_len})


@pytest.mark.parametrize("batch, variant", _cases())
@torch.no_grad()
def test_variant_sampling(benchmark, bench, batch, variant):
    size = SIZE
    held = bench.cache.get("variant")
    if held is None or held[0] != (variant, size["name"]):
        bench.cache.pop("variant", None)
        if bench.on_gpu:
            torch.cuda.empty_cache()
        bench.cache["variant"] = ((variant, size["name"]), build(variant, size, bench.device))
    model = bench.cache["variant"][1]
    labels = torch.arange(batch, device=bench.device) % 10
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bench.on_gpu else contextlib.nullcontext()
    num_iter = size["num_iter"]

    def sample():
        with autocast:
            if variant in ("mar_diffloss", "mar_cross_entropy"):
                return model.sample_tokens(bsz=batch, num_iter=num_iter, cfg=1.0, labels=labels, temperature=1.0)
            if variant == "discrete_mar_maskgit":
                return iterative_decode(model, num_steps=num_iter, batch_size=batch, labels=labels, mode="maskgit")
            return model.sample_tokens(batch, cfg=1.0, labels=labels, temperature=1.0,
                                       use_cache=variant != "ar_raster_recompute")

    def check(result):
        if result.shape[0] != batch:
            raise AssertionError(f"expected {batch} samples, got shape {tuple(result.shape)}")
        if result.is_floating_point() and not torch.isfinite(result).all():
            raise AssertionError("the sampled tokens contain NaN or inf")

    steps = num_iter if variant in ("mar_diffloss", "mar_cross_entropy", "discrete_mar_maskgit") else model.seq_len
    params = {"size": size["name"], "batch": batch, "width": size["width"], "blocks": 2 * size["depth"],
              "heads": size["heads"], "tokens": model.seq_len, "mar_steps": num_iter,
              "diffusion_head": f"{size['diffloss_d']}x{size['diffloss_w']}", "ddpm_steps": size["ddpm_steps"],
              "vocab": size["vocab"], "cfg": 1.0, "temperature": 1.0,
              "precision": "bf16 autocast, fp32 transformer weights, bf16 head weights" if bench.on_gpu else "fp32"}
    detail = {"mar_diffloss": "MAR.sample_tokens (reference loop), DiffLoss backend 'auto'",
              "mar_cross_entropy": "CrossEntropyMAR.sample_tokens",
              "discrete_mar_maskgit": "marfast.discrete.iterative_decode, mode 'maskgit'",
              "ar_raster_kv": "CausalAR('raster').sample_tokens with the KV cache, DiffLoss backend 'auto'",
              "ar_random_kv": "CausalAR('random').sample_tokens with the KV cache, DiffLoss backend 'auto'",
              "ar_raster_recompute": "CausalAR('raster').sample_tokens(use_cache=False), DiffLoss backend 'auto'"}
    info = bench.run_case(benchmark, case="variant_sample", case_key=f"variant_sample/{size['name']}/b{batch}",
                          provider=variant, provider_detail=detail[variant], fn=sample,
                          work=sampling_work(variant, size, batch), params=params,
                          warmup_calls=1, target_s=None if bench.on_gpu else 0.4, check_output=check,
                          notes=["equal model size across variants; no CFG; random weights"])
    benchmark.extra_info["variant"] = {"generation_steps": steps,
                                       "head": "diffusion" if variant in DIFFLOSS_VARIANTS else "softmax"}
    mar_median = bench.medians.get((info["case_key"], "mar_diffloss"))
    benchmark.extra_info["relative_to_mar"] = None if mar_median is None else mar_median / info["median_s"]
