"""Sharded, resumable, class-balanced generation; two gloo processes give the single-process result."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from marfast import MAR
from marfast.diffusion import GaussianDiffusion
from marfast.generate import balanced_labels, generate_npz, to_nhwc_rgb

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
