"""Benchmark subjects: the released head sizes, MAR presets, tiny CPU stand-ins, the probe that
tells whether the fused head path is really present, and the AR-step runners of both loops."""
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

import marfast.diffloss as diffloss_module
from marfast import MAR, DiffLoss, mar_base, mar_huge, mar_large
from marfast.demar import DenoisingHead, TransformerDiffLoss
from marfast.mar import DEMAR_HEADS, mask_by_order, sampling_class_embeddings
from marfast.sampler import cuda_graphs_requested, plan_steps, run_ar_loop, step_graphs_for

TOKEN_CHANNELS = 16
DDPM_STEPS = 100


@dataclass(frozen=True)
class HeadSpec:
    """A diffusion head size: depth x width, condition width z, token channels."""

    name: str
    depth: int
    width: int
    z_channels: int
    channels: int = TOKEN_CHANNELS


RELEASED_HEADS = (
    HeadSpec("6x1024", 6, 1024, 768),    # mar_base
    HeadSpec("8x1280", 8, 1280, 1024),   # mar_large
    HeadSpec("12x1536", 12, 1536, 1280),  # mar_huge
)
TINY_HEAD = HeadSpec("tiny2x64", 2, 64, 32)

RELEASED_CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}
RELEASED_HEAD_OF = dict(zip(("mar_base", "mar_large", "mar_huge"), RELEASED_HEADS))
SEQ_LEN_256PX = 256  # tokens per image at 256 px (VAE stride 16, patch size 1)


@dataclass(frozen=True)
class DemarHeadPair:
    """One MAR size's two diffusion heads at the same z width: the released MLP head `mlp` and
    De-MAR's Transformer head (depth x width), for images of `seq_len` context tokens."""

    name: str
    mlp: HeadSpec
    depth: int
    width: int
    seq_len: int = SEQ_LEN_256PX

    @property
    def z_channels(self):
        return self.mlp.z_channels

    @property
    def channels(self):
        return self.mlp.channels

    @property
    def transformer_name(self):
        return f"{self.depth}x{self.width}"


DEMAR_HEAD_PAIRS = tuple(DemarHeadPair(name, RELEASED_HEAD_OF[base], depth, width)
                         for name, (base, depth, width) in DEMAR_HEADS.items())
TINY_DEMAR_PAIR = DemarHeadPair("demar_tiny", TINY_HEAD, 2, 64, seq_len=16)

TINY_MAR_CONFIG = dict(img_size=64, vae_stride=16, patch_size=1, vae_embed_dim=TOKEN_CHANNELS,
                       encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2,
                       decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0,
                       buffer_size=4, class_num=10, diffloss_d=2, diffloss_w=64, num_sampling_steps="10")


def randomize_(module, seed, std=0.02):
    """Overwrite every parameter with N(0, std^2) draws (the official init zeroes the adaLN and final
    layers, which would make the head's output trivially constant)."""
    gen = None
    for param in module.parameters():
        if gen is None:
            gen = torch.Generator(device=param.device).manual_seed(seed)
        with torch.no_grad():
            param.copy_(torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32) * std)
    return module


def build_head(spec, device, dtype, backend, state_dict=None):
    """DiffLoss of `spec` with 100 DDPM steps in eval mode, weights in `dtype`."""
    with torch.device(device):
        head = DiffLoss(target_channels=spec.channels, z_channels=spec.z_channels, depth=spec.depth,
                        width=spec.width, num_sampling_steps=str(DDPM_STEPS), backend=backend)
    if state_dict is None:
        randomize_(head, seed=spec.depth * 1000 + spec.width)
    else:
        head.load_state_dict(state_dict)
    return head.to(dtype=dtype).eval()


def training_inputs(spec, rows, device, dtype):
    """One DiffLoss training call's inputs for `rows` rows (seeded by rows): target in [-1, 1], z in
    `dtype`, a mask keeping about 87% of the rows, integer timesteps and noise."""
    gen = torch.Generator(device=device).manual_seed(rows)
    return dict(target=torch.rand(rows, spec.channels, device=device, generator=gen) * 2 - 1,
                z=torch.randn(rows, spec.z_channels, device=device, generator=gen).to(dtype),
                mask=(torch.rand(rows, device=device, generator=gen) < 0.87).float(),
                t=torch.randint(0, 1000, (rows,), device=device, generator=gen),
                noise=torch.randn(rows, spec.channels, device=device, generator=gen))


def training_step(head, inputs):
    """One training call: zero the gradients (set to None), the masked DiffLoss, its backward;
    returns the detached loss."""
    head.zero_grad(set_to_none=True)
    loss = head(inputs["target"], inputs["z"], inputs["mask"], t=inputs["t"], noise=inputs["noise"])
    loss.backward()
    return loss.detach()


MAR_PRESET_BUILDERS = {"mar_base": mar_base, "mar_large": mar_large, "mar_huge": mar_huge}


def build_mar(name, device):
    """MAR `name` ("tiny_mar", or a released preset with its released head and 100 DDPM steps) on
    `device` in eval mode: random head weights, in bf16 on CUDA (the transformer stays fp32 and runs
    under autocast); official initialisation elsewhere."""
    device = torch.device(device)
    with torch.device(device):
        if name == "tiny_mar":
            model = MAR(**TINY_MAR_CONFIG)
        else:
            spec = RELEASED_HEAD_OF[name]
            model = MAR_PRESET_BUILDERS[name](diffloss_d=spec.depth, diffloss_w=spec.width,
                                              num_sampling_steps=str(DDPM_STEPS))
    randomize_(model.diffloss, seed=len(name))
    if device.type == "cuda":
        model.diffloss.to(torch.bfloat16)
    return model.eval()


def build_transformer_head(pair, device, dtype):
    """TransformerDiffLoss of `pair` (z width of its MAR size) with 100 DDPM steps in eval mode,
    random weights in `dtype`."""
    with torch.device(device):
        head = TransformerDiffLoss(target_channels=pair.channels, z_channels=pair.z_channels, depth=pair.depth,
                                   width=pair.width, num_sampling_steps=str(DDPM_STEPS))
    randomize_(head, seed=pair.depth * 1000 + pair.width + 1)
    return head.to(dtype=dtype).eval()


def build_denoising_head(pair, device, dtype):
    """DenoisingHead of `pair` as MAR builds it (width = the decoder width z), random weights in `dtype`."""
    with torch.device(device):
        head = DenoisingHead(pair.channels, pair.z_channels, pair.z_channels)
    randomize_(head, seed=pair.z_channels + 2)
    return head.to(dtype=dtype).eval()


@contextmanager
def count_reference_paths(head):
    """Count calls of the reference sampling loop and of the denoiser's full forward while active."""
    counts = {"reference_loop": 0, "net_forward": 0}
    original_loop = diffloss_module.ddpm_sample_loop_reference

    def counting_loop(*args, **kwargs):
        counts["reference_loop"] += 1
        return original_loop(*args, **kwargs)

    def count_forward(module, inputs):
        counts["net_forward"] += 1

    diffloss_module.ddpm_sample_loop_reference = counting_loop
    hook = head.net.register_forward_pre_hook(count_forward)
    try:
        yield counts
    finally:
        hook.remove()
        diffloss_module.ddpm_sample_loop_reference = original_loop


def fused_head_absence(head, z_channels, device, dtype, cfg):
    """None when `head.sample` runs a fused path on `device`; otherwise why not (a skip reason).

    Probes a 4-row CFG sample. NotImplementedError/ImportError mean "not built yet"; any other
    exception is a real failure and propagates. If the reference loop or the denoiser's full
    forward ran, the fused path is not present (the backend fell through to the reference).
    """
    z = torch.randn(4, z_channels, device=device, dtype=dtype)
    try:
        with count_reference_paths(head) as counts, torch.no_grad():
            head.sample(z, temperature=1.0, cfg=cfg)
    except (NotImplementedError, ImportError) as error:
        return f"DiffLoss(backend={head.backend!r}).sample is not available yet: {type(error).__name__}: {error}"
    if counts["reference_loop"] or counts["net_forward"]:
        return (f"fused sampling path not present: DiffLoss(backend={head.backend!r}).sample ran the reference "
                f"loop ({counts['reference_loop']} loop call(s), {counts['net_forward']} denoiser forward(s))")
    return None


def fused_copy_or_reason(reference, spec, z_channels, device, cfg):
    """(head, None): a `DiffLoss(backend="triton")` of `spec` with the reference head's weights and
    dtype, when its fused sampling path runs on `device`; otherwise (None, skip reason)."""
    dtype = reference.net.input_proj.weight.dtype
    try:
        head = build_head(spec, device, dtype, backend="triton", state_dict=reference.state_dict())
    except (ValueError, NotImplementedError, ImportError) as error:
        return None, f"DiffLoss(backend='triton') cannot be built: {type(error).__name__}: {error}"
    reason = fused_head_absence(head, z_channels, device, dtype, cfg)
    return (None, reason) if reason else (head, None)


@torch.no_grad()
def reference_ar_steps(model, bsz, num_iter, cfg, cfg_schedule, labels, temperature, steps):
    """Run only the AR steps `steps` of `model.sample_tokens(bsz, num_iter, ...)`, each with the shapes
    and mask state the complete loop has when it reaches that step: `MAR.reference_step`, the body of
    the reference loop (the mask of a step is rebuilt from the orders, one extra scatter per step;
    token values are zeros, which does not change the cost). Returns tokens [bsz, L, Ct].
    """
    plans = plan_steps(model, num_iter, cfg, cfg_schedule)
    orders = model.sample_orders(bsz)
    tokens = torch.zeros(bsz, model.seq_len, model.token_embed_dim, device=model.device)
    for step in steps:
        masked_before = plans[step].masked_before
        mask = mask_by_order(masked_before, orders).float()
        tokens, _, _ = model.reference_step(tokens, mask, masked_before, orders, step, num_iter, cfg, cfg_schedule,
                                            labels, temperature)
    return tokens


@torch.no_grad()
def fast_ar_steps(model, bsz, num_iter, cfg, cfg_schedule, labels, temperature, steps):
    """Run only the AR steps `steps` of `model.sample_tokens_fast(bsz, num_iter, ...)` (the fast
    loop's plans of those steps; its CUDA graphs when MARFAST_CUDA_GRAPHS=1). Returns tokens [bsz, L, Ct]."""
    plans = plan_steps(model, num_iter, cfg, cfg_schedule)
    tokens = torch.zeros(bsz, model.seq_len, model.token_embed_dim, device=model.device)
    class_embedding = sampling_class_embeddings(model, bsz, labels, cfg != 1.0)
    graphs = step_graphs_for(model, bsz, cfg != 1.0) if cuda_graphs_requested() else None
    run_ar_loop(model, tokens, model.sample_orders(bsz), class_embedding, [plans[step] for step in steps],
                temperature, graphs=graphs)
    return tokens


def require_finite_tokens(rows, channels):
    """check_output callable: the result is a finite [rows, channels] tensor."""
    def check(result):
        if tuple(result.shape) != (rows, channels):
            raise AssertionError(f"expected a [{rows}, {channels}] result, got {tuple(result.shape)}")
        if not torch.isfinite(result).all():
            raise AssertionError("the sampled tokens contain NaN or inf")
    return check


def skip_unless_cuda(what):
    if not torch.cuda.is_available():
        pytest.skip(f"{what} is timed on CUDA only")
