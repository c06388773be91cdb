"""Sharded, resumable, class-balanced generation; two gloo processes give the single-process result."""
import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from marfast import MAR
from marfast.diffusion import GaussianDiffusion
from marfast.generate import ShardMismatchError, balanced_labels, generate_npz, to_nhwc_rgb

from helpers import tiny_mar


class LatentsAsImages:
    """Stand-in image decoder: latents [B, 3, 4, 4] -> uint8 [B, 3, 4, 4]."""

    def decode(self, latents):
        return ((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def small_model():
    model = tiny_mar(num_sampling_steps="3")
    model.tokenizer = LatentsAsImages()
    return model


def digits_model():
    """The packaged digits model with a 5-step sampler (fast enough for two CPU processes)."""
    model = MAR.load("digits")
    model.diffloss.gen_diffusion = GaussianDiffusion(5)
    return model


def test_balanced_labels_and_layout():
    labels = balanced_labels(25, range(10))
    assert [labels.count(c) for c in range(10)] == [3] * 5 + [2] * 5
    gray = torch.randint(0, 255, (2, 5, 6), dtype=torch.uint8)
    rgb = to_nhwc_rgb(gray)
    assert rgb.shape == (2, 5, 6, 3) and np.array_equal(rgb[..., 2], gray.numpy())
    with pytest.raises(TypeError, match="uint8"):
        to_nhwc_rgb(torch.zeros(1, 3, 4, 4))


def test_generation_is_resumable_and_deterministic(tmp_path):
    model = small_model()
    kwargs = dict(num_images=7, classes=[1, 2, 3], batch_size=2, shard_size=3, num_iter=2, cfg=2.0, seed=5, progress=False)
    merged = generate_npz(model, tmp_path / "a", **kwargs)
    data = np.load(merged)
    assert data["arr_0"].shape == (7, 4, 4, 3) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [1, 2, 3, 1, 2, 3, 1]
    shard = tmp_path / "a" / "shards" / "shard_00001.npz"
    first_mtime = (tmp_path / "a" / "shards" / "shard_00000.npz").stat().st_mtime_ns
    shard.unlink()
    again = np.load(generate_npz(model, tmp_path / "a", **kwargs))
    assert np.array_equal(again["arr_0"], data["arr_0"]) and shard.exists()
    assert (tmp_path / "a" / "shards" / "shard_00000.npz").stat().st_mtime_ns == first_mtime  # not redone
    assert not [p for p in (tmp_path / "a").rglob(".*")]  # no temporary files left


def test_a_rerun_of_another_run_is_refused(tmp_path):
    model = small_model()
    kwargs = dict(num_images=4, classes=[1, 2], batch_size=2, shard_size=2, num_iter=2, seed=0, progress=False)
    generate_npz(model, tmp_path, **kwargs)
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        other_weights.class_emb.weight[0] += 1
    for other_model, changes, differs in [(model, dict(classes=[5, 6]), "classes"),
                                          (model, dict(seed=9), "seed"),
                                          (model, dict(num_images=5), "num_images"),
                                          (model, dict(cfg=3.0, temperature=0.5), "cfg, temperature"),
                                          (model, dict(autocast="bf16"), "autocast"),
                                          (other_weights, {}, "weights_sha256")]:
        with pytest.raises(ShardMismatchError, match=f"differs in {differs}\\b.*delete"):
            generate_npz(other_model, tmp_path, **{**kwargs, **changes})
    assert not (tmp_path / "samples_5.npz").exists()
    assert np.load(generate_npz(model, tmp_path, **kwargs))["labels"].tolist() == [1, 2, 1, 2]


def test_merge_checks_every_shard(tmp_path):
    model = small_model()
    kwargs = dict(num_images=4, classes=[1, 2], batch_size=2, shard_size=2, num_iter=2, seed=0, progress=False)
    generate_npz(model, tmp_path, **kwargs)
    shard = tmp_path / "shards" / "shard_00001.npz"
    np.savez(shard, arr_0=np.zeros((1, 4, 4, 3), np.uint8), labels=np.array([7]))
    with pytest.raises(ShardMismatchError, match="shard_00001.npz does not hold this run's shard"):
        generate_npz(model, tmp_path, **kwargs)
    (tmp_path / "shards" / "manifest.json").unlink()
    with pytest.raises(ShardMismatchError, match="holds shards without a manifest.json"):
        generate_npz(model, tmp_path, **kwargs)


def test_runs_with_neighbouring_seeds_share_no_shard(tmp_path):
    model = small_model()
    kwargs = dict(num_images=4, classes=[1], batch_size=2, shard_size=2, num_iter=2, progress=False)
    first = np.load(generate_npz(model, tmp_path / "seed0", seed=0, **kwargs))["arr_0"]
    second = np.load(generate_npz(model, tmp_path / "seed1", seed=1, **kwargs))["arr_0"]
    assert not np.array_equal(second[:2], first[2:])


@pytest.mark.parametrize("change,error,message", [
    (dict(classes=[]), ValueError, "at least one class"),
    (dict(classes=[1, 10]), ValueError, "labels must lie in 0..9"),
    (dict(seed=-1), ValueError, "seed must be an integer"),
    (dict(cfg=float("nan")), ValueError, "cfg must be finite"),
    (dict(tokenizer=None), ValueError, "needs a tokenizer"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, change, error, message):
    model = small_model()
    if "tokenizer" in change:
        model.tokenizer = change.pop("tokenizer")
    kwargs = dict(num_images=3, classes=[1, 2], batch_size=2, shard_size=2, num_iter=2, progress=False)
    with pytest.raises(error, match=message):
        generate_npz(model, tmp_path / "out", **{**kwargs, **change})
    assert not (tmp_path / "out").exists()


def _worker(rank, world, port, out_dir, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    generate_npz(digits_model(), out_dir, **kwargs)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one_on_the_digits_model(tmp_path):
    kwargs = dict(num_images=6, classes=range(10), batch_size=2, shard_size=2, num_iter=2, cfg=2.0, seed=0,
                  progress=False)
    single = np.load(generate_npz(digits_model(), tmp_path / "single", **kwargs))
    assert single["arr_0"].shape == (6, 8, 8, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "multi"), kwargs), nprocs=2, join=True)
    multi = np.load(tmp_path / "multi" / "samples_6.npz")
    assert np.array_equal(multi["arr_0"], single["arr_0"]) and np.array_equal(multi["labels"], single["labels"])
    again = np.load(generate_npz(digits_model(), tmp_path / "multi", **kwargs))  # the ranks' manifest fits
    assert np.array_equal(again["arr_0"], single["arr_0"])
