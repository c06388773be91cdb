"""Fused training path: LayerNorm-modulate and gated-residual kernels, the fused denoiser and
DiffLoss.forward on the triton backend, against float64 references.

CPU tests run the kernels under the Triton interpreter in float32 on awkward shapes; every
buffer the fused code allocates with torch.empty / torch.empty_like is filled with NaN first, so
an element a kernel fails to write shows up. GPU tests (bf16 / fp16 at the released head sizes)
are marked `gpu` and skipped without CUDA.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from marfast import DiffLoss
from marfast.diffloss import SimpleMLPAdaLN
from marfast.fused_training import FusedResBlockFunction, denoiser_forward_fused
from marfast.kernels.gated_residual import (gated_residual, gated_residual_backward, gated_residual_forward)
from marfast.kernels.layernorm_modulate import (layernorm_modulate, layernorm_modulate_backward,
                                                layernorm_modulate_forward)
from marfast.kernels.silu_backward import SiLUFunction, silu_backward

SHAPES = [(1, 40), (7, 72), (33, 100), (203, 130)]  # the last: the backward kernels loop over several row tiles
FP32_TOL = 2e-5  # max |error| / max |reference| for float32 kernels against float64
RELEASED_HEADS = [(6, 1024), (8, 1280), (12, 1536)]  # (depth, width) of mar_base / large / huge
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (NaN anywhere in actual gives inf)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_rel(actual, expected, tol, name=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors for the test's duration."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def nan_like(tensor):
    return torch.full_like(tensor, float("nan"))


def modulation_views(rows, width, count, dtype=torch.float32, device="cpu", std=1.0):
    """`count` [rows, width] column slices of one [rows, count * width] tensor (row stride count*width)."""
    base = torch.randn(rows, count * width, dtype=dtype, device=device) * std
    return base, [base[:, i * width:(i + 1) * width] for i in range(count)]


def layernorm_modulate_ref(x, weight, bias, scale, shift, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps) * (1 + scale) + shift


# ------------------------------------------------------------------ LayerNorm + modulate kernels


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("affine", ["weight_bias", "weight_only", "none"])
def test_layernorm_modulate_forward_matches_float64(rows, width, affine):
    torch.manual_seed(rows * width)
    x = torch.randn(rows, width) * 3 + 1.5
    weight = torch.randn(width) if affine != "none" else None
    bias = torch.randn(width) if affine == "weight_bias" else None
    _, (shift, scale) = modulation_views(rows, width, 2)
    out, mean, rstd = layernorm_modulate_forward(x, weight, bias, scale, shift, 1e-6, out=nan_like(x))
    d = lambda t: None if t is None else t.double()
    assert_rel(out, layernorm_modulate_ref(d(x), d(weight), d(bias), d(scale), d(shift)), FP32_TOL, "out")
    torch.testing.assert_close(mean.double(), x.double().mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (x.double().var(1, unbiased=False) + 1e-6).rsqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("out_mode", ["separate", "overwrite_dout"])
def test_layernorm_modulate_backward_matches_float64(rows, width, affine, out_mode):
    torch.manual_seed(rows + width)
    x = torch.randn(rows, width) * 2 - 0.5
    weight, bias = (torch.randn(width), torch.randn(width)) if affine else (None, None)
    _, (shift, scale) = modulation_views(rows, width, 2)
    dout, dresidual = torch.randn(rows, width), torch.randn(rows, width)
    _, mean, rstd = layernorm_modulate_forward(x, weight, bias, scale, shift, 1e-6)

    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, weight, bias, scale, shift)]
    expected_out = layernorm_modulate_ref(*leaves)
    expected_out.backward(dout.double())
    dx_ref, dw_ref, db_ref, dscale_ref, dshift_ref = [t.grad if t is not None else None for t in leaves]

    grads = torch.full((rows, 3 * width), float("nan"))  # dx | dscale | dshift as strided slices
    out_buffer = dout.clone() if out_mode == "overwrite_dout" else nan_like(x)
    dx, dw, db, dscale, dshift, out, (dscale_sum, dshift_sum) = layernorm_modulate_backward(
        out_buffer if out_mode == "overwrite_dout" else dout, x, weight, bias, scale, mean, rstd,
        dresidual=dresidual, shift=shift, recompute_out=True, modulation_colsums=True,
        dx=grads[:, :width], dscale=grads[:, width:2 * width], dshift=grads[:, 2 * width:], out=out_buffer)
    assert_rel(dx, dx_ref + dresidual.double(), FP32_TOL, "dx")
    assert_rel(dscale, dscale_ref, FP32_TOL, "dscale")
    assert_rel(dshift, dshift_ref, FP32_TOL, "dshift")
    assert_rel(dscale_sum, dscale_ref.sum(0), FP32_TOL, "dscale.sum(0)")
    assert_rel(dshift_sum, dshift_ref.sum(0), FP32_TOL, "dshift.sum(0)")
    assert_rel(out, expected_out.detach(), FP32_TOL, "recomputed out")
    if affine:
        assert_rel(dw, dw_ref, FP32_TOL, "dweight")
        assert_rel(db, db_ref, FP32_TOL, "dbias")
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("rows, width", SHAPES)
def test_layernorm_modulate_function_gradients(rows, width, poisoned_allocations):
    torch.manual_seed(3 * rows + width)
    inputs = [torch.randn(rows, width) * 2, torch.randn(width), torch.randn(width),
              torch.randn(rows, width), torch.randn(rows, width)]
    fused = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().requires_grad_() for t in inputs]
    dout = torch.randn(rows, width)
    out = layernorm_modulate(*fused, 1e-6)
    expected = layernorm_modulate_ref(*ref)
    assert_rel(out, expected, FP32_TOL, "out")
    out.backward(dout)
    expected.backward(dout.double())
    for name, a, b in zip(["x", "weight", "bias", "scale", "shift"], fused, ref):
        assert_rel(a.grad, b.grad, FP32_TOL, f"d{name}")


def test_layernorm_modulate_rejects_bad_input():
    x = torch.randn(4, 8)
    ok = dict(weight=torch.randn(8), bias=torch.randn(8), scale=torch.randn(4, 8), shift=torch.randn(4, 8), eps=1e-6)
    with pytest.raises(ValueError, match="scale must have shape"):
        layernorm_modulate_forward(x, **{**ok, "scale": torch.randn(4, 7)})
    with pytest.raises(TypeError, match="shift must have dtype"):
        layernorm_modulate_forward(x, **{**ok, "shift": torch.randn(4, 8, dtype=torch.float64)})
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        layernorm_modulate_forward(x.double(), **ok)
    with pytest.raises(ValueError, match="unit stride"):
        layernorm_modulate_forward(x, **{**ok, "scale": torch.randn(8, 4).t()})
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        layernorm_modulate_forward(x, **{**ok, "weight": torch.randn(9)})
    with pytest.raises(ValueError, match="must be on"):
        layernorm_modulate_forward(x, **{**ok, "shift": torch.randn(4, 8, device="meta")})
    with pytest.raises(ValueError, match="x must have shape"):
        layernorm_modulate_forward(torch.randn(4, 8, 1), **ok)
    _, mean, rstd = layernorm_modulate_forward(x, **ok)
    with pytest.raises(ValueError, match="recompute_out needs shift"):
        layernorm_modulate_backward(x, x, ok["weight"], ok["bias"], ok["scale"], mean, rstd, recompute_out=True)
    with pytest.raises(ValueError, match="rstd must be a float32 tensor"):
        layernorm_modulate_backward(x, x, ok["weight"], ok["bias"], ok["scale"], mean, rstd.double())


# ------------------------------------------------------------------ gated residual kernels


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("dh_over_h", [False, True])
def test_gated_residual_forward_backward_match_float64(rows, width, dh_over_h):
    torch.manual_seed(rows * 7 + width)
    x, h, dout = torch.randn(rows, width), torch.randn(rows, width), torch.randn(rows, width)
    _, (shift, scale, gate) = modulation_views(rows, width, 3)
    out = gated_residual_forward(x, gate, h, out=nan_like(x))
    assert_rel(out, x.double() + gate.double() * h.double(), FP32_TOL, "out")
    grads = torch.full((rows, 2 * width), float("nan"))
    expected_dgate, expected_dh = dout.double() * h.double(), dout.double() * gate.double()
    h_buffer = h.clone()
    dgate, dh, dh_sum, dgate_sum = gated_residual_backward(
        dout, gate, h_buffer, dgate=grads[:, width:], dh=h_buffer if dh_over_h else grads[:, :width],
        dh_colsum=True, dgate_colsum=True)
    assert (dh.data_ptr() == h_buffer.data_ptr()) == dh_over_h
    assert_rel(dgate, expected_dgate, FP32_TOL, "dgate")
    assert_rel(dh, expected_dh, FP32_TOL, "dh")
    assert_rel(dh_sum, expected_dh.sum(0), FP32_TOL, "dh.sum(0)")
    assert_rel(dgate_sum, expected_dgate.sum(0), FP32_TOL, "dgate.sum(0)")


@pytest.mark.parametrize("rows, width", SHAPES)
def test_gated_residual_function_gradients(rows, width, poisoned_allocations):
    torch.manual_seed(rows + 11 * width)
    inputs = [torch.randn(rows, width) for _ in range(3)]
    fused = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().requires_grad_() for t in inputs]
    out = gated_residual(*fused)
    expected = ref[0] + ref[1] * ref[2]
    assert_rel(out, expected, FP32_TOL, "out")
    dout = torch.randn(rows, width)
    out.backward(dout)
    expected.backward(dout.double())
    for name, a, b in zip(["x", "gate", "h"], fused, ref):
        assert_rel(a.grad, b.grad, FP32_TOL, f"d{name}")


def test_gated_residual_rejects_bad_input():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="gate must have shape"):
        gated_residual_forward(x, torch.randn(3, 4), x)
    with pytest.raises(TypeError, match="h must have dtype"):
        gated_residual_forward(x, x, x.half())
    with pytest.raises(ValueError, match="unit stride"):
        gated_residual_backward(x, x, torch.randn(5, 3).t())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        gated_residual_forward(x.double(), x.double(), x.double())


# ------------------------------------------------------------------ SiLU backward kernel


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_silu_backward_matches_float64(rows, width, in_place):
    torch.manual_seed(rows * 5 + width)
    pre_act, d_act = torch.randn(rows, width) * 4, torch.randn(rows, width)
    exact = pre_act.double().requires_grad_()
    F.silu(exact).backward(d_act.double())
    buffer = d_act.clone() if in_place else nan_like(d_act)
    d_pre_act, colsum = silu_backward(buffer if in_place else d_act, pre_act, d_pre_act=buffer, colsum=True)
    assert d_pre_act.data_ptr() == buffer.data_ptr()
    assert_rel(d_pre_act, exact.grad, FP32_TOL, "d_pre_act")
    assert_rel(colsum, exact.grad.sum(0), FP32_TOL, "d_pre_act.sum(0)")


def test_silu_function_gradient_and_bad_input(poisoned_allocations):
    pre_act = (torch.randn(7, 72) * 3).requires_grad_()
    exact = pre_act.detach().double().requires_grad_()
    d_act = torch.randn(7, 72)
    SiLUFunction.apply(pre_act).backward(d_act)
    F.silu(exact).backward(d_act.double())
    assert_rel(pre_act.grad, exact.grad, FP32_TOL, "d_pre_act")
    with pytest.raises(ValueError, match="pre_act must have shape"):
        silu_backward(d_act, torch.randn(7, 71))
    with pytest.raises(TypeError, match="pre_act must have dtype"):
        silu_backward(d_act, torch.randn(7, 72).half())


# ------------------------------------------------------------------ the fused denoiser


def random_net(in_channels, width, z_channels, depth, seed, dtype=torch.float32, device="cpu", std=None):
    """A SimpleMLPAdaLN with every weight random (the official init zeroes the adaLN and final
    layers, which would leave most gradients trivially zero)."""
    torch.manual_seed(seed)
    net = SimpleMLPAdaLN(in_channels, width, 2 * in_channels, z_channels, depth)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if std is not None:
                p.normal_(0, std)
            elif p.dim() == 2:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0, 0.1)
            if name.endswith("in_ln.weight"):
                p.add_(1.0)
    return net.to(device=device, dtype=dtype)


def run_with_grads(fn, net, x, t, c, dout):
    """Output, then gradients of (x, c, *parameters) for upstream gradient dout."""
    net.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    out = fn(net, x, t, c)
    out.backward(dout.to(out.dtype))
    return out.detach(), [x.grad, c.grad] + [p.grad for p in net.parameters()]


def grad_names(net):
    return ["x", "c"] + [name for name, _ in net.named_parameters()]


@pytest.mark.parametrize("rows, width, depth, checkpointing", [(1, 40, 2, False), (7, 72, 3, True), (33, 40, 3, False)])
def test_denoiser_forward_fused_matches_float64_reference(rows, width, depth, checkpointing, poisoned_allocations):
    net = random_net(5, width, 24, depth, seed=rows)
    ref = copy.deepcopy(net).double()
    net.grad_checkpointing = ref.grad_checkpointing = checkpointing
    x, c = torch.randn(rows, 5), torch.randn(rows, 24)
    t = torch.randint(0, 1000, (rows,))
    t[0] = 999
    dout = torch.randn(rows, 10)
    out, grads = run_with_grads(denoiser_forward_fused, net, x, t, c, dout)
    expected, expected_grads = run_with_grads(lambda n, *a: n(*a), ref, x.double(), t, c.double(), dout.double())
    assert out.dtype == torch.float32
    assert_rel(out, expected, 1e-5, "out")
    for name, g, e in zip(grad_names(net), grads, expected_grads):
        assert g is not None, f"no gradient for {name}"
        assert_rel(g, e, 1e-4, f"d{name}")


def test_denoiser_forward_fused_float_timesteps():
    net = random_net(3, 40, 8, 2, seed=5)
    ref = copy.deepcopy(net).double()
    x, c, t = torch.randn(7, 3), torch.randn(7, 8), torch.rand(7) * 999
    out, grads = run_with_grads(denoiser_forward_fused, net, x, t, c, torch.ones(7, 6))
    expected, expected_grads = run_with_grads(lambda n, *a: n(*a), ref, x.double(), t, c.double(), torch.ones(7, 6))
    assert_rel(out, expected, 1e-5, "out")
    for name, g, e in zip(grad_names(net), grads, expected_grads):
        assert_rel(g, e, 1e-4, f"d{name}")


@pytest.mark.parametrize("mode", ["fp16_parameters", "fp16_autocast"])
def test_denoiser_forward_fused_fp16_no_worse_than_eager(mode):
    """fp16 under the interpreter (bf16 is GPU-only): fp16 parameters, or fp32 parameters under
    fp16 autocast (fp16 compute, fp32 gradients). Errors against float64 within 2x eager's + 2e-3."""
    net = random_net(5, 40, 24, 2, seed=9)
    exact_net, eager_net = copy.deepcopy(net).double(), copy.deepcopy(net)
    if mode == "fp16_parameters":
        net, eager_net = net.half(), eager_net.half()
    rows = 33
    x, c, t = torch.randn(rows, 5), torch.randn(rows, 24), torch.randint(0, 1000, (rows,))
    dout = torch.randn(rows, 10)
    cast = torch.float16 if mode == "fp16_parameters" else torch.float32
    with torch.autocast("cpu", dtype=torch.float16, enabled=mode == "fp16_autocast"):
        fused, fused_grads = run_with_grads(denoiser_forward_fused, net, x.to(cast), t, c.to(cast), dout)
        eager, eager_grads = run_with_grads(lambda n, *a: n(*a), eager_net, x.to(cast), t, c.to(cast), dout)
    exact, exact_grads = run_with_grads(lambda n, *a: n(*a), exact_net, x.double(), t, c.double(), dout.double())
    assert fused.dtype == torch.float16
    for name, got, ref, ex in zip(["out"] + grad_names(net), [fused] + fused_grads, [eager] + eager_grads,
                                  [exact] + exact_grads):
        assert got.dtype == ref.dtype, name
        assert rel_err(got, ex) <= 2 * rel_err(ref, ex) + 2e-3, (name, rel_err(got, ex), rel_err(ref, ex))


def test_denoiser_backward_ignores_an_enclosing_autocast():
    """A backward called inside an autocast region recomputes in the forward's dtype (fp32 here).
    Checked on the gradients the fused Functions compute; the time embedding and input_proj are
    plain torch modules, whose backward (like the whole reference's) autocast does change."""
    net = random_net(3, 40, 8, 2, seed=4)
    x, c, t = torch.randn(7, 3), torch.randn(7, 8), torch.randint(0, 1000, (7,))
    dout = torch.randn(7, 6)
    _, plain = run_with_grads(denoiser_forward_fused, net, x, t, c, dout)
    net.zero_grad(set_to_none=True)
    out = denoiser_forward_fused(net, x, t, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.backward(dout)
    fused_names = ("res_blocks.", "final_layer.", "cond_embed.")
    for name, p, expected in zip(grad_names(net)[2:], net.parameters(), plain[2:]):
        assert p.grad.dtype == torch.float32
        if name.startswith(fused_names):
            torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_denoiser_forward_fused_rejects_bad_input():
    net = random_net(3, 40, 8, 1, seed=0)
    x, t, c = torch.randn(4, 3), torch.randint(0, 1000, (4,)), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 3\]"):
        denoiser_forward_fused(net, torch.randn(4, 2), t, c)
    with pytest.raises(ValueError, match="same number of rows"):
        denoiser_forward_fused(net, x, t[:3], c)
    with pytest.raises(ValueError, match=r"c must have shape \[N, 8\]"):
        denoiser_forward_fused(net, x, t, torch.randn(4, 7))
    with pytest.raises(ValueError, match="integer timesteps must lie in 0..999"):
        denoiser_forward_fused(net, x, torch.tensor([0, 1, 2, 1000]), c)
    with pytest.raises(ValueError, match="one device"):
        denoiser_forward_fused(net, x, t, torch.randn(4, 8, device="meta"))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        denoiser_forward_fused(copy.deepcopy(net).double(), x, t, c)
    block, ada = net.res_blocks[0], net.res_blocks[0].adaLN_modulation[1]
    silu_y = torch.randn(4, 40)
    with pytest.raises(ValueError, match="modulation must not require grad"):
        FusedResBlockFunction.apply(torch.randn(4, 40), torch.randn(4, 120, requires_grad=True), silu_y, ada.weight,
                                    ada.bias, block.in_ln.weight, block.in_ln.bias, block.mlp[0].weight,
                                    block.mlp[0].bias, block.mlp[2].weight, block.mlp[2].bias, 1e-6)


def saved_activation_bytes(fn):
    """Bytes of the distinct storages autograd saves during fn() (parameters excluded)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return storages


def test_fused_blocks_save_at_most_60_percent_of_reference_block_activations():
    """Activation bytes saved per residual block (depth 4 minus depth 2, so the fixed embedding and
    final-layer costs cancel): the reference keeps 11 [N, W] tensors per block, the fused path 5."""
    rows, width = 256, 64
    x, t, c = torch.randn(rows, 16), torch.randint(0, 1000, (rows,)), torch.randn(rows, 24)

    def saved_bytes(fn, depth):
        net = random_net(16, width, 24, depth, seed=depth)
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        storages = saved_activation_bytes(lambda: fn(net, x, t, c))
        return sum(n for ptr, n in storages.items() if ptr not in params)

    per_block = {name: (saved_bytes(fn, 4) - saved_bytes(fn, 2)) / 2 / (rows * width * 4)
                 for name, fn in (("reference", lambda net, *a: net(*a)), ("fused", denoiser_forward_fused))}
    assert per_block["reference"] == pytest.approx(11, abs=0.1)
    assert per_block["fused"] == pytest.approx(5, abs=0.1)
    assert per_block["fused"] <= 0.6 * per_block["reference"], per_block


# ------------------------------------------------------------------ DiffLoss on the triton backend


@pytest.mark.parametrize("rows, masked", [(7, False), (33, True)])
def test_diffloss_triton_backend_matches_torch_backend(rows, masked, poisoned_allocations):
    torch.manual_seed(rows)
    fused = DiffLoss(target_channels=4, z_channels=24, depth=2, width=40, num_sampling_steps="5", backend="triton")
    with torch.no_grad():
        fused.net.load_state_dict(random_net(4, 40, 24, 2, seed=rows).state_dict())
    reference = copy.deepcopy(fused).double()
    reference.backend = "torch"
    target, z = torch.rand(rows, 4) * 2.2 - 1.1, torch.randn(rows, 24)
    t = torch.randint(0, 1000, (rows,))
    t[:2] = torch.tensor([0, 999])
    noise = torch.randn(rows, 4)
    mask = (torch.rand(rows) < 0.6).float() if masked else None
    if masked:
        mask[0] = 1.0
    z_fused, z_ref = z.clone().requires_grad_(), z.double().requires_grad_()
    loss = fused(target, z_fused, mask, t=t, noise=noise)
    expected = reference(target.double(), z_ref, None if mask is None else mask.double(), t=t, noise=noise.double())
    loss.backward()
    expected.backward()
    assert loss.dtype == torch.float32
    assert_rel(loss, expected, 1e-5, "loss")
    assert_rel(z_fused.grad, z_ref.grad, 1e-4, "dz")
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_rel(p.grad, q.grad, 1e-4, f"d{name}")


def test_double_backward_needs_the_torch_backend():
    """The fused Functions give first-order gradients only: a gradient of a gradient (e.g. a
    gradient penalty) raises a clear error instead of failing inside a kernel's backward."""
    head = DiffLoss(target_channels=4, z_channels=24, depth=2, width=40, num_sampling_steps="5", backend="triton")
    with torch.no_grad():
        head.net.load_state_dict(random_net(4, 40, 24, 2, seed=1).state_dict())
    target, z, t = torch.randn(5, 4), torch.randn(5, 24).requires_grad_(), torch.randint(0, 1000, (5,))
    for backend in ("torch", "triton"):
        head.backend = backend
        (dz,) = torch.autograd.grad(head(target, z, t=t, noise=torch.ones(5, 4)), z, create_graph=True)
        if backend == "torch":
            dz.square().sum().backward()
            assert z.grad.abs().sum() > 0
        else:
            with pytest.raises(RuntimeError, match="differentiate twice"):
                dz.square().sum().backward()


# ------------------------------------------------------------------ GPU: bf16 / fp16 parity at the released head sizes

LOW_PRECISION = [torch.bfloat16, torch.float16]
# (ratio, floor): the fused error against float64 may be at most ratio x the eager reference's own
# error in the same dtype, plus floor (errors as max |error| / max |float64 value| per tensor).
NO_WORSE_THAN_EAGER = {torch.bfloat16: (2.0, 2e-2), torch.float16: (2.0, 4e-3)}


def assert_no_worse_than_reference(fused, eager, exact, dtype, name):
    ratio, floor = NO_WORSE_THAN_EAGER[dtype]
    fused_err, eager_err = rel_err(fused, exact), rel_err(eager, exact)
    assert fused_err <= ratio * eager_err + floor, (
        f"{name}: fused error {fused_err:.3g}, eager {dtype} error {eager_err:.3g}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("width", [1024, 1280, 1536])
def test_gpu_kernels_low_precision(width, dtype):
    torch.manual_seed(width)
    rows = 4099
    dev = "cuda"
    x = (torch.randn(rows, width, device=dev) * 2 + 1).to(dtype)
    weight, bias = torch.randn(width, device=dev).to(dtype), torch.randn(width, device=dev).to(dtype)
    modulation, (shift, scale, gate) = modulation_views(rows, width, 3, dtype, dev, std=0.5)
    h, dout, dres = [torch.randn(rows, width, device=dev).to(dtype) for _ in range(3)]
    d = lambda t: t.double()
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]  # a few output ulps
    out, mean, rstd = layernorm_modulate_forward(x, weight, bias, scale, shift, 1e-6, out=nan_like(x))
    leaves = [d(t).requires_grad_() for t in (x, weight, bias, scale, shift)]
    expected = layernorm_modulate_ref(*leaves)
    assert_rel(out, expected, tol, "layernorm_modulate out")
    expected.backward(d(dout))
    dx, dw, db, dscale, dshift, _, _ = layernorm_modulate_backward(
        dout, x, weight, bias, scale, mean, rstd, dresidual=dres)
    for name, got, ref in [("dx", dx, leaves[0].grad + d(dres)), ("dweight", dw, leaves[1].grad),
                           ("dbias", db, leaves[2].grad), ("dscale", dscale, leaves[3].grad),
                           ("dshift", dshift, leaves[4].grad)]:
        assert_rel(got, ref, 2 * tol, name)
    out = gated_residual_forward(x, gate, h, out=nan_like(x))
    assert_rel(out, d(x) + d(gate) * d(h), tol, "gated_residual out")
    dgate, dh, dh_sum, _ = gated_residual_backward(dout, gate, h, dh_colsum=True)
    assert_rel(dgate, d(dout) * d(h), tol, "dgate")
    assert_rel(dh, d(dout) * d(gate), tol, "dh")
    assert_rel(dh_sum, (d(dout) * d(gate)).sum(0), tol, "dh.sum(0)")
    exact = d(h).requires_grad_()
    F.silu(exact).backward(d(dout))
    d_pre_act, colsum = silu_backward(dout, h, d_pre_act=nan_like(h), colsum=True)
    assert_rel(d_pre_act, exact.grad, tol, "silu d_pre_act")
    assert_rel(colsum, exact.grad.sum(0), tol, "silu d_pre_act.sum(0)")


@gpu
@pytest.mark.gpu
def test_gpu_fp32_denoiser_is_tight():
    net = random_net(16, 1024, 768, 6, seed=0, device="cuda")
    ref = copy.deepcopy(net).double()
    rows = 1000
    x, c = torch.randn(rows, 16, device="cuda"), torch.randn(rows, 768, device="cuda")
    t = torch.randint(0, 1000, (rows,), device="cuda")
    dout = torch.randn(rows, 32, device="cuda")
    out, grads = run_with_grads(denoiser_forward_fused, net, x, t, c, dout)
    expected, expected_grads = run_with_grads(lambda n, *a: n(*a), ref, x.double(), t, c.double(), dout.double())
    tol = 1e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    assert_rel(out, expected, tol, "out")
    for name, g, e in zip(grad_names(net), grads, expected_grads):
        assert_rel(g, e, 10 * tol, f"d{name}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("depth, width", RELEASED_HEADS)
def test_gpu_denoiser_low_precision_parity(depth, width, dtype):
    z_channels = {1024: 768, 1280: 1024, 1536: 1280}[width]
    exact_net = random_net(16, width, z_channels, depth, seed=depth, dtype=torch.float64, device="cuda")
    net = copy.deepcopy(exact_net).to(dtype)
    eager_net = copy.deepcopy(exact_net).to(dtype)
    rows = 2048
    x, c = torch.randn(rows, 16, device="cuda"), torch.randn(rows, z_channels, device="cuda")
    t = torch.randint(0, 1000, (rows,), device="cuda")
    dout = torch.randn(rows, 32, device="cuda")
    fused, fused_grads = run_with_grads(denoiser_forward_fused, net, x.to(dtype), t, c.to(dtype), dout)
    eager, eager_grads = run_with_grads(lambda n, *a: n(*a), eager_net, x.to(dtype), t, c.to(dtype), dout)
    exact, exact_grads = run_with_grads(lambda n, *a: n(*a), exact_net, x.double(), t, c.double(), dout.double())
    assert fused.dtype == dtype
    assert_no_worse_than_reference(fused, eager, exact, dtype, "out")
    for name, g, e, ex in zip(grad_names(net), fused_grads, eager_grads, exact_grads):
        assert g.dtype == dtype
        assert_no_worse_than_reference(g, e, ex, dtype, f"d{name}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_autocast_fp32_parameters(dtype):
    """fp32 parameters under autocast: the fused path computes in the autocast dtype and returns
    fp32 gradients, matching the eager reference under the same autocast."""
    exact_net = random_net(16, 1024, 768, 6, seed=7, dtype=torch.float64, device="cuda")
    net, eager_net = copy.deepcopy(exact_net).float(), copy.deepcopy(exact_net).float()
    rows = 2048
    x, c = torch.randn(rows, 16, device="cuda"), torch.randn(rows, 768, device="cuda")
    t = torch.randint(0, 1000, (rows,), device="cuda")
    dout = torch.randn(rows, 32, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        fused, fused_grads = run_with_grads(denoiser_forward_fused, net, x, t, c, dout)
        eager, eager_grads = run_with_grads(lambda n, *a: n(*a), eager_net, x, t, c, dout)
    exact, exact_grads = run_with_grads(lambda n, *a: n(*a), exact_net, x.double(), t, c.double(), dout.double())
    assert fused.dtype == dtype
    assert_no_worse_than_reference(fused, eager, exact, dtype, "out")
    for name, g, e, ex in zip(grad_names(net), fused_grads, eager_grads, exact_grads):
        assert g.dtype == torch.float32, name
        assert_no_worse_than_reference(g, e, ex, dtype, f"d{name}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_diffloss_auto_backend_uses_fused_path_and_matches(dtype):
    torch.manual_seed(0)
    head = DiffLoss(16, 768, 6, 1024, "100").cuda()
    with torch.no_grad():
        head.net.load_state_dict(random_net(16, 1024, 768, 6, seed=3).state_dict())
    head = head.to(dtype)
    assert head.backend_for(torch.device("cuda")) == "triton"
    exact = copy.deepcopy(head).double()
    exact.backend = "torch"
    eager = copy.deepcopy(head)
    eager.backend = "torch"
    rows = 4096
    target, z = torch.rand(rows, 16, device="cuda") * 2 - 1, torch.randn(rows, 768, device="cuda")
    t, noise = torch.randint(0, 1000, (rows,), device="cuda"), torch.randn(rows, 16, device="cuda")
    mask = (torch.rand(rows, device="cuda") < 0.7).float()
    results = []
    for model, cast in ((head, dtype), (eager, dtype), (exact, torch.float64)):
        model.zero_grad(set_to_none=True)
        state_dtype = torch.float64 if cast == torch.float64 else torch.float32
        loss = model(target.to(state_dtype), z.to(cast), mask.to(state_dtype), t=t, noise=noise.to(state_dtype))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (fused_loss, fused_grads), (eager_loss, eager_grads), (exact_loss, exact_grads) = results
    assert_no_worse_than_reference(fused_loss, eager_loss, exact_loss, dtype, "loss")
    for (name, _), g, e, ex in zip(head.named_parameters(), fused_grads, eager_grads, exact_grads):
        assert_no_worse_than_reference(g, e, ex, dtype, f"d{name}")
