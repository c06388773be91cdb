"""The `marfast` command line.

    marfast sample --model digits --classes 0 1 2 --per-class 8 --seed 0 --out grid.png
    marfast sample --checkpoint checkpoint-last.pth --vae kl16.ckpt --classes 207 360 --out pngs/
    marfast sample --checkpoint checkpoint-last.pth --vae kl16.ckpt --num-images 50000 --npz --out fid/
    marfast train --model mar_base --cached-path latents/ --output-dir runs/b   (torchrun for many GPUs)
    marfast cache-latents --data-path imagenet/train --vae kl16.ckpt --out latents/
    marfast train-digits --out my-digits

Bad arguments exit with status 2 and a message naming the problem.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_CFG = 2.0
MAX_DEFAULT_NUM_ITER = 64
GRID_LABEL_WIDTH = 28
GRID_PAD = 2
DEFAULT_PER_CLASS = 8
DEFAULT_SCALE = 8


def finite_float(text):
    """argparse type: a finite float."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def temperature_value(text):
    """argparse type: a finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def seed_value(text):
    """argparse type: an integer seed in 0..2**64-1."""
    from .generate import check_seed

    try:
        seed = int(text)
        check_seed(seed)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2**64-1, got {text!r}") from err
    return seed


def device_value(text):
    """argparse type: a torch device that this machine can allocate memory on."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: {err}") from err
    if device.type == "meta":
        raise argparse.ArgumentTypeError("'meta' tensors hold no data, so nothing can be sampled on them")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:  # torch asserts when built without the device's backend
        raise argparse.ArgumentTypeError(f"{text!r} is not usable on this machine: {err}") from err
    return device


def grid_format(out):
    """The PIL format that writes a grid to `out` (by its suffix), or None for a directory."""
    from PIL import Image

    suffix = Path(out).suffix.lower()
    image_format = Image.registered_extensions().get(suffix)
    return image_format if image_format in Image.SAVE else None


def add_sample_arguments(parser):
    parser.add_argument("--model", "--checkpoint", dest="model", default="digits",
                        help="packaged model name, hub name (mar-base, ...), save_pretrained directory or checkpoint "
                             "file (default: %(default)s)")
    parser.add_argument("--vae", default=None, help="KL-16 VAE checkpoint (kl16.ckpt / kl16.safetensors) or 'kl16'")
    parser.add_argument("--num-images", type=int, default=None,
                        help="with --npz: generate this many class-balanced images (sharded, resumable, torchrun-aware)")
    parser.add_argument("--npz", action="store_true", help="write --out DIR/samples_N.npz for FID tools")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default: %(default)s)")
    parser.add_argument("--classes", type=int, nargs="+", metavar="C",
                        help="class indices, one grid row each (default: every class of the model)")
    parser.add_argument("--per-class", type=int, default=None,
                        help=f"samples per class, for a grid or a PNG directory (default: {DEFAULT_PER_CLASS})")
    parser.add_argument("--cfg", type=finite_float, default=DEFAULT_CFG,
                        help="classifier-free guidance scale, 1 = none (default: %(default)s)")
    parser.add_argument("--cfg-schedule", choices=("linear", "constant"), default="linear",
                        help="guidance schedule over the AR steps (default: %(default)s)")
    parser.add_argument("--num-iter", type=int, default=None,
                        help=f"autoregressive steps (default: the model's token count, at most {MAX_DEFAULT_NUM_ITER})")
    parser.add_argument("--temperature", type=temperature_value, default=1.0,
                        help="sampling temperature, >= 0 (default: %(default)s)")
    parser.add_argument("--seed", type=seed_value, default=0,
                        help="seed of every draw, 0..2**64-1 (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=None,
                        help=f"pixels per image pixel in the grid (default: {DEFAULT_SCALE})")
    parser.add_argument("--device", type=device_value, default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="fp32: the weights' own; bf16 / fp16: sample under autocast in that dtype (the official "
                             "evaluation uses fp16; the VAE decodes in fp32 either way); auto: bf16 on CUDA, fp32 "
                             "elsewhere (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 is the fastest for the small "
                             "digits model when other jobs share the CPU")
    parser.add_argument("--out", required=True,
                        help="an image file such as grid.png or grid.jpg (labelled grid), or a directory without a "
                             "suffix (one PNG per image, or the npz with --npz)")
    return parser


def check_output_dir(parser, out):
    path = Path(out)
    if path.exists() and not path.is_dir():
        parser.error(f"--out {out!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"cannot create --out directory {out!r}: {err}")
    if not os.access(path, os.W_OK):
        parser.error(f"cannot write into {out!r}: permission denied")
    return path


def check_output_path(parser, out):
    path = Path(out)
    if path.is_dir():
        parser.error(f"--out {out!r} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        parser.error(f"cannot write {out!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(f"cannot write {out!r}: permission denied")
    return path


def image_grid(images, classes, per_class, scale):
    """PIL grid (grayscale or RGB, as the images): one row of `per_class` images per class, the class
    drawn at the row start.

    images: uint8 tensor [len(classes) * per_class, H, W], [.., 1, H, W] or [.., 3, H, W], row-major by class.
    """
    from PIL import Image, ImageDraw

    from .mar import images_to_pil

    tiles = images_to_pil(images)
    height, width = images.shape[-2:]
    cell_h, cell_w = height * scale, width * scale
    grid = Image.new(tiles[0].mode, (GRID_LABEL_WIDTH + per_class * (cell_w + GRID_PAD) + GRID_PAD,
                                     len(classes) * (cell_h + GRID_PAD) + GRID_PAD), color="white")
    draw = ImageDraw.Draw(grid)
    for row, cls in enumerate(classes):
        top = GRID_PAD + row * (cell_h + GRID_PAD)
        draw.text((6, top + cell_h // 2), str(cls), fill="black", anchor="lm")
        for col in range(per_class):
            tile = tiles[row * per_class + col].resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (GRID_LABEL_WIDTH + GRID_PAD + col * (cell_w + GRID_PAD), top))
    return grid


def run_sample(parser, args):
    import torch

    from .mar import MAR

    if args.per_class is not None and args.per_class < 1:
        parser.error(f"--per-class must be at least 1, got {args.per_class}")
    if args.scale is not None and args.scale < 1:
        parser.error(f"--scale must be at least 1, got {args.scale}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    image_format = grid_format(args.out)
    grid_output = image_format is not None
    named_like_a_file = bool(Path(args.out).suffix) and not Path(args.out).is_dir()
    if args.npz and (grid_output or named_like_a_file):
        parser.error("--npz writes into a directory: give --out DIR")
    if named_like_a_file and not grid_output:
        parser.error(f"--out {args.out!r}: {Path(args.out).suffix!r} is not an image format to write a grid in "
                     "(e.g. .png, .jpg); for a directory give a name without a suffix")
    if args.num_images is not None and not args.npz:
        parser.error("--num-images goes with --npz (without it, use --classes and --per-class)")
    if args.npz and (args.num_images is None or args.num_images < 1):
        parser.error("--npz needs --num-images N (N >= 1)")
    if args.npz and args.per_class is not None:
        parser.error("--per-class does not apply to --npz, which generates --num-images class-balanced images")
    if args.scale is not None and not grid_output:
        parser.error("--scale applies to a grid only (--out FILE.png)")
    per_class = args.per_class if args.per_class is not None else DEFAULT_PER_CLASS
    scale = args.scale if args.scale is not None else DEFAULT_SCALE
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    out = check_output_path(parser, args.out) if grid_output else check_output_dir(parser, args.out)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = None if precision == "fp32" else precision
    start = time.perf_counter()
    try:
        model = MAR.load(args.model, vae=args.vae, device=device)
    except (OSError, ValueError) as err:
        parser.error(f"cannot load model {args.model!r}: {err}")
    load_seconds = time.perf_counter() - start
    if model.tokenizer is None:
        parser.error(f"model {args.model!r} has no tokenizer attached, so its samples are latents, not images "
                     "(give --vae for the ImageNet models)")
    classes = args.classes if args.classes is not None else list(range(model.num_classes))
    bad = [c for c in classes if not 0 <= c < model.num_classes]
    if bad:
        parser.error(f"class {bad[0]} is out of range: model {args.model!r} has classes 0..{model.num_classes - 1}")
    num_iter = args.num_iter if args.num_iter is not None else min(model.seq_len, MAX_DEFAULT_NUM_ITER)
    if not 1 <= num_iter <= model.seq_len:
        parser.error(f"--num-iter must lie in 1..{model.seq_len} for this model, got {num_iter}")
    if args.npz:
        from .generate import ShardMismatchError, generate_npz

        start = time.perf_counter()
        try:
            merged = generate_npz(model, out, args.num_images, classes, batch_size=args.batch_size,
                                  num_iter=num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                                  temperature=args.temperature, seed=args.seed, autocast=autocast)
        except ShardMismatchError as err:
            parser.error(str(err))
        seconds = time.perf_counter() - start
        print(f"{args.num_images} class-balanced images over {len(classes)} classes -> {merged} "
              f"(this process: {seconds:.1f} s)")
        return 0
    from .generate import shard_seed

    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    start = time.perf_counter()
    chunks = [model.sample(labels[start_index:start_index + args.batch_size], num_iter=num_iter, cfg=args.cfg,
                           cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                           seed=shard_seed(args.seed, chunk), progress=True, autocast=autocast)
              for chunk, start_index in enumerate(range(0, len(labels), args.batch_size))]
    images = torch.cat(chunks)
    sample_seconds = time.perf_counter() - start
    if not grid_output:
        from PIL import Image

        from .generate import to_nhwc_rgb

        for i, (array, label) in enumerate(zip(to_nhwc_rgb(images), labels.tolist())):
            Image.fromarray(array).save(out / f"{i:06d}_class{label}.png")
        print(f"sampled {len(labels)} images in {sample_seconds:.2f} s ({len(labels) / sample_seconds:.1f} images/s); "
              f"wrote {len(labels)} PNGs into {out}")
        return 0
    grid = image_grid(images, classes, per_class, scale)
    try:
        grid.save(out, format=image_format)
    except OSError as err:
        parser.error(f"cannot write {args.out!r}: {err}")
    print(f"sampled {len(labels)} images ({len(classes)} classes x {per_class}) from {args.model!r} on {device} "
          f"({precision}): "
          f"cfg {args.cfg} ({args.cfg_schedule}), {num_iter} AR steps, temperature {args.temperature}, "
          f"seed {args.seed}")
    print(f"loaded in {load_seconds:.2f} s, sampled in {sample_seconds:.2f} s "
          f"({len(labels) / sample_seconds:.1f} images/s); wrote {out} ({grid.width}x{grid.height} px)")
    return 0


def run_train_digits(parser, args):
    from .recipes.digits import check_train_args, run_from_args

    check_train_args(parser, args)
    run_from_args(args)
    return 0


def build_parser():
    from .recipes.digits import add_train_arguments
    from .train import add_cache_arguments, run_cache_latents, run_train
    from .train import add_train_arguments as add_mar_train_arguments

    parser = argparse.ArgumentParser(prog="marfast", description="Masked autoregressive image generation (MAR).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sample = commands.add_parser("sample", help="sample a labelled PNG grid, one row per class",
                                 description="Sample images class by class and write a labelled PNG grid.")
    add_sample_arguments(sample).set_defaults(run=run_sample)
    train = commands.add_parser("train-digits", help="train the digits model (needs scikit-learn)",
                                description="Train the digits MAR (reproduces the shipped `digits` weights).")
    add_train_arguments(train).set_defaults(run=run_train_digits)
    train_mar = commands.add_parser("train", help="train MAR with the official recipe (torchrun for many GPUs)",
                                    description="Train MAR on an image folder (with the VAE) or cached latents.")
    add_mar_train_arguments(train_mar).set_defaults(run=run_train)
    cache = commands.add_parser("cache-latents", help="encode an image folder with the VAE once (resumable)",
                                description="Cache VAE moments of every image and its mirror for training.")
    add_cache_arguments(cache).set_defaults(run=run_cache_latents)
    return parser, {"sample": sample, "train-digits": train, "train": train_mar, "cache-latents": cache}


def main(argv=None):
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    return args.run(subparsers[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
