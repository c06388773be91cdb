"""Training MAR: the official recipe, on one process or many (torchrun: DDP, or FSDP for the largest).

Defaults follow the official recipe: AdamW (betas 0.9 / 0.95, weight decay 0.02, none on biases,
norms and the diffusion head), lr = blr * global batch / 256 with linear warmup then constant,
an EMA of the weights (0.9999), label dropping (in the model), diffusion_batch_mul 4, gradient
clipping at 3.0. Mixed precision is bf16 autocast (fp16, the official choice, gives NaN losses).

Exact resumption: the data order is a function of (seed, epoch), every random draw comes from
generators whose states are saved, and a checkpoint holds model, EMA, optimizer, epoch, step and
RNG states; a resumed run refuses a configuration that would change the trajectory (TrainConfig).
`checkpoint-last.pth` keeps the official layout (`model`, `model_ema`, `optimizer`, `epoch`) so
official tools read it; `ema/` holds the EMA weights as a `save_pretrained` directory. `epoch` has
the official meaning, the index of the last completed epoch (official main_mar.py resumes at
`epoch + 1`): -1 before the first epoch ends, and a mid-epoch checkpoint names the epoch before the
current one, so an official resume redoes the partial epoch. marfast resumes from the exact `step`.
"""
import inspect
import math
import os
import time
import warnings
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import load_state_dict_checked, write_file_atomically, write_npz_atomically, write_pretrained
from .mar import PRESETS, MAR, build_preset
from .vae import LATENT_SCALE

PRECISIONS = ("bf16", "fp32")
LR_SCHEDULES = ("constant", "cosine")


def weight_decay_groups(model, weight_decay):
    """Official grouping: no weight decay on 1-D parameters, biases and the diffusion head."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() == 1 or name.endswith(".bias") or "diffloss" in name else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def learning_rate(step, base_lr, warmup_steps, total_steps, schedule="constant", min_lr=0.0):
    """The official schedule (util/lr_sched.py, per iteration): linear warmup from 0 at step 0 over
    `warmup_steps` (a float: warmup epochs x steps per epoch), then constant, or cosine decay to
    min_lr at `total_steps`."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param, for matching parameter lists, as one lerp (the
    official mul_ then add_ rounds twice in float32 and drifts: README, differences)."""
    for ema_p, p in zip(ema_params, params):
        ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)


# ------------------------------------------------------------------------------------------------
# data
def class_folder_files(root, keep):
    """(class names sorted, [(file, class index)]) of the files under root/<class>/, at any depth, with
    keep(path), in the order of torchvision's ImageFolder (which the official code reads data with)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = []
    for i, c in enumerate(classes):
        for folder, _, names in sorted(os.walk(root / c, followlinks=True)):
            files += [(f, i) for f in (Path(folder) / name for name in sorted(names)) if keep(f)]
    return classes, files


def is_cache_file(path):
    """A cached latent: a .npz file, not a hidden leftover of an interrupted atomic write."""
    return path.suffix == ".npz" and not path.name.startswith(".")


def cache_file(out_root, image_root, class_name, image):
    """Where `cache_latents` stores image_root/<class>/.../<name>: out_root/<class>/.../<name>.npz, as
    the official cache names a file (`x.JPEG.npz`), so images that differ only in their extension keep
    separate files (the official cache would put a nested image in a folder named after its parent)."""
    relative = Path(image).relative_to(Path(image_root) / class_name)
    return Path(out_root) / class_name / relative.parent / (relative.name + ".npz")


class CachedLatents(torch.utils.data.Dataset):
    """Latent cache written by `cache_latents`: root/<class>/<image name>.npz with `moments` and
    `moments_flip` (VAE posterior mean and log-variance, [2C, h, w] float32). Items are
    (moments [2, 2C, h, w] (plain, flipped), label)."""

    def __init__(self, root):
        self.root = Path(root)
        self.classes, self.files = class_folder_files(self.root, is_cache_file)
        if not self.files:
            raise FileNotFoundError(f"no cached latents (<class>/<name>.npz) under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        data = np.load(path)
        return torch.from_numpy(np.stack([data["moments"], data["moments_flip"]])), label


def center_crop_image(image, size):
    """ADM-style crop: halve with a box filter while the short side is >= 2 * size, resize the
    short side to `size` (bicubic), then crop the centre. PIL image -> PIL image."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image> -> (float image [3, size, size] in [-1, 1], label); flips are drawn by the
    trainer. Images are the files with an extension of EXTENSIONS in any case (torchvision's set,
    which the official code uses)."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root, size):
        self.root, self.size = Path(root), size
        self.classes, self.files = class_folder_files(self.root, lambda f: f.suffix.lower() in self.EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no images (<class>/<image>) under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as image:
            image = center_crop_image(image.convert("RGB"), self.size)
        array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return array.float() / 127.5 - 1.0, label


def sample_posterior(moments, generator):
    """Scaled latents from VAE moments [B, 2C, h, w] (mean, log-variance)."""
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise) * LATENT_SCALE


@torch.no_grad()
def cache_latents(vae, image_root, out_root, img_size=256, batch_size=64, device=None, progress=True):
    """Encode every image (and its mirror) once; resumable: images already cached are skipped. Refuses
    a cache holding files that match no image, such as one written before cache files were named
    by the full image name (`<stem>.npz`, which lost images differing only in their extension)."""
    dataset = ImageFolder(image_root, img_size)
    out_root = Path(out_root)
    targets = [cache_file(out_root, image_root, dataset.classes[label], f) for f, label in dataset.files]
    stray = sorted({f for f, _ in class_folder_files(out_root, is_cache_file)[1]} - set(targets))
    if stray:
        raise ValueError(f"{out_root} holds {len(stray)} cached latents that match no image under {image_root} "
                         f"(e.g. {stray[0]}); a cache must mirror its image folder (cache files are named "
                         f"<image file name>.npz since older caches' <stem>.npz lost images): use a fresh directory")
    todo = [i for i, target in enumerate(targets) if not target.exists()]
    device = device or next(vae.parameters()).device
    for start in tqdm(range(0, len(todo), batch_size), desc="cache latents", disable=not progress):
        items = [dataset[i] for i in todo[start:start + batch_size]]
        images = torch.stack([im for im, _ in items]).to(device=device, dtype=next(vae.parameters()).dtype)
        moments = vae.quant_conv(vae.encoder(torch.cat([images, images.flip(-1)]))).float().cpu().numpy()
        n = len(items)
        for j, i in enumerate(todo[start:start + batch_size]):
            targets[i].parent.mkdir(parents=True, exist_ok=True)
            write_npz_atomically(targets[i], moments=moments[j], moments_flip=moments[n + j])
    return out_root


# ------------------------------------------------------------------------------------------------
# configuration
def world_size():
    """Processes in this run: torchrun's WORLD_SIZE, 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# Fields a resumed run may change: where it stops and how it reports. epochs and max_steps only
# move the end of a constant schedule; with the cosine schedule they set its length, so the total
# step count they give must stay the same.
RESUME_MAY_CHANGE = ("output_dir", "epochs", "max_steps", "save_every_steps", "log_every_steps", "tensorboard",
                     "resume", "progress")
# MAR arguments that model_kwargs must not give: TrainConfig fields, fixed by the presets, or not data.
MODEL_KWARGS_NOT_ALLOWED = ("img_size", "grad_checkpointing", "mlp_ratio", "norm_layer", "tokenizer")


@dataclass
class TrainConfig:
    """Everything a run needs; validated by `check()` before any work starts.

    Resuming (`resume`, an existing output_dir/checkpoint-last.pth) needs the checkpoint's values of
    every field except RESUME_MAY_CHANGE (output and logging options, and epochs / max_steps to
    train longer with the constant schedule), the same number of processes and the same data set
    size; anything else is refused with the differing fields listed.
    """

    output_dir: str
    model: str = "mar_large"
    model_kwargs: dict = field(default_factory=dict)
    cached_path: str = ""
    data_path: str = ""
    vae_path: str = ""
    img_size: int = 256
    batch_size: int = 16
    epochs: int = 400
    max_steps: int = 0
    lr: float = 0.0
    blr: float = 1e-4
    min_lr: float = 0.0
    lr_schedule: str = "constant"
    warmup_epochs: float = 100.0
    weight_decay: float = 0.02
    ema_rate: float = 0.9999
    grad_clip: float = 3.0
    precision: str = "bf16"
    grad_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 1
    save_every_steps: int = 1000
    log_every_steps: int = 20
    tensorboard: bool = False
    resume: bool = True
    progress: bool = True

    def check(self, require_data=True):
        """Raise ValueError listing every problem (require_data=False: a dataset object is given)."""
        problems = []
        if self.model not in PRESETS and not (Path(self.model) / "config.json").is_file():
            problems.append(f"model must be one of {sorted(PRESETS)} or a save_pretrained directory, got {self.model!r}")
        if require_data and bool(self.cached_path) == bool(self.data_path):
            problems.append("give exactly one of cached_path (latent cache) and data_path (image folder)")
        if self.data_path and not self.vae_path:
            problems.append("data_path (images) needs vae_path (the KL-16 VAE) to encode them")
        for name in ("cached_path", "data_path", "vae_path"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                problems.append(f"{name} {value} does not exist")
        for name in ("batch_size", "epochs", "save_every_steps", "log_every_steps", "img_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            hint = " (fp16 autocast gives NaN losses with MAR; use bf16)" if self.precision == "fp16" else ""
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}{hint}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_rate < 1.0:
            problems.append(f"ema_rate must lie in [0, 1), got {self.ema_rate}")
        negative = [f"{name}={getattr(self, name)}" for name in ("lr", "blr", "min_lr") if not getattr(self, name) >= 0]
        if negative:
            problems.append(f"learning rates must not be negative: {', '.join(negative)}")
        elif self.lr == 0 and self.blr == 0:
            problems.append("give a positive lr or blr")
        elif self.lr_schedule == "constant" and self.min_lr:
            problems.append("min_lr only applies to lr_schedule='cosine'")
        elif self.lr_schedule == "cosine" and self.batch_size >= 1 \
                and self.min_lr > (peak := self.peak_lr(self.batch_size * world_size())):
            problems.append(f"min_lr {self.min_lr} exceeds the peak learning rate {peak:.3g} (lr, or blr x global batch / 256)")
        problems += model_kwargs_problems(self.model, self.model_kwargs)
        if self.max_steps < 0 or self.warmup_epochs < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            problems.append("max_steps, warmup_epochs, grad_clip and weight_decay must not be negative")
        if problems:
            raise ValueError("bad training configuration:\n  " + "\n  ".join(problems))
        return self

    def peak_lr(self, global_batch):
        """lr, or blr x global batch / 256 (the official scaling)."""
        return self.lr or self.blr * global_batch / 256


RUNTIME_MODEL_KWARGS = ("diffusion_batch_mul", "label_drop_prob", "mask_ratio_min")


def model_kwargs_problems(model, model_kwargs):
    """Names in model_kwargs that `build_model` cannot pass on (checked before any work)."""
    if model in PRESETS:
        allowed = sorted(set(inspect.signature(MAR.__init__).parameters) - {"self", *MODEL_KWARGS_NOT_ALLOWED})
    else:
        allowed = RUNTIME_MODEL_KWARGS  # a saved model: only training-time settings
    unknown = sorted(set(model_kwargs) - set(allowed))
    if not unknown:
        return []
    where = "a preset" if model in PRESETS else "a saved model"
    return [f"model_kwargs {unknown} cannot be given for {where} (img_size and grad_checkpointing are TrainConfig "
            f"fields; allowed: {', '.join(allowed)})"]


def build_model(config):
    """A preset built from scratch, or a save_pretrained directory as the starting point (then only
    the training-time settings RUNTIME_MODEL_KWARGS may be overridden)."""
    kwargs = {"diffusion_batch_mul": 4, **config.model_kwargs, "grad_checkpointing": config.grad_checkpointing}
    if config.model in PRESETS:
        return build_preset(config.model, img_size=config.img_size, **kwargs)
    model = MAR.load(config.model)
    for name in kwargs:
        if name not in RUNTIME_MODEL_KWARGS + ("grad_checkpointing",):
            raise ValueError(f"model_kwargs[{name!r}] cannot change a saved model (allowed: {RUNTIME_MODEL_KWARGS})")
        setattr(model, name, kwargs[name])
        if name in model.config:
            model.config[name] = kwargs[name]  # what this run trains with is what its checkpoints record
    model.diffloss.net.grad_checkpointing = config.grad_checkpointing
    return model.train()


# ------------------------------------------------------------------------------------------------
# the loop
class Trainer:
    """Runs `TrainConfig` on this process (rank and world size from torchrun's environment)."""

    def __init__(self, config, dataset=None, log=print):
        self.config = config.check(require_data=dataset is None)
        self.log = log
        self.world = world_size()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(config.seed + self.rank)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + self.rank)
        self.model = build_model(config).to(self.device).train()
        self.vae = None
        if dataset is not None:
            self.dataset = dataset
        elif config.cached_path:
            self.dataset = CachedLatents(config.cached_path)
        else:
            from .vae import load_vae

            self.dataset = ImageFolder(config.data_path, config.img_size)
            self.vae = load_vae(config.vae_path, device=self.device)
        self.global_batch = config.batch_size * self.world
        self.steps_per_epoch = len(self.dataset) // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"the data set has {len(self.dataset)} items, fewer than one global batch ({self.global_batch})")
        self.total_steps = min(config.epochs * self.steps_per_epoch, config.max_steps or math.inf)
        self.lr = config.peak_lr(self.global_batch)
        self.warmup_steps = config.warmup_epochs * self.steps_per_epoch
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.out / "checkpoint-last.pth"
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if config.resume and ckpt_path.is_file() else None
        if ckpt is not None:
            self.check_resumable(ckpt)
            load_state_dict_checked(self.model, ckpt["model"])
        self.wrapped = self._wrap(self.model)  # FSDP turns parameters into shards: optimizer and EMA come after
        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.model, config.weight_decay), lr=self.lr, betas=(0.9, 0.95))
        self.ema = [p.detach().clone().float() for p in self.model.parameters()]
        self.step = 0
        if ckpt is not None:
            self.restore(ckpt)
            self.log(f"resumed from {ckpt_path} at step {self.step}")
        self.history = []

    def _wrap(self, model):
        if self.world == 1:
            return model
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in list(model.encoder_blocks) + list(model.decoder_blocks):
                fully_shard(block)
            return fully_shard(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- data ----------------------------------------------------------------------------------
    def batch_indices(self, epoch, step_in_epoch):
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))
        start = step_in_epoch * self.global_batch + self.rank * self.config.batch_size
        return order[start:start + self.config.batch_size].tolist()

    def load_batch(self, indices):
        items = [self.dataset[i] for i in indices]
        x = torch.stack([torch.as_tensor(a) for a, _ in items]).to(self.device)
        labels = torch.tensor([int(b) for _, b in items], dtype=torch.long, device=self.device)
        flip = torch.rand(len(items), generator=self.generator, device=self.device) < 0.5
        if isinstance(self.dataset, CachedLatents):
            moments = torch.where(flip[:, None, None, None], x[:, 1], x[:, 0])
            return sample_posterior(moments, self.generator), labels
        if self.vae is not None:
            images = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.no_grad():
                moments = self.vae.quant_conv(self.vae.encoder(images.to(self.vae.post_quant_conv.weight.dtype))).float()
            return sample_posterior(moments, self.generator), labels
        return x.float(), labels  # a dataset of ready latents (no flips: the caller's data may not allow them)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def sharded(self):
        return self.config.fsdp and self.world > 1

    def full_state_dict(self):
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def ema_state_dict(self, model_state):
        """The model state with EMA parameters (every rank takes part in gathering shards; with
        FSDP only rank 0 gets the full dict)."""
        state = dict(model_state)
        for (name, _), value in zip(self.model.named_parameters(), self.ema):
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            if name in state:
                state[name] = full.detach().cpu().to(state[name].dtype).reshape(state[name].shape)
        return state

    def optimizer_state_dict(self):
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.wrapped, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def rng_states(self):
        """Every rank's random states (gathered to all ranks)."""
        mine = {"cpu": torch.get_rng_state(), "generator": self.generator.get_state().cpu(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.empty(0, dtype=torch.uint8)}
        if self.world == 1:
            return [mine]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return gathered

    def save_checkpoint(self):
        model_state = self.full_state_dict()
        ema_state = self.ema_state_dict(model_state)
        optimizer_state, rng = self.optimizer_state_dict(), self.rng_states()
        if self.rank != 0:
            return
        ckpt = {"model": model_state, "model_ema": ema_state, "optimizer": optimizer_state,
                "epoch": self.step // self.steps_per_epoch - 1, "step": self.step, "world_size": self.world,
                "dataset_size": len(self.dataset), "config": asdict(self.config), "rng": rng,
                "model_config": self.model.config}
        write_file_atomically(self.out / "checkpoint-last.pth", lambda tmp: torch.save(ckpt, tmp))
        write_pretrained(ema_state, self.model.config, self.out / "ema")

    def check_resumable(self, ckpt):
        """Raise ValueError listing what differs from the checkpoint's run, unless only the fields of
        RESUME_MAY_CHANGE do (with the cosine schedule, the total step count must also match)."""
        saved, current = ckpt["config"], asdict(self.config)
        missing = "(not in the checkpoint)"
        diffs = [f"{name}: {saved.get(name, missing)!r} in the checkpoint, {value!r} now"
                 for name, value in current.items() if name not in RESUME_MAY_CHANGE and saved.get(name, missing) != value]
        if ckpt.get("world_size", 1) != self.world:
            diffs.append(f"processes: {ckpt.get('world_size', 1)} in the checkpoint, {self.world} now")
        if "dataset_size" in ckpt and ckpt["dataset_size"] != len(self.dataset):  # absent in older checkpoints
            diffs.append(f"data set size: {ckpt['dataset_size']} in the checkpoint, {len(self.dataset)} now")
        model_config = ckpt.get("model_config", {})
        changed = sorted(k for k in {*model_config, *self.model.config} if model_config.get(k) != self.model.config.get(k))
        if changed:
            diffs.append(f"model configuration entries {changed}")
        if not diffs and self.config.lr_schedule == "cosine":
            saved_total = min(saved["epochs"] * self.steps_per_epoch, saved["max_steps"] or math.inf)
            if saved_total != self.total_steps:
                diffs.append(f"total steps (epochs, max_steps; the cosine schedule's length): {saved_total} in the "
                             f"checkpoint, {self.total_steps} now")
        if diffs:
            raise ValueError(f"cannot resume {self.out / 'checkpoint-last.pth'}: exact resumption needs the same "
                             "run, but\n  " + "\n  ".join(diffs) + "\n(use another output_dir, or resume=False (--no-resume) "
                             "to start over)")

    def restore(self, ckpt):
        """Optimizer, EMA, step and RNG states from a checkpoint (model weights are loaded before wrapping)."""
        ema_state = ckpt["model_ema"]
        for (name, p), ema in zip(self.model.named_parameters(), self.ema):
            full = ema_state[name].to(self.device).float()
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements)
            ema.copy_(full)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.wrapped, self.optimizer, optim_state_dict=ckpt["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        rng = ckpt["rng"][self.rank]
        torch.set_rng_state(rng["cpu"])
        self.generator.set_state(rng["generator"])
        if self.device.type == "cuda" and rng["cuda"].numel():
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # -- loop ----------------------------------------------------------------------------------
    def gradients_finite(self, params):
        """Clip the gradients to the total norm grad_clip (when > 0); False when that norm is not finite.
        The norm is global: every DDP or FSDP rank reaches the same answer."""
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip if self.config.grad_clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
            norm = norm.full_tensor()
        return bool(torch.isfinite(norm))

    def train(self):
        cfg = self.config
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and self.device.type == "cuda")
        params = list(self.model.parameters())
        writer = None
        if cfg.tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(self.out / "tensorboard"))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not cfg.progress or self.rank != 0)
        start, start_step = time.perf_counter(), self.step
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            latents, labels = self.load_batch(self.batch_indices(epoch, in_epoch))
            lr = learning_rate(self.step, self.lr, self.warmup_steps, self.total_steps, cfg.lr_schedule, cfg.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                loss = self.wrapped(latents, labels, generator=self.generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.gradients_finite(params):
                self.optimizer.step()
                update_ema(self.ema, params, cfg.ema_rate)
            else:
                warnings.warn(f"non-finite gradient norm at step {self.step}: the update is skipped (weights, optimizer "
                              "state and EMA unchanged), as the official fp16 loss scaler skips it", RuntimeWarning)
            self.step += 1
            loss_value = loss.detach().float()
            if self.world > 1:
                dist.all_reduce(loss_value)
                loss_value /= self.world
            self.history.append(loss_value.item())
            bar.update(1)
            if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - start
                rate = (self.step - start_step) * self.global_batch / max(elapsed, 1e-9)
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else float("nan")
                bar.set_postfix(loss=f"{self.history[-1]:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", mem_gib=f"{peak:.2f}")
                if writer is not None:
                    for name, value in (("loss", self.history[-1]), ("lr", lr), ("images_per_s", rate), ("peak_mem_gib", peak)):
                        writer.add_scalar(name, value, self.step)
            if self.step % cfg.save_every_steps == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        if writer is not None:
            writer.close()
        return self.history


# ------------------------------------------------------------------------------------------------
# command line (`marfast train`, `marfast cache-latents`)
def add_train_arguments(parser):
    """Every TrainConfig field as a --flag (underscores become dashes), defaults from TrainConfig."""
    defaults = TrainConfig(output_dir="")
    parser.add_argument("--output-dir", required=True, help="checkpoints, EMA weights and logs")
    parser.add_argument("--model", default=defaults.model,
                        help=f"preset ({', '.join(sorted(PRESETS))}) or a save_pretrained directory (default: %(default)s)")
    parser.add_argument("--diffloss-d", type=int, default=None, help="head depth (preset models)")
    parser.add_argument("--diffloss-w", type=int, default=None, help="head width (preset models)")
    parser.add_argument("--diffusion-batch-mul", type=int, default=4, help="default: %(default)s")
    for name in ("cached_path", "data_path", "vae_path"):
        parser.add_argument("--" + name.replace("_", "-"), default="")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("output_dir", "model", "model_kwargs", "cached_path", "data_path", "vae_path", "resume", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=f"default: {value}")
        else:
            parser.add_argument(flag, type=type(value), default=value, help="default: %(default)s")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint-last.pth")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def config_from_args(args):
    model_kwargs = {"diffusion_batch_mul": args.diffusion_batch_mul}
    for name in ("diffloss_d", "diffloss_w"):
        if getattr(args, name) is not None:
            model_kwargs[name] = getattr(args, name)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_kwargs", "resume", "progress"}
    return TrainConfig(model_kwargs=model_kwargs, resume=not args.no_resume, progress=not args.no_progress,
                       **{name: getattr(args, name) for name in fields})


def run_train(parser, args):
    try:
        config = config_from_args(args).check()
    except ValueError as err:
        parser.error(str(err))
    Trainer(config).train()
    return 0


def add_cache_arguments(parser):
    parser.add_argument("--data-path", required=True, help="image folder: <class>/<image>")
    parser.add_argument("--vae", required=True, help="kl16.ckpt or kl16.safetensors")
    parser.add_argument("--out", required=True, help="cache directory (resumable)")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    return parser


def run_cache_latents(parser, args):
    from .vae import load_vae

    if not Path(args.data_path).is_dir():
        parser.error(f"--data-path {args.data_path!r} is not a directory")
    if args.img_size < 1 or args.batch_size < 1:
        parser.error("--img-size and --batch-size must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(args.vae, device=device)
    out = cache_latents(vae, args.data_path, args.out, img_size=args.img_size, batch_size=args.batch_size)
    print(f"latents cached under {out}")
    return 0
