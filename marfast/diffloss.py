"""The per-token Diffusion Loss head: a drop-in for the official `DiffLoss`.

`SimpleMLPAdaLN` is the denoiser (official module and parameter names, so official state dicts
load strictly). This plain-PyTorch code is the readable spec of the head and the path on CPU;
the fused Triton path must compute the same function.
"""
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .diffusion import NUM_TRAIN_TIMESTEPS, GaussianDiffusion, parse_num_steps, timestep_embedding
from .fused_training import denoiser_forward_fused
from .kernels.linear_fused import interpreting


BACKENDS = ("auto", "triton", "torch")


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (256) -> Linear -> SiLU -> Linear: [N] -> [N, W]."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t):
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), (shift, scale, gate) from SiLU(y)."""

    def __init__(self, channels):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels, bias=True),
            nn.SiLU(),
            nn.Linear(channels, channels, bias=True),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels, bias=True))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.mlp(modulate(self.in_ln(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """Linear(modulate(LN(x), shift, scale)) with a parameter-free LayerNorm: [N, W] -> [N, 2C]."""

    def __init__(self, model_channels, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def init_denoiser_linears(net):
    """The official head initialisation before its zero layers: Xavier-uniform linears with zero
    bias, then N(0, 0.02) for the time embedding's two linears (net.time_embed)."""
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
    nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: net(x [N, C], t [N] original 0..999 timesteps, c [N, Z]) -> [N, 2C] (eps, v)."""

    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks, grad_checkpointing=False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        init_denoiser_linears(self)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


def check_float_tensor(name, x, ndim, last_dim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if last_dim is not None and x.shape[-1] != last_dim:
        raise ValueError(f"{name} must have {last_dim} channels in its last dimension, got shape {tuple(x.shape)}")


def finite_scalar(name, value):
    """`value` (a number or a one-element tensor, as the official sampler passes cfg) as a finite float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def as_cfg_scale(cfg):
    """The CFG scale as a python float."""
    return finite_scalar("cfg", cfg)


def check_temperature(temperature):
    temperature = finite_scalar("temperature", temperature)
    if not temperature >= 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    return temperature


def masked_diffusion_loss(diffusion, denoise, target, mask=None, t=None, noise=None):
    """Masked mean of the per-row diffusion loss (eps MSE + variational bound): a scalar.

    denoise(x_t [N, C], t long [N]) -> [N, 2C] is the net with its conditions bound; target
    [N, C]; mask [N] or None; t: optional long [N] timesteps in 0..999 (drawn uniformly when
    None); noise: optional [N, C] (drawn when None). Works in float32 (float64 for float64 target).
    """
    n = target.shape[0]
    if t is None:
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), device=target.device)
    elif t.shape != (n,) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"t must be an integer tensor of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    elif n and (int(t.min()) < 0 or int(t.max()) >= NUM_TRAIN_TIMESTEPS):
        raise ValueError(f"t must lie in 0..{NUM_TRAIN_TIMESTEPS - 1}")
    t = t.to(device=target.device, dtype=torch.long)
    work_dtype = torch.promote_types(target.dtype, torch.float32)
    x0 = target.to(work_dtype)
    if noise is None:
        noise = torch.randn_like(x0)
    elif noise.shape != target.shape:
        raise ValueError(f"noise must have the shape of target {tuple(target.shape)}, got {tuple(noise.shape)}")
    noise = noise.to(device=x0.device, dtype=work_dtype)
    x_t = diffusion.q_sample(x0, t, noise)
    loss = diffusion.training_losses(denoise(x_t, t).to(work_dtype), x0, x_t, t, noise)
    if mask is not None:
        if mask.shape != (n,):
            raise ValueError(f"mask must have shape ({n},), got {tuple(mask.shape)}")
        mask = mask.to(loss.dtype)
        loss = (loss * mask).sum() / mask.sum()
    return loss.mean()


def initial_state(z, channels, cfg, noise=None, generator=None):
    """x_T for the reverse loop: [R, C] in the state dtype (float32, float64 for float64 z).

    z: [R, Z] conditions; with cfg != 1 R must be even (conditional rows, then unconditional) and
    one [R/2, C] draw (or the given `noise`) is duplicated into both halves, as the official head does.
    """
    rows = z.shape[0]
    if cfg != 1.0 and rows % 2:
        raise ValueError(f"with cfg != 1, z must hold an even number of rows (conditional, then unconditional), got {rows}")
    state_dtype = torch.promote_types(z.dtype, torch.float32)
    half = rows // 2 if cfg != 1.0 else rows
    if noise is None:
        noise = torch.randn(half, channels, device=z.device, dtype=state_dtype, generator=generator)
    elif tuple(noise.shape) != (half, channels):
        raise ValueError(f"noise must have shape ({half}, {channels}), got {tuple(noise.shape)}")
    x = noise.to(device=z.device, dtype=state_dtype)
    return torch.cat([x, x]) if cfg != 1.0 else x


def ddpm_sample_loop_reference(net, diffusion, z, x, temperature, cfg, draw_noise, clip_x0=None):
    """The official reverse DDPM loop: the net is called once per step.

    z: [R, Z] conditions (with CFG, R = 2B: conditional rows first, then unconditional);
    x: [R, C] initial x_T (with CFG both halves equal); draw_noise(step) -> [R, C] fresh noise.
    With CFG only eps is mixed: eps = eps_u + cfg * (eps_c - eps_u), both halves get it, the
    variance values stay per half. Returns x_0 [R, C] in x's dtype.
    """
    c = x.shape[-1]
    param_dtype = next(net.parameters()).dtype
    use_cfg = cfg != 1.0
    for step in reversed(range(diffusion.num_timesteps)):
        t_orig = diffusion.timestep_map[step].to(x.device).expand(x.shape[0])
        x_in = torch.cat([x[: len(x) // 2]] * 2) if use_cfg else x
        out = net(x_in.to(param_dtype), t_orig, z.to(param_dtype)).to(x.dtype)
        eps, v = out[:, :c], out[:, c:]
        if use_cfg:
            cond_eps, uncond_eps = eps.chunk(2)
            half_eps = uncond_eps + cfg * (cond_eps - uncond_eps)
            eps = torch.cat([half_eps, half_eps])
        x = diffusion.p_sample_step(eps, v, x, step, draw_noise(step), temperature, clip_x0)
    return x


def sample_with_fresh_noise(net, diffusion, z, x, temperature, cfg, generator=None, clip_x0=None):
    """`ddpm_sample_loop_reference` with each step's noise [R, C] drawn from `generator` in turn."""

    def draw_noise(step):
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)

    return ddpm_sample_loop_reference(net, diffusion, z, x, temperature, cfg, draw_noise, clip_x0)


class DiffusionHead(nn.Module):
    """What every diffusion head shares: its sizes and its training (1000-step) and sampling
    (respaced) diffusions. Holds no parameters, so the state dict is only the subclass's net."""

    def __init__(self, target_channels, z_channels, num_sampling_steps):
        super().__init__()
        self.in_channels = target_channels
        self.z_channels = z_channels
        self.train_diffusion = GaussianDiffusion(NUM_TRAIN_TIMESTEPS)
        self.set_sampling_steps(num_sampling_steps)

    def set_sampling_steps(self, num_sampling_steps):
        """Respace the sampling diffusion to `num_sampling_steps` ("100" or 100)."""
        self.num_sampling_steps = parse_num_steps(num_sampling_steps)
        self.gen_diffusion = GaussianDiffusion(self.num_sampling_steps)

    def extra_repr(self):
        return (f"target_channels={self.in_channels}, z_channels={self.z_channels}, "
                f"sampling_steps={self.num_sampling_steps}")


class DiffLoss(DiffusionHead):
    """Diffusion Loss head, drop-in for the official class (same constructor and state dict).

    forward(target [N, C], z [N, Z], mask [N] or None) -> scalar loss.
    sample(z [R, Z], temperature, cfg) -> [R, C] tokens (with CFG R = 2B rows, conditional first;
    the caller keeps the first half, as with the official head).
    """

    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps, grad_checkpointing=False,
                 backend="auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(target_channels, z_channels, num_sampling_steps)
        self.backend = backend
        self.net = SimpleMLPAdaLN(
            in_channels=target_channels,
            model_channels=width,
            out_channels=target_channels * 2,
            z_channels=z_channels,
            num_res_blocks=depth,
            grad_checkpointing=grad_checkpointing,
        )

    def extra_repr(self):
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def backend_for(self, device):
        """The path that runs for tensors on `device`: "triton" or "torch".

        "auto" picks Triton on CUDA and the reference elsewhere; "triton" off CUDA needs the Triton
        CPU interpreter (TRITON_INTERPRET=1) and raises otherwise.
        """
        device = torch.device(device)
        if self.backend == "torch":
            return "torch"
        if self.backend == "auto":
            return "triton" if device.type == "cuda" else "torch"
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"backend='triton' needs a CUDA device or the Triton CPU interpreter (TRITON_INTERPRET=1 "
                               f"set before marfast is imported), got tensors on {device}")
        return "triton"

    def _check_rows(self, target, z):
        check_float_tensor("target", target, 2, self.in_channels)
        check_float_tensor("z", z, 2, self.z_channels)
        if target.shape[0] != z.shape[0]:
            raise ValueError(f"target and z must have the same number of rows, got {target.shape[0]} and {z.shape[0]}")
        if target.device != z.device:
            raise ValueError(f"target is on {target.device} but z is on {z.device}")

    def forward(self, target, z, mask=None, *, t=None, noise=None):
        """Masked mean of the per-row loss (eps MSE + variational bound).

        t: optional long [N] timesteps in 0..999; noise: optional [N, C]. Given both, the loss
        is deterministic.
        """
        self._check_rows(target, z)
        param_dtype = self.net.input_proj.weight.dtype
        fused = self.backend_for(target.device) == "triton"

        def denoise(x_t, t):
            if fused:
                return denoiser_forward_fused(self.net, x_t.to(param_dtype), t, z.to(param_dtype))
            return self.net(x_t.to(param_dtype), t, z.to(param_dtype))

        return masked_diffusion_loss(self.train_diffusion, denoise, target, mask, t, noise)

    def sample(self, z, temperature=1.0, cfg=1.0, *, noise=None, generator=None, clip_x0=None):
        """Draw tokens [R, C] for conditions z [R, Z] with the respaced reverse DDPM loop.

        cfg != 1: z holds 2B rows (conditional, then unconditional), one B-row x_T is duplicated,
        and the returned 2B rows' first half is the guided sample. noise: the initial x_T ([B, C]
        with CFG, else [R, C]); with temperature 0 and a given noise the result is deterministic.
        generator: torch.Generator on z's device for all draws. clip_x0: optional (lo, hi) clamp
        of the x0 prediction (off by default, as in the official code). Returns the state dtype
        (float32, or float64 for float64 z).

        With the Triton backend (`backend_for(z.device) == "triton"`) the loop runs fused
        (`fused_head.ddpm_sample_loop_fused`, float32 state, float64 z rejected): the per-step
        noise is drawn up front as one [S, B, C] tensor (another stream of draws than the
        reference's, same distribution), and with CFG the second half repeats the first.
        """
        check_float_tensor("z", z, 2, self.z_channels)
        temperature = check_temperature(temperature)
        cfg = as_cfg_scale(cfg)
        rows = z.shape[0]
        x = initial_state(z, self.in_channels, cfg, noise, generator)
        if self.backend_for(z.device) == "triton":
            from .fused_head import ddpm_sample_loop_fused

            half = rows // 2 if cfg != 1.0 else rows
            step_noise = torch.randn(self.gen_diffusion.num_timesteps, half, self.in_channels, device=z.device,
                                     dtype=x.dtype, generator=generator)
            return ddpm_sample_loop_fused(self.net, self.gen_diffusion, z, x, temperature, cfg, step_noise, clip_x0)
        return sample_with_fresh_noise(self.net, self.gen_diffusion, z, x, temperature, cfg, generator, clip_x0)
