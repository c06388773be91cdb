"""MAR training step: forward + backward + AdamW step, per head backend, with peak memory.

GPU: mar_base (head 6x1024) and mar_large (head 8x1280), batch 64, diffusion_batch_mul 4, bf16
autocast with fp32 master weights (the recipe of `marfast.train`). CPU: a tiny MAR, reference only
(exercises the harness in CI).

Providers, side by side in one run: reference_eager (`DiffLoss(backend="torch")`, the head as the
official code runs it) and marfast_fused (`backend="triton"`: the fused head's autograd Functions).
The transformer is the same in both. FLOPs: 3x the forward FLOPs (forward + backward), with the
encoder's token count at the expected mask ratio (0.867 of 256 tokens masked), so TFLOP/s is
approximate; peak memory is exact (`torch.cuda.max_memory_allocated` over warm-up and timed rounds).
"""
import pytest
import torch

from marfast.mar import build_preset

from .harness import FUSED, REFERENCE, Work, head_flops_per_row_step, transformer_block_flops
from .models import TINY_MAR_CONFIG, randomize_

ON_GPU = torch.cuda.is_available()
HEADS = {"mar_base": (6, 1024), "mar_large": (8, 1280)}
BATCH, DIFFUSION_BATCH_MUL = 64, 4
EXPECTED_MASKED_FRACTION = 0.867  # mean of N(1, 0.25^2) truncated to [0.7, 1]


def _cases():
    if not ON_GPU:
        return [pytest.param("tiny", REFERENCE, id=f"tiny-{REFERENCE}")]
    return [pytest.param(name, provider, id=f"{name}-{provider}") for name in HEADS for provider in (REFERENCE, FUSED)]


def _build(name, backend, device):
    torch.manual_seed(0)
    if name == "tiny":
        from marfast import MAR

        model = MAR(**{**TINY_MAR_CONFIG, "diffusion_batch_mul": DIFFUSION_BATCH_MUL})
    else:
        depth, width = HEADS[name]
        with torch.device(device):
            model = build_preset(name, diffloss_d=depth, diffloss_w=width, diffusion_batch_mul=DIFFUSION_BATCH_MUL)
    model.diffloss.backend = backend
    randomize_(model.diffloss, seed=1)
    return model.to(device).train()


def training_step_flops(config, batch):
    seq = (config["img_size"] // config["vae_stride"] // config["patch_size"]) ** 2
    known = round(seq * (1 - EXPECTED_MASKED_FRACTION))
    channels = config["vae_embed_dim"] * config["patch_size"] ** 2
    forward = batch * (config["encoder_depth"] * transformer_block_flops(config["encoder_embed_dim"], config["buffer_size"] + known, config["mlp_ratio"])
                       + config["decoder_depth"] * transformer_block_flops(config["decoder_embed_dim"], config["buffer_size"] + seq, config["mlp_ratio"]))
    head_rows = batch * seq * config["diffusion_batch_mul"]
    forward += head_rows * (head_flops_per_row_step(config["diffloss_d"], config["diffloss_w"], channels)
                            + 2 * config["diffloss_w"] * (config["decoder_embed_dim"] + 2 * config["diffloss_w"]))
    return 3.0 * forward


@pytest.mark.parametrize("name, provider", _cases())
def test_mar_training_step(benchmark, bench, name, provider):
    if provider == FUSED and not ON_GPU:
        pytest.skip("the fused head is timed on CUDA only")
    backend = "torch" if provider == REFERENCE else "triton"
    model = _build(name, backend, bench.device)
    config = model.config
    batch = BATCH if ON_GPU else 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.02)
    generator = torch.Generator(device=bench.device).manual_seed(0)
    latents = torch.randn(batch, config["vae_embed_dim"], model.seq_h, model.seq_w, device=bench.device, generator=generator)
    labels = torch.randint(0, config["class_num"], (batch,), device=bench.device, generator=generator)

    def step():
        with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=ON_GPU):
            loss = model(latents, labels, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def check(loss):
        if not torch.isfinite(loss):
            raise AssertionError(f"non-finite training loss {loss.item()}")

    flops = training_step_flops(config, batch)
    params = sum(p.numel() for p in model.parameters())
    work = Work(flops=flops, bytes_min=float(params * (4 + 4 + 4 + 8)), items=batch, unit="images/s")
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats(bench.device)
    bench.run_case(benchmark, case="mar_training_step", case_key=f"mar_training_step/{name}/batch={batch}",
                   provider=provider, provider_detail=f"MAR forward+backward+AdamW, DiffLoss(backend={backend!r})",
                   fn=step, work=work, check_output=check,
                   params={"model": name, "batch": batch, "diffusion_batch_mul": DIFFUSION_BATCH_MUL,
                           "head": f"{config['diffloss_d']}x{config['diffloss_w']}",
                           "precision": "bf16 autocast, fp32 weights" if ON_GPU else "fp32"},
                   notes=["flops approximate: encoder tokens at the expected mask ratio",
                          "bytes_min: weights, gradients and AdamW moments touched once (fp32)"])
    if ON_GPU:
        benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
