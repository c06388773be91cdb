"""Checkpoint formats: save_pretrained round trip, official .pth, flat safetensors, bad files."""
import argparse
import os

import pytest
import torch
from safetensors.torch import save_file

from marfast import MAR
from marfast.checkpoint import CheckpointError, infer_config, load_model

from helpers import tiny_mar

# an official-shaped (buffer 64, 16 channels, stride 16) but tiny model, so the preset can be inferred
OFFICIAL_LIKE = dict(img_size=64, vae_stride=16, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=7, diffloss_d=2,
                     diffloss_w=24, num_sampling_steps="4")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_mar(sample_clip=(-1.0, 1.0))
    model.save_pretrained(tmp_path / "m")
    loaded = MAR.load(tmp_path / "m")
    assert same_weights(model, loaded) and loaded.sample_clip == (-1.0, 1.0) and not loaded.training
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directories left behind
    model.save_pretrained(tmp_path / "m")  # overwriting an existing directory works
    assert same_weights(model, MAR.load(tmp_path / "m", dtype=torch.float64).float())


def test_official_pth_with_ema_model_and_args(tmp_path):
    model, ema = MAR(**OFFICIAL_LIKE), MAR(**OFFICIAL_LIKE)
    ckpt = {"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
            "args": argparse.Namespace(model="mar_base", lr=1e-4)}
    torch.save(ckpt, tmp_path / "checkpoint-last.pth")
    assert same_weights(MAR.load(tmp_path / "checkpoint-last.pth"), ema)
    assert same_weights(MAR.load(tmp_path / "checkpoint-last.pth", ema=False), model)
    torch.save({"model": model.state_dict()}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        MAR.load(tmp_path / "no_ema.pth")


def test_flat_safetensors_infers_the_configuration(tmp_path):
    model = MAR(**OFFICIAL_LIKE)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "mar.safetensors"))
    loaded = MAR.load(tmp_path / "mar.safetensors")
    assert same_weights(model, loaded)
    config = infer_config(model.state_dict())
    assert (config["encoder_depth"], config["decoder_depth"], config["diffloss_d"], config["diffloss_w"],
            config["class_num"], config["buffer_size"]) == (2, 1, 2, 24, 7, 64)


def test_mismatched_and_corrupt_files_fail_clearly(tmp_path):
    model = MAR(**OFFICIAL_LIKE)
    state = model.state_dict()
    state["unexpected.weight"] = torch.zeros(1)
    state["decoder_norm.weight"] = torch.zeros(5)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: unexpected.weight.*decoder_norm.weight \(checkpoint \(5,\)"):
        MAR.load(tmp_path / "bad.safetensors")
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(good))
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        MAR.load(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        MAR.load(tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError, match="neither a file"):
        MAR.load(tmp_path / "missing")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="must hold config.json"):
        MAR.load(tmp_path / "emptydir")


def test_hub_names_resolve_through_a_local_stand_in(tmp_path):
    model = MAR(**OFFICIAL_LIKE)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(hub / "mar-base.safetensors"))
    with pytest.warns(UserWarning, match="non-EMA"):
        loaded = load_model("mar-base", hub_repo=str(hub))
    assert same_weights(model, loaded)
    with pytest.raises(FileNotFoundError, match="holds no mar-large.safetensors"):
        load_model("mar-large", ema=False, hub_repo=str(hub))


def test_hub_offline_and_not_cached_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        load_model("mar-huge", ema=False, revision="main")


def test_vae_is_attached_for_images_but_stays_out_of_the_state_dict(tmp_path, monkeypatch):
    import marfast.vae as vae_module

    full_size = vae_module.KLAutoencoder
    tiny = lambda: full_size(embed_dim=3, ch_mult=(1, 1, 1), ch=32, resolution=16)
    monkeypatch.setattr(vae_module, "KLAutoencoder", tiny)
    save_file({k: v.contiguous() for k, v in tiny().state_dict().items()}, str(tmp_path / "kl.safetensors"))
    tiny_mar().save_pretrained(tmp_path / "m")
    model = MAR.load(tmp_path / "m", vae=tmp_path / "kl.safetensors")
    assert set(model.state_dict()) == set(tiny_mar().state_dict())
    images = model.sample([1, 2], num_iter=2, seed=0, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16)
