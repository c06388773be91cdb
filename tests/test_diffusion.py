"""Diffusion tables, respacing and one reverse step against an independent float64 NumPy computation."""
import math

import numpy as np
import pytest
import torch

from marfast.diffusion import GaussianDiffusion, parse_num_steps, space_timesteps, timestep_embedding


def numpy_tables(num_steps):
    """Independent float64 derivation of the respaced cosine schedule (closed-form indices)."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    abar = np.cumprod(1 - betas)
    kept = list(range(1000)) if num_steps == 1000 else [int(round(k * 999 / (num_steps - 1))) for k in range(num_steps)]
    abar_kept = abar[kept]
    prev = np.concatenate([[1.0], abar_kept[:-1]])
    new_betas = 1 - abar_kept / prev
    post_var = new_betas * (1 - prev) / (1 - abar_kept)
    return dict(kept=kept, betas=new_betas, abar=abar_kept, prev=prev, post_var=post_var,
                post_logvar=np.log(np.concatenate([post_var[1:2], post_var[1:]])),
                coef1=new_betas * np.sqrt(prev) / (1 - abar_kept),
                coef2=(1 - prev) * np.sqrt(1 - new_betas) / (1 - abar_kept))


@pytest.mark.parametrize("num_steps", [1000, 100, 50, 25, 7])
def test_tables_match_independent_float64(num_steps):
    d = GaussianDiffusion(num_steps)
    ref = numpy_tables(num_steps)
    assert d.timestep_map.tolist() == ref["kept"]
    for name, key in [("betas", "betas"), ("alphas_cumprod", "abar"), ("alphas_cumprod_prev", "prev"),
                      ("posterior_variance", "post_var"), ("posterior_log_variance_clipped", "post_logvar"),
                      ("posterior_mean_coef1", "coef1"), ("posterior_mean_coef2", "coef2")]:
        table = getattr(d, name)
        assert table.dtype == torch.float64
        np.testing.assert_allclose(table.numpy(), ref[key], rtol=1e-12, atol=1e-15, err_msg=name)


def test_respacing_first_last_and_official_100():
    kept = space_timesteps(1000, 100)
    assert kept[0] == 0 and kept[-1] == 999 and len(set(kept)) == 100
    assert kept[:6] == [0, 10, 20, 30, 40, 50] and kept[10] == 101
    assert space_timesteps(1000, 1) == [0]


def test_cosine_betas_are_clipped_and_increasing():
    d = GaussianDiffusion(1000)
    assert d.betas.max().item() == pytest.approx(0.999)
    assert torch.all(d.betas[1:] >= d.betas[:-1] - 1e-12)


@pytest.mark.parametrize("value,expected", [("100", 100), (100, 100), (" 25", 25)])
def test_num_steps_parsing(value, expected):
    assert parse_num_steps(value) == expected


@pytest.mark.parametrize("bad", ["ddim", "0", 0, 1001, -3, 2.5, True, None])
def test_num_steps_rejects_bad_values(bad):
    with pytest.raises((ValueError, TypeError)):
        parse_num_steps(bad)


def test_one_reverse_step_matches_numpy():
    d = GaussianDiffusion(100)
    ref = numpy_tables(100)
    g = torch.Generator().manual_seed(0)
    n, c, step, temperature = 5, 3, 40, 0.7
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    eps = torch.randn(n, c, generator=g, dtype=torch.float64)
    v = torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(n, c, generator=g, dtype=torch.float64)
    out = d.p_sample_step(eps, v, x, step, noise, temperature)

    xn, en, vn, nn_ = (a.numpy() for a in (x, eps, v, noise))
    abar = ref["abar"][step]
    x0 = np.sqrt(1 / abar) * xn - np.sqrt(1 / abar - 1) * en
    mean = ref["coef1"][step] * x0 + ref["coef2"][step] * xn
    frac = (vn + 1) / 2
    log_var = frac * np.log(ref["betas"][step]) + (1 - frac) * ref["post_logvar"][step]
    expected = mean + np.exp(0.5 * log_var) * nn_ * temperature
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    # the last step adds no noise
    last = d.p_sample_step(eps, v, x, 0, noise, temperature)
    x0 = np.sqrt(1 / ref["abar"][0]) * xn - np.sqrt(1 / ref["abar"][0] - 1) * en
    np.testing.assert_allclose(last.numpy(), ref["coef1"][0] * x0 + ref["coef2"][0] * xn, rtol=1e-12, atol=1e-12)


def test_clip_x0_clamps_the_prediction():
    d = GaussianDiffusion(10)
    x = torch.full((2, 2), 50.0, dtype=torch.float64)
    eps = torch.zeros_like(x)
    v = torch.zeros_like(x)
    unclipped = d.p_sample_step(eps, v, x, 0, torch.zeros_like(x))
    clipped = d.p_sample_step(eps, v, x, 0, torch.zeros_like(x), clip_x0=(-1.0, 1.0))
    assert unclipped.min() > 40 and clipped.max() <= 1.0 + 1e-9


def test_timestep_embedding_layout():
    t = torch.tensor([0, 999])
    emb = timestep_embedding(t, 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    expected = torch.cat([torch.cos(999 * freqs), torch.sin(999 * freqs)])
    torch.testing.assert_close(emb[1].double(), expected, rtol=0, atol=2e-4)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
