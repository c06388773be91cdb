"""MAR: masked autoregressive generation with a per-token Diffusion Loss (reference model).

Module and parameter names follow the official implementation exactly, so its checkpoints load
strictly. Differences from the official code, by design: no hard-coded `.cuda()` (everything runs
on the module's device), generation orders and masks come from torch generators instead of
NumPy's global RNG (so a seed reproduces a sample), and `class_emb` has `class_num` rows (the
official code always allocates 1000).
"""
import contextlib
import math
import numbers
from functools import partial

import torch
import torch.nn as nn
import triton
from tqdm import tqdm

from .attention import active_backend as active_attention_backend
from .attention import requested_backend as requested_attention_backend
from .attention import run_attention
from .demar import DenoisingHead, TransformerDiffLoss
from .diffloss import DiffLoss, as_cfg_scale, check_temperature
from .kernels.add_layernorm import add_layernorm
from .kernels.linear_fused import WEIGHT_DTYPES, fastest_way, interpreting, linear_gelu

CFG_SCHEDULES = ("linear", "constant")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = ("mlp", "transformer")
DEFAULT_INPUT_NOISE_MAX_T = 100


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection: [B, N, D] -> [B, N, D].

    The attention itself runs on the backend `marfast.attention` picks per call (FlashAttention,
    PyTorch's flash SDPA or the math path; MARFAST_ATTENTION forces one); `last_backend` names
    the one the latest call used. Attention dropout applies in training mode only.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.last_backend = None

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"attention={requested_attention_backend()}, last_backend={self.last_backend}")

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        dropout_p = self.attn_drop if self.training else 0.0
        self.last_backend = active_attention_backend(q.device, q.dtype, self.head_dim, dropout_p)
        x = run_attention(self.last_backend, q, k, v, dropout_p)
        return self.proj_drop(self.proj(x.reshape(b, n, d)))


_FC1_GELU_CHOICE = {}


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def forward_inference(self, x):
        """forward(x) with autograd off, x [..., D] in the dtype the GEMMs read (the fused
        LayerNorms' output): fc1 + bias + exact GELU as one Triton GEMM (`linear_gelu`, the GELU
        in its fp32 epilogue) instead of a GEMM and a pass over the [..., 4D] hidden tensor. On
        CUDA both ways are timed once per (power-of-two row bucket, shape, dtype) and the faster
        kept; under the Triton interpreter the Triton GEMM runs. Active dropout or another
        activation: forward(x)."""
        if (self.training and self.drop1.p > 0) or type(self.act) is not nn.GELU or self.act.approximate != "none":
            return self(x)
        rows = x.reshape(-1, x.shape[-1])
        ways = {"torch": lambda: self.act(self.fc1(rows)), "triton": lambda: self._fc1_gelu_triton(rows)}
        way = "triton"
        if x.device.type == "cuda":
            key = (triton.next_power_of_2(rows.shape[0]), tuple(self.fc1.weight.shape), x.dtype, str(x.device))
            way = fastest_way(_FC1_GELU_CHOICE, key, ways, "the transformer MLP's fc1 + GELU")
        return self.drop2(self.fc2(ways[way]())).view(*x.shape[:-1], -1)

    def _fc1_gelu_triton(self, rows):
        out = torch.empty(rows.shape[0], self.fc1.out_features, device=rows.device, dtype=rows.dtype)
        return linear_gelu(rows, self.fc1.weight.to(rows.dtype), self.fc1.bias, out)


NORM_BACKENDS = ("auto", "triton", "torch")


class Block(nn.Module):
    """Pre-norm ViT block (timm `Block` names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).

    norm_backend (not in the state dict; `set_norm_backend` sets it on every block of a model):
    "torch" runs the block as written; "triton" runs its LayerNorms through the fused Triton
    `add_layernorm` (inference only: autograd must be off; CUDA, or the CPU interpreter): the
    attention branch's residual add and norm2 are one pass (and, in `run_blocks_then_norm`, the
    MLP branch's add and the next norm1), and both norms write the dtype the next GEMM reads
    (autocast's bf16/fp16) instead of fp32 that autocast casts again; the MLP runs
    `Mlp.forward_inference` (fc1 + GELU as one Triton GEMM where that is faster). "auto"
    (default) takes "triton" where it applies on CUDA (no autograd, a float32 residual stream,
    LayerNorms with weight and bias) and "torch" otherwise. Both compute the same function.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm, proj_drop=0.0, attn_drop=0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.norm_backend = "auto"

    def forward(self, x):
        return self.residual_branches(x, self.attn)

    def residual_branches(self, x, attend):
        """x [B, n, D] + attend(norm1(x)), then + mlp(norm2(.)), on the block's norm backend."""
        dtype = self.fused_norm_dtype(x)
        if dtype is None:
            x = x + attend(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x, update = self.fused_residual_branches(x.contiguous(), None, attend, dtype)
        return x + update

    def fused_residual_branches(self, x, pending, attend, dtype):
        """The block on the fused LayerNorms (`fused_norm_dtype(x)` is dtype), leaving its last add
        to the caller: x float32 [B, n, D] contiguous, pending: an update not yet added to x (the
        previous block's MLP output, [B, n, D]) or None. Returns (s, u): s = x + pending +
        attend(norm1(x + pending)) (float32) and u = mlp(norm2(s)) (dtype); the block's output is
        s + u, which the next LayerNorm's pass can add (`run_blocks_then_norm`)."""
        s, h = add_layernorm(x, pending, self.norm1.weight, self.norm1.bias, self.norm1.eps, dtype)
        s, h = add_layernorm(s, attend(h).contiguous(), self.norm2.weight, self.norm2.bias, self.norm2.eps, dtype)
        return s, self.mlp.forward_inference(h)

    def fused_norm_dtype(self, x):
        """The dtype the fused LayerNorms write for input x (autocast's dtype where autocast is on for
        x's device, else x's), or None when the block runs its torch LayerNorms."""
        if self.norm_backend not in NORM_BACKENDS:
            raise ValueError(f"norm_backend must be one of {NORM_BACKENDS}, got {self.norm_backend!r}")
        if self.norm_backend == "torch":
            return None
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        problems = [reason for reason, bad in (
            ("autograd is on (the fused LayerNorms have no backward)", torch.is_grad_enabled()),
            (f"the residual stream is {x.dtype}, not float32", x.dtype != torch.float32),
            (f"the output dtype {dtype} is not one of {WEIGHT_DTYPES}", dtype not in WEIGHT_DTYPES),
            ("the LayerNorms lack a weight or bias", not (affine_layer_norm(self.norm1)
                                                          and affine_layer_norm(self.norm2))),
            (f"tensors are on {x.device} (Triton needs CUDA or TRITON_INTERPRET=1)",
             device_type != "cuda" and not interpreting())) if bad]
        if self.norm_backend == "auto":
            return dtype if device_type == "cuda" and not problems else None
        if problems:
            raise RuntimeError("norm_backend 'triton' cannot run here: " + "; ".join(problems))
        return dtype


def affine_layer_norm(norm):
    """Whether `norm` is an nn.LayerNorm with weight and bias (what `add_layernorm` computes)."""
    return isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None


def run_blocks_then_norm(blocks, x, norm, run_block=lambda block, x: block(x)):
    """norm(x after every block of `blocks` in turn): [B, n, D] -> [B, n, D].

    Where every block runs on the fused LayerNorms (sampling on CUDA: `Block.fused_norm_dtype`)
    and norm is an affine LayerNorm, each block's MLP output is added to the residual stream inside
    the next LayerNorm's pass (the next block's norm1, or `norm`, written in float32 as
    nn.LayerNorm writes it, also under autocast) instead of in a pass of its own. Otherwise
    run_block(block, x) runs each block (the caller's hook for gradient checkpointing).
    """
    dtypes = {block.fused_norm_dtype(x) for block in blocks}
    if len(dtypes) != 1 or None in dtypes or not affine_layer_norm(norm):
        for block in blocks:
            x = run_block(block, x)
        return norm(x)
    dtype = dtypes.pop()
    x, pending = x.contiguous(), None
    for block in blocks:
        x, pending = block.fused_residual_branches(x, pending, block.attn, dtype)
    return add_layernorm(x, pending, norm.weight, norm.bias, norm.eps, torch.float32)[1]


def set_norm_backend(module, backend):
    """Set `norm_backend` ("auto", "triton" or "torch") on every transformer Block in module."""
    if backend not in NORM_BACKENDS:
        raise ValueError(f"norm_backend must be one of {NORM_BACKENDS}, got {backend!r}")
    for block in module.modules():
        if isinstance(block, Block):
            block.norm_backend = backend
    return module


def set_token_geometry(module, img_size, vae_stride, patch_size, vae_embed_dim):
    """Check the image/latent/patch sizes and set the token grid attributes the models share."""
    if img_size % (vae_stride * patch_size):
        raise ValueError(f"img_size {img_size} is not divisible by vae_stride * patch_size = {vae_stride * patch_size}")
    module.vae_embed_dim = vae_embed_dim
    module.img_size = img_size
    module.vae_stride = vae_stride
    module.patch_size = patch_size
    module.seq_h = module.seq_w = img_size // vae_stride // patch_size
    module.seq_len = module.seq_h * module.seq_w
    module.token_embed_dim = vae_embed_dim * patch_size**2


def init_official_weights(module, embeddings):
    """The official initialisation: N(0, 0.02) for the learned embeddings, Xavier-uniform linears
    with zero bias, LayerNorms at weight 1 and bias 0 (the diffusion head initialises itself after)."""
    for p in embeddings:
        nn.init.normal_(p, std=0.02)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def truncated_normal_mask_ratio(mask_ratio_min, generator=None, device=None):
    """One mask ratio from N(1, 0.25^2) truncated to [mask_ratio_min, 1] (inverse-CDF draw)."""
    lo = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / 0.25, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor(0.0, dtype=torch.float64))
    u = torch.rand((), dtype=torch.float64, generator=generator, device=device).cpu()
    return float(1.0 + 0.25 * torch.special.ndtri(lo + (hi - lo) * u))


def next_mask_len(seq_len, step, num_iter, masked_now):
    """Tokens still masked after AR step `step` (official cosine schedule, at least one per step)."""
    mask_ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
    return int(max(1, min(masked_now - 1, math.floor(seq_len * mask_ratio))))


def sampling_class_embeddings(model, bsz, labels, use_cfg):
    """Sampling conditions [B', D] of a model with `class_emb` and `fake_latent`: the class
    embeddings of labels long [bsz] (the fake latent when labels is None), followed with CFG by bsz
    fake-latent rows for the unconditional half (B' = 2 * bsz)."""
    class_embedding = model.class_emb(labels) if labels is not None else model.fake_latent.repeat(bsz, 1)
    return torch.cat([class_embedding, model.fake_latent.repeat(bsz, 1)]) if use_cfg else class_embedding


def mask_by_order(mask_len, orders):
    """Boolean [B, L] mask of the first `mask_len` positions of each row's order [B, L]."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(-1, orders[:, :mask_len], True)


class MAR(nn.Module):
    """Masked autoregressive model (official constructor keywords; see `mar_base` etc.).

    forward(latents [B, vae_embed_dim, H, W], labels long [B]) -> scalar training loss.
    sample_tokens(bsz, ...) -> latents [B, vae_embed_dim, H, W] (official signature).
    sample(labels, ...) -> latents, or images when a tokenizer with `decode` is attached.

    De-MAR options (marfast.demar; off by default, leaving the official model unchanged):
    head="transformer" (diffloss_d blocks of width diffloss_w, head_num_heads attention heads (default:
    `marfast.demar.default_head_count`), head_mlp_ratio), denoising_head=True (refinement/assessment MLPs of width denoising_width,
    default the decoder width) and input_noise_max_t (training-time noise levels on the unmasked
    inputs: 0..N-1 of 1000; default 100 with the denoising head, else 0).
    """

    def __init__(self, img_size=256, vae_stride=16, patch_size=1,
                 encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                 decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=nn.LayerNorm, vae_embed_dim=16, mask_ratio_min=0.7,
                 label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1,
                 buffer_size=64, diffloss_d=3, diffloss_w=1024, num_sampling_steps="100",
                 diffusion_batch_mul=4, grad_checkpointing=False, sample_clip=None, tokenizer=None,
                 head="mlp", head_num_heads=None, head_mlp_ratio=4.0, denoising_head=False, denoising_width=None,
                 input_noise_max_t=None):
        super().__init__()
        if not 0.0 < mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must lie in (0, 1], got {mask_ratio_min}")
        if not 0.0 <= label_drop_prob <= 1.0:
            raise ValueError(f"label_drop_prob must lie in [0, 1], got {label_drop_prob}")
        for name, value in (("class_num", class_num), ("diffusion_batch_mul", diffusion_batch_mul)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "mlp" and (head_num_heads is not None or head_mlp_ratio != 4.0):
            raise ValueError("head_num_heads and head_mlp_ratio configure head='transformer' only")
        if not denoising_head and denoising_width is not None:
            raise ValueError("denoising_width needs denoising_head=True")
        if input_noise_max_t is None:
            input_noise_max_t = DEFAULT_INPUT_NOISE_MAX_T if denoising_head else 0
        if isinstance(input_noise_max_t, bool) or not isinstance(input_noise_max_t, int) \
                or not 0 <= input_noise_max_t <= 1000:
            raise ValueError(f"input_noise_max_t must be an integer in 0..1000, got {input_noise_max_t!r}")
        self.head = head
        self.input_noise_max_t = input_noise_max_t
        set_token_geometry(self, img_size, vae_stride, patch_size, vae_embed_dim)
        self.grad_checkpointing = grad_checkpointing
        self.num_classes = class_num
        self.mask_ratio_min = mask_ratio_min
        self.label_drop_prob = label_drop_prob
        self.buffer_size = buffer_size
        self.diffusion_batch_mul = diffusion_batch_mul
        self.sample_clip = sample_clip
        self.tokenizer = tokenizer
        self.config = dict(
            img_size=img_size, vae_stride=vae_stride, patch_size=patch_size,
            encoder_embed_dim=encoder_embed_dim, encoder_depth=encoder_depth, encoder_num_heads=encoder_num_heads,
            decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio, vae_embed_dim=vae_embed_dim, mask_ratio_min=mask_ratio_min,
            label_drop_prob=label_drop_prob, class_num=class_num, attn_dropout=attn_dropout,
            proj_dropout=proj_dropout, buffer_size=buffer_size, diffloss_d=diffloss_d, diffloss_w=diffloss_w,
            num_sampling_steps=str(num_sampling_steps), diffusion_batch_mul=diffusion_batch_mul,
            sample_clip=list(sample_clip) if sample_clip is not None else None,
        )
        if head != "mlp" or denoising_head or input_noise_max_t:
            self.config.update(head=head, head_num_heads=head_num_heads, head_mlp_ratio=head_mlp_ratio,
                               denoising_head=denoising_head, denoising_width=denoising_width,
                               input_noise_max_t=input_noise_max_t)
        if getattr(tokenizer, "config", None) is not None:
            self.config["tokenizer"] = tokenizer.config

        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim, bias=True)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                        proj_drop=proj_dropout, attn_drop=attn_dropout)
        self.encoder_blocks = nn.ModuleList([block(encoder_embed_dim, encoder_num_heads) for _ in range(encoder_depth)])
        self.encoder_norm = norm_layer(encoder_embed_dim)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        # None: not an affine nn.LayerNorm, which config.json cannot describe (save_pretrained refuses it)
        self.config["norm_eps"] = (self.decoder_norm.eps if type(self.decoder_norm) is nn.LayerNorm
                                   and affine_layer_norm(self.decoder_norm) else None)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.initialize_weights()
        if head == "mlp":
            self.diffloss = DiffLoss(target_channels=self.token_embed_dim, z_channels=decoder_embed_dim,
                                     width=diffloss_w, depth=diffloss_d, num_sampling_steps=num_sampling_steps,
                                     grad_checkpointing=grad_checkpointing)
        else:
            self.diffloss = TransformerDiffLoss(target_channels=self.token_embed_dim, z_channels=decoder_embed_dim,
                                                width=diffloss_w, depth=diffloss_d,
                                                num_sampling_steps=num_sampling_steps, num_heads=head_num_heads,
                                                mlp_ratio=head_mlp_ratio, grad_checkpointing=grad_checkpointing)
        self.denoising_head = (DenoisingHead(self.token_embed_dim, decoder_embed_dim, denoising_width or decoder_embed_dim)
                               if denoising_head else None)

    def initialize_weights(self):
        init_official_weights(self, (self.class_emb.weight, self.fake_latent, self.mask_token,
                                     self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                                     self.diffusion_pos_embed_learned))

    @property
    def device(self):
        return self.fake_latent.device

    @property
    def token_dtype(self):
        """The dtype latent tokens are kept in: float32, or float64 for a float64 model (a bf16 or
        fp16 model still samples and trains its targets in float32, as under autocast)."""
        return torch.promote_types(self.fake_latent.dtype, torch.float32)

    @classmethod
    def load(cls, source, vae=None, ema=True, device=None, dtype=None, revision=None):
        """Load a model: a save_pretrained directory, an official checkpoint (.pth, EMA weights by
        default), a flat safetensors state dict, a packaged model name such as "digits", or a hub
        name ("mar-base", "mar-large", "mar-huge"; `revision` selects the hub revision).
        `vae`: a KL-16 checkpoint or "kl16", so that `sample` returns images."""
        from .checkpoint import load_model

        return load_model(source, vae=vae, ema=ema, device=device, dtype=dtype, revision=revision)

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors into `directory` (atomically)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory)

    # ----------------------------------------------------------------------------------------
    # tokens
    def patchify(self, x):
        """[B, C, H, W] -> [B, L, C * p * p]."""
        bsz, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(bsz, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwcpq", x)
        return x.reshape(bsz, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x):
        """[B, L, C * p * p] -> [B, C, H, W]."""
        bsz, p, c = x.shape[0], self.patch_size, self.vae_embed_dim
        x = x.reshape(bsz, self.seq_h, self.seq_w, c, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(bsz, c, self.seq_h * p, self.seq_w * p)

    def sample_orders(self, bsz, generator=None):
        """A uniformly random generation order per sample: long [B, L] on the model's device."""
        keys = torch.rand(bsz, self.seq_len, generator=generator, device=self.device)
        return torch.argsort(keys, dim=-1)

    def random_masking(self, x, orders, generator=None):
        """Float mask [B, L] (1 = masked) of the first ceil(L * r) positions of each order."""
        bsz, seq_len, _ = x.shape
        ratio = truncated_normal_mask_ratio(self.mask_ratio_min, generator, self.device)
        num_masked = int(math.ceil(seq_len * ratio))
        return mask_by_order(num_masked, orders).to(x.dtype)

    # ----------------------------------------------------------------------------------------
    # transformer
    def embed_encoder_inputs(self, x, class_embedding, generator=None):
        """Tokens [B, L, Ct], class emb [B, D] -> normalised encoder inputs of the buffer and of
        every position [B, buffer + L, D] (in training the class embedding is replaced by the
        fake latent with probability label_drop_prob)."""
        x = self.z_proj(x.to(self.z_proj.weight.dtype))
        bsz, _, embed_dim = x.shape
        x = torch.cat([x.new_zeros(bsz, self.buffer_size, embed_dim), x], dim=1)
        if self.training:
            drop = (torch.rand(bsz, generator=generator, device=x.device) < self.label_drop_prob).unsqueeze(-1).to(x.dtype)
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
        x[:, : self.buffer_size] = class_embedding.unsqueeze(1).to(x.dtype)
        return self.z_proj_ln(x + self.encoder_pos_embed_learned)

    def run_encoder(self, x):
        """Kept encoder inputs [B, buffer + known, D] -> encoder blocks and norm, same shape."""
        return run_blocks_then_norm(self.encoder_blocks, x, self.encoder_norm, self._run_block)

    def run_decoder(self, x_after_pad):
        """Decoder inputs of the buffer and every position [B, buffer + L, Dd] -> z [B, L, Dd]."""
        x = run_blocks_then_norm(self.decoder_blocks, x_after_pad + self.decoder_pos_embed_learned,
                                 self.decoder_norm, self._run_block)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def forward_mae_encoder(self, x, mask, class_embedding, generator=None):
        """Tokens [B, L, Ct], mask [B, L] (1 = masked, same count per row), class emb [B, D]
        -> encoded buffer and unmasked positions [B, buffer + known, D]."""
        x = self.embed_encoder_inputs(x, class_embedding, generator)
        bsz, _, embed_dim = x.shape
        mask_with_buffer = torch.cat([mask.new_zeros(bsz, self.buffer_size), mask], dim=1)
        x = x[(1 - mask_with_buffer).nonzero(as_tuple=True)].reshape(bsz, -1, embed_dim)
        return self.run_encoder(x)

    def forward_mae_decoder(self, x, mask):
        """Encoder output [B, buffer + known, D], mask [B, L] -> conditions z [B, L, Dd]."""
        x = self.decoder_embed(x)
        mask_with_buffer = torch.cat([mask.new_zeros(x.size(0), self.buffer_size), mask], dim=1)
        x_after_pad = self.mask_token.to(x.dtype).repeat(mask_with_buffer.shape[0], mask_with_buffer.shape[1], 1)
        x_after_pad[(1 - mask_with_buffer).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[2])
        return self.run_decoder(x_after_pad)

    def _run_block(self, block, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    # ----------------------------------------------------------------------------------------
    # training
    def check_latents(self, latents):
        expected = (self.vae_embed_dim, self.seq_h * self.patch_size, self.seq_w * self.patch_size)
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("latents must be a floating-point tensor [B, C, H, W]")
        if latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"latents must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(latents.shape)}")

    def check_labels(self, labels, bsz=None):
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64) or labels.dim() != 1:
            raise TypeError("labels must be a 1-D integer tensor of class indices")
        if bsz is not None and labels.shape[0] != bsz:
            raise ValueError(f"expected {bsz} labels, got {labels.shape[0]}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got values in "
                             f"{int(labels.min())}..{int(labels.max())}")

    def forward_loss(self, z, target, mask):
        """The diffusion head's loss on the masked tokens: z [B, L, Dd], target [B, L, Ct], mask [B, L].
        Every row is repeated diffusion_batch_mul times (the transformer head's rows of one image
        share that image's z [L, Dd] as context)."""
        if self.head == "transformer":
            mul = self.diffusion_batch_mul
            return self.diffloss(target=target.repeat(1, mul, 1), z=z.repeat(1, mul, 1), context=z,
                                 mask=mask.repeat(1, mul))
        bsz, seq_len, _ = target.shape
        target = target.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        z = z.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        mask = mask.reshape(bsz * seq_len).repeat(self.diffusion_batch_mul)
        return self.diffloss(z=z, target=target, mask=mask)

    def forward(self, imgs, labels, generator=None):
        """Training loss for latents imgs [B, C, H, W] and labels [B].

        generator: torch.Generator on the model's device for the orders, the masking, the label
        drop and the input noise; dropout and the diffusion head's timesteps and noise draw from the
        global RNG, as in the official code (`torch.manual_seed` as well for a reproducible loss)."""
        self.check_latents(imgs)
        self.check_labels(labels, imgs.shape[0])
        labels = labels.to(self.device)
        class_embedding = self.class_emb(labels)
        x = self.patchify(imgs.to(self.device, self.token_dtype))
        gt_latents = x.clone().detach()
        orders = self.sample_orders(x.size(0), generator)
        mask = self.random_masking(x, orders, generator)
        if self.input_noise_max_t:
            x = self.noise_inputs(gt_latents, generator)
        z = self.forward_mae_decoder(self.forward_mae_encoder(x, mask, class_embedding, generator), mask)
        loss = self.forward_loss(z=z, target=gt_latents, mask=mask)
        if self.denoising_head is not None:
            known = mask == 0
            refine_loss, assess_loss = self.denoising_head.losses(x[known], z[known], gt_latents[known])
            loss = loss + refine_loss + assess_loss
        return loss

    def noise_inputs(self, tokens, generator=None):
        """De-MAR's training-time input noise: tokens [B, L, Ct] diffused by the DDPM forward
        process to a level t drawn per token uniformly from 0..input_noise_max_t - 1."""
        rows = tokens.reshape(-1, tokens.shape[-1])
        t = torch.randint(0, self.input_noise_max_t, (rows.shape[0],), generator=generator, device=tokens.device)
        noise = torch.randn(rows.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        return self.diffloss.train_diffusion.q_sample(rows, t, noise).reshape(tokens.shape)

    # ----------------------------------------------------------------------------------------
    # sampling
    def check_sampling_args(self, num_iter, cfg, cfg_schedule, temperature):
        if isinstance(num_iter, bool) or not isinstance(num_iter, numbers.Integral) or not 1 <= num_iter <= self.seq_len:
            raise ValueError(f"num_iter must be an integer in 1..{self.seq_len}, got {num_iter!r}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        return as_cfg_scale(cfg), check_temperature(temperature)

    def cfg_for_step(self, cfg, cfg_schedule, mask_len):
        if cfg_schedule == "linear":
            return 1 + (cfg - 1) * (self.seq_len - mask_len) / self.seq_len
        return cfg

    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      progress=False, *, generator=None):
        """Reference AR sampling loop (official semantics): latents [bsz, C, H, W], float32.

        labels: long [bsz] or None (unconditional, the fake latent). With cfg != 1 the batch is
        doubled with the fake latent as the unconditional half. With a denoising head (De-MAR),
        every step first replaces the known tokens by the head's mix of each token and its
        refinement, conditioned on the conditional half's decoder outputs.
        """
        check_batch_size(bsz)
        cfg, temperature = self.check_sampling_args(num_iter, cfg, cfg_schedule, temperature)
        if labels is not None:
            self.check_labels(labels, bsz)
            labels = labels.to(self.device)
        dev = self.device
        mask = torch.ones(bsz, self.seq_len, device=dev)
        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=dev, dtype=self.token_dtype)
        orders = self.sample_orders(bsz, generator)
        masked_now = self.seq_len
        steps = range(num_iter)
        for step in tqdm(steps, desc="MAR steps", leave=False) if progress else steps:
            tokens, mask, masked_now = self.reference_step(tokens, mask, masked_now, orders, step, num_iter, cfg,
                                                           cfg_schedule, labels, temperature, generator)
        return self.unpatchify(tokens)

    def reference_step(self, tokens, mask, masked_now, orders, step, num_iter, cfg, cfg_schedule, labels, temperature,
                       generator=None):
        """One step of the reference AR loop (`sample_tokens`): tokens [B, L, Ct] and float mask
        [B, L] (1 = masked; masked_now positions, the first of each row's orders) when step `step` of
        `num_iter` starts -> (tokens, mask, masked_now) when it ends. cfg, temperature: floats."""
        bsz = tokens.shape[0]
        cur_tokens = tokens.clone()
        class_embedding = sampling_class_embeddings(self, bsz, labels, cfg != 1.0)
        enc_tokens, enc_mask = tokens, mask
        if cfg != 1.0:
            enc_tokens = torch.cat([tokens, tokens])
            enc_mask = torch.cat([mask, mask])
        x = self.forward_mae_encoder(enc_tokens, enc_mask, class_embedding)
        z_all = self.forward_mae_decoder(x, enc_mask)
        if self.denoising_head is not None:
            known = mask == 0
            cur_tokens[known] = self.denoising_head(tokens[known], z_all[:bsz][known]).to(cur_tokens.dtype)
        mask_len = next_mask_len(self.seq_len, step, num_iter, masked_now)
        mask_next = mask_by_order(mask_len, orders)
        mask_to_pred = mask.bool() if step >= num_iter - 1 else torch.logical_xor(mask.bool(), mask_next)
        if cfg != 1.0:
            z = torch.cat([z_all[:bsz][mask_to_pred], z_all[bsz:][mask_to_pred]])
        else:
            z = z_all[mask_to_pred]
        sampled = self.sample_head(z, z_all, temperature, self.cfg_for_step(cfg, cfg_schedule, mask_len), generator)
        if cfg != 1.0:
            sampled = sampled[: sampled.shape[0] // 2]
        cur_tokens[mask_to_pred] = sampled.to(cur_tokens.dtype)
        return cur_tokens, mask_next.float(), mask_len

    def sample_head(self, z, context, temperature, cfg, generator=None):
        """The diffusion head's tokens [R, Ct] for rows z [R, Dd] (with CFG the conditional rows
        first; image-major, position-ascending) of the images whose decoder outputs are context
        [B', L, Dd] (only the transformer head reads it)."""
        if self.head == "transformer":
            return self.diffloss.sample(z, context, temperature, cfg, generator=generator, clip_x0=self.sample_clip)
        return self.diffloss.sample(z, temperature, cfg, generator=generator, clip_x0=self.sample_clip)

    def sample_tokens_fast(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                           progress=False, *, generator=None):
        """`sample_tokens` with no host synchronisation inside the AR loop (marfast.sampler): same
        arguments and, for the same generator, the same latents [bsz, C, H, W]."""
        from .sampler import sample_tokens_fast

        return sample_tokens_fast(self, bsz, num_iter, cfg, cfg_schedule, labels, temperature, progress,
                                  generator=generator)

    def sample(self, labels, num_iter=64, cfg=1.0, cfg_schedule="linear", temperature=1.0, *, seed=None,
               generator=None, progress=True, pil=False, autocast=None):
        """Generate one image per label (long [B], or a list of ints; None entries are not allowed).

        Reproducible: `seed` (or an explicit `generator` on the model's device) fixes every draw.
        autocast: None (compute in the weights' dtype), "bf16" or "fp16": the transformer and the
        diffusion head run under autocast in that dtype (the official evaluation samples under fp16
        autocast; on a GPU this is the fast way: the fused head computes with a cached cast copy of
        its weights); the tokenizer or VAE decodes outside it, in its own dtype.
        Returns the tokenizer's decoded uint8 images when one is attached (a list of PIL images with
        pil=True), else latents [B, C, H, W].
        """
        if pil and self.tokenizer is None:
            raise ValueError("pil=True needs an attached tokenizer or VAE (this model samples latents)")
        with sampling_autocast(self.device, autocast):
            latents = sample_labels_in_eval_mode(
                self, labels, seed, generator,
                lambda labels, generator: self.sample_tokens_fast(labels.shape[0], num_iter, cfg, cfg_schedule,
                                                                  labels, temperature, progress, generator=generator))
        if self.tokenizer is None:
            return latents
        images = self.tokenizer.decode(latents)
        return images_to_pil(images) if pil else images


def check_autocast(autocast):
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}, got {autocast!r}")
    return autocast


def sampling_autocast(device, autocast):
    """The context `MAR.sample` samples under: autocast in AUTOCAST_DTYPES[autocast] on `device`, or
    none for autocast=None."""
    if check_autocast(autocast) is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[autocast])


def check_batch_size(bsz):
    if isinstance(bsz, bool) or not isinstance(bsz, numbers.Integral) or bsz < 1:
        raise ValueError(f"bsz must be a positive integer, got {bsz!r}")


def sample_labels_in_eval_mode(model, labels, seed, generator, sample_tokens):
    """The common part of the models' `sample`: labels (long [B] or a list of ints) checked and moved
    to the model's device, a generator from `seed` (or the given one; not both), and
    sample_tokens(labels, generator) run in eval mode (the training mode is restored after)."""
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if not isinstance(labels, torch.Tensor):
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
            raise TypeError(f"labels must be a 1-D integer tensor or a list of ints, got {type(labels).__name__}")
        labels = list(labels)
        for label in labels:
            if isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise TypeError(f"labels must be integers, got {label!r}")
        labels = torch.tensor(labels, dtype=torch.long)
    model.check_labels(labels)
    if labels.numel() == 0:
        raise ValueError("labels must hold at least one class label")
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        return sample_tokens(labels.to(model.device), generator)
    finally:
        model.train(was_training)


def images_to_pil(images):
    """uint8 images [B, H, W] (grayscale) or [B, C, H, W] (C = 1 or 3) -> list of PIL images."""
    from PIL import Image

    arrays = images.cpu()
    if arrays.dim() == 4:
        arrays = arrays[:, 0] if arrays.shape[1] == 1 else arrays.permute(0, 2, 3, 1)
    return [Image.fromarray(a.numpy()) for a in arrays]


PRESETS = {
    "mar_base": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12),
    "mar_large": dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                      decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16),
    "mar_huge": dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                     decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16),
}

# De-MAR-B/L/H (Table 1 of the De-MAR paper): the MAR-B/L/H transformers with a Transformer
# diffusion head of 4/6/9 blocks and the denoising head. The paper gives no head width; widths
# 1024/1280/1280 reproduce its parameter counts (227M/524M/995M) within 2% (tests/test_demar.py).
DEMAR_HEADS = {"demar_base": ("mar_base", 4, 1024), "demar_large": ("mar_large", 6, 1280),
               "demar_huge": ("mar_huge", 9, 1280)}
PRESETS.update({name: dict(PRESETS[base], head="transformer", denoising_head=True, diffloss_d=depth, diffloss_w=width)
                for name, (base, depth, width) in DEMAR_HEADS.items()})

# The four rows of the De-MAR ablation (Table 4): MAR, + Transformer diffusion head, + denoising
# head (with its training-time input noise), and both (De-MAR). Pass one as MAR(**row, ...).
DEMAR_ABLATIONS = {
    "mar": dict(head="mlp", denoising_head=False),
    "transformer_head": dict(head="transformer", denoising_head=False),
    "denoising_head": dict(head="mlp", denoising_head=True),
    "de_mar": dict(head="transformer", denoising_head=True),
}

norm_layer_eps6 = partial(nn.LayerNorm, eps=1e-6)


def build_preset(name, **kwargs):
    """A preset of PRESETS; keyword arguments override its entries."""
    return MAR(**{**PRESETS[name], **kwargs}, mlp_ratio=4, norm_layer=norm_layer_eps6)


def mar_base(**kwargs):
    """MAR-B: width 768, 12 + 12 blocks, 12 heads (released head: diffloss_d=6, diffloss_w=1024)."""
    return build_preset("mar_base", **kwargs)


def mar_large(**kwargs):
    """MAR-L: width 1024, 16 + 16 blocks, 16 heads (released head: diffloss_d=8, diffloss_w=1280)."""
    return build_preset("mar_large", **kwargs)


def mar_huge(**kwargs):
    """MAR-H: width 1280, 20 + 20 blocks, 16 heads (released head: diffloss_d=12, diffloss_w=1536)."""
    return build_preset("mar_huge", **kwargs)


def demar_base(**kwargs):
    """De-MAR-B: MAR-B with a 4-block, width-1024 Transformer diffusion head and the denoising head."""
    return build_preset("demar_base", **kwargs)


def demar_large(**kwargs):
    """De-MAR-L: MAR-L with a 6-block, width-1280 Transformer diffusion head and the denoising head."""
    return build_preset("demar_large", **kwargs)


def demar_huge(**kwargs):
    """De-MAR-H: MAR-H with a 9-block, width-1280 Transformer diffusion head and the denoising head."""
    return build_preset("demar_huge", **kwargs)
