"""The shipped `digits` model: tokenizer, packaged weights, measured quality, CLI and recipe.

Quality is judged by a classifier and a PCA feature space fitted on the real TRAINING split
(marfast.recipes.digits_quality); the held-out split is only compared to.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marfast import MAR
from marfast.checkpoint import PACKAGED_MODELS_DIR
from marfast.cli import main as cli_main
from marfast.tokenizer import PixelPatchTokenizer, build_tokenizer

pytest.importorskip("sklearn", reason="the digits quality tests need scikit-learn (the package's test extra)")
from marfast.recipes import digits as recipe  # noqa: E402
from marfast.recipes.digits_quality import (  # noqa: E402
    DEFAULT_CFG, DEFAULT_NUM_ITER, DigitsJudge, evaluate, format_metrics, frechet_distance)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The digits model is tiny: one thread is as fast as several and, unlike several, is not slowed
    down tenfold when other jobs share the CPU. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_model():
    return MAR.load("digits")


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge()


# ------------------------------------------------------------------------------------------------
# tokenizer
def test_tokenizer_round_trip_and_patch_layout():
    gen = torch.Generator().manual_seed(0)
    tok = PixelPatchTokenizer(img_size=8, patch_size=2)
    images = torch.randint(0, 256, (5, 8, 8), generator=gen, dtype=torch.uint8)
    latents = tok.encode(images)
    assert latents.dtype == torch.float32 and latents.shape == (5, 4, 4, 4)
    assert latents.min() >= -1.0 and latents.max() <= 1.0
    # token (i, j) holds the 2 x 2 patch at rows 2i..2i+1, columns 2j..2j+1, row-major
    patch = images[3, 2:4, 4:6].reshape(-1).double() * (2.0 / 255.0) - 1.0
    torch.testing.assert_close(latents[3, :, 1, 2].double(), patch, rtol=0, atol=1e-6)
    assert torch.equal(tok.decode(latents), images)
    assert torch.equal(tok.decode(tok.encode(images.unsqueeze(1))), images)
    assert (tok.decode(torch.full((1, 4, 4, 4), 7.5)) == 255).all()  # clamped to [-1, 1]
    assert (tok.decode(torch.full((1, 4, 4, 4), -7.5)) == 0).all()

    rgb = PixelPatchTokenizer(img_size=4, patch_size=2, channels=3)
    images = torch.randint(0, 256, (2, 3, 4, 4), generator=gen, dtype=torch.uint8)
    assert rgb.encode(images).shape == (2, 12, 2, 2)
    assert torch.equal(rgb.decode(rgb.encode(images)), images)


def test_tokenizer_config_and_bad_inputs():
    tok = PixelPatchTokenizer(img_size=8, patch_size=2)
    config = json.loads(json.dumps(tok.config))
    assert config["type"] == "pixel_patch"
    assert build_tokenizer(config).config == tok.config
    with pytest.raises(TypeError, match="uint8"):
        tok.encode(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        tok.encode(torch.zeros(2, 6, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        tok.decode(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        tok.decode(torch.full((1, 4, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer({"type": "vae"})
    with pytest.raises(ValueError, match="bad 'pixel_patch' tokenizer config"):
        build_tokenizer({"type": "pixel_patch", "img_size": 8, "patch": 2})
    with pytest.raises(ValueError, match="divisible"):
        PixelPatchTokenizer(img_size=8, patch_size=3)


# ------------------------------------------------------------------------------------------------
# packaged weights and the sample API
def test_packaged_model_files_and_config(digits_model):
    folder = PACKAGED_MODELS_DIR / "digits"
    assert (folder / "model.safetensors").stat().st_size < 5 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["tokenizer"] == {"type": "pixel_patch", "img_size": 8, "patch_size": 2, "channels": 1}
    assert config["sample_clip"] == [-1.0, 1.0]
    assert isinstance(digits_model.tokenizer, PixelPatchTokenizer)
    assert digits_model.sample_clip == (-1.0, 1.0) and digits_model.num_classes == 10
    assert not any(k.startswith("tokenizer") for k in digits_model.state_dict())


def test_sample_returns_one_uint8_image_per_label_reproducibly(digits_model):
    images = digits_model.sample(labels=[3, 1, 4], seed=7, num_iter=4, cfg=DEFAULT_CFG, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 8, 8)
    again = digits_model.sample(labels=torch.tensor([3, 1, 4]), seed=7, num_iter=4, cfg=DEFAULT_CFG, progress=False)
    assert torch.equal(images, again)
    other = digits_model.sample(labels=[3, 1, 4], seed=8, num_iter=4, cfg=DEFAULT_CFG, progress=False)
    assert not torch.equal(images, other)
    pictures = digits_model.sample(labels=[3, 1, 4], seed=7, num_iter=4, cfg=DEFAULT_CFG, progress=False, pil=True)
    assert [p.size for p in pictures] == [(8, 8)] * 3
    assert np.array_equal(np.asarray(pictures[1]), images[1].numpy())


# ------------------------------------------------------------------------------------------------
# measured quality
def test_frechet_distance_matches_closed_form():
    gen = np.random.default_rng(0)
    a = gen.normal(size=(4000, 3))
    b = gen.normal(size=(4000, 3)) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I): |mu|^2 + tr(I) + tr(4I) - 2 tr(2I) = 3 + 3 + 12 - 12 = 6
    assert abs(frechet_distance(a, b) - 6.0) < 0.4
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_generated_digits_are_recognised_cover_all_classes_and_are_close_to_heldout(digits_model, judge):
    metrics = evaluate(digits_model, judge, per_class=20, cfg=DEFAULT_CFG, num_iter=DEFAULT_NUM_ITER,
                       unconditional=100, seed=0)
    print("\n" + format_metrics(metrics))
    assert metrics["classifier_heldout_accuracy"] > 0.95
    assert metrics["accuracy"] >= 0.95
    assert all(count > 0 for count in metrics["unconditional_class_counts"])
    ref = metrics["fd_reference"]
    # References at the same sample size: real training digits are the floor (sampling noise
    # only); training digits with visible pixel noise (std 96 of 255) or a 3 x 3 blur are what
    # clearly degraded digits score. Generated digits must beat both degraded references.
    # Measured values: marfast/weights/digits/METRICS.md.
    assert ref["real_train"] < ref["noisy_train"] < ref["blurred_train"]
    assert metrics["fd_generated"] < ref["noisy_train"]


# ------------------------------------------------------------------------------------------------
# CLI
def test_cli_sample_writes_labelled_grid(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert cli_main(["sample", "--model", "digits", "--classes", "0", "7", "--per-class", "3", "--num-iter", "4",
                     "--seed", "1", "--scale", "4", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sampled 6 images (2 classes x 3)" in printed and str(out) in printed and " s" in printed
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 2 and grid.shape[0] == 2 * (8 * 4 + 2) + 2
    label_column = grid[:, :20]
    assert (label_column < 128).any(), "class labels are drawn at the row starts"


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "cannot load model 'no-such-model'"),
    (["--classes", "3", "10"], "class 10 is out of range"),
    (["--classes", "-1"], "class -1 is out of range"),
    (["--per-class", "0"], "--per-class must be at least 1"),
    (["--num-iter", "17"], "--num-iter must lie in 1..16"),
    (["--out", "/no/such/dir/grid.png"], "does not exist"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_cli_sample_bad_arguments_exit_2(tmp_path, capsys, args, message):
    argv = ["sample", "--device", "cpu", "--out", str(tmp_path / "grid.png"), *args]
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_cli_runs_as_a_module_without_scikit_learn(tmp_path):
    """`python -m marfast.cli sample` on the packaged weights, with scikit-learn made unimportable."""
    out = tmp_path / "g.png"
    argv = ["marfast", "sample", "--classes", "5", "--per-class", "1", "--num-iter", "2", "--device", "cpu",
            "--threads", "1", "--out", str(out)]
    script = ("import runpy, sys; sys.modules['sklearn'] = None; "
              f"sys.argv = {argv!r}; runpy.run_module('marfast.cli', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "wrote" in result.stdout


# ------------------------------------------------------------------------------------------------
# training recipe
def test_split_is_fixed_stratified_and_disjoint():
    split = recipe.digits_split()
    assert len(split.train_labels) + len(split.heldout_labels) == 1797
    held_counts = torch.bincount(split.heldout_labels, minlength=10)
    assert held_counts.min() >= 34 and held_counts.max() <= 37
    train_rows = {tuple(x.tolist()) for x in split.train_images.reshape(-1, 64)}
    overlap = sum(tuple(x.tolist()) in train_rows for x in split.heldout_images.reshape(-1, 64))
    assert overlap <= 2, "held-out digits are (up to exact duplicates in the data set) not in the training split"
    again = recipe.digits_split()
    assert torch.equal(again.heldout_images, split.heldout_images)


def test_training_is_reproducible_from_a_seed():
    first, _ = recipe.train(steps=3, batch_size=16, seed=5, progress=False, log=lambda *_: None)
    second, _ = recipe.train(steps=3, batch_size=16, seed=5, progress=False, log=lambda *_: None)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_recipe_runs_end_to_end_and_clipping_keeps_a_short_run_bounded(tmp_path):
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, "-m", "marfast.recipes.digits", "--steps", "20", "--batch-size", "32",
                             "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "trained 20 steps" in result.stdout and "images/s" in result.stdout
    assert "20/20" in result.stdout + result.stderr, "progress bar"
    model = MAR.load(out)
    assert model.sample_clip == (-1.0, 1.0)
    labels = torch.arange(6)
    bounded = model.sample_tokens(6, 4, cfg=DEFAULT_CFG, labels=labels, generator=torch.Generator().manual_seed(0))
    assert bounded.abs().max() <= 1.0
    model.sample_clip = None
    diverged = model.sample_tokens(6, 4, cfg=DEFAULT_CFG, labels=labels, generator=torch.Generator().manual_seed(0))
    assert diverged.abs().max() > 100.0, "without x0 clipping a briefly trained model diverges"


def test_recipe_bad_arguments_exit_2(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        recipe.main(["--steps", "0", "--out", str(tmp_path / "m")])
    assert exc.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        recipe.main(["--out", str(blocker / "m")])
    assert exc.value.code == 2 and "not a writable directory" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(SystemExit) as exc:
        recipe.main(["--out", str(tmp_path / "m")])
    assert exc.value.code == 2 and "needs scikit-learn" in capsys.readouterr().err
