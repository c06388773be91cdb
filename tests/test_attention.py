"""Attention backends (marfast.attention): parity with a float64 reference, selection, forced
backends, the FlashAttention wiring (stand-in modules on CPU, the real packages on GPU)."""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import marfast.attention as attn
from marfast.mar import Attention

from helpers import tiny_mar

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def reference_attention(q, k, v):
    """float64 softmax(q k^T / sqrt(Dh)) v for BSHD inputs -> BSHD float64."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)


def random_qkv(shape, dtype, device="cpu", seed=0):
    """q, k, v [B, N, H, Dh] as strided views of one fused [B, N, 3, H, Dh] tensor (as in MAR)."""
    generator = torch.Generator(device).manual_seed(seed)
    b, n, h, d = shape
    qkv = torch.randn(b, n, 3, h, d, generator=generator, device=device, dtype=torch.float32).to(dtype)
    return qkv.unbind(2)


def assert_close(out, expected, dtype):
    tol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == expected.shape
    err = (out.double() - expected).abs().max().item()
    assert err <= tol * max(1.0, expected.abs().max().item()), f"max error {err} > {tol} ({dtype})"


@pytest.fixture
def env(monkeypatch):
    """Sets MARFAST_ATTENTION for one test and isolates the import cache of optional packages."""
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    monkeypatch.setattr(attn, "_import_errors", {})

    def set_backend(name):
        monkeypatch.setenv(attn.ENV_VAR, name)

    return set_backend


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes CPU tensors look like CUDA capability `cap` to the backend rules (CPU wiring tests)."""

    def set_capability(cap):
        monkeypatch.setattr(attn, "device_capability", lambda device: cap)

    return set_capability


# ------------------------------------------------------------------------------------------------
# math path and PyTorch SDPA on CPU


@pytest.mark.parametrize("shape", [(2, 7, 3, 5), (1, 1, 1, 8), (3, 20, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_math_path_matches_float64_reference(shape, dtype):
    q, k, v = random_qkv(shape, dtype)
    expected = reference_attention(q, k, v)
    assert_close(attn.math_attention(q, k, v), expected, dtype)
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert_close(sdpa, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_flash_wiring_on_cpu(env, fake_gpu, dtype):
    """PyTorch's flash kernel exists on CPU too: drive the sdpa_flash backend through it."""
    fake_gpu((9, 0))
    env("sdpa_flash")
    q, k, v = random_qkv((2, 33, 3, 16), dtype, seed=1)
    out = attn.attention(q, k, v)
    assert_close(out, reference_attention(q, k, v), dtype)
    assert_close(attn.attention(q, k, v, backend="math"), reference_attention(q, k, v), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_math_path_computes_in_float32_under_autocast(dtype):
    """Under autocast the math path's matmuls still run in float32: bitwise the result outside
    autocast, and fp16 scores above 65504 (|q.k| / sqrt(Dh) = 80,000 here) do not overflow."""
    q, k, v = random_qkv((2, 16, 2, 16), dtype, seed=5)
    outside = attn.math_attention(q, k, v)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(attn.math_attention(q, k, v), outside)
    big = torch.full((1, 4, 1, 64), 100.0, dtype=dtype)
    values = torch.randn(1, 4, 1, 64).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = attn.math_attention(big, big, values)
    assert_close(out, reference_attention(big, big, values), dtype)


def test_math_path_gradients_match_float64_reference():
    q, k, v = (t.detach().clone().requires_grad_() for t in random_qkv((2, 9, 2, 8), torch.float32, seed=2))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(2, 9, 2, 8, generator=torch.Generator().manual_seed(3))
    attn.math_attention(q, k, v).backward(grad_out)
    reference_attention(q64, k64, v64).backward(grad_out.double())
    for got, expected in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert_close(got, expected, torch.float32)


def test_auto_uses_math_on_cpu_and_for_fp32(env, fake_gpu):
    assert attn.active_backend("cpu", torch.float32) == "math"
    assert attn.active_backend("cpu", torch.bfloat16) == "math"
    fake_gpu((9, 0))
    assert attn.active_backend("cpu", torch.float32) == "math"
    assert attn.active_backend("cpu", torch.bfloat16) == "sdpa_flash"  # no flash-attn installed here
    assert attn.active_backend("cpu", torch.float16, head_dim=12) == "math"  # flash needs multiples of 8
    fake_gpu((7, 5))
    assert attn.active_backend("cpu", torch.float16) == "math"


# ------------------------------------------------------------------------------------------------
# forced backends


def test_forced_backend_that_is_not_installed_raises(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    q, k, v = random_qkv((1, 4, 2, 8), torch.float32)
    for name, module in (("fa2", "flash_attn"), ("fa4", "flash_attn.cute")):
        env(name)
        with pytest.raises(RuntimeError, match=f"{attn.ENV_VAR}={name} cannot run here: `{module}` is not importable"):
            attn.attention(q, k, v)
        with pytest.raises(RuntimeError, match="not importable"):
            Attention(16, 2)(torch.randn(1, 4, 16))


def test_forced_backend_that_cannot_take_the_inputs_raises(env, fake_gpu, monkeypatch):
    q, k, v = random_qkv((1, 4, 2, 8), torch.float32)
    env("sdpa_flash")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        attn.attention(q, k, v)
    fake_gpu((9, 0))
    with pytest.raises(RuntimeError, match="needs float16 or bfloat16 inputs"):
        attn.attention(q, k, v)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        attn.active_backend("cuda", torch.bfloat16, head_dim=20)
    fake_gpu((8, 0))
    install_fa4_stand_in(monkeypatch, [])
    with pytest.raises(RuntimeError, match="fa4 cannot run these inputs: .*capability >= \\(9, 0\\)"):
        attn.attention(*random_qkv((1, 4, 2, 8), torch.bfloat16), backend="fa4")
    fake_gpu((12, 0))  # consumer Blackwell: flash_attn.cute asserts on it, so auto takes SDPA's flash kernel
    with pytest.raises(RuntimeError, match="fa4 cannot run these inputs: .*9.x to 11.x"):
        attn.attention(*random_qkv((1, 4, 2, 8), torch.bfloat16), backend="fa4")
    assert attn.active_backend("cuda", torch.bfloat16) == "sdpa_flash"


def test_forced_math_runs_everywhere_and_bad_names_raise(env):
    q, k, v = random_qkv((1, 5, 2, 4), torch.float32)
    env("math")
    assert attn.active_backend("cpu", torch.float32) == "math"
    assert_close(attn.attention(q, k, v), reference_attention(q, k, v), torch.float32)
    env("flash3")
    with pytest.raises(ValueError, match="MARFAST_ATTENTION must be one of"):
        attn.active_backend("cpu", torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        attn.attention(q, k, v, backend="xformers")


def test_bad_inputs_raise():
    q, k, v = random_qkv((1, 5, 2, 4), torch.float32)
    with pytest.raises(ValueError, match="4-D"):
        attn.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="must agree"):
        attn.attention(q, k[:, :3], v)
    with pytest.raises(ValueError, match="must agree"):
        attn.attention(q[..., :2], k, v)
    with pytest.raises(TypeError, match="dtype"):
        attn.attention(q, k.double(), v)


def test_cross_attention_with_fewer_queries_than_keys_matches_math():
    """Queries [B, Nq, H, Dh] attend over Nk != Nq keys (the De-MAR transformer head's case)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 2, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 7, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = torch.einsum("bqhk,bkhd->bqhd", (torch.einsum("bqhd,bkhd->bqhk", q, k) / 8 ** 0.5).softmax(-1), v)
    torch.testing.assert_close(attn.attention(q, k, v), expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# FlashAttention-2/4 wiring with stand-in modules (the real packages are tested on GPU below)


def stand_in_flash_attn_func(calls, returns_lse):
    """A flash_attn_func that checks the BSHD layout and arguments it receives and computes the
    attention with the math path (float32)."""

    def flash_attn_func(q, k, v, dropout_p=None, softmax_scale=None, causal=None, **others):
        assert not others, f"unexpected arguments {others}"
        assert causal is False and softmax_scale is None
        assert (dropout_p is None) == returns_lse  # FA4 takes no dropout argument
        for t in (q, k, v):
            assert t.dim() == 4 and t.stride(-1) == 1 and t.dtype in (torch.float16, torch.bfloat16)
        assert k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:]
        calls.append(dict(shape=tuple(q.shape), keys=k.shape[1], dropout_p=dropout_p))
        out = attn.math_attention(q.float(), k.float(), v.float()).to(q.dtype)
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
        return (out, lse) if returns_lse else out

    return flash_attn_func


def install_fa2_stand_in(monkeypatch, calls):
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = stand_in_flash_attn_func(calls, returns_lse=False)
    monkeypatch.setitem(sys.modules, "flash_attn", module)


def install_fa4_stand_in(monkeypatch, calls):
    module = types.ModuleType("flash_attn.cute")
    module.flash_attn_func = stand_in_flash_attn_func(calls, returns_lse=True)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", module)


@pytest.mark.parametrize("backend", ["fa2", "fa4"])
@pytest.mark.parametrize("forced", [False, True])
def test_flash_attn_stand_ins_receive_bshd_and_match_reference(env, fake_gpu, monkeypatch, backend, forced):
    calls = []
    (install_fa2_stand_in if backend == "fa2" else install_fa4_stand_in)(monkeypatch, calls)
    fake_gpu((9, 0))
    if forced:
        env(backend)
    q, k, v = random_qkv((2, 11, 3, 16), torch.bfloat16, seed=4)
    assert attn.active_backend("cpu", torch.bfloat16, head_dim=16) == backend
    assert_close(attn.attention(q, k, v), reference_attention(q, k, v), torch.bfloat16)
    assert calls == [dict(shape=(2, 11, 3, 16), keys=11, dropout_p=0.0 if backend == "fa2" else None)]


@pytest.mark.parametrize("backend", ["fa2", "fa4"])
def test_flash_attn_stand_ins_serve_the_de_mar_heads_cross_attention(env, fake_gpu, monkeypatch, backend):
    """The Transformer diffusion head's queries (P per image) attend over L != P keys."""
    from marfast.demar import ContextCrossAttention

    calls = []
    (install_fa2_stand_in if backend == "fa2" else install_fa4_stand_in)(monkeypatch, calls)
    fake_gpu((9, 0))
    torch.manual_seed(0)
    module = ContextCrossAttention(32, 24, 2).to(torch.bfloat16)
    x = torch.randn(3, 4, 32, dtype=torch.bfloat16)
    k, v = module.keys_values(torch.randn(3, 9, 24, dtype=torch.bfloat16))
    out = module(x, k, v)
    assert module.last_backend == backend
    assert calls == [dict(shape=(3, 4, 2, 16), keys=9, dropout_p=0.0 if backend == "fa2" else None)]
    env("math")
    expected = module(x, k, v)
    assert module.last_backend == "math"
    assert (out.float() - expected.float()).abs().max() <= 2e-2 * max(1.0, expected.float().abs().max().item())


def test_auto_order_and_fa4_limits(env, fake_gpu, monkeypatch):
    fa2_calls, fa4_calls = [], []
    install_fa4_stand_in(monkeypatch, fa4_calls)
    fake_gpu((9, 0))
    assert attn.active_backend("cuda", torch.bfloat16, head_dim=64) == "fa4"
    assert attn.active_backend("cuda", torch.bfloat16, head_dim=64, dropout_p=0.1) == "sdpa_flash"
    assert attn.active_backend("cuda", torch.bfloat16, head_dim=192) == "sdpa_flash"
    fake_gpu((8, 0))
    assert attn.active_backend("cuda", torch.bfloat16, head_dim=64) == "sdpa_flash"
    install_fa2_stand_in(monkeypatch, fa2_calls)
    assert attn.active_backend("cuda", torch.bfloat16, head_dim=64) == "fa2"
    fake_gpu((9, 0))
    assert attn.active_backend("cuda", torch.bfloat16, head_dim=64, dropout_p=0.1) == "fa2"
    assert attn.active_backend("cuda", torch.float32, head_dim=64) == "math"
    env("fa4")
    with pytest.raises(RuntimeError, match="no attention dropout"):
        attn.active_backend("cuda", torch.bfloat16, head_dim=64, dropout_p=0.1)


def test_attention_module_reports_backend_and_passes_dropout_in_training_only(env, fake_gpu, monkeypatch):
    calls = []
    install_fa2_stand_in(monkeypatch, calls)
    fake_gpu((9, 0))
    module = Attention(32, 2, attn_drop=0.25).to(torch.bfloat16)
    assert "attention=auto, last_backend=None" in repr(module)
    x = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    module.eval()(x)
    module.train()(x)
    assert [c["dropout_p"] for c in calls] == [0.0, 0.25]
    assert "attention=auto, last_backend=fa2" in repr(module)
    env("math")
    module.eval()(x)
    assert "attention=math, last_backend=math" in repr(module)


def test_attention_module_matches_float64_reference_and_drops_out_in_training_only(env):
    torch.manual_seed(0)
    module = Attention(24, 3, attn_drop=0.5, proj_drop=0.5).eval()
    x = torch.randn(2, 10, 24)
    b, n, d = x.shape
    qkv = F.linear(x.double(), module.qkv.weight.double(), module.qkv.bias.double()).reshape(b, n, 3, 3, 8).unbind(2)
    expected = F.linear(reference_attention(*qkv).reshape(b, n, d), module.proj.weight.double(), module.proj.bias.double())
    out = module(x)
    assert_close(out, expected, torch.float32)
    assert torch.equal(module(x), out)  # no dropout at inference
    module.train()
    assert not torch.allclose(module(x), out)
    assert module.last_backend == "math"


def test_mar_under_fa2_stand_in_equals_math(env, fake_gpu, monkeypatch):
    """The transformer blocks of MAR run through the FA2 wiring (bf16 weights on CPU)."""
    calls = []
    install_fa2_stand_in(monkeypatch, calls)
    fake_gpu((9, 0))
    model = tiny_mar(encoder_embed_dim=32, encoder_num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)
    model = model.to(torch.bfloat16).eval()
    x = torch.randn(3, 4 + model.seq_len, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out_fa2 = model.run_encoder(x)
        env("math")
        out_math = model.run_encoder(x)
    assert len(calls) == len(model.encoder_blocks)
    assert (out_fa2.float() - out_math.float()).abs().max().item() < 5e-2


# ------------------------------------------------------------------------------------------------
# GPU: every backend present against the float64 reference


def gpu_backends():
    names = ["sdpa_flash", "math"]
    for name in ("fa2", "fa4"):
        if torch.cuda.is_available() and attn.rejection(name, "cuda", torch.bfloat16, 64) is None:
            names.append(name)
    return names


GPU_SHAPES = [(4, 320, 12, 64), (3, 77, 16, 80), (2, 64, 16, 64)]  # MAR-B decoder, MAR-H-like head dim


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_backends_match_float64_reference(backend, dtype, shape):
    if backend == "fa4" and attn.rejection("fa4", "cuda", dtype, shape[-1]) is not None:
        pytest.skip(attn.rejection("fa4", "cuda", dtype, shape[-1]))
    q, k, v = random_qkv(shape, dtype, device="cuda", seed=5)
    expected = reference_attention(q, k, v)
    assert_close(attn.attention(q, k, v, backend=backend), expected, dtype)
    assert_close(attn.attention(q.float(), k.float(), v.float(), backend="math"), expected, torch.float32)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", [name for name in gpu_backends() if name != "math"])
def test_gpu_backend_gradients_match_math_in_fp32(backend):
    if backend == "fa4" and attn.rejection("fa4", "cuda", torch.bfloat16, 64) is not None:
        pytest.skip("fa4 unavailable")
    q, k, v = (t.contiguous().requires_grad_() for t in random_qkv((2, 96, 4, 64), torch.bfloat16, "cuda", seed=6))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(2, 96, 4, 64, device="cuda")
    attn.attention(q, k, v, backend=backend).backward(grad_out.to(torch.bfloat16))
    attn.attention(q32, k32, v32, backend="math").backward(grad_out)
    for got, expected in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        err = (got.float() - expected).abs().max().item()
        assert err <= 5e-2 * max(1.0, expected.abs().max().item()), f"{backend} gradient error {err}"


@pytest.mark.gpu
@requires_cuda
def test_gpu_auto_selection_and_forced_errors(env):
    auto = attn.active_backend("cuda", torch.bfloat16, head_dim=64)
    expected = next((n for n in attn.AUTO_ORDER if attn.rejection(n, "cuda", torch.bfloat16, 64) is None), "math")
    assert auto == expected
    if torch.cuda.get_device_capability() >= (8, 0):
        assert auto != "math"
    assert attn.active_backend("cuda", torch.float32, head_dim=64) == "math"
    env("sdpa_flash")
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        attn.active_backend("cuda", torch.float32, head_dim=64)
    model = tiny_mar(encoder_embed_dim=128, encoder_num_heads=2, decoder_embed_dim=128, decoder_num_heads=2).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.run_encoder(torch.randn(2, 20, 128, device="cuda"))
    assert model.encoder_blocks[0].attn.last_backend == "sdpa_flash"
