"""Pixel-patch tokenizer for small images: continuous patch tokens, no VAE, no parameters.

Each p x p pixel patch of a C-channel image is one token of C * p * p values in [-1, 1], laid out
as MAR's latents [B, C * p * p, H / p, W / p] (channel index c * p * p + i * p + j for pixel
(i, j) of the patch, i.e. `torch.nn.functional.pixel_unshuffle`). A MAR on these latents uses
`vae_embed_dim = C * p * p`, `vae_stride = p` and `patch_size = 1`.
"""
import torch
import torch.nn.functional as F

PIXEL_MAX = 255


def check_finite_latents(latents):
    """Decoders clamp to the pixel range, which would turn NaN into black pixels: refuse them."""
    if not torch.isfinite(latents).all():
        raise ValueError("latents hold NaN or infinite values (a diverged model?); they decode to no image")


class PixelPatchTokenizer:
    """uint8 images <-> latents in [-1, 1]; `decode(encode(x)) == x` exactly.

    images: uint8 [B, H, W] (single channel only) or [B, C, H, W], values 0..255.
    latents: float32 [B, C * p * p, H / p, W / p].
    """

    type_name = "pixel_patch"

    def __init__(self, img_size, patch_size, channels=1):
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.channels = channels
        self.embed_dim = channels * patch_size**2
        self.grid_size = img_size // patch_size

    @property
    def config(self):
        """JSON-serialisable description; `build_tokenizer(config)` rebuilds this tokenizer."""
        return {"type": self.type_name, "img_size": self.img_size, "patch_size": self.patch_size,
                "channels": self.channels}

    def __repr__(self):
        return (f"PixelPatchTokenizer(img_size={self.img_size}, patch_size={self.patch_size}, "
                f"channels={self.channels})")

    def encode(self, images):
        """uint8 images [B, H, W] or [B, C, H, W] (tensor or array) -> float32 latents [B, C*p*p, h, w]."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 (values 0..{PIXEL_MAX}), got {images.dtype}")
        if images.dim() == 3 and self.channels == 1:
            images = images.unsqueeze(1)
        expected = (self.channels, self.img_size, self.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            single = f"[B, {self.img_size}, {self.img_size}] or " if self.channels == 1 else ""
            raise ValueError(f"images must have shape {single}[B, {', '.join(map(str, expected))}], "
                             f"got {tuple(images.shape)}")
        pixels = images.to(torch.float32) * (2.0 / PIXEL_MAX) - 1.0
        return F.pixel_unshuffle(pixels, self.patch_size)

    def decode(self, latents):
        """float latents [B, C*p*p, h, w] -> uint8 images on the latents' device: [B, H, W] for
        one channel, else [B, C, H, W]. Values are clamped to [-1, 1] and rounded to 0..255."""
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("latents must be a floating-point tensor [B, C*p*p, h, w]")
        expected = (self.embed_dim, self.grid_size, self.grid_size)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"latents must have shape [B, {', '.join(map(str, expected))}], got {tuple(latents.shape)}")
        check_finite_latents(latents)
        pixels = F.pixel_shuffle(latents.float(), self.patch_size)
        images = ((pixels.clamp(-1.0, 1.0) + 1.0) * (PIXEL_MAX / 2.0)).round().to(torch.uint8)
        return images[:, 0] if self.channels == 1 else images


TOKENIZERS = {PixelPatchTokenizer.type_name: PixelPatchTokenizer}


def build_tokenizer(config):
    """Tokenizer from its `config` dict ({"type": ..., **constructor keywords})."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"a tokenizer config must be a dict with a 'type' key, got {config!r}")
    kwargs = dict(config)
    kind = kwargs.pop("type")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer type {kind!r} (known: {sorted(TOKENIZERS)})")
    try:
        return TOKENIZERS[kind](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad {kind!r} tokenizer config {config!r}: {err}") from err
