"""marfast.accelerate: swap marfast's DiffLoss into a MAR-style model from another codebase."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import marfast
from marfast import DiffLoss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class ForeignBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))


class ForeignFinal(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))


class ForeignNet(nn.Module):
    """Another codebase's denoiser with the official parameter names; forward written functionally."""

    def __init__(self, channels, width, z_channels, depth):
        super().__init__()
        self.time_embed = nn.Module()
        self.time_embed.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList([ForeignBlock(width) for _ in range(depth)])
        self.final_layer = ForeignFinal(width, 2 * channels)

    def forward(self, x, t, c):
        freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
        angles = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(x.dtype)
        y = self.time_embed.mlp(features) + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.res_blocks:
            shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=1)
            h = h + gate * block.mlp(block.in_ln(h) * (1 + scale) + shift)
        shift, scale = self.final_layer.adaLN_modulation(y).chunk(2, dim=1)
        return self.final_layer.linear(F.layer_norm(h, h.shape[1:], eps=1e-6) * (1 + scale) + shift)


class ForeignHead(nn.Module):
    def __init__(self, channels, z_channels, depth, width, steps):
        super().__init__()
        self.net = ForeignNet(channels, width, z_channels, depth)
        self.gen_diffusion = type("Spaced", (), {"num_timesteps": steps})()


class ForeignMAR(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.z_proj = nn.Linear(8, 8)
        self.diffloss = head


def foreign_model(dtype=torch.float64, steps=3, seed=0):
    torch.manual_seed(seed)
    head = ForeignHead(channels=16, z_channels=24, depth=2, width=40, steps=steps)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    return ForeignMAR(head).to(dtype)


def test_accelerate_swaps_the_head_in_place_with_the_same_weights():
    model = foreign_model().eval()
    old_head, z_proj = model.diffloss, model.z_proj
    old_state = {k: v.clone() for k, v in old_head.state_dict().items()}
    assert marfast.accelerate(model) is model
    head = model.diffloss
    assert isinstance(head, DiffLoss) and head is not old_head and model.z_proj is z_proj
    assert head.num_sampling_steps == 3 and head.backend == "auto" and not head.training
    new_state = head.state_dict()
    assert list(new_state) == list(old_state)
    assert all(torch.equal(new_state[k], v) and new_state[k].dtype == v.dtype for k, v in old_state.items())

    x, c = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 24, dtype=torch.float64)
    t = torch.tensor([0, 17, 500, 998, 999])
    torch.testing.assert_close(head.net(x, t, c), old_head.net(x, t, c), rtol=1e-12, atol=1e-12)


def test_accelerate_keeps_dtype_and_sampling_runs_fused():
    model = foreign_model(torch.float32, steps=3, seed=1)
    reference = DiffLoss(16, 24, 2, 40, 3, backend="torch")
    reference.load_state_dict(model.diffloss.state_dict())
    marfast.accelerate(model.to(DEVICE), backend="triton")
    assert model.diffloss.training and model.diffloss.net.input_proj.weight.dtype == torch.float32
    z, noise = torch.randn(6, 24, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    fused = model.diffloss.sample(z, temperature=0.0, cfg=2.0, noise=noise)
    expected = reference.to(DEVICE).sample(z, temperature=0.0, cfg=2.0, noise=noise)
    torch.testing.assert_close(fused[:3], expected[:3], rtol=1e-4, atol=1e-4)


def test_accelerate_keeps_low_precision_weights():
    model = foreign_model(torch.bfloat16)
    marfast.accelerate(model, num_sampling_steps="5")
    assert model.diffloss.num_sampling_steps == 5
    assert all(p.dtype == torch.bfloat16 for p in model.diffloss.parameters())


def test_accelerate_on_a_marfast_head_sets_the_backend_and_steps():
    model = ForeignMAR(DiffLoss(16, 24, 1, 40, 3))
    head = model.diffloss
    marfast.accelerate(model, backend="torch")
    assert model.diffloss is head and head.backend == "torch" and head.gen_diffusion.num_timesteps == 3
    marfast.accelerate(model, num_sampling_steps="25")
    assert head.num_sampling_steps == head.gen_diffusion.num_timesteps == 25


def test_accelerate_keeps_the_parameter_objects_for_optimizers():
    """An optimizer (or EMA list) built before accelerate keeps training the head; frozen
    parameters stay frozen and gradients already accumulated are kept."""
    model = foreign_model(torch.float32)
    params = list(model.diffloss.parameters())
    model.diffloss.net.time_embed.mlp[0].weight.requires_grad_(False)
    model.diffloss.net.input_proj.bias.grad = torch.ones(40)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    marfast.accelerate(model, backend="torch")
    assert [p for p in model.diffloss.parameters()] == params
    assert not model.diffloss.net.time_embed.mlp[0].weight.requires_grad
    assert torch.equal(model.diffloss.net.input_proj.bias.grad, torch.ones(40))
    before = model.diffloss.net.input_proj.weight.detach().clone()
    optimizer.zero_grad()
    model.diffloss(torch.randn(6, 16), torch.randn(6, 24)).backward()
    optimizer.step()
    assert not torch.equal(model.diffloss.net.input_proj.weight, before)


def test_accelerate_rejects_what_it_cannot_convert():
    with pytest.raises(TypeError, match="no `diffloss` head"):
        marfast.accelerate(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        marfast.accelerate(foreign_model(), backend="cuda")
    model = foreign_model()
    del model.diffloss.gen_diffusion
    with pytest.raises(ValueError, match="pass num_sampling_steps"):
        marfast.accelerate(model)
    model = foreign_model()
    model.diffloss.register_buffer("extra_table", torch.zeros(3))
    with pytest.raises(RuntimeError, match="extra_table"):
        marfast.accelerate(model)
    assert isinstance(model.diffloss, ForeignHead)  # left untouched on failure
    model.diffloss = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="not an official-style head"):
        marfast.accelerate(model)
