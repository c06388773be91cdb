"""marfast against numbers produced by the official MAR code (LTH14/mar at fe470ac, run on the CPU).

tests/data/official_tiny_mar.safetensors holds a tiny official MAR's weights (every tensor perturbed:
the official init zeroes the head's adaLN and output layers), its inputs, and what the official code
computed from them: the training loss and six parameters' gradients (train mode, global seed 5:
label drop, timesteps and noise), and `sample_tokens` for four settings (global seeds 7-10, one
unconditional). In float32 as the official code runs; in float64 with dtype-only changes to the
official code: the diffusion tables not cast to float32, the float32 timestep embedding cast to
the MLP's dtype, and float64 as the default dtype while sampling (x_T and the step noise drawn in
float64, as marfast draws them for a float64 state). The orders and the masked count are fixed on
both sides (the official code draws them from NumPy's global RNG, marfast from torch generators).
Every other draw comes from torch's global CPU generator in the same order on both sides;
`rng_canary` (torch.randn(4) after manual_seed(0)) tells a change of that generator from a change
of marfast.
"""
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from marfast import MAR
from marfast.mar import mask_by_order

FIXTURE = Path(__file__).resolve().parent / "data" / "official_tiny_mar.safetensors"
# |marfast - official| <= TOLERANCE * max|official| per dtype (float32: rounding of a different
# attention kernel and summation orders, seen up to 5e-7; float64: seen up to 5e-16). A 1%
# change of the temperature moves the samples by 2e-6 to 4e-6 of their scale: the float64 cases are
# the sensitive ones. The samples of a random head grow to ~5e4 (no x0 clipping, as officially).
TOLERANCE = {torch.float32: 3e-6, torch.float64: 1e-12}
TAGS = {torch.float32: "f32", torch.float64: "f64"}


@pytest.fixture(scope="module")
def official():
    with safe_open(str(FIXTURE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def official_model(official, dtype):
    """marfast's MAR with the official weights, orders and masked count."""
    tensors, meta = official
    model = MAR(norm_layer=partial(nn.LayerNorm, eps=1e-6), **json.loads(meta["config"]))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    model = model.to(dtype)
    orders, num_masked = tensors["orders"], int(meta["num_masked"])
    model.sample_orders = lambda bsz, generator=None: orders[:bsz].clone()
    model.random_masking = lambda x, orders, generator=None: mask_by_order(num_masked, orders).to(x.dtype)
    return model


def assert_close_to(got, expected, dtype, what):
    error = (got.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max |marfast - official| {error:.3g} at scale {scale:.3g}"


def test_the_global_generator_draws_what_it_drew_for_the_official_run(official):
    torch.manual_seed(0)
    assert torch.equal(torch.randn(4), official[0]["rng_canary"]), \
        "torch's CPU generator changed its stream: the official outputs must be regenerated"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_loss_and_gradients_equal_the_official(official, dtype):
    tensors, meta = official
    model = official_model(official, dtype).train()
    torch.manual_seed(int(meta["train_seed"]))
    loss = model(tensors["imgs"].to(dtype), tensors["labels"])
    loss.backward()
    tag = TAGS[dtype]
    assert_close_to(loss.detach().reshape(1), tensors[f"{tag}.train_loss"], dtype, "loss")
    params = dict(model.named_parameters())
    for name in json.loads(meta["grads"]):
        assert_close_to(params[name].grad, tensors[f"{tag}.grad.{name}"], dtype, f"gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loop", ["sample_tokens", "sample_tokens_fast"])
@pytest.mark.parametrize("case", ["cfg1", "cfg3_linear", "cfg2_constant", "unconditional_cfg2"])
def test_sampled_tokens_equal_the_official(official, dtype, loop, case):
    tensors, meta = official
    settings = json.loads(meta["sample_cases"])[case]
    model = official_model(official, dtype).eval()
    torch.manual_seed(settings["seed"])
    tokens = getattr(model, loop)(settings["bsz"], num_iter=settings["num_iter"], cfg=settings["cfg"],
                                  cfg_schedule=settings["cfg_schedule"],
                                  labels=None if settings.get("unconditional") else tensors["labels"][:settings["bsz"]],
                                  temperature=settings["temperature"])
    assert_close_to(tokens, tensors[f"{TAGS[dtype]}.sample.{case}"], dtype, f"{loop} {case}")
