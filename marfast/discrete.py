"""Discrete-token masked generation: the Elixir `MAR` module's API (MaskGIT-style confidence
decoding) in two modes, and `CrossEntropyMAR`, the MAR transformer with a softmax head.

1. `DiscreteMAR`: the module documented as `Edifice.Generative.MAR` (Elixir/Axon, the `edifice`
   package on hexdocs.pm): token embedding plus sinusoidal positions, a stack
   of bidirectional pre-norm blocks (`marfast.mar.Block`), LayerNorm and a dense layer to logits.
   The vocabulary includes [MASK] at id 0. Tokens of a tokenizer with K codes are ids 1..K
   (`codes_to_tokens`, `tokens_to_codes`), so `vocab_size = K + 1`.

   Elixir name -> Python name:

   - `MAR.build(vocab_size:, embed_dim:, num_layers:, num_heads:, seq_len:, dropout:)`
     -> `DiscreteMAR.build(vocab_size, embed_dim=256, num_layers=6, num_heads=8, seq_len=256,
     dropout=0.1, mode="documented", num_classes=None)` (the same as `DiscreteMAR(...)`); the
     model maps tokens long [B, L] (and optional labels long [B]) to logits [B, L, vocab_size].
   - `MAR.mar_loss(logits, targets, mask)` -> `mar_loss(logits, targets, mask)`.
   - `MAR.sample_mask_ratio()` -> `sample_mask_ratio(mode="documented", generator=None)`.
   - `MAR.iterative_decode(model, params, seq_len:, vocab_size:, num_steps:, mask_token_id:,
     temperature:)` -> `iterative_decode(model, seq_len=None, vocab_size=None, num_steps=8,
     mask_token_id=0, temperature=1.0, *, batch_size=1, labels=None, mode=None, ...)`, also the
     method `DiscreteMAR.iterative_decode`. The parameters live in the module, so Axon's
     `params` argument has no counterpart.
   - Not in the Elixir module: `DiscreteMAR.training_loss(tokens, labels)` (draws the ratio,
     masks, runs the model, applies `mar_loss`), `random_mask`, class conditioning.

   The two modes (`mode=` at build, overridable per call):

   ================  ==========================================  =====================================
   choice            "documented" (the Elixir module, exactly)   "maskgit" (MaskGIT's choices)
   ================  ==========================================  =====================================
   mask ratio        r = 1 - cos(pi u / 2), u ~ U[0, 1): favours  r = cos(pi u / 2): favours high
   (training)        SMALL ratios (mean 0.36, median 0.29),       ratios (mean 0.64), as MaskGIT
                     although the text says "moderate"
   ratio per         training step (one r for the batch)          sample (one r per row)
   unmask schedule   linear: after step k, round((1 - k/K) L)     cosine: floor(L cos(pi k / 2K)),
                     stay masked (round half away from zero)      clamped so that each step reveals
                                                                  at least one, all by step K
   token choice      greedy argmax of the logits over the whole   a draw from softmax(logits / T)
                     vocabulary: [MASK] itself can be chosen      with [MASK] excluded (T = 0: argmax)
   confidence        max softmax(logits / T), whole vocabulary   log softmax(logits) of the drawn token
                                                                  + choice_temperature (1 - k/K) Gumbel
   temperature T     changes only the confidence (must be > 0)    sampling temperature (>= 0)
   ================  ==========================================  =====================================

   In both modes only masked positions are updated, a revealed token is never resampled, and the
   `n` positions kept masked after a step are the least confident of the masked ones (ties: the
   lower position stays masked, as the Elixir stable sort does). Masked training positions are
   `ceil(r L)` positions drawn uniformly (at least one; the Elixir module leaves this to the
   caller). Differences from the Elixir module in both modes, on purpose: batch sizes above one
   (each row decodes as the Elixir code decodes its single row; the result is [B, L], not [1, L]);
   optional class conditioning (a learned class vector prepended to the sequence, with a
   "no label" row for unconditional use and label dropping in training); a learned token
   embedding (the Elixir source multiplies a one-hot by the fixed matrix iota(V, D) / sqrt(D),
   which the documentation does not state: row v is the constant v sqrt(D) plus a ramp shared by
   all tokens, and every pre-norm LayerNorm removes that constant, so in eval mode its outputs do
   not depend on the token ids); a fused q/k/v projection and no 1e-8 in the attention softmax's
   denominator.

2. `CrossEntropyMAR`: `marfast.mar.MAR` (its encoder/decoder, buffer, masking and cosine AR
   schedule) on the codes of a VQ tokenizer, with an embedding of the codes in place of the latent
   projection's input and a linear softmax head over the vocabulary in place of the Diffusion Loss
   (the "cross-entropy" rows of the MAR paper's Table 1). Training: cross-entropy on the masked
   positions (`mar_loss`); sampling: the MAR schedule and random orders, temperature sampling of
   each predicted token, optional CFG on the logits.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .mar import MAR, Block, check_batch_size, mask_by_order, next_mask_len, sampling_class_embeddings

MASK_TOKEN_ID = 0
MODES = ("documented", "maskgit")
DEFAULT_CHOICE_TEMPERATURE = 4.5  # MaskGIT's randomness of the positions to reveal


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


def _check_tokens(name, tokens, vocab_size, seq_len=None):
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an integer tensor [B, L], got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape [B, L], got {tuple(tokens.shape)}")
    if seq_len is not None and not 1 <= tokens.shape[1] <= seq_len:
        raise ValueError(f"{name} must have 1..{seq_len} positions (the model's seq_len), got {tokens.shape[1]}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{name} must lie in 0..{vocab_size - 1}, got values in {int(tokens.min())}..{int(tokens.max())}")


def codes_to_tokens(codes):
    """Tokenizer codes 0..K-1 -> token ids 1..K of a vocabulary with [MASK] at id 0."""
    return codes + 1


def tokens_to_codes(tokens):
    """Token ids 1..K -> codes 0..K-1; raises if a [MASK] (id 0) is left."""
    if bool((tokens == MASK_TOKEN_ID).any()):
        raise ValueError("tokens still hold [MASK] (id 0); they have no code")
    return tokens - 1


def sinusoidal_positions(seq_len, dim):
    """Fixed positional encoding [seq_len, dim]: [sin(p f_i) | cos(p f_i)], f_i = 10000^(-i / (half - 1))
    for i in 0..half-1 (the Elixir module's encoding, `half - 1` in the exponent's denominator)."""
    if dim % 2:
        raise ValueError(f"embed_dim must be even for the sinusoidal positional encoding, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(torch.float32)


# ------------------------------------------------------------------------------------------------
# loss, mask ratio, masking

def mar_loss(logits, targets, mask):
    """Cross-entropy over masked positions only: sum(CE * mask) / (sum(mask) + 1e-8), a scalar.

    logits [B, L, V] float; targets long [B, L] in 0..V-1; mask [B, L] (bool or 0/1 numbers,
    1 = masked, predicted). The mean runs over all masked positions of the batch; an all-zero
    mask gives 0. Computed in float32 (float64 for float64 logits).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 3:
        raise TypeError(f"logits must be a floating-point tensor [B, L, V], got {getattr(logits, 'shape', type(logits))}")
    _check_tokens("targets", targets, logits.shape[-1])
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"mask must be a tensor of shape {tuple(logits.shape[:2])}, got {getattr(mask, 'shape', type(mask))}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must hold only 0 and 1 (1 = masked)")
    work_dtype = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits.flatten(0, 1).to(work_dtype), targets.flatten().long(), reduction="none")
    ce = ce.view_as(targets)
    weights = mask.to(ce.dtype)
    return (ce * weights).sum() / (weights.sum() + 1e-8)


def mask_ratio_from_uniform(u, mode):
    """The mode's map of u in [0, 1) to a mask ratio: 1 - cos(pi u / 2) or cos(pi u / 2)."""
    return 1.0 - math.cos(math.pi * u / 2.0) if check_mode(mode) == "documented" else math.cos(math.pi * u / 2.0)


def sample_mask_ratio(mode="documented", generator=None, device=None):
    """One training mask ratio in [0, 1] (a python float) from u ~ U[0, 1): 1 - cos(pi u / 2)
    ("documented") or cos(pi u / 2) ("maskgit"). generator: on `device` (default CPU)."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64, device=device))
    return mask_ratio_from_uniform(u, mode)


def random_mask(shape, mode="documented", generator=None, device=None):
    """Training mask, bool [B, L] (True = masked): per row ceil(r L) uniformly drawn positions, at
    least one. "documented": one ratio r for the whole batch; "maskgit": one per row. The
    generator (if any) must be on `device` (default CPU)."""
    check_mode(mode)
    bsz, seq_len = shape
    device = torch.device("cpu") if device is None else torch.device(device)
    if mode == "documented":
        ratios = [sample_mask_ratio(mode, generator, device)] * bsz
    else:
        u = torch.rand(bsz, generator=generator, dtype=torch.float64, device=device).tolist()
        ratios = [mask_ratio_from_uniform(value, mode) for value in u]
    counts = torch.tensor([min(seq_len, max(1, math.ceil(r * seq_len))) for r in ratios], device=device)
    ranks = torch.rand(bsz, seq_len, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


# ------------------------------------------------------------------------------------------------
# the model

class DiscreteMAR(nn.Module):
    """Bidirectional transformer over token ids: forward(tokens long [B, L], labels long [B] or None)
    -> logits float [B, L, vocab_size]. See the module docstring for the modes.

    vocab_size includes [MASK] at id 0; seq_len is the longest sequence (positional encoding);
    dropout applies after the embedding, to each block's attention output and FFN output;
    num_classes (optional) adds class conditioning with `label_drop_prob` label dropping in training.
    """

    def __init__(self, vocab_size, embed_dim=256, num_layers=6, num_heads=8, seq_len=256, dropout=0.1,
                 mode="documented", num_classes=None, label_drop_prob=0.1):
        super().__init__()
        _check_int("vocab_size", vocab_size, 2)
        _check_int("embed_dim", embed_dim, 2)
        _check_int("num_layers", num_layers, 1)
        _check_int("num_heads", num_heads, 1)
        _check_int("seq_len", seq_len, 1)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if num_classes is not None:
            _check_int("num_classes", num_classes, 1)
        if not 0.0 <= label_drop_prob <= 1.0:
            raise ValueError(f"label_drop_prob must lie in [0, 1], got {label_drop_prob}")
        self.mode = check_mode(mode)
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.seq_len = seq_len
        self.num_classes = num_classes
        self.label_drop_prob = label_drop_prob
        self.mask_token_id = MASK_TOKEN_ID
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers, num_heads=num_heads,
                           seq_len=seq_len, dropout=dropout, mode=mode, num_classes=num_classes,
                           label_drop_prob=label_drop_prob)
        self.token_embed = nn.Embedding(vocab_size, embed_dim)
        self.register_buffer("pos_encoding", sinusoidal_positions(seq_len, embed_dim), persistent=False)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim) if num_classes is not None else None
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList()
        for _ in range(num_layers):
            block = Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=dropout, attn_drop=0.0)
            block.mlp.drop1 = nn.Dropout(0.0)  # the documented block drops out the FFN's output only
            self.blocks.append(block)
        self.final_norm = nn.LayerNorm(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.initialize_weights()

    @classmethod
    def build(cls, vocab_size, **options):
        """`MAR.build/1`: the same as the constructor (vocab_size, embed_dim, num_layers, num_heads,
        seq_len, dropout, and the Python extensions mode, num_classes, label_drop_prob)."""
        return cls(vocab_size, **options)

    def initialize_weights(self):
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def device(self):
        return self.token_embed.weight.device

    def check_labels(self, labels, bsz):
        if labels is None:
            return None
        if self.num_classes is None:
            raise ValueError("this model has no class conditioning (built without num_classes); pass labels=None")
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64) or labels.dim() != 1:
            raise TypeError("labels must be a 1-D integer tensor of class indices")
        if labels.shape[0] != bsz:
            raise ValueError(f"expected {bsz} labels, got {labels.shape[0]}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        return labels.to(self.device)

    def forward(self, tokens, labels=None, generator=None):
        """tokens long [B, L] (L <= seq_len), labels long [B] or None -> logits [B, L, vocab_size].

        With class conditioning, labels=None (or a dropped label in training, probability
        label_drop_prob, drawn from `generator`) uses the "no label" class vector.
        """
        _check_tokens("tokens", tokens, self.vocab_size, self.seq_len)
        bsz, seq_len = tokens.shape
        labels = self.check_labels(labels, bsz)
        x = self.token_embed(tokens.to(self.device)) + self.pos_encoding[:seq_len].to(self.token_embed.weight.dtype)
        if self.class_emb is not None:
            class_ids = torch.full((bsz,), self.num_classes, device=self.device) if labels is None else labels.clone()
            if self.training and self.label_drop_prob > 0:
                drop = torch.rand(bsz, generator=generator, device=self.device) < self.label_drop_prob
                class_ids[drop] = self.num_classes
            x = torch.cat([self.class_emb(class_ids).unsqueeze(1), x], dim=1)
        x = self.embed_dropout(x)
        for block in self.blocks:
            x = block(x)
        if self.class_emb is not None:
            x = x[:, 1:]
        return self.lm_head(self.final_norm(x))

    def training_loss(self, tokens, labels=None, mode=None, generator=None):
        """Mask a training batch (tokens long [B, L] with no [MASK]) by this mode's ratio, predict,
        and return `mar_loss` on the masked positions (a scalar)."""
        mode = check_mode(self.mode if mode is None else mode)
        _check_tokens("tokens", tokens, self.vocab_size, self.seq_len)
        if bool((tokens == self.mask_token_id).any()):
            raise ValueError(f"training tokens must not contain the [MASK] id {self.mask_token_id}")
        tokens = tokens.to(self.device)
        mask = random_mask(tokens.shape, mode, generator, self.device)
        logits = self(tokens.masked_fill(mask, self.mask_token_id), labels, generator=generator)
        return mar_loss(logits, tokens, mask)

    def iterative_decode(self, seq_len=None, vocab_size=None, num_steps=8, mask_token_id=MASK_TOKEN_ID,
                         temperature=1.0, **options):
        """`iterative_decode(self, ...)`: see the module function."""
        return iterative_decode(self, seq_len, vocab_size, num_steps, mask_token_id, temperature, **options)


# ------------------------------------------------------------------------------------------------
# decoding

def masked_after_step(step, num_steps, seq_len, masked_now, mode):
    """Positions still masked after decoding step `step` (1..num_steps), given `masked_now` before it.

    "documented": round_half_away((1 - step / num_steps) * seq_len) (can equal masked_now: then the
    step reveals nothing). "maskgit": MAR's and MaskGIT's cosine schedule,
    floor(seq_len * cos(pi / 2 * step / num_steps)) clamped to 1..masked_now-1, and 0 at the last step.
    """
    if mode == "documented":
        return int(math.floor((1.0 - step / num_steps) * seq_len + 0.5))
    return 0 if step >= num_steps else next_mask_len(seq_len, step - 1, num_steps, masked_now)


def keep_least_confident(confidence, masked, keep):
    """New mask, bool [B, L]: of each row's masked positions, the `keep` least confident stay masked
    (ties: lower position first); unmasked positions stay unmasked."""
    if keep <= 0:
        return torch.zeros_like(masked)
    ranked = confidence.masked_fill(~masked, math.inf)
    order = torch.sort(ranked, dim=1, stable=True).indices[:, :keep]
    return torch.zeros_like(masked).scatter(1, order, True) & masked


def gumbel_noise(shape, generator, device):
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-16)))


@torch.no_grad()
def iterative_decode(model, seq_len=None, vocab_size=None, num_steps=8, mask_token_id=MASK_TOKEN_ID,
                     temperature=1.0, *, batch_size=1, labels=None, mode=None,
                     choice_temperature=DEFAULT_CHOICE_TEMPERATURE, generator=None, progress=False):
    """Iterative masked decoding: start fully masked, reveal the most confident positions over
    `num_steps` steps. Returns token ids, long [batch_size, seq_len], on the model's device.

    seq_len defaults to the model's; vocab_size, when given, must equal the model's. labels: long
    [batch_size] for a class-conditional model (None: the "no label" class). mode defaults to
    the model's. "maskgit" only: temperature 0 takes the argmax (still never [MASK]); generator
    (on the model's device) drives the draws; choice_temperature scales the Gumbel noise added
    to the confidence (0: none). The model runs in eval mode (it is restored afterwards).
    """
    if not isinstance(model, DiscreteMAR):
        raise TypeError(f"model must be a DiscreteMAR, got {type(model).__name__}")
    mode = check_mode(model.mode if mode is None else mode)
    seq_len = model.seq_len if seq_len is None else _check_int("seq_len", seq_len, 1, model.seq_len)
    if vocab_size is not None and vocab_size != model.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} does not match the model's {model.vocab_size}")
    _check_int("num_steps", num_steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("mask_token_id", mask_token_id, 0, model.vocab_size - 1)
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0 or (mode == "documented" and temperature == 0):
        raise ValueError(f"temperature must be finite and {'> 0' if mode == 'documented' else '>= 0'} "
                         f"in mode {mode!r}, got {temperature}")
    if not choice_temperature >= 0:
        raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
    labels = model.check_labels(labels, batch_size)
    device = model.device
    tokens = torch.full((batch_size, seq_len), mask_token_id, dtype=torch.long, device=device)
    masked = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    masked_now = seq_len
    was_training = model.training
    model.eval()
    try:
        steps = range(1, num_steps + 1)
        for step in tqdm(steps, desc="decode", leave=False) if progress else steps:
            logits = model(tokens, labels).to(torch.float64)
            if mode == "documented":
                confidence = torch.softmax(logits / temperature, dim=-1).amax(dim=-1)
                predicted = logits.argmax(dim=-1)
            else:
                logits[..., mask_token_id] = -math.inf
                predicted = sample_from_logits(logits.flatten(0, 1), temperature, generator).view(batch_size, seq_len)
                log_probs = torch.log_softmax(logits, dim=-1)
                confidence = log_probs.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
                if choice_temperature > 0:
                    confidence = confidence + choice_temperature * (1.0 - step / num_steps) * gumbel_noise(
                        confidence.shape, generator, device)
            keep = masked_after_step(step, num_steps, seq_len, masked_now, mode)
            new_masked = keep_least_confident(confidence, masked, keep)
            revealed = masked & ~new_masked
            tokens = torch.where(revealed, predicted, tokens)
            masked, masked_now = new_masked, int(new_masked[0].sum())
    finally:
        model.train(was_training)
    return tokens


# ------------------------------------------------------------------------------------------------
# cross-entropy MAR

def sample_from_logits(logits, temperature, generator=None):
    """Token draws long [N] from logits [N, V]: softmax(logits / temperature), argmax at 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.to(torch.float64) / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class CrossEntropyMAR(MAR):
    """MAR on discrete codes with a softmax head (cross-entropy loss) in place of the Diffusion Loss.

    vocab_size: codes of the VQ tokenizer (no [MASK] id: masked positions are MAR's mask tokens);
    code_embed_dim: width of the learned code embedding that MAR's `z_proj` maps to the encoder.
    Other keywords are MAR's (img_size / vae_stride fix the code grid; patch_size must be 1; the
    diffusion-head keywords do not apply). forward(codes long [B, L], labels long [B]) -> loss;
    sample_tokens(bsz, ...) -> codes long [B, L]; sample(labels, ...) -> the tokenizer's images
    when a tokenizer with `decode` is attached, else codes.
    """

    def __init__(self, vocab_size, code_embed_dim=16, patch_size=1, **mar_kwargs):
        _check_int("vocab_size", vocab_size, 2)
        _check_int("code_embed_dim", code_embed_dim, 1)
        if patch_size != 1:
            raise ValueError(f"CrossEntropyMAR predicts one code per position: patch_size must be 1, got {patch_size}")
        not_applicable = {"vae_embed_dim", "diffloss_d", "diffloss_w", "num_sampling_steps", "diffusion_batch_mul",
                          "sample_clip", "head", "head_num_heads", "head_mlp_ratio", "denoising_head",
                          "denoising_width", "input_noise_max_t"} & set(mar_kwargs)
        if not_applicable:
            raise ValueError(f"{sorted(not_applicable)} do not apply to CrossEntropyMAR (it has no diffusion head "
                             f"and no De-MAR heads)")
        super().__init__(patch_size=1, vae_embed_dim=code_embed_dim, diffloss_d=0, diffloss_w=1,
                         num_sampling_steps="1", **mar_kwargs)
        del self.diffloss
        for key in ("diffloss_d", "diffloss_w", "num_sampling_steps", "diffusion_batch_mul", "sample_clip", "vae_embed_dim"):
            self.config.pop(key)
        self.config.update(vocab_size=vocab_size, code_embed_dim=code_embed_dim)
        self.vocab_size = vocab_size
        self.code_embed = nn.Embedding(vocab_size, code_embed_dim)
        decoder_embed_dim = self.decoder_embed.out_features
        self.logits_head = nn.Linear(decoder_embed_dim, vocab_size)
        nn.init.normal_(self.code_embed.weight, std=0.02)
        nn.init.xavier_uniform_(self.logits_head.weight)
        nn.init.zeros_(self.logits_head.bias)

    @classmethod
    def load(cls, *args, **kwargs):
        raise NotImplementedError("CrossEntropyMAR has no checkpoint format of its own; "
                                  "save and load its state_dict with torch.save / load_state_dict")

    def save_pretrained(self, directory):
        raise NotImplementedError("CrossEntropyMAR has no checkpoint format of its own; "
                                  "save and load its state_dict with torch.save / load_state_dict")

    def check_codes(self, codes):
        _check_tokens("codes", codes, self.vocab_size)
        if codes.shape[1] != self.seq_len:
            raise ValueError(f"codes must have shape [B, {self.seq_len}], got {tuple(codes.shape)}")

    def code_logits(self, codes, mask, class_embedding, generator=None):
        """codes long [B, L], mask [B, L] float (1 = masked, same count per row), class emb [B, D]
        -> logits [B, L, vocab_size]: MAR's encoder and decoder, then the softmax head."""
        x = self.forward_mae_encoder(self.code_embed(codes), mask, class_embedding, generator)
        return self.logits_head(self.forward_mae_decoder(x, mask))

    def forward(self, codes, labels, generator=None):
        """Training loss: cross-entropy on the masked positions (MAR's masking and mask ratios)."""
        self.check_codes(codes)
        self.check_labels(labels, codes.shape[0])
        codes, labels = codes.to(self.device), labels.to(self.device)
        orders = self.sample_orders(codes.shape[0], generator)
        mask = self.random_masking(codes.unsqueeze(-1).to(self.fake_latent.dtype), orders, generator)
        logits = self.code_logits(codes, mask, self.class_emb(labels), generator)
        return mar_loss(logits, codes, mask)

    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=16, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      progress=False, *, generator=None):
        """MAR sampling on codes: random orders, the cosine schedule, each predicted code drawn from
        softmax(logits / temperature) (argmax at 0). With cfg != 1 the logits are guided:
        uncond + cfg_step * (cond - uncond) (the unconditional half uses the fake latent).
        Returns codes long [bsz, L]."""
        check_batch_size(bsz)
        cfg, temperature = self.check_sampling_args(num_iter, cfg, cfg_schedule, temperature)
        if labels is not None:
            self.check_labels(labels, bsz)
            labels = labels.to(self.device)
        mask = torch.ones(bsz, self.seq_len, device=self.device)
        codes = torch.zeros(bsz, self.seq_len, dtype=torch.long, device=self.device)
        orders = self.sample_orders(bsz, generator)
        masked_now = self.seq_len
        steps = range(num_iter)
        for step in tqdm(steps, desc="MAR steps", leave=False) if progress else steps:
            class_embedding = sampling_class_embeddings(self, bsz, labels, cfg != 1.0)
            if cfg != 1.0:
                logits = self.code_logits(torch.cat([codes, codes]), torch.cat([mask, mask]), class_embedding)
            else:
                logits = self.code_logits(codes, mask, class_embedding)
            mask_len = next_mask_len(self.seq_len, step, num_iter, masked_now)
            mask_next = mask_by_order(mask_len, orders)
            to_predict = mask.bool() if step >= num_iter - 1 else torch.logical_xor(mask.bool(), mask_next)
            logits = logits.float()
            if cfg != 1.0:
                cond, uncond = logits[:bsz], logits[bsz:]
                logits = uncond + self.cfg_for_step(cfg, cfg_schedule, mask_len) * (cond - uncond)
            codes[to_predict] = sample_from_logits(logits[to_predict], temperature, generator)
            mask, masked_now = mask_next.float(), mask_len
        return codes

    def sample_tokens_fast(self, bsz, num_iter=16, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                           progress=False, *, generator=None):
        """The same as `sample_tokens` (the sync-free loop of marfast.sampler serves the diffusion head)."""
        return self.sample_tokens(bsz, num_iter, cfg, cfg_schedule, labels, temperature, progress, generator=generator)
