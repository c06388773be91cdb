"""Checkpoints: strict state-dict checks with named keys, save_pretrained and MAR.load sources.

Supported sources for `load_model`: a directory written by `save_pretrained` (config.json +
model.safetensors), an official training checkpoint (`.pth` with `model` / `model_ema`, loaded
with weights_only=True; the configuration is read off the tensors, or taken from the
`model_config` entry that marfast's trainer adds), a flat safetensors state dict with official key names, the name of a
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
import tempfile
from pathlib import Path

import warnings

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PACKAGED_MODELS_DIR = Path(__file__).parent / "weights"

HUB_REPO = "jadechoghari/mar"
HUB_FILES = {"mar-base": "mar-base.safetensors", "mar-large": "mar-large.safetensors",
             "mar-huge": "mar-huge.safetensors", "kl16": "kl16.safetensors"}

# Heads per width of the official presets (the tensors do not record the head count).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model: its message names the offending keys."""


def _listing(keys, limit=8):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(module, state_dict):
    """Raise CheckpointError naming missing, unexpected and shape-mismatched keys, if any."""
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
    """write_fn(tmp) writes a temporary sibling of `path` (same suffix), which then replaces `path`;
    on any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _atomic_dir_write(directory, write_fn):
    """Write files into a temporary sibling directory, then move it into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_fn(tmp)
        if directory.exists():
            for name in os.listdir(tmp):
                os.replace(tmp / name, directory / name)
            tmp.rmdir()
        else:
            os.replace(tmp, directory)
    except BaseException:
        for name in os.listdir(tmp):
            (tmp / name).unlink()
        tmp.rmdir()
        raise


def save_pretrained(model, directory):
    """Write config.json and model.safetensors for `model` into `directory` (atomically)."""
    return write_pretrained(model.state_dict(), model.config, directory)


def write_pretrained(state_dict, config, directory):
    """Write a state dict and its MAR config as a save_pretrained directory (atomically)."""
    from safetensors.torch import save_file

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
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    key = "model_ema" if ema else "model"
    config = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), dict) else None
    if key in ckpt and isinstance(ckpt[key], dict):
        return ckpt[key], config
    if any(k in ckpt for k in ("model", "model_ema")):
        raise CheckpointError(f"{path} has no '{key}' entry (it has: {_listing(k for k in ckpt if isinstance(k, str))})")
    return ckpt, None


def infer_config(state_dict):
    """MAR constructor keywords for an official-layout state dict (sizes read off the tensors).

    A denoising head (`denoising_head.*`) is recognised; a De-MAR Transformer head is refused with
    a CheckpointError, since its attention-head count is not in the tensors (guessing it would
    load without error and compute another function).
    """
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
    de_mar = {}
    if "denoising_head.refine_fc1.weight" in state_dict:
        de_mar.update(denoising_head=True, denoising_width=shape("denoising_head.refine_fc1.weight")[0])
    return dict(
        img_size=side * 16, vae_stride=16, patch_size=1, vae_embed_dim=token_dim,
        encoder_embed_dim=enc_dim, encoder_depth=count("encoder_blocks"),
        encoder_num_heads=HEADS_BY_WIDTH.get(enc_dim, max(1, enc_dim // 64)),
        decoder_embed_dim=dec_dim, decoder_depth=count("decoder_blocks"),
        decoder_num_heads=HEADS_BY_WIDTH.get(dec_dim, max(1, dec_dim // 64)),
        buffer_size=shape("encoder_pos_embed_learned")[1] - seq_len,
        class_num=shape("class_emb.weight")[0],
        diffloss_d=count("diffloss.net.res_blocks"), diffloss_w=shape("diffloss.net.input_proj.weight")[0],
        **de_mar,
    )


def _build(config, state_dict, device, dtype):
    from .mar import MAR, norm_layer_eps6

    config = dict(config)
    tokenizer = config.pop("tokenizer", None)
    if config.get("sample_clip") is not None:
        config["sample_clip"] = tuple(config["sample_clip"])
    try:
        with torch.device("meta"):
            model = MAR(norm_layer=norm_layer_eps6, **config)
    except TypeError as err:
        raise CheckpointError(f"config does not fit MAR: {err}") from err
    check_state_dict(model, state_dict)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict, strict=True)
    if tokenizer is not None:
        from .tokenizer import build_tokenizer
        model.tokenizer = build_tokenizer(tokenizer)
        model.config["tokenizer"] = tokenizer
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
    `sample` returns uint8 images (the VAE runs in bf16 on CUDA, float32 elsewhere).
    """
    model = _load_mar(source, ema, device, dtype, revision, hub_repo)
    if vae is not None:
        from .vae import VAEImageDecoder, load_vae

        if str(vae) == "kl16" and not Path(vae).exists():
            vae = resolve_hub_file("kl16", revision, hub_repo)
        vae_dtype = torch.bfloat16 if model.device.type == "cuda" else torch.float32
        model.tokenizer = VAEImageDecoder(load_vae(vae, device=model.device, dtype=vae_dtype))
    return model


def _load_mar(source, ema, device, dtype, revision, hub_repo):
    if str(source) in HUB_FILES and str(source) != "kl16" and not Path(source).exists():
        if ema:
            warnings.warn(f"{source!r} comes from the public safetensors port, reported to hold the non-EMA weights; "
                          "use the official checkpoint-last.pth for the EMA weights", stacklevel=3)
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
        return _build(config, _read_safetensors(weights_path), device, dtype)
    if path.is_file():
        if path.suffix == ".safetensors":
            state_dict, config = _read_safetensors(path), None
        else:
            state_dict, config = _read_official_pth(path, ema)
        return _build(config if config is not None else infer_config(state_dict), state_dict, device, dtype)
    known = sorted(p.name for p in PACKAGED_MODELS_DIR.iterdir() if p.is_dir()) if PACKAGED_MODELS_DIR.is_dir() else []
    raise FileNotFoundError(f"{source!r} is neither a file, a directory, a packaged model (packaged: {known}) "
                            f"nor a hub model ({sorted(k for k in HUB_FILES if k != 'kl16')})")
