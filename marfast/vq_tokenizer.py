"""Discrete tokens for small images: k-means vector quantisation of pixel patches.

Each p x p pixel patch of a C-channel uint8 image (C * p * p values 0..255) becomes the index of
its nearest codebook vector (squared Euclidean distance, ties to the lower index). The codebook is
fitted by k-means on training images (`PatchKMeansTokenizer.fit`: k-means++ seeding and Lloyd
iterations in float64, every draw from a seeded torch.Generator, so a seed reproduces a codebook).
Codes are laid out as a sequence in raster order of the patch grid: long [B, (H / p) * (W / p)],
the token order of `marfast.mar.MAR` with `vae_stride = p` and `patch_size = 1`.

This is the discrete counterpart of `marfast.tokenizer.PixelPatchTokenizer`: the discrete-token
models (`marfast.discrete`) train on its codes; the code count is the vocabulary size (plus one for
a [MASK] id where a model reserves one).
"""
import torch
import torch.nn.functional as F

PIXEL_MAX = 255


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def squared_distances(points, codebook):
    """Squared Euclidean distances [N, K] between points [N, D] and codebook [K, D] (float64)."""
    return (points.square().sum(1, keepdim=True) - 2.0 * points @ codebook.T
            + codebook.square().sum(1)[None, :]).clamp_min(0.0)


def kmeans(points, num_codes, iters=50, seed=0):
    """k-means on points [N, D]: k-means++ seeding, then at most `iters` Lloyd iterations.

    Runs in float64 on the distinct points weighted by their multiplicity (the same objective as
    on all points, cheaper). An empty cluster is re-seeded with the point farthest from its
    centre. Returns the centres, float64 [num_codes, D]. Raises ValueError when there are fewer
    distinct points than codes.
    """
    if not isinstance(points, torch.Tensor) or points.dim() != 2:
        raise ValueError(f"points must be a 2-D tensor [N, D], got {getattr(points, 'shape', type(points))}")
    _check_positive_int("num_codes", num_codes)
    points, counts = torch.unique(points.to(torch.float64), dim=0, return_counts=True)
    weights = counts.to(torch.float64)
    if points.shape[0] < num_codes:
        raise ValueError(f"k-means with {num_codes} codes needs at least as many distinct points, got {points.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    centres = points.new_empty(num_codes, points.shape[1])
    centres[0] = points[torch.multinomial(weights, 1, generator=generator)]
    nearest = squared_distances(points, centres[:1]).squeeze(1)
    for k in range(1, num_codes):
        centres[k] = points[torch.multinomial(weights * nearest, 1, generator=generator)]
        nearest = torch.minimum(nearest, squared_distances(points, centres[k:k + 1]).squeeze(1))
    for _ in range(iters):
        distances = squared_distances(points, centres)
        assignment = distances.argmin(1)
        mass = torch.zeros(num_codes, dtype=torch.float64).index_add_(0, assignment, weights)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points * weights[:, None])
        updated = sums / mass.clamp_min(1.0)[:, None]
        own_distance = distances.gather(1, assignment[:, None]).squeeze(1)
        for k in (mass == 0).nonzero().flatten().tolist():
            farthest = own_distance.argmax()
            updated[k] = points[farthest]
            own_distance[farthest] = -1.0
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres


class PatchKMeansTokenizer:
    """uint8 images <-> codes of p x p pixel patches quantised to a k-means codebook.

    images: uint8 [B, H, W] (single channel) or [B, C, H, W], values 0..255.
    codes: long [B, L], L = (H / p) * (W / p), values 0..num_codes-1, raster order of the patches.
    codebook: float32 [num_codes, C * p * p] in pixel units (0..255), channel-major within a
    patch as in `torch.nn.functional.pixel_unshuffle`.
    """

    type_name = "patch_kmeans"

    def __init__(self, codebook, img_size, patch_size, channels=1):
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("channels", channels)):
            _check_positive_int(name, value)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        codebook = torch.as_tensor(codebook, dtype=torch.float32)
        patch_values = channels * patch_size**2
        if codebook.dim() != 2 or codebook.shape[1] != patch_values or codebook.shape[0] < 1:
            raise ValueError(f"codebook must have shape [num_codes, {patch_values}], got {tuple(codebook.shape)}")
        if not torch.isfinite(codebook).all():
            raise ValueError("codebook holds NaN or inf values")
        self.codebook = codebook
        self.img_size = img_size
        self.patch_size = patch_size
        self.channels = channels
        self.grid_size = img_size // patch_size
        self.seq_len = self.grid_size**2

    @property
    def num_codes(self):
        return self.codebook.shape[0]

    @classmethod
    def fit(cls, images, num_codes, patch_size, iters=50, seed=0):
        """Fit the codebook by k-means on every patch of uint8 `images` ([B, H, W] or [B, C, H, W])."""
        _check_positive_int("num_codes", num_codes)
        _check_positive_int("patch_size", patch_size)
        images = cls._as_4d(images)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be square, got shape {tuple(images.shape)}")
        tokenizer = cls(torch.zeros(1, images.shape[1] * patch_size**2), images.shape[-1], patch_size, images.shape[1])
        centres = kmeans(tokenizer._patches(images).reshape(-1, tokenizer.codebook.shape[1]), num_codes, iters, seed)
        return cls(centres.to(torch.float32), images.shape[-1], patch_size, images.shape[1])

    @property
    def config(self):
        """JSON-serialisable description; `PatchKMeansTokenizer.from_config(config)` rebuilds it."""
        return {"type": self.type_name, "img_size": self.img_size, "patch_size": self.patch_size,
                "channels": self.channels, "codebook": self.codebook.tolist()}

    @classmethod
    def from_config(cls, config):
        kwargs = dict(config)
        if kwargs.pop("type", cls.type_name) != cls.type_name:
            raise ValueError(f"not a {cls.type_name!r} tokenizer config: {config.get('type')!r}")
        return cls(**kwargs)

    def __repr__(self):
        return (f"PatchKMeansTokenizer(num_codes={self.num_codes}, img_size={self.img_size}, "
                f"patch_size={self.patch_size}, channels={self.channels})")

    @staticmethod
    def _as_4d(images):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 (values 0..{PIXEL_MAX}), got {images.dtype}")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise ValueError(f"images must have shape [B, H, W] or [B, C, H, W], got {tuple(images.shape)}")
        return images

    def _patches(self, images):
        """uint8 [B, C, H, W] -> float64 patch values [B, L, C * p * p] in pixel units."""
        patches = F.pixel_unshuffle(images.to(torch.float64), self.patch_size)
        return patches.flatten(2).transpose(1, 2)

    def encode(self, images):
        """uint8 images [B, H, W] or [B, C, H, W] -> long codes [B, L] (nearest codebook vector)."""
        images = self._as_4d(images)
        expected = (self.channels, self.img_size, self.img_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [B, {', '.join(map(str, expected))}] "
                             f"(or [B, {self.img_size}, {self.img_size}] for one channel), got {tuple(images.shape)}")
        patches = self._patches(images)
        bsz, seq_len, values = patches.shape
        codebook = self.codebook.to(device=patches.device, dtype=torch.float64)
        distances = squared_distances(patches.reshape(-1, values), codebook)
        return distances.argmin(1).reshape(bsz, seq_len)

    def decode(self, codes):
        """long codes [B, L] -> uint8 images on the codes' device: [B, H, W] for one channel, else
        [B, C, H, W] (codebook vectors rounded and clamped to 0..255)."""
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"codes must be an integer tensor [B, {self.seq_len}], got {getattr(codes, 'dtype', type(codes))}")
        if codes.dim() != 2 or codes.shape[1] != self.seq_len:
            raise ValueError(f"codes must have shape [B, {self.seq_len}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"codes must lie in 0..{self.num_codes - 1}, got values in {int(codes.min())}..{int(codes.max())}")
        vectors = self.codebook.to(codes.device)[codes.long()]
        grid = vectors.transpose(1, 2).reshape(codes.shape[0], -1, self.grid_size, self.grid_size)
        images = F.pixel_shuffle(grid, self.patch_size).round().clamp(0, PIXEL_MAX).to(torch.uint8)
        return images[:, 0] if self.channels == 1 else images
