"""Train the shipped `digits` model: a class-conditional MAR on scikit-learn's 8x8 digits.

    python -m marfast.recipes.digits --out DIR      (same as: marfast train-digits --out DIR)

The model is the ordinary `MAR` class with a small config on pixel-patch tokens (16 tokens of
2 x 2 pixels, values in [-1, 1]) and x0 clipping in the sampler. Training: AdamW, linear warmup
then cosine decay, an EMA of the weights (the saved weights are the EMA), on a fixed stratified
split of the 1,797 digits (1,438 training images) whose held-out part is never trained on.
Everything is drawn from `--seed`, so a run on the same machine and thread count reproduces the
shipped weights. A deliberate difference from the official recipe, kept because the shipped
weights were trained so: AdamW here decays every parameter, biases, norms and the head included
(the official grouping, marfast.train.weight_decay_groups, exempts them).
Needs scikit-learn (for the data set); sampling from the saved weights does not.
"""
import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from ..mar import DEMAR_ABLATIONS, MAR, norm_layer_eps6
from ..tokenizer import PixelPatchTokenizer

NUM_CLASSES = 10
DIGITS_PIXEL_MAX = 16  # load_digits pixels are integers 0..16
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
TOKENIZER_CONFIG = dict(img_size=8, patch_size=2, channels=1)
MODEL_CONFIG = dict(
    img_size=8, vae_stride=2, patch_size=1, vae_embed_dim=4,
    encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=4,
    decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4,
    mlp_ratio=4.0, mask_ratio_min=0.7, label_drop_prob=0.1, class_num=NUM_CLASSES,
    attn_dropout=0.0, proj_dropout=0.0, buffer_size=4,
    diffloss_d=3, diffloss_w=128, num_sampling_steps="50", diffusion_batch_mul=2,
    sample_clip=(-1.0, 1.0),
)


class DigitsSplit(NamedTuple):
    """uint8 images [N, 8, 8] (0..255) and long labels [N] of the fixed train / held-out split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def load_digits_uint8():
    """All 1,797 digits as uint8 images [N, 8, 8] scaled from 0..16 to 0..255, and labels long [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn") from err
    data = load_digits()
    images = torch.from_numpy(data.images).mul(255.0 / DIGITS_PIXEL_MAX).round().to(torch.uint8)
    return images, torch.from_numpy(data.target).long()


def digits_split(seed=SPLIT_SEED, heldout_fraction=HELDOUT_FRACTION):
    """The fixed stratified split: per class, a seeded permutation's first round(n * fraction)
    images are held out. Returns a DigitsSplit (indices in data-set order within each part)."""
    images, labels = load_digits_uint8()
    generator = torch.Generator().manual_seed(seed)
    train_idx, heldout_idx = [], []
    for cls in range(NUM_CLASSES):
        idx = (labels == cls).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_heldout = round(idx.numel() * heldout_fraction)
        heldout_idx.append(idx[:n_heldout])
        train_idx.append(idx[n_heldout:])
    train_idx = torch.cat(train_idx).sort().values
    heldout_idx = torch.cat(heldout_idx).sort().values
    return DigitsSplit(images[train_idx], labels[train_idx], images[heldout_idx], labels[heldout_idx])


# The De-MAR ablation rows at digits size: the Transformer head has 2 blocks of width 128 (4
# attention heads), about as many parameters as the MLP head's 3 blocks.
VARIANTS = {name: dict(row, diffloss_d=2) if row["head"] == "transformer" else dict(row)
            for name, row in DEMAR_ABLATIONS.items()}


def build_digits_model(variant="mar", input_noise_max_t=None):
    """A freshly initialised digits MAR (global torch RNG) with its pixel-patch tokenizer attached.
    variant: a row of the De-MAR ablation (VARIANTS: "mar", the shipped `digits` model, and
    "transformer_head", "denoising_head", "de_mar", the shipped `digits-demar`).
    input_noise_max_t: the denoising head's input-noise range (None: MAR's default)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    extra = {} if input_noise_max_t is None else dict(input_noise_max_t=input_noise_max_t)
    tokenizer = PixelPatchTokenizer(**TOKENIZER_CONFIG)
    return MAR(norm_layer=norm_layer_eps6, tokenizer=tokenizer, **{**MODEL_CONFIG, **VARIANTS[variant], **extra})


def lr_at(step, steps, lr, warmup_steps):
    """Linear warmup to `lr`, then cosine decay to 0 at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema_model, model, decay):
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.lerp_(p, 1.0 - decay)


@torch.no_grad()
def mean_loss(model, latents, labels, seed, repeats=4, batch_size=256):
    """Training loss averaged over `repeats` seeded passes (model in eval mode: no label drop)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        for _ in range(repeats):
            for start in range(0, latents.shape[0], batch_size):
                batch = latents[start:start + batch_size]
                total += float(model(batch, labels[start:start + batch_size], generator=generator)) * batch.shape[0]
                count += batch.shape[0]
    model.train(was_training)
    return total / count


def train(steps=1500, batch_size=128, lr=1e-3, weight_decay=0.02, ema_decay=0.999, warmup_steps=100, seed=0,
          progress=True, log=print, variant="mar", input_noise_max_t=None):
    """Train the digits model (`variant`, `input_noise_max_t`: see build_digits_model); returns (EMA
    model in eval mode, stats dict)."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("warmup_steps", warmup_steps)):
        if value < (0 if name == "warmup_steps" else 1):
            raise ValueError(f"{name} must be positive, got {value}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    split = digits_split()
    if batch_size > split.train_labels.numel():
        raise ValueError(f"batch_size {batch_size} exceeds the {split.train_labels.numel()} training images")
    torch.manual_seed(seed)
    model = build_digits_model(variant, input_noise_max_t)
    tokenizer = model.tokenizer
    train_latents = tokenizer.encode(split.train_images)
    heldout_latents = tokenizer.encode(split.heldout_images)
    ema_model = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n_train = train_latents.shape[0]
    num_params = sum(p.numel() for p in model.parameters())
    log(f"digits MAR ({variant}): {num_params / 1e6:.2f}M parameters, {n_train} training / {heldout_latents.shape[0]} held-out "
        f"images, {steps} steps of {batch_size}, {torch.get_num_threads()} CPU threads, seed {seed}")
    model.train()
    order, cursor = torch.randperm(n_train, generator=generator), 0
    running_loss = None
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train digits", disable=not progress, file=sys.stdout, mininterval=1.0)
    for step in bar:
        if cursor + batch_size > n_train:
            order, cursor = torch.randperm(n_train, generator=generator), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps)
        loss = model(train_latents[idx], split.train_labels[idx], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema_model, model, min(ema_decay, (1.0 + step) / (10.0 + step)))
        loss_value = loss.item()
        running_loss = loss_value if running_loss is None else 0.98 * running_loss + 0.02 * loss_value
        if progress and (step % 10 == 0 or step == steps - 1):
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{running_loss:.4f}", img_s=f"{(step + 1) * batch_size / elapsed:.0f}")
    train_seconds = time.perf_counter() - start
    bar.close()
    stats = dict(variant=variant, steps=steps, batch_size=batch_size, seed=seed, train_seconds=train_seconds,
                 images_per_second=steps * batch_size / train_seconds, final_running_loss=running_loss,
                 ema_train_loss=mean_loss(ema_model, train_latents[: heldout_latents.shape[0]],
                                          split.train_labels[: heldout_latents.shape[0]], seed),
                 ema_heldout_loss=mean_loss(ema_model, heldout_latents, split.heldout_labels, seed))
    log(f"trained {steps} steps in {train_seconds:.1f} s ({stats['images_per_second']:.0f} images/s); EMA loss: "
        f"train {stats['ema_train_loss']:.4f}, held-out {stats['ema_heldout_loss']:.4f}")
    return ema_model.eval(), stats


def add_train_arguments(parser):
    parser.add_argument("--out", default="marfast-digits", help="directory for config.json + model.safetensors "
                        "(default: %(default)s; the shipped weights were written to marfast/weights/digits)")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; bitwise results depend on it, and the shipped weights were trained "
                        "with 1, which is also the fastest choice on a busy machine (default: %(default)s)")
    parser.add_argument("--variant", default="mar", choices=sorted(VARIANTS),
                        help="De-MAR ablation row: mar (the shipped `digits`), de_mar (the shipped `digits-demar`), "
                        "transformer_head or denoising_head (default: %(default)s)")
    parser.add_argument("--input-noise-max-t", type=int, default=None,
                        help="with a denoising head: input-noise levels 0..N-1 of 1000 (default: MAR's, 100)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args):
    """Train with parsed arguments and save the EMA model to args.out; returns the output path."""
    torch.set_num_threads(args.threads)
    model, _ = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     progress=not args.no_progress, variant=args.variant, input_noise_max_t=args.input_noise_max_t)
    out = model.save_pretrained(args.out)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}; try: marfast sample --model {out}")
    return out


def check_train_args(parser, args):
    """Exit through `parser.error` (status 2) on bad training arguments, before any work."""
    try:
        import sklearn  # noqa: F401  (the data set ships with it)
    except ImportError:
        parser.error("training the digits model needs scikit-learn, which holds the data set: "
                     "pip install scikit-learn")
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    n_train = digits_split().train_labels.numel()
    if args.batch_size > n_train:
        parser.error(f"--batch-size {args.batch_size} exceeds the {n_train} training images (a step never "
                     "repeats an image)")
    if args.input_noise_max_t is not None:
        if not VARIANTS[args.variant]["denoising_head"]:
            parser.error(f"--input-noise-max-t needs a variant with the denoising head, not {args.variant!r}")
        if not 0 <= args.input_noise_max_t <= 1000:
            parser.error(f"--input-noise-max-t must lie in 0..1000, got {args.input_noise_max_t}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} exists and is not a directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        parser.error(f"cannot create or write --out {args.out!r}: {str(existing)!r} is not a writable directory")


def main(argv=None):
    parser = add_train_arguments(argparse.ArgumentParser(
        prog="python -m marfast.recipes.digits", description="Train the digits MAR (the shipped `digits` model)."))
    args = parser.parse_args(argv)
    check_train_args(parser, args)
    run_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
