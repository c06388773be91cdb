"""Residual add + LayerNorm of the transformer blocks (kernels/add_layernorm.py) and the blocks'
norm backends (with them the MLP's fc1 + GELU GEMM, `Mlp.forward_inference`). CPU tests run the
kernels under the Triton interpreter in fp32 against float64, on awkward widths and row counts,
with every output poisoned (NaN) before the kernel writes it; GPU tests (marked `gpu`) check bf16
autocast blocks, both MLP ways and the MAR transformer against the torch modules.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from marfast.ar import CausalBlock
from marfast.kernels.add_layernorm import add_layernorm
from marfast import mar as mar_module
from marfast.mar import Block, Mlp, mar_base, set_norm_backend

from helpers import tiny_mar

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """torch.empty / empty_like return NaN-filled tensors while the test runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    def nan_empty_like(*args, **kwargs):
        return empty_like(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def layer_norm_params(width, seed):
    gen = torch.Generator().manual_seed(seed)
    return 1 + 0.2 * torch.randn(width, generator=gen), 0.2 * torch.randn(width, generator=gen)


@pytest.mark.parametrize("rows, width", [(1, 40), (7, 100), (33, 24)])
@pytest.mark.parametrize("with_update", [True, False], ids=["add", "plain"])
def test_add_layernorm_matches_float64(rows, width, with_update, poisoned_outputs):
    gen = torch.Generator().manual_seed(rows * width)
    x = 3 + 2 * torch.randn(2, rows, width, generator=gen)  # a mean far from zero: a one-pass variance would lose digits
    update = torch.randn(2, rows, width, generator=gen) if with_update else None
    weight, bias = layer_norm_params(width, rows)
    summed, normed = add_layernorm(x, update, weight, bias, 1e-6, torch.float32)
    expected_sum = x.double() + (update.double() if with_update else 0)
    expected = F.layer_norm(expected_sum, (width,), weight.double(), bias.double(), 1e-6)
    torch.testing.assert_close(summed.double(), expected_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed.double(), expected, rtol=2e-5, atol=2e-5)
    assert summed is not x if with_update else summed is x


def test_add_layernorm_reads_a_half_precision_update_and_handles_no_rows():
    x = torch.randn(5, 48)
    update = torch.randn(5, 48).half()
    weight, bias = layer_norm_params(48, 1)
    summed, normed = add_layernorm(x, update, weight, bias, 1e-5, torch.float32)
    expected_sum = x.double() + update.double()
    torch.testing.assert_close(summed.double(), expected_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed.double(), F.layer_norm(expected_sum, (48,), weight.double(), bias.double(), 1e-5),
                               rtol=2e-5, atol=2e-5)
    summed, normed = add_layernorm(torch.empty(0, 48), torch.empty(0, 48), weight, bias, 1e-5, torch.float32)
    assert summed.shape == normed.shape == (0, 48)


def test_add_layernorm_rejects_bad_input():
    x, weight, bias = torch.randn(4, 32), torch.ones(32), torch.zeros(32)
    with pytest.raises(TypeError, match=r"residual stream\) must be float32"):
        add_layernorm(x.double(), None, weight, bias, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="update must have x's shape"):
        add_layernorm(x, torch.randn(4, 33), weight, bias, 1e-6, torch.float32)
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor \[..., 32\]"):
        add_layernorm(torch.randn(4, 31), None, weight, bias, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="must be contiguous"):
        add_layernorm(torch.randn(32, 4).t(), None, weight, bias, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="bias must be"):
        add_layernorm(x, None, weight, torch.zeros(31), 1e-6, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        add_layernorm(x, None, weight, bias, 1e-6, torch.int32)


def random_block(block_class, dim=40, heads=2, seed=0):
    torch.manual_seed(seed)
    block = block_class(dim, heads, mlp_ratio=2.0, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block.eval()


@pytest.mark.parametrize("block_class", [Block, CausalBlock])
def test_block_with_triton_norms_matches_float64(block_class):
    block = random_block(block_class)
    reference = copy.deepcopy(block).double()
    reference.norm_backend = "torch"
    x = 2 + torch.randn(2, 9, 40)
    block.norm_backend = "triton"
    with torch.no_grad():
        fused = block(x)
        expected = reference(x.double())
    torch.testing.assert_close(fused.double(), expected, rtol=1e-4, atol=1e-4)


def test_norm_backend_choice_and_errors():
    block = random_block(Block)
    x = torch.randn(1, 3, 40)
    with torch.no_grad():
        assert block.fused_norm_dtype(x) is None  # auto: torch LayerNorms off CUDA
        block.norm_backend = "triton"
        assert block.fused_norm_dtype(x) == torch.float32
        with pytest.raises(RuntimeError, match="float32"):
            block.fused_norm_dtype(x.double())
    with pytest.raises(RuntimeError, match="autograd is on"):
        block(x)
    block.norm_backend = "fast"
    with pytest.raises(ValueError, match="norm_backend must be one of"):
        block(x)
    with pytest.raises(ValueError, match="norm_backend must be one of"):
        set_norm_backend(block, "fast")


def test_mlp_forward_inference_runs_the_gelu_gemm_only_where_it_computes_forward(monkeypatch):
    """The fused fc1 + GELU stands in for fc1 -> GELU -> dropout only where dropout is inactive and
    the activation is the exact GELU; elsewhere forward runs as written."""
    torch.manual_seed(2)
    x = torch.randn(2, 5, 24)
    mlp = Mlp(24, 40).eval()
    with torch.no_grad():
        torch.testing.assert_close(mlp.forward_inference(x).double(), copy.deepcopy(mlp).double()(x.double()),
                                   rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(mar_module, "linear_gelu", lambda *args: pytest.fail("the fused GEMM must not run here"))
    for changed in (Mlp(24, 40, drop=0.5).train(), Mlp(24, 40).eval()):
        if not changed.training:
            changed.act = nn.GELU(approximate="tanh")
        with torch.no_grad():
            torch.manual_seed(3)
            expected = changed(x)
            torch.manual_seed(3)
            torch.testing.assert_close(changed.forward_inference(x), expected)


@pytest.mark.parametrize("depth", [1, 3])
def test_blocks_then_norm_adds_each_mlp_output_in_the_next_norm(depth, monkeypatch, poisoned_outputs):
    """`run_blocks_then_norm` on the fused norms: one pass per LayerNorm (2 per block + the final
    norm), the first without an update, every later one adding the branch output before it; the
    result matches the torch modules in float64, and the final norm writes float32."""
    torch.manual_seed(depth)
    blocks = nn.ModuleList(random_block(Block, seed=i) for i in range(depth))
    norm = nn.LayerNorm(40, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(0.2 * torch.randn(40))
        norm.bias.add_(0.2 * torch.randn(40))
    reference_blocks, reference_norm = copy.deepcopy(blocks).double(), copy.deepcopy(norm).double()
    set_norm_backend(reference_blocks, "torch")
    set_norm_backend(blocks, "triton")
    updates = []

    def spy(x, update, *args):
        updates.append(update)
        return add_layernorm(x, update, *args)

    monkeypatch.setattr(mar_module, "add_layernorm", spy)
    x = 2 + torch.randn(2, 9, 40)
    with torch.no_grad():
        out = mar_module.run_blocks_then_norm(blocks, x, norm)
        expected = mar_module.run_blocks_then_norm(reference_blocks, x.double(), reference_norm)
    assert len(updates) == 2 * depth + 1
    assert updates[0] is None and all(u is not None for u in updates[1:])
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_blocks_then_norm_runs_each_block_where_a_norm_is_not_fused():
    """A final norm without affine parameters, or blocks on the torch norms, take the plain path
    through the caller's run_block (gradient checkpointing's hook)."""
    blocks = nn.ModuleList(random_block(Block, seed=i) for i in range(2))
    x = torch.randn(1, 4, 40)
    ran = []

    def run_block(block, x):
        ran.append(block)
        return block(x)

    for backend, norm in (("triton", nn.LayerNorm(40, elementwise_affine=False)), ("torch", nn.LayerNorm(40))):
        set_norm_backend(blocks, backend)
        ran.clear()
        with torch.no_grad():
            out = mar_module.run_blocks_then_norm(blocks, x, norm, run_block)
            expected = norm(blocks[1](blocks[0](x)))
        assert ran == list(blocks)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_mar_fast_loop_with_triton_norms_matches_torch_norms():
    """The whole sampling loop (encoder and decoder blocks) with the fused LayerNorms gives the
    tokens of the torch LayerNorms, up to fp32 rounding carried through the diffusion head."""
    torch.manual_seed(0)
    model = tiny_mar().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = {}
    for backend in ("torch", "triton"):
        set_norm_backend(model, backend)
        tokens[backend] = model.sample_tokens_fast(2, num_iter=3, cfg=2.0, labels=torch.tensor([1, 4]),
                                                   generator=torch.Generator().manual_seed(5))
    assert all(b.norm_backend == "triton" for b in (*model.encoder_blocks, *model.decoder_blocks))
    torch.testing.assert_close(tokens["triton"], tokens["torch"], rtol=1e-3, atol=1e-3)


@gpu
@needs_cuda
@pytest.mark.parametrize("dim, heads", [(768, 12), (1280, 16)], ids=["base", "huge"])
def test_gpu_block_norm_backends_agree_under_bf16_autocast(dim, heads):
    """A block at mar_base's and mar_huge's width, fp32 weights under bf16 autocast (as sampling
    runs): the fused norms give the torch norms' output within bf16 rounding of the GEMM inputs."""
    block = random_block(Block, dim, heads, seed=dim).cuda()
    x = 2 + torch.randn(4, 257, dim, device="cuda")
    outs = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for backend in ("torch", "auto"):
            block.norm_backend = backend
            outs[backend] = block(x)
        assert block.fused_norm_dtype(x) == torch.bfloat16
    reference = copy.deepcopy(block).double()
    reference.norm_backend = "torch"
    with torch.no_grad():
        exact = reference(x.double())
    error = {b: ((out.double() - exact).norm() / exact.norm()).item() for b, out in outs.items()}
    assert error["auto"] <= max(1.5 * error["torch"], 1e-4), error


@gpu
@needs_cuda
@pytest.mark.parametrize("way", ["torch", "triton"])
def test_gpu_mlp_forward_inference_either_way_matches_float64(way, monkeypatch):
    """mar_base's MLP under bf16 autocast on bf16 inputs, with the timed choice forced to each way:
    within 2x the plain forward's error against float64 (bf16 rounding of the GEMM inputs)."""
    monkeypatch.setattr(mar_module, "fastest_way", lambda choices, key, ways, what: way)
    torch.manual_seed(1)
    mlp = Mlp(768, 3072).cuda().eval()
    x = torch.randn(3, 300, 768, device="cuda").bfloat16()
    with torch.no_grad():
        exact = copy.deepcopy(mlp).double()(x.double())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            plain, fused = mlp(x), mlp.forward_inference(x)
    error = {name: ((out.double() - exact).norm() / exact.norm()).item() for name, out in (("plain", plain),
                                                                                          ("fused", fused))}
    assert fused.shape == plain.shape and fused.dtype == plain.dtype
    assert error["fused"] <= max(2 * error["plain"], 1e-3), error


@gpu
@needs_cuda
def test_gpu_mar_base_conditions_agree_across_norm_backends():
    """mar_base's transformer under bf16 autocast: the decoder outputs (the head's conditions) of
    one sampling step with fused norms match the torch norms within bf16 rounding."""
    model = mar_base(num_sampling_steps="4").cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tokens = torch.randn(2, model.seq_len, model.token_embed_dim, device="cuda")
    mask = torch.zeros(2, model.seq_len, device="cuda")
    mask[:, ::3] = 1
    class_embedding = model.class_emb(torch.tensor([3, 7], device="cuda"))
    z = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for backend in ("torch", "auto"):
            set_norm_backend(model, backend)
            z[backend] = model.forward_mae_decoder(model.forward_mae_encoder(tokens, mask, class_embedding), mask)
    error = ((z["auto"].float() - z["torch"].float()).norm() / z["torch"].float().norm()).item()
    assert error <= 2e-2, error
