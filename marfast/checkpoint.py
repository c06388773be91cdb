"""Checkpoints: strict state-dict checks with named keys, save_pretrained and MAR.load sources.

Supported sources for `load_model`: a directory written by `save_pretrained` (config.json +
model.safetensors), an official training checkpoint (`.pth` with `model` / `model_ema`, loaded
with weights_only=True; the configuration is taken from the `model_config` entry that marfast's
trainer adds, or else read off the tensors and the official `args`: see `infer_config`), a flat
safetensors state dict with official key names (official widths only: see `infer_config`), the name of a
model shipped inside the package (`"digits"`), and the names of the public Hugging Face port
(`"mar-base"`, `"mar-large"`, `"mar-huge"`, and `"kl16"` for the VAE), downloaded once through
huggingface_hub and cached. The port's safetensors are reported (by a third-party audit) to hold
the non-EMA weights; the official `checkpoint-last.pth` has both.
"""
import argparse
import json
import math
import os
import re
import shutil
import tempfile
from functools import partial
from pathlib import Path

import warnings

import numpy as np
import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PACKAGED_MODELS_DIR = Path(__file__).parent / "weights"

HUB_REPO = "jadechoghari/mar"
HUB_FILES = {"mar-base": "mar-base.safetensors", "mar-large": "mar-large.safetensors",
             "mar-huge": "mar-huge.safetensors", "kl16": "kl16.safetensors"}

# Heads per width of the official presets (the tensors do not record the head count).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}

# The official main_mar.py arguments that it passes to the MAR constructor (a checkpoint's `args`).
OFFICIAL_MODEL_ARGS = ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "mask_ratio_min", "label_drop_prob",
                       "class_num", "attn_dropout", "proj_dropout", "buffer_size", "diffloss_d", "diffloss_w",
                       "num_sampling_steps", "diffusion_batch_mul")

# The LayerNorm eps of config.json files written before it was recorded (all were built with 1e-6).
UNRECORDED_NORM_EPS = 1e-6


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model: its message names the offending keys."""


def _listing(keys, limit=8):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _non_tensor_values(state_dict):
    """'key (type)' for each value of `state_dict` that is not a tensor."""
    return [f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]


def check_state_dict(module, state_dict):
    """Raise CheckpointError naming missing, unexpected and shape-mismatched keys, if any."""
    not_tensors = _non_tensor_values(state_dict)
    if not_tensors:
        raise CheckpointError(f"checkpoint does not fit {type(module).__name__}: values that are not tensors: "
                              f"{_listing(not_tensors)}")
    expected = module.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    mismatched = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(module).__name__}: " + "; ".join(problems))


def load_state_dict_checked(module, state_dict):
    """Strict load that explains every mismatch before touching the module's parameters."""
    check_state_dict(module, state_dict)
    module.load_state_dict(state_dict, strict=True)
    return module


def write_file_atomically(path, write_fn):
    """write_fn(tmp) writes a temporary sibling of `path` (a hidden `.tmp` file, which no reader that
    lists files by suffix picks up if the process is killed), which then replaces `path`; on any
    failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_npz_atomically(path, **arrays):
    """np.savez(path, **arrays) through write_file_atomically (into a file object: np.savez given a
    name without `.npz` would append one)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_file_atomically(path, write)


def _atomic_dir_write(directory, write_fn):
    """write_fn(new) fills a fresh temporary sibling directory `new`, which then takes the place of
    `directory` by renames: its files are never mixed with the ones `directory` held before (see
    `write_pretrained`). On failure `directory` is left as it was and `new` is removed."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new.", dir=directory.parent))
    try:
        write_fn(new)
        if directory.exists():
            _replace_directory(directory, new)
        else:
            os.replace(new, directory)
    except BaseException:
        if new.exists():
            shutil.rmtree(new)
        raise


def _replace_directory(directory, new):
    """Put directory `new` in place of `directory`, first moving into it the entries of `directory`
    that `new` lacks; on failure everything is moved back."""
    old = new.with_name(new.name + ".old")
    kept = []
    try:
        for name in sorted(set(os.listdir(directory)) - set(os.listdir(new))):
            os.replace(directory / name, new / name)
            kept.append(name)
        os.replace(directory, old)
        os.replace(new, directory)
    except BaseException:
        if old.exists():
            os.replace(old, directory)
        for name in kept:
            os.replace(new / name, directory / name)
        raise
    shutil.rmtree(old)


def save_pretrained(model, directory):
    """Write config.json and model.safetensors for `model` into `directory` (see `write_pretrained`)."""
    return write_pretrained(model.state_dict(), model.config, directory)


def write_pretrained(state_dict, config, directory):
    """Write a state dict and its MAR config as a save_pretrained directory.

    The files are written into a temporary sibling directory that then replaces `directory` by
    renames, carrying over the other files `directory` holds: a reader finds the old config.json
    and model.safetensors or the new ones, never one of each (between two renames it may find no
    `directory`). If the save fails, `directory` is left as it was.
    """
    from safetensors.torch import save_file

    if "norm_eps" in config and config["norm_eps"] is None:
        raise ValueError("cannot save this MAR: its norm_layer is not an nn.LayerNorm with weight and bias, which "
                         "config.json cannot describe (build it with norm_layer=partial(nn.LayerNorm, eps=...))")
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}

    def write(tmp):
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "marfast"})
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    _atomic_dir_write(directory, write)
    return Path(directory)


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err


def _read_official_pth(path, ema):
    """(state dict, `model_config` entry or None, `args` entry or None) of a .pth checkpoint."""
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    key = "model_ema" if ema else "model"
    if key in ckpt and isinstance(ckpt[key], dict):
        state_dict = ckpt[key]
        config = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), dict) else None
        args = ckpt.get("args")
    elif any(k in ckpt for k in ("model", "model_ema")):
        raise CheckpointError(f"{path} has no '{key}' entry (it has: {_listing(k for k in ckpt if isinstance(k, str))})")
    else:
        state_dict, config, args = ckpt, None, None
    not_tensors = _non_tensor_values(state_dict)
    if not_tensors:
        raise CheckpointError(f"{path} holds values that are not tensors: {_listing(not_tensors)}")
    return state_dict, config, args


def infer_config(state_dict, args=None):
    """MAR constructor keywords for an official-layout state dict (sizes read off the tensors).

    args: the official training arguments (a checkpoint's `args` Namespace, or a dict), or None.
    Its OFFICIAL_MODEL_ARGS are taken as given and checked against the tensors, and `args.model`,
    when it names a preset, gives the attention-head counts. Without args the geometry is the
    official one (vae_stride 16, patch_size 1) and the rest MAR's defaults.

    The tensors do not record attention-head counts, so a width outside HEADS_BY_WIDTH (the official
    presets') without a preset in args, and a De-MAR Transformer head, are refused with a
    CheckpointError (a guess would load without error and compute another function).
    """
    from .mar import PRESETS

    def shape(key):
        if key not in state_dict:
            raise CheckpointError(f"cannot infer the model configuration: missing key {key}")
        return tuple(state_dict[key].shape)

    def count(prefix):
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        return len({m.group(1) for k in state_dict for m in [pattern.match(k)] if m})

    enc_dim = shape("fake_latent")[1]
    dec_dim = shape("mask_token")[2]
    seq_len = shape("diffusion_pos_embed_learned")[1]
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise CheckpointError(f"diffusion_pos_embed_learned has {seq_len} positions, not a square grid")
    token_dim = shape("z_proj.weight")[1]
    transformer_head = any(k.startswith("diffloss.net.blocks.") for k in state_dict)
    if transformer_head:
        raise CheckpointError("this state dict has a De-MAR Transformer head, whose attention-head count the tensors "
                              "do not record: load it from a save_pretrained directory (config.json records it)")
    config = dict(
        encoder_embed_dim=enc_dim, encoder_depth=count("encoder_blocks"),
        decoder_embed_dim=dec_dim, decoder_depth=count("decoder_blocks"),
        buffer_size=shape("encoder_pos_embed_learned")[1] - seq_len,
        class_num=shape("class_emb.weight")[0],
        diffloss_d=count("diffloss.net.res_blocks"), diffloss_w=shape("diffloss.net.input_proj.weight")[0],
        head="mlp", denoising_head="denoising_head.refine_fc1.weight" in state_dict,
    )
    if config["denoising_head"]:
        config["denoising_width"] = shape("denoising_head.refine_fc1.weight")[0]
    given = _official_args(args)
    model_name = given.pop("model", None)
    problems = [f"{key} {given[key]!r} (tensors: {config[key]})" for key in config if key in given and given[key] != config[key]]
    for key in ("vae_stride", "patch_size", "img_size", "vae_embed_dim"):
        if key in given and (isinstance(given[key], bool) or not isinstance(given[key], int) or given[key] < 1):
            raise CheckpointError(f"the checkpoint's args.{key} must be a positive integer, got {given[key]!r}")
    vae_stride, patch_size = given.get("vae_stride", 16), given.get("patch_size", 1)
    img_size = given.get("img_size", side * vae_stride * patch_size)
    vae_embed_dim = given.get("vae_embed_dim", token_dim // patch_size**2)
    if vae_embed_dim * patch_size**2 != token_dim:
        problems.append(f"vae_embed_dim {vae_embed_dim} with patch_size {patch_size} (tensors: tokens of {token_dim} values)")
    if img_size % (vae_stride * patch_size) or img_size // (vae_stride * patch_size) != side:
        problems.append(f"img_size {img_size} with vae_stride {vae_stride} and patch_size {patch_size} "
                        f"(tensors: a {side}x{side} token grid)")
    preset = PRESETS.get(model_name) if isinstance(model_name, str) else None
    if preset is not None:
        problems += [f"model {model_name!r}: {key} {preset[key]!r} (tensors: {config[key]!r})"
                     for key in preset if key in config and preset[key] != config[key]]
    if problems:
        raise CheckpointError("the checkpoint's args disagree with its tensors: " + "; ".join(problems))
    if preset is not None:
        heads = dict(encoder_num_heads=preset["encoder_num_heads"], decoder_num_heads=preset["decoder_num_heads"])
    else:
        heads = dict(encoder_num_heads=_official_head_count(enc_dim), decoder_num_heads=_official_head_count(dec_dim))
    return {**given, **config, **heads, "img_size": img_size, "vae_stride": vae_stride, "patch_size": patch_size,
            "vae_embed_dim": vae_embed_dim}


def _official_args(args):
    """The MAR keywords (OFFICIAL_MODEL_ARGS) and `model` that a checkpoint's `args` holds."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise CheckpointError(f"the checkpoint's args must be an argparse.Namespace or a dict, got {type(args).__name__}")
    return {key: args[key] for key in OFFICIAL_MODEL_ARGS + ("model",) if key in args}


def _official_head_count(width):
    if width not in HEADS_BY_WIDTH:
        raise CheckpointError(
            f"the transformer width {width} is not an official one ({', '.join(map(str, sorted(HEADS_BY_WIDTH)))}) and "
            "the tensors do not record its attention-head count: load the model from a directory written by "
            "save_pretrained (its config.json records the head counts), or from an official checkpoint whose args "
            "name its preset")
    return HEADS_BY_WIDTH[width]


def _build(config, state_dict, device, dtype, source):
    """MAR from its constructor keywords `config` (read from `source`, which errors name) and weights."""
    from .mar import MAR
    from .tokenizer import build_tokenizer

    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the configuration must be a JSON object of MAR keywords, "
                              f"got {type(config).__name__}")
    config = dict(config)
    norm_eps = config.pop("norm_eps", UNRECORDED_NORM_EPS)
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
        raise CheckpointError(f"{source}: norm_eps must be a positive number, got {norm_eps!r}")
    clip = config.get("sample_clip")
    if clip is not None:
        if not isinstance(clip, list) or len(clip) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in clip):
            raise CheckpointError(f"{source}: sample_clip must be null or [low, high], got {clip!r}")
        config["sample_clip"] = tuple(clip)
    try:
        if config.get("tokenizer") is not None:
            config["tokenizer"] = build_tokenizer(config["tokenizer"])
        with torch.device("meta"):
            model = MAR(norm_layer=partial(torch.nn.LayerNorm, eps=norm_eps), **config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: the configuration does not fit MAR: {err}") from err
    check_state_dict(model, state_dict)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device=device or "cpu")
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def resolve_hub_file(name, revision=None, repo=HUB_REPO):
    """Local path of a hub model file (downloaded once, then read from the cache).

    `repo` may be a local directory standing in for the hub (it must hold the file).
    """
    filename = HUB_FILES[name]
    if Path(repo).is_dir():
        path = Path(repo) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{repo} holds no {filename}")
        return path
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError as err:
        raise ImportError(f"loading {name!r} by name needs huggingface_hub: pip install 'marfast[hub]'") from err
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise FileNotFoundError(f"{filename} from {repo} (revision {revision or 'main'}) is not in the local cache and "
                                f"cannot be downloaded (offline?): {err}") from err


def load_model(source, vae=None, ema=True, device=None, dtype=None, revision=None, hub_repo=HUB_REPO):
    """Build a MAR from `source` (see module docstring); returns it in eval mode.

    vae: a KL-16 checkpoint path (`kl16.ckpt` / `kl16.safetensors`) or "kl16" (hub); when given,
    `sample` returns uint8 images (the VAE runs in float32, as officially: `load_vae`). Its latent
    channels and stride must be the model's vae_embed_dim and vae_stride.
    dtype: a floating-point torch.dtype or its name ("bfloat16"), or None (as stored: float32).
    """
    if dtype is not None:
        dtype = _floating_dtype(dtype)
    model = _load_mar(source, ema, device, dtype, revision, hub_repo)
    if vae is not None:
        from .vae import VAEImageDecoder, load_vae

        if str(vae) == "kl16" and not Path(vae).exists():
            vae = resolve_hub_file("kl16", revision, hub_repo)
        autoencoder = load_vae(vae, device=model.device)
        if (autoencoder.embed_dim, autoencoder.stride) != (model.vae_embed_dim, model.vae_stride):
            raise CheckpointError(f"the VAE {vae} has {autoencoder.embed_dim} latent channels and stride "
                                  f"{autoencoder.stride}, but the model takes vae_embed_dim {model.vae_embed_dim} "
                                  f"and vae_stride {model.vae_stride}")
        model.tokenizer = VAEImageDecoder(autoencoder)
    return model


def _floating_dtype(dtype):
    """A floating-point torch.dtype given as one or by name ("bfloat16", "torch.float16")."""
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype or its name (such as 'bfloat16'), got {dtype!r}")
    return resolved


def _load_mar(source, ema, device, dtype, revision, hub_repo):
    if str(source) in HUB_FILES and str(source) != "kl16" and not Path(source).exists():
        if ema:
            warnings.warn(f"{source!r} comes from the public safetensors port, reported to hold the non-EMA weights; "
                          "use the official checkpoint-last.pth for the EMA weights", stacklevel=4)
        source = resolve_hub_file(str(source), revision, hub_repo)
    path = Path(source)
    if not path.exists() and (PACKAGED_MODELS_DIR / str(source)).is_dir():
        path = PACKAGED_MODELS_DIR / str(source)
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise CheckpointError(f"{path} must hold {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
        return _build(config, _read_safetensors(weights_path), device, dtype, config_path)
    if path.is_file():
        if path.suffix == ".safetensors":
            state_dict, config, args = _read_safetensors(path), None, None
        else:
            state_dict, config, args = _read_official_pth(path, ema)
        if config is None:
            try:
                config = infer_config(state_dict, args)
            except CheckpointError as err:
                raise CheckpointError(f"{path}: {err}") from err
        return _build(config, state_dict, device, dtype, path)
    known = sorted(p.name for p in PACKAGED_MODELS_DIR.iterdir() if p.is_dir()) if PACKAGED_MODELS_DIR.is_dir() else []
    raise FileNotFoundError(f"{source!r} is neither a file, a directory, a packaged model (packaged: {known}) "
                            f"nor a hub model ({sorted(k for k in HUB_FILES if k != 'kl16')})")
