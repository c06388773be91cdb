"""Checkpoint formats: save_pretrained round trip, official .pth, flat safetensors, bad files."""
import argparse
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from marfast import MAR
from marfast import checkpoint
from marfast.checkpoint import CheckpointError, infer_config, load_model
from marfast.mar import norm_layer_eps6
from marfast.tokenizer import PixelPatchTokenizer

from helpers import tiny_mar

# an official-shaped (buffer 64, 16 channels, stride 16) but tiny model, so the preset can be inferred
OFFICIAL_LIKE = dict(img_size=64, vae_stride=16, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=7, diffloss_d=2,
                     diffloss_w=24, num_sampling_steps="4")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def save_flat(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture
def official_width_32(monkeypatch):
    """Let OFFICIAL_LIKE's width 32 stand in for an official width (2 heads, as OFFICIAL_LIKE has)."""
    monkeypatch.setitem(checkpoint.HEADS_BY_WIDTH, 32, 2)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_mar(sample_clip=(-1.0, 1.0))
    model.save_pretrained(tmp_path / "m")
    loaded = MAR.load(tmp_path / "m")
    assert same_weights(model, loaded) and loaded.sample_clip == (-1.0, 1.0) and not loaded.training
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directories left behind
    model.save_pretrained(tmp_path / "m")  # overwriting an existing directory works
    assert same_weights(model, MAR.load(tmp_path / "m", dtype=torch.float64).float())


def test_official_pth_with_ema_model_and_args(tmp_path, official_width_32):
    model, ema = MAR(**OFFICIAL_LIKE), MAR(**OFFICIAL_LIKE)
    ckpt = {"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
            "args": argparse.Namespace(model="mar_tiny", lr=1e-4)}
    torch.save(ckpt, tmp_path / "checkpoint-last.pth")
    assert same_weights(MAR.load(tmp_path / "checkpoint-last.pth"), ema)
    assert same_weights(MAR.load(tmp_path / "checkpoint-last.pth", ema=False), model)
    torch.save({"model": model.state_dict()}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        MAR.load(tmp_path / "no_ema.pth")


def test_official_args_give_the_geometry_and_must_fit_the_tensors(tmp_path, official_width_32):
    model = MAR(**{**OFFICIAL_LIKE, "patch_size": 2, "num_sampling_steps": "5"}, norm_layer=norm_layer_eps6)
    official = dict(model="mar_tiny", img_size=64, vae_stride=16, patch_size=2, vae_embed_dim=16, mask_ratio_min=0.7,
                    label_drop_prob=0.1, class_num=7, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                    diffloss_d=2, diffloss_w=24, num_sampling_steps="5", diffusion_batch_mul=4, lr=1e-4, epochs=3)

    def load_with(**args):
        torch.save({"model": model.state_dict(), "model_ema": model.state_dict(),
                    "args": argparse.Namespace(**{**official, **args})}, tmp_path / "checkpoint-last.pth")
        return MAR.load(tmp_path / "checkpoint-last.pth")

    loaded = load_with()
    assert loaded.config == model.config and same_weights(model, loaded)
    for args, problem in ((dict(img_size=128), "img_size 128 with vae_stride 16 and patch_size 2"),
                          (dict(patch_size=1, img_size=32), "vae_embed_dim 16 with patch_size 1"),
                          (dict(class_num=9), "class_num 9 (tensors: 7)"),
                          (dict(model="mar_base"), "model 'mar_base': encoder_embed_dim 768 (tensors: 32)")):
        with pytest.raises(CheckpointError, match="args disagree with its tensors: .*" + re.escape(problem)):
            load_with(**args)


def test_flat_safetensors_infers_the_configuration_of_official_widths(tmp_path, monkeypatch):
    model = MAR(**OFFICIAL_LIKE, norm_layer=norm_layer_eps6)
    save_flat(model, tmp_path / "mar.safetensors")
    with pytest.raises(CheckpointError, match="width 32 is not an official one .* attention-head count.*save_pretrained"):
        MAR.load(tmp_path / "mar.safetensors")
    save_flat(MAR.load("digits"), tmp_path / "digits.safetensors")  # 4 heads of width 96
    with pytest.raises(CheckpointError, match="width 96 is not an official one"):
        MAR.load(tmp_path / "digits.safetensors")
    monkeypatch.setitem(checkpoint.HEADS_BY_WIDTH, 32, 2)
    loaded = MAR.load(tmp_path / "mar.safetensors")
    assert same_weights(model, loaded) and loaded.config == {**model.config, "num_sampling_steps": "100"}
    config = infer_config(model.state_dict())
    assert (config["encoder_depth"], config["decoder_depth"], config["diffloss_d"], config["diffloss_w"],
            config["class_num"], config["buffer_size"]) == (2, 1, 2, 24, 7, 64)


def test_layer_norm_eps_and_tokenizer_survive_save_pretrained(tmp_path):
    tokenizer = PixelPatchTokenizer(img_size=16, patch_size=4)
    model = tiny_mar(vae_embed_dim=16, tokenizer=tokenizer)  # nn.LayerNorm: eps 1e-5
    model.save_pretrained(tmp_path / "m")
    loaded = MAR.load(tmp_path / "m")
    blocks = [*loaded.encoder_blocks, *loaded.decoder_blocks]
    norms = [loaded.encoder_norm, loaded.decoder_norm] + [b.norm1 for b in blocks] + [b.norm2 for b in blocks]
    assert {norm.eps for norm in norms} == {1e-5}
    assert loaded.config == model.config and loaded.tokenizer.config == tokenizer.config
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["norm_eps"]  # written before norm_eps was recorded: built with eps 1e-6
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert MAR.load(tmp_path / "m").encoder_blocks[0].norm1.eps == 1e-6

    class ScaledLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="norm_layer is not an nn.LayerNorm"):
        tiny_mar(norm_layer=ScaledLayerNorm).save_pretrained(tmp_path / "scaled")
    assert not (tmp_path / "scaled").exists()


def test_save_pretrained_never_mixes_old_and_new_files(tmp_path, monkeypatch):
    """Fail each os.replace of an overwriting save in turn: the directory then holds the old model
    and the files beside it; once no replace fails it holds the new one."""
    old, new = tiny_mar(class_num=10), tiny_mar(class_num=5)
    real_replace = os.replace
    for failing_call in range(1, 20):
        target = tmp_path / str(failing_call) / "m"
        old.save_pretrained(target)
        (target / "METRICS.md").write_text("notes")
        calls = []

        def replace_failing_once(src, dst):
            calls.append(dst)
            if len(calls) == failing_call:
                raise OSError("simulated failure")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace_failing_once)
        try:
            new.save_pretrained(target)
            saved = True
        except OSError:
            saved = False
        monkeypatch.setattr(os, "replace", real_replace)
        assert same_weights(MAR.load(target), new if saved else old)
        assert sorted(os.listdir(target.parent)) == ["m"] and (target / "METRICS.md").read_text() == "notes"
        if saved:
            break
    assert failing_call > 3  # the save needs several replaces, and each of them failed once above


def test_mismatched_and_corrupt_files_fail_clearly(tmp_path, official_width_32):
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


def test_hub_names_resolve_through_a_local_stand_in(tmp_path, official_width_32):
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
    for embed_dim, ch_mult, problem in ((4, (1, 1, 1), "4 latent channels and stride 4"),
                                        (3, (1, 1), "3 latent channels and stride 2")):
        misfit = lambda: full_size(embed_dim=embed_dim, ch_mult=ch_mult, ch=32, resolution=16)
        monkeypatch.setattr(vae_module, "KLAutoencoder", misfit)
        save_flat(misfit(), tmp_path / "misfit.safetensors")
        with pytest.raises(CheckpointError, match=problem + ", but the model takes vae_embed_dim 3 and vae_stride 4"):
            MAR.load(tmp_path / "m", vae=tmp_path / "misfit.safetensors")


def test_bad_contents_and_arguments_fail_clearly(tmp_path):
    tiny_mar().save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    good = json.loads(config_path.read_text())
    for contents, problem in ((None, "the configuration must be a JSON object of MAR keywords, got NoneType"),
                              ([1, 2], "the configuration must be a JSON object of MAR keywords, got list"),
                              ({**good, "sample_clip": 1.0}, "sample_clip must be null or [low, high], got 1.0"),
                              ({**good, "norm_eps": None}, "norm_eps must be a positive number, got None"),
                              ({**good, "img_size": 18}, "the configuration does not fit MAR: img_size 18 is not divisible")):
        config_path.write_text(json.dumps(contents))
        with pytest.raises(CheckpointError, match=re.escape(f"{config_path}: {problem}")):
            MAR.load(tmp_path / "m")
    config_path.write_text(json.dumps(good))
    state = tiny_mar().state_dict()
    torch.save({"model_ema": {**state, "decoder_norm.bias": 3}}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'ints.pth'} holds values that are not tensors: "
                                                        "decoder_norm.bias (int)")):
        MAR.load(tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match=r"values that are not tensors: decoder_norm.bias \(int\)"):
        checkpoint.load_state_dict_checked(tiny_mar(), {**state, "decoder_norm.bias": 3})
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth: the file is empty"):
        MAR.load(tmp_path / "empty.pth")
    assert MAR.load(tmp_path / "m", dtype="bfloat16").fake_latent.dtype == torch.bfloat16
    for dtype in ("int64", torch.int64, "LayerNorm"):
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype or its name"):
            MAR.load(tmp_path / "m", dtype=dtype)
