"""`marfast` command line beyond the digits grid: PNG directories, the FID npz, train and cache-latents."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from marfast.cli import main

from helpers import tiny_mar


def test_sample_into_a_directory_and_npz(tmp_path, capsys):
    assert main(["sample", "--classes", "1", "7", "--per-class", "2", "--num-iter", "2", "--out", str(tmp_path / "pngs")]) == 0
    files = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert files == ["000000_class1.png", "000001_class1.png", "000002_class7.png", "000003_class7.png"]
    assert Image.open(tmp_path / "pngs" / files[0]).size == (8, 8)
    assert main(["sample", "--checkpoint", "digits", "--classes", "0", "3", "--num-images", "3", "--npz",
                 "--num-iter", "2", "--batch-size", "2", "--out", str(tmp_path / "fid")]) == 0
    data = np.load(tmp_path / "fid" / "samples_3.npz")
    assert data["arr_0"].shape == (3, 8, 8, 3) and data["labels"].tolist() == [0, 3, 0]


def test_npz_rerun_with_other_settings_exits_2(tmp_path, capsys):
    common = ["sample", "--num-iter", "2", "--npz", "--out", str(tmp_path / "fid")]
    assert main([*common, "--classes", "0", "1", "--num-images", "3"]) == 0
    with pytest.raises(SystemExit) as exc:
        main([*common, "--classes", "5", "6", "--num-images", "5", "--seed", "9"])
    assert exc.value.code == 2 and "differs in classes, num_images, seed" in capsys.readouterr().err
    assert not (tmp_path / "fid" / "samples_5.npz").exists()


def test_precision_auto_is_fp32_on_the_cpu_and_bf16_samples_under_autocast(tmp_path, capsys, monkeypatch):
    import marfast.mar as mar_module

    requested = []
    original = mar_module.sampling_autocast
    monkeypatch.setattr(mar_module, "sampling_autocast", lambda device, autocast: requested.append(autocast) or
                        original(device, autocast))
    common = ["sample", "--classes", "2", "--per-class", "2", "--num-iter", "2"]
    assert main([*common, "--out", str(tmp_path / "a.png")]) == 0
    assert "on cpu (fp32)" in capsys.readouterr().out
    assert main([*common, "--precision", "bf16", "--out", str(tmp_path / "b.png")]) == 0
    assert "on cpu (bf16)" in capsys.readouterr().out and requested == [None, "bf16"]
    with pytest.raises(SystemExit) as exc:
        main([*common, "--precision", "fp8", "--out", str(tmp_path / "c.png")])
    assert exc.value.code == 2


def test_directory_batches_of_neighbouring_seeds_differ(tmp_path):
    for seed in ("0", "2"):
        assert main(["sample", "--classes", "3", "--per-class", "4", "--batch-size", "2", "--num-iter", "2",
                     "--seed", seed, "--out", str(tmp_path / seed)]) == 0
    image = lambda seed, i: np.asarray(Image.open(tmp_path / seed / f"{i:06d}_class3.png"))
    assert not np.array_equal(image("2", 0), image("0", 2))  # was: seed 2's batch 0 = seed 0's batch 1


def test_grid_of_rgb_vae_images_and_as_jpeg(tmp_path, monkeypatch):
    import marfast.vae as vae_module

    full_size = vae_module.KLAutoencoder
    monkeypatch.setattr(vae_module, "KLAutoencoder", lambda: full_size(embed_dim=4, ch_mult=(1, 1), ch=32, resolution=8))
    torch.manual_seed(0)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in vae_module.KLAutoencoder().state_dict().items()}, str(tmp_path / "vae.safetensors"))
    args = ["sample", "--classes", "0", "1", "--per-class", "2", "--num-iter", "2", "--scale", "2"]
    assert main([*args, "--vae", str(tmp_path / "vae.safetensors"), "--out", str(tmp_path / "rgb.png")]) == 0
    grid = Image.open(tmp_path / "rgb.png")
    assert grid.mode == "RGB" and grid.size == (28 + 2 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    assert main([*args, "--out", str(tmp_path / "gray.jpg")]) == 0
    grid = Image.open(tmp_path / "gray.jpg")
    assert grid.format == "JPEG" and grid.mode == "L" and grid.size == (28 + 2 * (16 + 2) + 2, 2 * (16 + 2) + 2)


@pytest.mark.parametrize("args,message", [
    (["--npz", "--out", "x.png"], "--npz writes into a directory"),
    (["--npz", "--num-images", "4", "--out", "x.npz"], "--npz writes into a directory"),
    (["--npz", "--out", "dir"], "--npz needs --num-images"),
    (["--num-images", "5", "--out", "dir"], "--num-images goes with --npz"),
    (["--batch-size", "0", "--out", "dir"], "--batch-size must be at least 1"),
    (["--npz", "--num-images", "4", "--per-class", "2", "--out", "dir"], "--per-class does not apply to --npz"),
    (["--npz", "--num-images", "4", "--scale", "2", "--out", "dir"], "--scale applies to a grid only"),
    (["--scale", "2", "--out", "dir"], "--scale applies to a grid only"),
    (["--out", "x.grid"], "'.grid' is not an image format"),
    (["--device", "meta", "--out", "x.png"], "argument --device: 'meta' tensors hold no data"),
    (["--device", "cuda:99", "--out", "x.png"], "argument --device: 'cuda:99' is not usable on this machine"),
    (["--device", "gpu", "--out", "x.png"], "argument --device: 'gpu' is not a torch device"),
    (["--cfg", "nan", "--out", "x.png"], "argument --cfg: must be a finite number"),
    (["--temperature", "inf", "--out", "x.png"], "argument --temperature: must be a finite number"),
    (["--temperature", "-1", "--out", "x.png"], "argument --temperature: must be >= 0"),
    (["--seed", "99999999999999999999", "--out", "x.png"], "argument --seed: must be an integer in 0..2**64-1"),
    (["--seed", "-1", "--out", "x.png"], "argument --seed: must be an integer in 0..2**64-1"),
])
def test_sample_bad_output_arguments(tmp_path, capsys, args, message):
    args = [a if a not in ("x.png", "x.npz", "x.grid", "dir") else str(tmp_path / a) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["sample", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sample_model_with_an_invalid_config_exits_2(tmp_path, capsys):
    tiny_mar().save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "img_size": 18}))
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "grid.png")])
    assert exc.value.code == 2 and "cannot load model" in capsys.readouterr().err


def test_train_rejects_bad_configuration_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--output-dir", str(tmp_path / "run"), "--model", "mar_tiny", "--precision", "fp16"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "mar_tiny" in err and "NaN" in err and "exactly one of cached_path" in err
    assert not (tmp_path / "run").exists()


def test_train_and_cache_latents_run(tmp_path, monkeypatch):
    import marfast.vae as vae_module

    full_size = vae_module.KLAutoencoder
    monkeypatch.setattr(vae_module, "KLAutoencoder", lambda: full_size(embed_dim=3, ch_mult=(1, 1), ch=32, resolution=16))
    torch.manual_seed(0)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in vae_module.KLAutoencoder().state_dict().items()}, str(tmp_path / "vae.safetensors"))
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.random.RandomState(i).randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    assert main(["cache-latents", "--data-path", str(tmp_path / "img"), "--vae", str(tmp_path / "vae.safetensors"),
                 "--out", str(tmp_path / "cache"), "--img-size", "16", "--batch-size", "3"]) == 0
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 8
    from helpers import tiny_mar

    tiny_mar(vae_embed_dim=3, img_size=32, vae_stride=4, class_num=2).save_pretrained(tmp_path / "init")
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--model", str(tmp_path / "init"),
                 "--cached-path", str(tmp_path / "cache"), "--batch-size", "4", "--max-steps", "2",
                 "--precision", "fp32", "--warmup-epochs", "0", "--no-progress"]) == 0
    assert (tmp_path / "run" / "checkpoint-last.pth").is_file() and (tmp_path / "run" / "ema" / "config.json").is_file()
