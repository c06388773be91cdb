"""Training: official recipe pieces, digits runs that learn, exact resume, DDP (gloo) vs one process,
latent caching, and configurations that fail before any work starts."""
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from marfast import MAR
from marfast.recipes.digits import digits_split
from marfast.tokenizer import PixelPatchTokenizer
from marfast.train import (CachedLatents, ImageFolder, center_crop_image, TrainConfig, Trainer, cache_latents, learning_rate,
                           update_ema, weight_decay_groups)

from helpers import tiny_mar

DIGITS_MODEL = dict(img_size=8, vae_stride=2, vae_embed_dim=4, encoder_embed_dim=32, encoder_depth=1,
                    encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                    buffer_size=2, class_num=10, diffloss_d=2, diffloss_w=48, num_sampling_steps="10",
                    attn_dropout=0.0, proj_dropout=0.0, sample_clip=(-1.0, 1.0))


class DigitsLatents(torch.utils.data.Dataset):
    def __init__(self, n=None):
        split = digits_split()
        self.latents = PixelPatchTokenizer(8, 2).encode(split.train_images)[:n]
        self.labels = split.train_labels[:n]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.latents[i], int(self.labels[i])


@pytest.fixture(scope="module")
def digits_init(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "model"
    torch.manual_seed(0)
    MAR(**DIGITS_MODEL).save_pretrained(path)
    return str(path)


def config(out, model, **kw):
    base = dict(output_dir=str(out), model=model, batch_size=32, epochs=100, lr=2e-3, warmup_epochs=0.2,
                ema_rate=0.99, save_every_steps=1000, log_every_steps=5, progress=False, precision="fp32",
                model_kwargs=dict(diffusion_batch_mul=2))
    return TrainConfig(**{**base, **kw})


def test_recipe_pieces():
    model = tiny_mar()
    no_decay, decay = weight_decay_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() > 1 and "diffloss" not in names[id(p)] for p in decay["params"])
    assert any("diffloss" in names[id(p)] and p.dim() > 1 for p in no_decay["params"]) and decay["weight_decay"] == 0.02
    assert learning_rate(10, 1.0, 0, 10, "cosine", 0.1) == pytest.approx(0.1)
    ema, p = [torch.zeros(2)], [torch.ones(2)]
    update_ema(ema, p, 0.75)
    assert torch.allclose(ema[0], torch.full((2,), 0.25))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_follows_the_official_schedule(schedule):
    """util/lr_sched.py of the official code, called with the fractional epoch step / steps_per_epoch:
    0 at the first step, base_lr first reached at the step that ends warmup (2.5 epochs here)."""
    base_lr, min_lr, warmup_epochs, epochs, steps_per_epoch = 8e-4, 1e-5, 2.5, 10, 7

    def official(epoch):
        if epoch < warmup_epochs:
            return base_lr * epoch / warmup_epochs
        if schedule == "constant":
            return base_lr
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))

    for step in range(epochs * steps_per_epoch):
        got = learning_rate(step, base_lr, warmup_epochs * steps_per_epoch, epochs * steps_per_epoch, schedule, min_lr)
        assert got == pytest.approx(official(step / steps_per_epoch), rel=1e-12, abs=1e-20), step
    assert learning_rate(0, base_lr, 4, 10) == 0.0 and learning_rate(4, base_lr, 4, 10) == base_lr


def test_a_non_finite_gradient_skips_the_update(tmp_path, digits_init):
    """A finite loss with a NaN gradient (the second of two steps here) leaves weights, optimizer state and EMA as
    they were (the run equals the one that never took that step's update), with a warning."""
    data = DigitsLatents(256)
    clean = Trainer(config(tmp_path / "clean", digits_init, max_steps=1, save_every_steps=1), dataset=data)
    clean.train()
    trainer = Trainer(config(tmp_path / "nan", digits_init, max_steps=2, save_every_steps=1), dataset=data)
    weight = trainer.model.diffloss.net.input_proj.weight
    weight.register_hook(lambda grad: grad * float("nan") if trainer.step == 1 else grad)
    with pytest.warns(RuntimeWarning, match="non-finite gradient norm at step 1"):
        history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    for a, b in zip(clean.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(clean.ema, trainer.ema):
        assert torch.equal(a, b)
    assert [s["step"] for s in trainer.optimizer.state.values()] == [s["step"] for s in clean.optimizer.state.values()]
    saved = torch.load(tmp_path / "nan" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model_ema"].values())


def test_bad_configs_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError) as err:
        TrainConfig(output_dir=str(tmp_path), model="mar_gigantic", precision="fp16", batch_size=0,
                    data_path=str(tmp_path / "nowhere")).check()
    text = str(err.value)
    for part in ("mar_gigantic", "NaN", "batch_size", "vae_path", "does not exist"):
        assert part in text
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="exactly one of cached_path"):
        TrainConfig(output_dir=str(tmp_path), model="mar_base").check()


@pytest.mark.slow
def test_short_digits_run_lowers_the_loss(tmp_path, digits_init):
    trainer = Trainer(config(tmp_path, digits_init, max_steps=60), dataset=DigitsLatents())
    history = trainer.train()
    assert len(history) == 60 and np.mean(history[-10:]) < 0.8 * np.mean(history[:10])
    loaded = MAR.load(tmp_path / "checkpoint-last.pth")  # the official layout loads as a checkpoint
    ema = MAR.load(tmp_path / "ema")
    assert MAR.load(digits_init).diffusion_batch_mul == 4 and ema.diffusion_batch_mul == 2  # the run's setting
    assert all(torch.equal(loaded.state_dict()[k], ema.state_dict()[k]) for k in ema.state_dict())


def test_resume_reproduces_the_uninterrupted_run(tmp_path, digits_init):
    data = DigitsLatents(256)
    straight = Trainer(config(tmp_path / "a", digits_init, max_steps=8, save_every_steps=4), dataset=data)
    full = straight.train()
    first = Trainer(config(tmp_path / "b", digits_init, max_steps=4, save_every_steps=4), dataset=data)
    part = first.train()
    second = Trainer(config(tmp_path / "b", digits_init, max_steps=8, save_every_steps=4), dataset=data)
    assert second.step == 4
    rest = second.train()
    assert part + rest == full
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema, second.ema):
        assert torch.equal(a, b)


def _worker(rank, world, port, out, init, result_path, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(config(out, init, **overrides), dataset=DigitsLatents(512))
    history = trainer.train()
    if rank == 0:
        np.save(result_path, np.array(history))
    torch.distributed.destroy_process_group()


def run_two_processes(out, init, result_path, **overrides):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(out), init, str(result_path), overrides), nprocs=2, join=True)
    return np.load(result_path).tolist()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, digits_init):
    single = Trainer(config(tmp_path / "one", digits_init, batch_size=32, max_steps=30), dataset=DigitsLatents(512)).train()
    double = run_two_processes(tmp_path / "two", digits_init, tmp_path / "h.npy", batch_size=16, max_steps=30)
    # same global batch (2 x 16 vs 32) and data order; the random draws differ, so compare the curves' levels
    assert abs(np.mean(double[-10:]) - np.mean(single[-10:])) < 0.15 * np.mean(single[-10:])
    assert np.mean(double[-10:]) < 0.8 * np.mean(double[:10])


@pytest.mark.slow
def test_fsdp_run_resumes_exactly(tmp_path, digits_init):
    kw = dict(batch_size=16, fsdp=True, save_every_steps=3)
    full = run_two_processes(tmp_path / "a", digits_init, tmp_path / "a.npy", max_steps=6, **kw)
    part = run_two_processes(tmp_path / "b", digits_init, tmp_path / "b1.npy", max_steps=3, **kw)
    rest = run_two_processes(tmp_path / "b", digits_init, tmp_path / "b2.npy", max_steps=6, **kw)
    assert part + rest == full
    a, b = MAR.load(tmp_path / "a" / "ema"), MAR.load(tmp_path / "b" / "ema")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_cache_latents_is_resumable_and_feeds_training(tmp_path, monkeypatch):
    from PIL import Image

    import marfast.vae as vae_module

    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.RandomState(i).randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    torch.manual_seed(0)
    vae = vae_module.KLAutoencoder(embed_dim=4, ch_mult=(1, 2), ch=32, resolution=16).eval()
    cache_latents(vae, tmp_path / "img", tmp_path / "cache", img_size=16, batch_size=4, progress=False)
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 6
    first = files[0].stat().st_mtime_ns
    files[-1].unlink()
    cache_latents(vae, tmp_path / "img", tmp_path / "cache", img_size=16, batch_size=4, progress=False)
    assert files[0].stat().st_mtime_ns == first and files[-1].exists()
    data = CachedLatents(tmp_path / "cache")
    moments, label = data[4]
    assert moments.shape == (2, 8, 8, 8) and label == 1 and data.classes == ["cat", "dog"]
    cropped = center_crop_image(Image.new("RGB", (100, 40)), 16)
    assert cropped.size == (16, 16)


def test_bad_rates_model_kwargs_and_removed_options_fail_in_check(tmp_path, digits_init):
    def problems(**kw):
        with pytest.raises(ValueError) as err:
            TrainConfig(output_dir=str(tmp_path), cached_path=str(tmp_path), **kw).check()
        return str(err.value)

    assert "lr=-1.0" in problems(lr=-1.0)
    assert "exceeds the peak learning rate" in problems(lr=1e-3, min_lr=2e-3, lr_schedule="cosine")
    assert "exceeds the peak learning rate" in problems(blr=1e-4, batch_size=16, min_lr=1e-5, lr_schedule="cosine")
    assert "only applies to lr_schedule='cosine'" in problems(min_lr=1e-6)
    assert "['diffloss_depth']" in problems(model="mar_base", model_kwargs=dict(diffloss_depth=3))
    assert "['img_size', 'mlp_ratio']" in problems(model="mar_base", model_kwargs=dict(img_size=64, mlp_ratio=2.0))
    assert "['encoder_depth']" in problems(model=digits_init, model_kwargs=dict(encoder_depth=2))
    TrainConfig(output_dir=str(tmp_path), cached_path=str(tmp_path), lr=1e-3, min_lr=1e-3, lr_schedule="cosine",
                model_kwargs=dict(diffloss_d=2, head="transformer", class_num=10)).check()
    with pytest.raises(TypeError):  # it was never read: there is no data loader
        TrainConfig(output_dir=str(tmp_path), num_workers=2)


def test_resume_refuses_a_different_run(tmp_path, digits_init):
    data = DigitsLatents(64)  # 2 steps per epoch
    Trainer(config(tmp_path, digits_init, max_steps=3, save_every_steps=3), dataset=data).train()

    def refusal(dataset=data, **kw):
        with pytest.raises(ValueError, match="cannot resume") as err:
            Trainer(config(tmp_path, digits_init, max_steps=6, **kw), dataset=dataset)
        return str(err.value)

    text = refusal(batch_size=16, seed=7, lr=1e-3, warmup_epochs=1.0, model_kwargs=dict(diffusion_batch_mul=4))
    for name in ("batch_size", "seed", "lr:", "warmup_epochs", "model_kwargs", "diffusion_batch_mul"):
        assert name in text
    assert "data set size: 64 in the checkpoint, 96 now" in refusal(dataset=DigitsLatents(96))
    assert "lr_schedule" in refusal(lr_schedule="cosine")
    # training longer with the constant schedule and other output options are fine
    resumed = Trainer(config(tmp_path, digits_init, max_steps=6, epochs=200, log_every_steps=1, tensorboard=False), dataset=data)
    assert resumed.step == 3


def test_cosine_resume_needs_the_same_schedule_length(tmp_path, digits_init):
    data = DigitsLatents(64)
    Trainer(config(tmp_path, digits_init, max_steps=3, lr_schedule="cosine"), dataset=data).train()
    with pytest.raises(ValueError, match="cosine schedule's length"):
        Trainer(config(tmp_path, digits_init, max_steps=6, lr_schedule="cosine"), dataset=data)
    assert Trainer(config(tmp_path, digits_init, max_steps=3, lr_schedule="cosine"), dataset=data).step == 3


def test_checkpoint_epoch_is_the_last_completed_epoch(tmp_path, digits_init):
    data = DigitsLatents(64)  # 2 steps per epoch
    Trainer(config(tmp_path, digits_init, max_steps=1), dataset=data).train()
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"]) == (1, -1)  # an official resume starts at epoch 0
    Trainer(config(tmp_path, digits_init, max_steps=4), dataset=data).train()
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"]) == (4, 1)  # epochs 0 and 1 done: an official resume starts at 2


def test_cache_keeps_images_that_differ_in_extension_or_case(tmp_path):
    from PIL import Image

    import marfast.vae as vae_module

    names = ("0.png", "0.jpg", "a.JPG", "b.PNG", "c.Jpeg")
    (tmp_path / "img" / "cat").mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / "cat" / name)
    assert len(ImageFolder(tmp_path / "img", 16)) == 5
    torch.manual_seed(0)
    vae = vae_module.KLAutoencoder(embed_dim=4, ch_mult=(1, 2), ch=32, resolution=16).eval()
    cache_latents(vae, tmp_path / "img", tmp_path / "cache", img_size=16, batch_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "cache" / "cat").iterdir()) == sorted(n + ".npz" for n in names)
    (tmp_path / "cache" / "cat" / ".0.png.npz.tmp.npz").write_bytes(b"")  # an interrupted write's leftover
    data = CachedLatents(tmp_path / "cache")
    assert len(data) == 5 and not torch.equal(data[0][0], data[1][0])
    np.savez(tmp_path / "cache" / "cat" / "0.npz", moments=np.zeros(1), moments_flip=np.zeros(1))  # an old-style name
    with pytest.raises(ValueError, match="match no image"):
        cache_latents(vae, tmp_path / "img", tmp_path / "cache", img_size=16, batch_size=2, progress=False)


def test_images_in_nested_folders_are_read_and_cached_in_torchvision_order(tmp_path):
    """root/<class>/ at any depth, as torchvision's ImageFolder (the official reader) lists it: a
    flat listing dropped class/sub/x.png. The cache mirrors the nesting, reads back the same order
    and labels, and no temporary file is left."""
    from PIL import Image

    import marfast.vae as vae_module

    layout = {"cat": ["b.png", "sub/a.png", "sub/deeper/c.png", "z.png"], "dog": ["a/x.png", "y.png"]}
    for c, names in layout.items():
        for i, name in enumerate(names):
            path = tmp_path / "img" / c / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.RandomState(i).randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    images = ImageFolder(tmp_path / "img", 16)
    listed = [(str(f.relative_to(tmp_path / "img")), label) for f, label in images.files]
    assert listed == [("cat/b.png", 0), ("cat/z.png", 0), ("cat/sub/a.png", 0), ("cat/sub/deeper/c.png", 0),
                      ("dog/y.png", 1), ("dog/a/x.png", 1)]
    torch.manual_seed(0)
    vae = vae_module.KLAutoencoder(embed_dim=4, ch_mult=(1, 2), ch=32, resolution=16).eval()
    cache_latents(vae, tmp_path / "img", tmp_path / "cache", img_size=16, batch_size=4, progress=False)
    data = CachedLatents(tmp_path / "cache")
    assert [(str(f.relative_to(tmp_path / "cache")), label) for f, label in data.files] == \
        [(name + ".npz", label) for name, label in listed]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]


def test_atomic_writes_use_a_temporary_name_no_npz_reader_lists(tmp_path):
    from marfast.checkpoint import write_file_atomically, write_npz_atomically

    seen = []
    write_file_atomically(tmp_path / "x.npz", lambda tmp: (seen.append(Path(tmp).name), Path(tmp).write_bytes(b"1")))
    assert seen[0].startswith(".x.npz.") and seen[0].endswith(".tmp")
    write_npz_atomically(tmp_path / "y.npz", a=np.arange(3))
    assert np.array_equal(np.load(tmp_path / "y.npz")["a"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "y.npz"]


def test_digits_recipe_refuses_a_batch_larger_than_the_training_split(tmp_path):
    import argparse

    from marfast.recipes import digits

    parser = digits.add_train_arguments(argparse.ArgumentParser())
    digits.check_train_args(parser, parser.parse_args(["--out", str(tmp_path / "o"), "--batch-size", "1438"]))
    with pytest.raises(SystemExit):
        digits.check_train_args(parser, parser.parse_args(["--out", str(tmp_path / "o"), "--batch-size", "1439"]))
    with pytest.raises(ValueError, match="exceeds the 1438 training images"):
        digits.train(steps=1, batch_size=1439, progress=False, log=lambda *a: None)
