"""Causal autoregressive models with the Diffusion Loss head: raster order and random order
(the AR rows of the MAR paper's Table 1), decoded one token per step with a KV cache.

`CausalAR(order="raster" | "random", ...)` takes MAR's constructor keywords (minus the masking
ones) and reuses MAR's pieces: `marfast.mar.Block` with its attention made causal
(`CausalBlock`, `CausalAttention`: the same parameter names qkv / proj / norm1 / mlp...), the
encoder/decoder split with `z_proj`, `z_proj_ln`, `decoder_embed` and the three learned
positional embeddings, `class_emb` / `fake_latent` for class conditioning and CFG, and `DiffLoss`
for every token.

The sequence, for an order o (raster: o = 0, 1, ..., L-1; random: a fresh permutation per sample):

- encoder slot 0 is the class vector (the start token), slot j >= 1 the token x_{o_{j-1}};
  every slot gets the encoder positional embedding of its token's original position (slot 0 its
  own entry), then `z_proj_ln`, then causal encoder blocks and `encoder_norm`;
- decoder slot j = decoder_embed(encoder slot j) + the decoder positional embedding of the
  position o_j to predict next (as the MAR paper does for random order: this tells the decoder
  which position comes next), then causal decoder blocks, `decoder_norm` and the diffusion
  positional embedding of o_j: z_j, the condition of the head for x_{o_j}.

So slot j sees the class and x_{o_0..o_{j-1}} only, training is teacher-forced over all L slots
in one pass, and sampling runs L steps of one slot each, keeping every block's keys and values in
a `KVCache` (`use_cache=False` recomputes the whole prefix at every step instead: the same
function, used to test the cache).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .diffloss import DiffLoss, as_cfg_scale, check_temperature
from .mar import (CFG_SCHEDULES, MAR, Attention, Block, check_batch_size, init_official_weights,
                  sample_labels_in_eval_mode, sampling_class_embeddings, set_token_geometry)

ORDERS = ("raster", "random")


def causal_attention(q, k, v, dropout_p=0.0):
    """Causal attention of the last Nq of Nk positions: q [B, H, Nq, Dh], k, v [B, H, Nk, Dh]
    -> [B, H, Nq, Dh]; query i (position Nk - Nq + i) sees keys 0..Nk - Nq + i.

    `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA where they apply,
    the math kernel elsewhere): is_causal when Nq == Nk, no mask when Nq == 1, an explicit
    bottom-right-aligned mask otherwise.
    """
    nq, nk = q.shape[-2], k.shape[-2]
    if nq > nk:
        raise ValueError(f"more queries ({nq}) than keys ({nk})")
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if nq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class LayerKV:
    """Keys and values of one attention layer: [B, H, max_len, Dh], allocated on first use in the
    dtype of the first keys, filled up to `length`."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.keys = self.values = None
        self.length = 0

    def append(self, k, v):
        """Store k, v [B, H, n, Dh] after the cached ones; returns all keys and values so far."""
        if self.keys is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        elif k.shape[:2] != self.keys.shape[:2] or k.shape[3] != self.keys.shape[3] or k.dtype != self.keys.dtype:
            raise ValueError(f"keys {tuple(k.shape)} {k.dtype} do not fit the cache {tuple(self.keys.shape)} {self.keys.dtype}")
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """One `LayerKV` per causal block of a model: `cache.layers[i]` for block i."""

    def __init__(self, num_layers, max_len):
        self.layers = [LayerKV(max_len) for _ in range(num_layers)]

    @property
    def length(self):
        return self.layers[0].length


class CausalAttention(Attention):
    """`marfast.mar.Attention` (same parameters) with causal masking and an optional KV cache:
    x [B, n, D] (the n newest positions) -> [B, n, D]. The attention always runs through
    `causal_attention` (PyTorch SDPA), whatever MARFAST_ATTENTION says."""

    def extra_repr(self):
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attention=sdpa (causal)"

    def forward(self, x, cache=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.append(k, v)
        dropout_p = self.attn_drop if self.training else 0.0
        self.last_backend = "sdpa_causal"
        x = causal_attention(q, k, v, dropout_p).transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(x))


class CausalBlock(Block):
    """`marfast.mar.Block` with `CausalAttention`: forward(x [B, n, D], cache: LayerKV or None)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm, proj_drop=0.0,
                 attn_drop=0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, norm_layer, proj_drop, attn_drop)
        self.attn = CausalAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)

    def forward(self, x, cache=None):
        return self.residual_branches(x, lambda h: self.attn(h, cache))


class CausalAR(nn.Module):
    """Causal AR over continuous tokens with a per-token Diffusion Loss (see the module docstring).

    forward(latents [B, vae_embed_dim, H, W], labels long [B]) -> scalar training loss.
    sample_tokens(bsz, ...) -> latents [B, vae_embed_dim, H, W]; sample(labels, ...) -> images when a
    tokenizer with `decode` is attached, else latents.
    """

    patchify = MAR.patchify
    unpatchify = MAR.unpatchify
    check_latents = MAR.check_latents
    check_labels = MAR.check_labels
    cfg_for_step = MAR.cfg_for_step
    token_dtype = MAR.token_dtype

    def __init__(self, order="raster", img_size=256, vae_stride=16, patch_size=1,
                 encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                 decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=nn.LayerNorm, vae_embed_dim=16, label_drop_prob=0.1, class_num=1000,
                 attn_dropout=0.1, proj_dropout=0.1, diffloss_d=3, diffloss_w=1024, num_sampling_steps="100",
                 diffusion_batch_mul=4, grad_checkpointing=False, sample_clip=None, tokenizer=None):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order = order
        set_token_geometry(self, img_size, vae_stride, patch_size, vae_embed_dim)
        self.num_classes = class_num
        self.label_drop_prob = label_drop_prob
        self.diffusion_batch_mul = diffusion_batch_mul
        self.grad_checkpointing = grad_checkpointing
        self.sample_clip = sample_clip
        self.tokenizer = tokenizer
        self.config = dict(
            order=order, img_size=img_size, vae_stride=vae_stride, patch_size=patch_size,
            encoder_embed_dim=encoder_embed_dim, encoder_depth=encoder_depth, encoder_num_heads=encoder_num_heads,
            decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio, vae_embed_dim=vae_embed_dim, label_drop_prob=label_drop_prob, class_num=class_num,
            attn_dropout=attn_dropout, proj_dropout=proj_dropout, diffloss_d=diffloss_d, diffloss_w=diffloss_w,
            num_sampling_steps=str(num_sampling_steps), diffusion_batch_mul=diffusion_batch_mul,
            sample_clip=list(sample_clip) if sample_clip is not None else None,
        )
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim, bias=True)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + 1, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList([
            CausalBlock(encoder_embed_dim, encoder_num_heads, mlp_ratio, True, norm_layer, proj_dropout, attn_dropout)
            for _ in range(encoder_depth)])
        self.encoder_norm = norm_layer(encoder_embed_dim)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=True)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            CausalBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio, True, norm_layer, proj_dropout, attn_dropout)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.initialize_weights()
        self.diffloss = DiffLoss(target_channels=self.token_embed_dim, z_channels=decoder_embed_dim, width=diffloss_w,
                                 depth=diffloss_d, num_sampling_steps=num_sampling_steps,
                                 grad_checkpointing=grad_checkpointing)

    def initialize_weights(self):
        init_official_weights(self, (self.class_emb.weight, self.fake_latent, self.encoder_pos_embed_learned,
                                     self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned))

    @property
    def device(self):
        return self.fake_latent.device

    def new_cache(self):
        """An empty KV cache for every causal block (encoder blocks first) of one sampling run."""
        return KVCache(len(self.encoder_blocks) + len(self.decoder_blocks), self.seq_len + 1)

    def sample_orders(self, bsz, generator=None):
        """Generation orders long [B, L]: 0..L-1 for "raster", a uniform permutation per row for "random"."""
        if self.order == "raster":
            return torch.arange(self.seq_len, device=self.device).expand(bsz, -1)
        keys = torch.rand(bsz, self.seq_len, generator=generator, device=self.device)
        return torch.argsort(keys, dim=-1)

    # ----------------------------------------------------------------------------------------
    # the causal transformer
    def class_slot(self, class_embedding):
        """Class emb [B, D] -> the normalised encoder input of slot 0, [B, 1, D]."""
        x = class_embedding.unsqueeze(1).to(self.z_proj.weight.dtype)
        return self.z_proj_ln(x + self.encoder_pos_embed_learned[:, :1])

    def token_slots(self, tokens, positions):
        """Tokens [B, n, Ct] at original positions long [B, n] -> normalised encoder inputs [B, n, D]."""
        x = self.z_proj(tokens.to(self.z_proj.weight.dtype))
        return self.z_proj_ln(x + self.encoder_pos_embed_learned[0, 1:][positions])

    def transformer(self, x, targets, cache=None):
        """Encoder inputs of slots [s, s + n) [B, n, D] (the s earlier slots in `cache`, or s = 0),
        positions to predict at those slots long [B, n] -> conditions z [B, n, Dd]."""
        encoder_caches, decoder_caches = [None] * len(self.encoder_blocks), [None] * len(self.decoder_blocks)
        if cache is not None:
            encoder_caches = cache.layers[:len(self.encoder_blocks)]
            decoder_caches = cache.layers[len(self.encoder_blocks):]
        for block, layer_cache in zip(self.encoder_blocks, encoder_caches):
            x = self._run_block(block, x, layer_cache)
        x = self.decoder_embed(self.encoder_norm(x)) + self.decoder_pos_embed_learned[0][targets]
        for block, layer_cache in zip(self.decoder_blocks, decoder_caches):
            x = self._run_block(block, x, layer_cache)
        return self.decoder_norm(x) + self.diffusion_pos_embed_learned[0][targets]

    def _run_block(self, block, x, layer_cache):
        if layer_cache is None and self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x, layer_cache)

    def conditions(self, tokens_in_order, orders, class_embedding):
        """Teacher-forced conditions of every slot: tokens [B, L, Ct] in generation order, orders
        long [B, L], class emb [B, D] -> z [B, L, Dd] (z[:, j] conditions the head for
        tokens_in_order[:, j])."""
        x = torch.cat([self.class_slot(class_embedding), self.token_slots(tokens_in_order[:, :-1], orders[:, :-1])], 1)
        return self.transformer(x, orders)

    # ----------------------------------------------------------------------------------------
    # training
    def forward(self, imgs, labels, generator=None):
        """Training loss for latents imgs [B, C, H, W] and labels [B]: the Diffusion Loss of every
        token given the class and the tokens before it in the order (label dropping for CFG)."""
        self.check_latents(imgs)
        self.check_labels(labels, imgs.shape[0])
        labels = labels.to(self.device)
        x = self.patchify(imgs.to(self.device, self.token_dtype))
        bsz, seq_len, channels = x.shape
        orders = self.sample_orders(bsz, generator)
        tokens = x.gather(1, orders.unsqueeze(-1).expand(-1, -1, channels))
        class_embedding = self.class_emb(labels)
        if self.training and self.label_drop_prob > 0:
            drop = (torch.rand(bsz, generator=generator, device=self.device) < self.label_drop_prob).unsqueeze(-1)
            class_embedding = torch.where(drop, self.fake_latent.to(class_embedding.dtype), class_embedding)
        z = self.conditions(tokens, orders, class_embedding)
        target = tokens.reshape(bsz * seq_len, channels).repeat(self.diffusion_batch_mul, 1)
        z = z.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        return self.diffloss(target=target, z=z)

    # ----------------------------------------------------------------------------------------
    # sampling
    @torch.no_grad()
    def generate(self, bsz, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0, progress=False, *,
                 generator=None, use_cache=True):
        """L decoding steps of one token each. Returns (tokens [bsz, L, Ct] in generation order,
        orders long [bsz, L], conditions z [R, L, Dd] of every step), R = 2 bsz with CFG
        (conditional rows first, then the unconditional ones with the fake latent).

        use_cache=False recomputes every step from the start (no KV cache): the same function and,
        for the same generator, the same draws (in eval mode: in training mode dropout draws from
        the global RNG, as in `MAR.sample_tokens`; `sample` switches to eval mode).
        """
        cfg, temperature = as_cfg_scale(cfg), check_temperature(temperature)
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        check_batch_size(bsz)
        if labels is not None:
            self.check_labels(labels, bsz)
            labels = labels.to(self.device)
        orders = self.sample_orders(bsz, generator)
        class_embedding = sampling_class_embeddings(self, bsz, labels, cfg != 1.0)
        rows_orders = torch.cat([orders, orders]) if cfg != 1.0 else orders
        rows = class_embedding.shape[0]
        tokens = torch.zeros(rows, self.seq_len, self.token_embed_dim, device=self.device, dtype=self.token_dtype)
        conditions = []
        cache = self.new_cache() if use_cache else None
        steps = range(self.seq_len)
        for step in tqdm(steps, desc="AR steps", leave=False) if progress else steps:
            if use_cache:  # only the newest slot: the class at step 0, then the token drawn last
                x = self.class_slot(class_embedding) if step == 0 else \
                    self.token_slots(tokens[:, step - 1:step], rows_orders[:, step - 1:step])
                z = self.transformer(x, rows_orders[:, step:step + 1], cache)[:, -1]
            else:
                x = torch.cat([self.class_slot(class_embedding),
                               self.token_slots(tokens[:, :step], rows_orders[:, :step])], dim=1)
                z = self.transformer(x, rows_orders[:, :step + 1])[:, -1]
            conditions.append(z)
            cfg_step = self.cfg_for_step(cfg, cfg_schedule, self.seq_len - step - 1)
            sampled = self.diffloss.sample(z, temperature, cfg_step, generator=generator, clip_x0=self.sample_clip)
            if cfg != 1.0:
                sampled = torch.cat([sampled[:bsz], sampled[:bsz]])
            tokens[:, step] = sampled.to(tokens.dtype)
        return tokens[:bsz], orders, torch.stack(conditions, dim=1)

    def sample_tokens(self, bsz, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0, progress=False, *,
                      generator=None, use_cache=True):
        """Sample latents [bsz, C, H, W] (float32, float64 for a float64 model): L steps with a KV
        cache (see `generate`)."""
        tokens, orders, _ = self.generate(bsz, cfg, cfg_schedule, labels, temperature, progress,
                                          generator=generator, use_cache=use_cache)
        x = torch.empty_like(tokens).scatter_(1, orders.unsqueeze(-1).expand_as(tokens), tokens)
        return self.unpatchify(x)

    def sample(self, labels, cfg=1.0, cfg_schedule="linear", temperature=1.0, *, seed=None, generator=None,
               progress=False):
        """One image per label (long [B] or a list of ints), reproducible with `seed` or `generator`.
        Returns the tokenizer's decoded images when one is attached, else latents [B, C, H, W]."""
        latents = sample_labels_in_eval_mode(
            self, labels, seed, generator,
            lambda labels, generator: self.sample_tokens(labels.shape[0], cfg, cfg_schedule, labels, temperature,
                                                         progress, generator=generator))
        return self.tokenizer.decode(latents) if self.tokenizer is not None else latents
