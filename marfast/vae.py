"""The KL-16 VAE of MAR: latent-diffusion's AutoencoderKL with the original parameter names.

We keep our own small module rather than depend on diffusers: the original key names load
`kl16.ckpt` / `kl16.safetensors` directly (no key mapping to maintain), the module is ~200 lines,
and it runs through plain PyTorch convolutions, in float32 as officially (`load_vae`). Architecture (facts of the
released VAE): base width 128, channel multipliers (1, 1, 2, 2, 4), two residual blocks per level
in the encoder and three in the decoder, GroupNorm(32, eps 1e-6) + SiLU, self-attention at
16x16 in the encoder and in both middles, 16 latent channels (the encoder predicts mean and
log-variance), stride 16. MAR scales latents by 0.2325.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .tokenizer import check_finite_latents

LATENT_SCALE = 0.2325


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice plus a 1x1 shortcut when the width changes: [B, Cin, H, W] -> [B, Cout, H, W]."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v and output projection."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (conv(n).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding on the right and bottom only."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks, attns):
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _middle(channels):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_middle(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def _run_level(level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Images [B, 3, R, R] in [-1, 1] -> moments [B, 2 * z_channels, R / 2^(L-1), ...]."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, resolution=256, z_channels=16,
                 attn_resolutions=(16,)):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = resolution, ch
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _middle(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_middle(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B, z_channels, r, r] -> images [B, 3, r * 2^(L-1), ...] (roughly in [-1, 1])."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
            level = _level(blocks, [])
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = _run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """MAR's KL VAE. encode(images in [-1, 1]) -> scaled latents; decode(scaled latents) -> images.

    Both take and return [B, C, H, W] tensors; `encode` samples the posterior (or returns its mean
    with sample=False) and multiplies by LATENT_SCALE, `decode` divides by it first.
    """

    def __init__(self, embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ch=128, resolution=256):
        super().__init__()
        self.embed_dim = embed_dim
        self.stride = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, resolution=resolution, z_channels=embed_dim)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, z_channels=embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def encode(self, images, sample=True, generator=None):
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise ValueError(f"images must be [B, 3, H, W] with H and W divisible by {self.stride}, got {tuple(images.shape)}")
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean * LATENT_SCALE

    def decode(self, latents):
        if latents.dim() != 4 or latents.shape[1] != self.embed_dim:
            raise ValueError(f"latents must be [B, {self.embed_dim}, h, w], got {tuple(latents.shape)}")
        return self.decoder(self.post_quant_conv(latents / LATENT_SCALE))

    def decode_to_uint8(self, latents):
        """Scaled latents -> uint8 images [B, 3, H, W]."""
        check_finite_latents(latents)
        images = self.decode(latents.to(self.post_quant_conv.weight.dtype)).float()
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class VAEImageDecoder:
    """Attaches a VAE to a MAR for `MAR.sample` (`decode`: latents -> uint8 [B, 3, H, W]).

    A plain object, not a submodule, so the VAE's weights stay out of MAR's state dict.
    """

    def __init__(self, vae):
        self.vae = vae

    def decode(self, latents):
        """Scaled latents [B, C, h, w] -> uint8 images, in the VAE's dtype even under autocast."""
        device = self.vae.post_quant_conv.weight.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return self.vae.decode_to_uint8(latents.to(device))


def load_vae(path, device=None, dtype=torch.float32):
    """KL-16 VAE from `kl16.ckpt` (weights under "model") or a flat `kl16.safetensors`, in float32 by
    default on every device: the official code encodes in float32 (bf16 moved the encoded moments by
    about 5% of their RMS, and decoded pixels by up to 3 levels).

    The training checkpoint also holds the discriminator and perceptual-loss weights under
    "loss."; those are skipped. Any other missing, unexpected or mis-shaped key is an error.
    """
    from .checkpoint import CheckpointError, _read_official_pth, _read_safetensors, check_state_dict

    path = str(path)
    state = _read_safetensors(path) if path.endswith(".safetensors") else _read_official_pth(path, ema=False)[0]
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    vae = KLAutoencoder()
    try:
        check_state_dict(vae, state)
    except CheckpointError as err:
        raise CheckpointError(f"{path} is not a KL-16 VAE checkpoint: {err}") from err
    vae.load_state_dict(state, strict=True)
    return vae.to(device=device or "cpu", dtype=dtype).eval()
