"""De-MAR heads (Yao et al., "Denoising Token Prediction in Masked Autoregressive Models", ICCV 2025).

No public implementation exists; this follows section 3 of the paper (`../shared/seeds/de-mar-paper.txt`).
`MAR(head="transformer", denoising_head=True)` builds De-MAR from these two heads:

- `TransformerDiffLoss`, the diffusion head for masked tokens (eq. 7-10): the noisy token x_t
  attends to every conditional token z of its image through cross-attention blocks; one shared
  adaptive-norm projection c = W_c SiLU(z_i + te(t)) + b_c feeds every block, each block modulates
  it with its own scale and shift into (alpha1, beta1, alpha2, beta2), and the block is
      y = x + tanh(beta1) * norm(CrossAttn(alpha1 * norm(x), norm(z)))
      x' = y + tanh(beta2) * norm(FFN(alpha2 * norm(y))).
  It is trained with the same eps-MSE + variational-bound loss and sampled with the same respaced
  DDPM loop and CFG convention as the MLP head (`marfast.diffloss`).
- `DenoisingHead` for unmasked tokens (eq. 2-6): a refinement branch y = MLP([x', z]) + x' trained
  to recover the clean token, and an assessment branch s = MLP([x', y, z]) that predicts the cosine
  similarity of x' and of y to the clean token; at inference x' and y are mixed with weights
  s / sum(s).

Choices the paper leaves open, made here:
- the head's token width is `width` (its parameter counts in Table 1 fit widths 1024 / 1280 / 1280
  for De-MAR-B/L/H, see `marfast.mar.DEMAR_HEADS`), z enters through a linear `cond_embed`, and x_t
  through a linear `input_proj`, as in the MLP head; the FFN is Linear-GELU-Linear (ratio 4);
- every "norm" is a LayerNorm without affine parameters (eps 1e-6); keys and values are linear
  projections of norm(z), so they are computed once per sampling call, not once per DDPM step;
- initialisation makes each block the identity (alpha = 1, beta = 0: per-block scale 1, shift
  (1, 0, 1, 0), shared projection zero) and the output zero, as adaLN-Zero does in DiT;
- eq. 3's |y - x| is the Euclidean norm of the difference per token, averaged over the unmasked
  tokens; the assessment targets and the refined token it reads are detached (the assessment
  learns to judge the refinement, it does not steer it);
- scores below `SCORE_FLOOR` are raised to it before normalising, so negative or zero scores
  cannot flip or blow up the mixing weights.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import active_backend as active_attention_backend
from .attention import run_attention
from .diffloss import (DiffusionHead, TimestepEmbedder, as_cfg_scale, check_float_tensor, check_temperature,
                       init_denoiser_linears, initial_state, masked_diffusion_loss, sample_with_fresh_noise)

NORM_EPS = 1e-6
SCORE_FLOOR = 1e-3


def plain_norm(x):
    """LayerNorm over the last dimension without affine parameters."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


class ContextCrossAttention(nn.Module):
    """Multi-head cross-attention of head tokens [G, P, W] to their image's context [G, L, Z].

    Keys and values come from `keys_values(context)` so that a sampling loop computes them once.
    The attention runs on the backend `marfast.attention` picks (flash backends on CUDA in
    bf16/fp16, the math path elsewhere); `last_backend` names the latest one.
    """

    def __init__(self, width, context_dim, num_heads):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"head width {width} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim, 2 * width)
        self.proj = nn.Linear(width, width)
        self.last_backend = None

    def keys_values(self, context):
        """Normalised context [G, L, Z] -> keys, values [G, L, H, Dh]."""
        g, n, _ = context.shape
        k, v = self.kv(context).reshape(g, n, 2, self.num_heads, self.head_dim).unbind(2)
        return k, v

    def forward(self, x, k, v):
        g, p, w = x.shape
        q = self.q(x).reshape(g, p, self.num_heads, self.head_dim)
        k, v = k.to(q.dtype), v.to(q.dtype)
        self.last_backend = active_attention_backend(q.device, q.dtype, self.head_dim)
        return self.proj(run_attention(self.last_backend, q, k, v).reshape(g, p, w))


class CrossAttentionBlock(nn.Module):
    """One head block (eq. 9): x [G, P, W], shared modulation c [G, P, 4W], keys/values -> [G, P, W]."""

    def __init__(self, width, context_dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = ContextCrossAttention(width, context_dim, num_heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.modulation_scale = nn.Parameter(torch.ones(4 * width))
        self.modulation_shift = nn.Parameter(torch.zeros(4 * width))
        self.reset_modulation()

    def reset_modulation(self):
        """alpha = 1 and beta = 0 while the shared projection is zero: the block is the identity."""
        width = self.modulation_shift.shape[0] // 4
        with torch.no_grad():
            self.modulation_scale.fill_(1.0)
            self.modulation_shift.zero_()
            self.modulation_shift[:width].fill_(1.0)
            self.modulation_shift[2 * width:3 * width].fill_(1.0)

    def forward(self, x, c, k, v):
        alpha1, beta1, alpha2, beta2 = (c * self.modulation_scale + self.modulation_shift).chunk(4, dim=-1)
        y = x + torch.tanh(beta1) * plain_norm(self.attn(alpha1 * plain_norm(x), k, v))
        return y + torch.tanh(beta2) * plain_norm(self.mlp(alpha2 * plain_norm(y)))


class TransformerDenoiser(nn.Module):
    """The head's denoiser: net(x [G, P, C], t long [G, P] (0..999), z [G, P, Z], keys_values) -> [G, P, 2C].

    keys_values = net.context_keys_values(context [G, L, Z]): one (k, v) pair per block.
    """

    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_blocks, num_heads, mlp_ratio=4.0,
                 grad_checkpointing=False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.z_channels = z_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 4 * model_channels))
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList(
            [CrossAttentionBlock(model_channels, z_channels, num_heads, mlp_ratio) for _ in range(num_blocks)])
        self.final_linear = nn.Linear(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        init_denoiser_linears(self)
        for layer in (self.adaLN_modulation[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for block in self.blocks:
            block.reset_modulation()

    def context_keys_values(self, context):
        """Context [G, L, Z] -> tuple of (keys, values) [G, L, H, Dh], one pair per block."""
        normed = plain_norm(context)
        return tuple(block.attn.keys_values(normed) for block in self.blocks)

    def forward(self, x, t, z, keys_values):
        g, p, _ = x.shape
        te = self.time_embed(t.reshape(-1)).reshape(g, p, -1)
        c = self.adaLN_modulation(self.cond_embed(z) + te)
        h = self.input_proj(x)
        for block, (k, v) in zip(self.blocks, keys_values):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, k, v, use_reentrant=False)
            else:
                h = block(h, c, k, v)
        return self.final_linear(plain_norm(h))


class ContextBoundDenoiser(nn.Module):
    """The denoiser with its images' keys and values bound, on flat rows for the DDPM loop:
    net(x [R, C], t [R], z [R, Z]) -> [R, 2C], rows image-major (R = groups * P)."""

    def __init__(self, net, keys_values, groups):
        super().__init__()
        self.net = net
        self.keys_values = keys_values
        self.groups = groups

    def forward(self, x, t, z):
        g = self.groups
        out = self.net(x.reshape(g, -1, x.shape[-1]), t.reshape(g, -1), z.reshape(g, -1, z.shape[-1]), self.keys_values)
        return out.reshape(x.shape[0], -1)


def default_head_count(width):
    """Heads of 64 channels where 64 divides the width, else the most heads of at least 64 channels
    that divide it (width 1000: 10 heads of 100)."""
    return next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)


class TransformerDiffLoss(DiffusionHead):
    """The De-MAR Transformer diffusion head.

    forward(target [G, P, C], z [G, P, Z], context [G, L, Z], mask [G, P] or None) -> scalar loss:
    G images, P head rows per image (any positions, repeated rows allowed), L conditional tokens
    per image (the decoder outputs of every position).
    sample(z [R, Z], context [G, L, Z], temperature, cfg) -> [R, C]: R = G * P rows, image-major;
    with CFG the first G/2 images are the conditional ones (as with `DiffLoss`, the caller keeps
    the first half of the rows).
    """

    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps, num_heads=None, mlp_ratio=4.0,
                 grad_checkpointing=False):
        super().__init__(target_channels, z_channels, num_sampling_steps)
        num_heads = num_heads or default_head_count(width)
        self.net = TransformerDenoiser(target_channels, width, 2 * target_channels, z_channels, depth, num_heads,
                                       mlp_ratio, grad_checkpointing)

    @property
    def param_dtype(self):
        return self.net.input_proj.weight.dtype

    def _check_context(self, context, groups=None):
        check_float_tensor("context", context, 3, self.z_channels)
        if groups is not None and context.shape[0] != groups:
            raise ValueError(f"context must hold {groups} images, got shape {tuple(context.shape)}")

    def forward(self, target, z, context, mask=None, *, t=None, noise=None):
        """Masked mean of the per-row loss (eps MSE + variational bound). t: optional long [G, P]
        timesteps in 0..999; noise: optional [G, P, C]; given both, the loss is deterministic."""
        check_float_tensor("target", target, 3, self.in_channels)
        check_float_tensor("z", z, 3, self.z_channels)
        if target.shape[:2] != z.shape[:2]:
            raise ValueError(f"target and z must have the same [G, P], got {tuple(target.shape)} and {tuple(z.shape)}")
        self._check_context(context, target.shape[0])
        if not target.device == z.device == context.device:
            raise ValueError(f"target, z and context must be on one device, got {target.device}, {z.device}, {context.device}")
        g, p, c = target.shape
        if mask is not None and mask.shape != (g, p):
            raise ValueError(f"mask must have shape ({g}, {p}), got {tuple(mask.shape)}")
        if t is not None and t.shape != (g, p):
            raise ValueError(f"t must have shape ({g}, {p}), got {tuple(t.shape)}")
        if noise is not None and noise.shape != target.shape:
            raise ValueError(f"noise must have the shape of target {tuple(target.shape)}, got {tuple(noise.shape)}")
        bound = ContextBoundDenoiser(self.net, self.net.context_keys_values(context.to(self.param_dtype)), g)
        z_rows = z.reshape(g * p, -1).to(self.param_dtype)

        def denoise(x_t, t_rows):
            return bound(x_t.to(self.param_dtype), t_rows, z_rows)

        def flat(a):
            return None if a is None else a.reshape(g * p, *a.shape[2:])

        return masked_diffusion_loss(self.train_diffusion, denoise, target.reshape(g * p, c), flat(mask), flat(t),
                                     flat(noise))

    def sample(self, z, context, temperature=1.0, cfg=1.0, *, noise=None, generator=None, clip_x0=None):
        """Draw tokens [R, C] for rows z [R, Z] of the images whose conditional tokens are context
        [G, L, Z] (R = G * P, image-major). noise, generator, clip_x0 and the CFG convention as in
        `DiffLoss.sample` (the reference loop: the net runs once per step; keys and values once)."""
        check_float_tensor("z", z, 2, self.z_channels)
        self._check_context(context)
        temperature = check_temperature(temperature)
        cfg = as_cfg_scale(cfg)
        groups = context.shape[0]
        if z.shape[0] % groups or (cfg != 1.0 and groups % 2):
            raise ValueError(f"z's {z.shape[0]} rows must split evenly over the {groups} context images"
                             + (" (an even count with cfg != 1)" if cfg != 1.0 else ""))
        if z.device != context.device:
            raise ValueError(f"z is on {z.device} but context is on {context.device}")
        x = initial_state(z, self.in_channels, cfg, noise, generator)
        bound = ContextBoundDenoiser(self.net, self.net.context_keys_values(context.to(self.param_dtype)), groups)
        return sample_with_fresh_noise(bound, self.gen_diffusion, z, x, temperature, cfg, generator, clip_x0)


class DenoisingHead(nn.Module):
    """The De-MAR denoising head for unmasked tokens (eq. 2-6).

    refine(x' [N, C], z [N, Z]) -> y [N, C]; assess(x', y, z) -> scores [N, 2] (predicted cosine
    similarity of x' and of y to the clean token); forward(x', z) -> the mixed token [N, C];
    losses(x', z, clean) -> (refinement loss, assessment loss), scalars.
    """

    def __init__(self, token_channels, z_channels, width):
        super().__init__()
        self.refine_fc1 = nn.Linear(token_channels + z_channels, width)
        self.refine_fc2 = nn.Linear(width, token_channels)
        self.assess_fc1 = nn.Linear(2 * token_channels + z_channels, width)
        self.assess_fc2 = nn.Linear(width, 2)
        for layer in (self.refine_fc1, self.refine_fc2, self.assess_fc1, self.assess_fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.refine_fc2.weight)  # starts as the identity: y = x'

    def check_rows(self, noisy, z, clean=None):
        check_float_tensor("noisy tokens", noisy, 2, self.refine_fc2.out_features)
        check_float_tensor("z", z, 2, self.refine_fc1.in_features - self.refine_fc2.out_features)
        if clean is not None:
            check_float_tensor("clean tokens", clean, 2, noisy.shape[1])
        if any(t.shape[0] != noisy.shape[0] for t in (z, noisy if clean is None else clean)):
            raise ValueError(f"noisy tokens, z (and clean tokens) must have the same rows, got {noisy.shape[0]} "
                             f"and {z.shape[0]}" + ("" if clean is None else f" and {clean.shape[0]}"))

    def refine(self, noisy, z):
        inputs = torch.cat([noisy, z], dim=-1).to(self.refine_fc1.weight.dtype)  # cat promotes: float32 tokens
        return self.refine_fc2(F.silu(self.refine_fc1(inputs))) + noisy

    def assess(self, noisy, refined, z):
        inputs = torch.cat([noisy, refined, z], dim=-1).to(self.assess_fc1.weight.dtype)
        return self.assess_fc2(F.silu(self.assess_fc1(inputs)))

    def forward(self, noisy, z):
        self.check_rows(noisy, z)
        refined = self.refine(noisy, z)
        scores = self.assess(noisy, refined, z).clamp_min(SCORE_FLOOR)
        weights = scores / scores.sum(dim=-1, keepdim=True)
        return weights[:, :1] * noisy + weights[:, 1:] * refined

    def losses(self, noisy, z, clean):
        """Refinement loss (mean Euclidean distance of y to the clean token, eq. 3) and assessment
        loss (mean absolute error of both scores, eq. 6); both 0 for zero rows."""
        self.check_rows(noisy, z, clean)
        rows = max(noisy.shape[0], 1)
        refined = self.refine(noisy, z)
        refine_loss = (refined - clean).norm(dim=-1).sum() / rows
        target = torch.stack([F.cosine_similarity(noisy, clean, dim=-1),
                              F.cosine_similarity(refined.detach(), clean, dim=-1)], dim=-1).detach()
        scores = self.assess(noisy, refined.detach(), z)
        assess_loss = (scores - target).abs().sum() / rows
        return refine_loss, assess_loss
