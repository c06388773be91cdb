"""DiffLoss: official state-dict layout, denoiser semantics, loss, sampler conventions, bad input."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from marfast import DiffLoss
from marfast.checkpoint import CheckpointError, load_state_dict_checked
from marfast.diffloss import ddpm_sample_loop_reference
from marfast.diffusion import GaussianDiffusion

from helpers import official_key_shapes

RELEASED_HEADS = {"mar_base": (6, 1024, 768), "mar_large": (8, 1280, 1024), "mar_huge": (12, 1536, 1280)}


def small_head(dtype=torch.float64, steps="5", seed=0, randomize=True):
    torch.manual_seed(seed)
    head = DiffLoss(target_channels=3, z_channels=6, depth=2, width=20, num_sampling_steps=steps).to(dtype)
    if randomize:  # official init zeroes the adaLN and final layers; exercise every weight
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.3)
    return head


@pytest.mark.parametrize("preset", sorted(RELEASED_HEADS))
def test_state_dict_matches_official_head(preset):
    depth, width, z = RELEASED_HEADS[preset]
    official = {k[len("diffloss."):]: v for k, v in official_key_shapes()[preset].items() if k.startswith("diffloss.")}
    with torch.device("meta"):
        head = DiffLoss(16, z, depth, width, "100")
    mine = {k: list(v.shape) for k, v in head.state_dict().items()}
    assert mine == official


def test_official_state_dict_loads_strictly_and_round_trips():
    official = {k[len("diffloss."):]: v for k, v in official_key_shapes()["mar_base"].items() if k.startswith("diffloss.")}
    state = {k: torch.randn(shape) for k, shape in official.items()}
    head = DiffLoss(16, 768, 6, 1024, 100)
    head.load_state_dict(state, strict=True)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in state.items())
    bad = dict(state)
    bad.pop("net.cond_embed.weight")
    bad["net.final_layer.linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"missing keys: net.cond_embed.weight.*shape mismatches: net.final_layer.linear.weight"):
        load_state_dict_checked(head, bad)


def functional_net(sd, x, t, c, depth):
    """The denoiser written from the spec, independently of the module code (float64)."""
    lin = lambda name, h: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])
    # the official embedding is computed in float32 whatever the model dtype
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs
    feats = torch.cat([args.cos(), args.sin()], -1).double()
    temb = lin("net.time_embed.mlp.2", F.silu(lin("net.time_embed.mlp.0", feats)))
    y = temb + lin("net.cond_embed", c)
    h = lin("net.input_proj", x)
    for i in range(depth):
        p = f"net.res_blocks.{i}"
        shift, scale, gate = lin(p + ".adaLN_modulation.1", F.silu(y)).chunk(3, -1)
        n = F.layer_norm(h, h.shape[-1:], sd[p + ".in_ln.weight"], sd[p + ".in_ln.bias"], 1e-6)
        h = h + gate * lin(p + ".mlp.2", F.silu(lin(p + ".mlp.0", n * (1 + scale) + shift)))
    shift, scale = lin("net.final_layer.adaLN_modulation.1", F.silu(y)).chunk(2, -1)
    n = F.layer_norm(h, h.shape[-1:], eps=1e-6)
    return lin("net.final_layer.linear", n * (1 + scale) + shift)


def test_denoiser_matches_spec():
    head = small_head()
    x, c = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 99, 500, 998, 999])
    out = head.net(x, t, c)
    assert out.shape == (7, 6)
    torch.testing.assert_close(out, functional_net(head.state_dict(), x, t, c, 2), rtol=1e-6, atol=1e-6)


def spec_loss(head, target, z, t, noise):
    """Per-row loss from the spec: eps MSE + variational bound in bits (KL, or decoder NLL at t=0)."""
    d = GaussianDiffusion(1000)
    abar = d.alphas_cumprod[t][:, None]
    x_t = abar.sqrt() * target + (1 - abar).sqrt() * noise
    out = head.net(x_t, t, z)
    eps, v = out[:, :3], out[:, 3:]
    x0 = (1 / abar).sqrt() * x_t - (1 / abar - 1).sqrt() * eps.detach()
    c1, c2 = d.posterior_mean_coef1[t][:, None], d.posterior_mean_coef2[t][:, None]
    min_log, max_log = d.posterior_log_variance_clipped[t][:, None], d.betas[t].log()[:, None]
    log_var = (v + 1) / 2 * max_log + (1 - (v + 1) / 2) * min_log
    mean, true_mean = c1 * x0 + c2 * x_t, c1 * target + c2 * x_t
    kl = 0.5 * (-1 + log_var - min_log + (min_log - log_var).exp() + (true_mean - mean) ** 2 * (-log_var).exp())
    cdf = lambda u: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    inv = (-0.5 * log_var).exp()
    lo, hi = cdf(inv * (target - mean - 1 / 255)), cdf(inv * (target - mean + 1 / 255))
    logp = torch.where(target < -0.999, hi.clamp(min=1e-12).log(),
                       torch.where(target > 0.999, (1 - lo).clamp(min=1e-12).log(), (hi - lo).clamp(min=1e-12).log()))
    vb = torch.where(t == 0, -logp.mean(-1), kl.mean(-1)) / math.log(2)
    return ((noise - eps) ** 2).mean(-1) + vb


def test_forward_loss_matches_spec_and_is_deterministic():
    head = small_head()
    n = 9
    target = torch.rand(n, 3, dtype=torch.float64) * 2.4 - 1.2  # some rows past +-0.999
    z = torch.randn(n, 6, dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 2, 50, 300, 700, 998, 999])
    noise = torch.randn(n, 3, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.float64)
    loss = head(target, z, mask, t=t, noise=noise)
    per_row = spec_loss(head, target, z, t, noise)
    torch.testing.assert_close(loss, (per_row * mask).sum() / mask.sum(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(head(target, z, t=t, noise=noise), per_row.mean(), rtol=1e-9, atol=1e-9)
    assert torch.equal(head(target, z, mask, t=t, noise=noise), loss)


def test_forward_backward_reaches_every_parameter():
    head = small_head(torch.float32)
    loss = head(torch.randn(16, 3), torch.randn(16, 6, requires_grad=True))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_grad_checkpointing_gives_same_gradients():
    a = small_head(torch.float64)
    b = small_head(torch.float64)
    b.net.grad_checkpointing = True
    args = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64))
    kw = dict(t=torch.randint(0, 1000, (8,)), noise=torch.randn(8, 3, dtype=torch.float64))
    a(*args, **kw).backward()
    b(*args, **kw).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def manual_cfg_loop(head, z, x_half, cfg, temperature, noise_fn):
    """The official sampler convention written out: 2B rows, eps-only guidance."""
    d = head.gen_diffusion
    x = torch.cat([x_half, x_half])
    for step in reversed(range(d.num_timesteps)):
        t = torch.full((x.shape[0],), int(d.timestep_map[step]))
        half = x[: len(x) // 2]
        out = head.net(torch.cat([half, half]), t, z)
        eps, v = out[:, :3], out[:, 3:]
        ce, ue = eps.chunk(2)
        mixed = ue + cfg * (ce - ue)
        x = d.p_sample_step(torch.cat([mixed, mixed]), v, x, step, noise_fn(step), temperature)
    return x


def test_sample_cfg_follows_official_conventions():
    head = small_head()
    b = 4
    z = torch.randn(2 * b, 6, dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    # the same generator stream: x_T drawn first (B rows), then 2B rows of noise per step
    out = head.sample(z, temperature=0.8, cfg=2.5, generator=g1)
    x_half = torch.randn(b, 3, dtype=torch.float64, generator=g2)
    expected = manual_cfg_loop(head, z, x_half, 2.5, 0.8, lambda s: torch.randn(2 * b, 3, dtype=torch.float64, generator=g2))
    assert out.shape == (2 * b, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_sample_cfg_with_equal_halves_equals_plain_sampling():
    head = small_head()
    z = torch.randn(3, 6, dtype=torch.float64)
    noise = torch.randn(3, 3, dtype=torch.float64)
    plain = head.sample(z, temperature=0.0, noise=noise)
    guided = head.sample(torch.cat([z, z]), temperature=0.0, cfg=4.0, noise=noise)
    torch.testing.assert_close(guided[:3], plain, rtol=1e-12, atol=1e-12)


def test_sample_is_deterministic_with_noise_and_zero_temperature():
    head = small_head()
    z = torch.randn(5, 6, dtype=torch.float64)
    noise = torch.randn(5, 3, dtype=torch.float64)
    a = head.sample(z, temperature=0.0, noise=noise)
    torch.manual_seed(123)
    b = head.sample(z, temperature=0.0, noise=noise)
    assert torch.equal(a, b) and a.dtype == torch.float64
    c = head.sample(z, 1.0, generator=torch.Generator().manual_seed(1))
    d = head.sample(z, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, d) and not torch.equal(c, head.sample(z, 1.0, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_in_low_precision_returns_float32(dtype):
    head = small_head(dtype)
    out = head.sample(torch.randn(4, 6, dtype=dtype), cfg=1.5 if dtype == torch.float32 else 1.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    head = small_head()
    z = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="channels"):
        head.sample(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="even number of rows"):
        head.sample(z[:3], cfg=2.0)
    with pytest.raises(ValueError, match="temperature"):
        head.sample(z, temperature=-0.1)
    with pytest.raises(ValueError, match="temperature must be a number or a one-element tensor"):
        head.sample(z, temperature=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="noise must have shape"):
        head.sample(z, noise=torch.randn(3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        head.sample(torch.ones(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="same number of rows"):
        head(torch.randn(3, 3, dtype=torch.float64), z)
    with pytest.raises(ValueError, match="t must"):
        head(torch.randn(4, 3, dtype=torch.float64), z, t=torch.tensor([0, 1, 2, 1000]))
    with pytest.raises(ValueError, match="mask must have shape"):
        head(torch.randn(4, 3, dtype=torch.float64), z, torch.ones(5))
    with pytest.raises(ValueError, match="backend"):
        DiffLoss(3, 6, 1, 8, "10", backend="cuda")


def test_num_sampling_steps_string_or_int():
    assert DiffLoss(3, 6, 1, 8, "25").gen_diffusion.num_timesteps == 25
    assert DiffLoss(3, 6, 1, 8, 25).gen_diffusion.timestep_map.tolist() == DiffLoss(3, 6, 1, 8, "25").gen_diffusion.timestep_map.tolist()


class GaussianOracle(torch.nn.Module):
    """The exact eps of a 1-D Gaussian N(mu, s^2) target, with v = +1 (variance = beta)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
        self.input_proj = torch.nn.Linear(1, 1).double()
        self.abar = GaussianDiffusion(1000).alphas_cumprod

    def forward(self, x, t, c):
        a = self.abar[t][:, None]
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)
        return torch.cat([eps, torch.ones_like(eps)], -1)


def test_sampler_with_exact_eps_recovers_the_gaussian():
    """With the exact eps the 1000-step sampler draws from the target (mean and spread)."""
    n, mu, s = 5000, 0.7, 0.2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, dtype=torch.float64, generator=g)
    out = ddpm_sample_loop_reference(GaussianOracle(mu, s), GaussianDiffusion(1000), torch.zeros(n, 1, dtype=torch.float64),
                                     x, 1.0, 1.0, lambda step: torch.randn(n, 1, dtype=torch.float64, generator=g))
    assert abs(out.mean().item() - mu) < 0.01
    assert abs(out.std().item() - s) < 0.01


def mixture_batch(n, generator):
    """x | z: two Gaussian modes at +-m(z) (std 0.1) with m(z) = (z0, 0.5 + 0.3 z1)."""
    z = torch.rand(n, 2, generator=generator) * 2 - 1
    modes = torch.stack([z[:, 0], 0.5 + 0.3 * z[:, 1]], -1)
    sign = torch.where(torch.rand(n, 1, generator=generator) < 0.5, -1.0, 1.0)
    return sign * modes + 0.1 * torch.randn(n, 2, generator=generator), z, modes


@pytest.mark.slow
def test_head_learns_a_conditional_mixture():
    """A small head trained for a few hundred steps samples the right modes and spreads.

    The x0 prediction is clipped to the data range: at the first respaced step an eps error is
    amplified ~600x (sqrt(abar_prev / abar_999)), which a briefly trained head cannot avoid.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = DiffLoss(target_channels=2, z_channels=3, depth=2, width=96, num_sampling_steps="50")
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(500):
        x, z, _ = mixture_batch(512, g)
        drop = (torch.rand(512, 1, generator=g) < 0.1).float()  # label drop: z = 0 row, flag 1
        cond = torch.cat([z * (1 - drop), drop], -1)
        loss = head(x, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    n = 1000
    clip = (-2.0, 2.0)
    _, z, modes = mixture_batch(n, g)
    cond = torch.cat([z, torch.zeros(n, 1)], -1)
    uncond = torch.cat([torch.zeros(n, 2), torch.ones(n, 1)], -1)
    with torch.no_grad():
        for samples in (head.sample(cond, generator=g, clip_x0=clip),
                        head.sample(torch.cat([cond, uncond]), cfg=1.5, generator=g, clip_x0=clip)[:n]):
            dist_pos = (samples - modes).norm(dim=-1)
            dist_neg = (samples + modes).norm(dim=-1)
            near = torch.minimum(dist_pos, dist_neg)
            frac_pos = (dist_pos < dist_neg).float().mean().item()
            resid = torch.where((dist_pos < dist_neg)[:, None], samples - modes, samples + modes)
            assert 0.4 < frac_pos < 0.6, frac_pos  # both modes, equal weight
            assert near.median() < 0.2, near.median()  # samples sit on the modes
            std = resid.std(dim=0)
            assert torch.all((std > 0.05) & (std < 0.2)), std  # the right spread (0.1)
            assert resid.mean(dim=0).abs().max() < 0.05  # centred on the modes


def test_triton_backend_off_cuda_needs_the_interpreter_from_import_time():
    """Triton reads TRITON_INTERPRET when the kernels are defined: set only after importing marfast,
    the triton backend refuses CPU tensors with the reason instead of failing inside Triton."""
    script = ("import os, torch\n"
              "from marfast import DiffLoss\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "head = DiffLoss(3, 6, 1, 8, '4', backend='triton')\n"
              "for call in (lambda: head(torch.randn(2, 3), torch.randn(2, 6)), lambda: head.sample(torch.randn(2, 6))):\n"
              "    try:\n"
              "        call()\n"
              "    except RuntimeError as err:\n"
              "        print(err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("set before marfast is imported" in line for line in lines), done.stdout
