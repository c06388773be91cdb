"""Fused sampling path of the diffusion head: every kernel and the whole loop against float64.

CPU tests run the Triton kernels under the interpreter (TRITON_INTERPRET=1, set by conftest.py)
in fp32 on small awkward shapes; outputs are poisoned with NaN before the kernels write them.
GPU tests (marked `gpu`) check bf16/fp16/fp32 parity at the released head sizes and that the
captured CUDA graph replays exactly what the eager launches compute.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import triton

from marfast import DiffLoss, fused_head
from marfast.diffloss import SimpleMLPAdaLN, ddpm_sample_loop_reference
from marfast.diffusion import GaussianDiffusion
from marfast.fused_head import (MAX_GRAPHS_PER_HEAD, MIN_BUCKET_ROWS, bucket_rows, ddpm_sample_loop_fused,
                                modulation_chunks, modulation_steps_per_gemm, packed_head, release_fused_cache)
from marfast.kernels.adaln_input import adaln_input
from marfast.kernels.ddpm_step import final_layer_ddpm_step, step_coefficients
from marfast.kernels import ddpm_step, linear_fused
from marfast.kernels.linear_fused import (STATS_GROUP, input_projection, linear, linear_gated_residual, linear_gelu,
                                          linear_ln_modulate_silu, stats_shape)
from marfast.mar import next_mask_len

from concurrent_programs import concurrent_programs, needs_interpreter

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = dict(rtol=2e-5, atol=2e-5)


def poisoned(*shape, dtype=torch.float32, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def randomize(net, seed=0):
    """Replace the official init (adaLN and final layers zero) by random weights of sane scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 2:
                std = (0.5 if "adaLN" in name or "final_layer" in name else 1.0) / math.sqrt(p.shape[1])
                value = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
            elif "in_ln.weight" in name:
                value = 1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                value = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(value)
    return net


def group_stats64(x):
    """float64 [R, G, 2]: (mean, sum of squared deviations) of every STATS_GROUP-column group."""
    rows, width = x.shape
    stats = torch.zeros(stats_shape(rows, width), dtype=torch.float64)
    for g in range(stats.shape[1]):
        seg = x[:, g * STATS_GROUP:(g + 1) * STATS_GROUP]
        stats[:, g, 0] = seg.mean(1)
        stats[:, g, 1] = ((seg - seg.mean(1, keepdim=True)) ** 2).sum(1)
    return stats


def modulate_ln64(x, shift, scale, weight=None, bias=None, eps=1e-6):
    h = F.layer_norm(x, (x.shape[1],), weight, bias, eps)
    return h * (1 + scale) + shift


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def assert_close64(actual, expected, rtol=FP32_TOL["rtol"], atol=FP32_TOL["atol"]):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# kernels, one at a time (interpreter on CPU, fp32)

@pytest.mark.parametrize("rows,k,n", [(1, 40, 72), (7, 72, 40), (33, 24, 40)])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "linear_gelu"])
def test_linear_matches_float64(rows, k, n, gelu):
    torch.manual_seed(rows)
    a, w, b = torch.randn(rows, k), torch.randn(n, k) / math.sqrt(k), torch.randn(n)
    out = poisoned(rows, n)
    (linear_gelu if gelu else linear)(*on_device(a, w, b), out)
    expected = a.double() @ w.double().T + b.double()
    assert_close64(out, F.gelu(expected) if gelu else expected)


@pytest.mark.parametrize("state_rows,repeat,width", [(7, 2, 40), (1, 1, 72), (33, 1, 40)])
def test_input_projection_writes_residual_and_stats(state_rows, repeat, width):
    torch.manual_seed(width + state_rows)
    rows, channels = state_rows * repeat, 16
    state, w, b = torch.randn(state_rows, channels), torch.randn(width, channels), torch.randn(width)
    residual, stats = poisoned(rows, width), poisoned(*stats_shape(rows, width))
    input_projection(*on_device(state, w, b), residual, stats)
    expected = (state.double() @ w.double().T + b.double()).repeat(repeat, 1)
    assert_close64(residual, expected)
    assert_close64(stats, group_stats64(expected), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("steps,rows,width", [(3, 7, 40), (1, 33, 72), (5, 1, 24)])
def test_adaln_input_matches_float64(steps, rows, width):
    """out[k, r] = SiLU(time[k] + cond[r]), also into a slice of a larger buffer (as the loop's last chunk)."""
    torch.manual_seed(steps + rows + width)
    time, cond = torch.randn(steps, width), torch.randn(rows, width)
    buffer = poisoned(steps + 2, rows, width)
    adaln_input(*on_device(time, cond), buffer[:steps])
    assert_close64(buffer[:steps], F.silu(time.double()[:, None] + cond.double()[None]))
    assert torch.isnan(buffer[steps:]).all()


def test_adaln_input_rejects_bad_input():
    time, cond, out = on_device(torch.randn(2, 40), torch.randn(3, 40), torch.empty(2, 3, 40))
    with pytest.raises(ValueError, match="time must have shape \\(2, 40\\)"):
        adaln_input(time[:1], cond, out)
    with pytest.raises(ValueError, match="cond must have shape \\(3, 40\\)"):
        adaln_input(time, cond[:, :39], out)
    with pytest.raises(TypeError, match="time must have dtype"):
        adaln_input(time.half(), cond, out)
    with pytest.raises(TypeError, match="out dtype"):
        adaln_input(time, cond, out.double())
    with pytest.raises(ValueError, match="3-D"):
        adaln_input(time, cond, out[0])
    with pytest.raises(ValueError, match="unit column stride"):
        adaln_input(time, cond, torch.empty(40, 3, 2, device=DEVICE).permute(2, 1, 0))


@pytest.mark.parametrize("two_pass", [False, True], ids=["prologue", "two_pass"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("rows,width,n", [(7, 40, 72), (33, 72, 40), (1, 40, 40)])
def test_linear_ln_modulate_silu_matches_float64(rows, width, n, affine, two_pass, monkeypatch):
    """Both paths: LN-modulate fused into the GEMM prologue (few rows) or written once, then a plain GEMM."""
    monkeypatch.setattr(linear_fused, "PROLOGUE_MAX_ROWS", 0 if two_pass else 1 << 30)
    torch.manual_seed(rows + width)
    x = torch.randn(rows, width) * 2 + 3
    modulation = torch.randn(rows, 3 * width).to(DEVICE)  # shift and scale are strided views, as in the loop
    shift, scale = modulation[:, width:2 * width], modulation[:, 2 * width:]
    ln_w, ln_b = (1 + 0.1 * torch.randn(width), 0.1 * torch.randn(width)) if affine else (None, None)
    w, b = torch.randn(n, width), torch.randn(n)
    stats = group_stats64(x.double()).float()
    out = poisoned(rows, n)
    linear_ln_modulate_silu(*on_device(x, stats, ln_w, ln_b, shift, scale, w, b), out)
    d = lambda t: None if t is None else t.double()
    h = modulate_ln64(x.double(), shift.double(), scale.double(), d(ln_w), d(ln_b))
    assert_close64(out, F.silu(h @ w.double().T + b.double()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_chunk", [1, 2])
@pytest.mark.parametrize("two_pass", [False, True], ids=["prologue", "two_pass"])
def test_layernorm_statistics_merge_chunks(max_chunk, two_pass, monkeypatch):
    """Rows whose statistics groups are read in several chunks (72 columns: groups of 32, 32 and 8;
    at most 1 or 2 groups per chunk), merged by Chan's formula, on a mean far from zero."""
    monkeypatch.setattr(linear_fused, "MAX_STATS_CHUNK", max_chunk)
    test_linear_ln_modulate_silu_matches_float64(7, 72, 40, True, two_pass, monkeypatch)


def fake_gpu_timings(monkeypatch, choice_tables, faster, way_of):
    """The launchers' GPU configurations under the interpreter, with faked timings: a timed run takes
    1 ms when way_of(the kernel names it launched) is `faster`, else 2 ms. Empties the tuner's and
    the named choice tables for the test; returns the list recording every launch's kernel name.
    (InterpretedFunction.run is patched on the class: an instance patch would outlive the test.)"""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(linear_fused, "gpu_configs", lambda device: True)
    for table in ("_TUNED", "_TIMINGS") + tuple(choice_tables):
        monkeypatch.setattr(linear_fused, table, {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launched = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: (launched.append(self.fn.__name__),
                                                                          run(self, *a, **k))[1])

    def fake_time(run, repeats=1, queue_cycles=0):
        launched.clear()
        run()
        return 1.0 if way_of(launched) == faster else 2.0

    monkeypatch.setattr(linear_fused, "time_launches", fake_time)
    return launched


@pytest.mark.parametrize("faster", ["two_pass", "fused_prologue"])
def test_ln_modulate_prologue_choice_is_timed_once_per_shape(faster, monkeypatch):
    """With the GPU configurations at few rows, both ways (fused prologue, written once + plain GEMM)
    are timed once per shape, the faster one runs then and afterwards, and the result is the same
    function; timing during CUDA graph capture is refused. (Timings faked: the interpreter runs it.)"""
    launched = fake_gpu_timings(monkeypatch, ("_PROLOGUE_CHOICE",), faster,
                                lambda names: "two_pass" if "_ln_modulate_kernel" in names else "fused_prologue")
    rows, width, n = 5, 40, 72
    torch.manual_seed(3)
    x = torch.randn(rows, width) * 2 + 3
    shift, scale = torch.randn(rows, width), torch.randn(rows, width)
    w, b = torch.randn(n, width), torch.randn(n)
    stats = group_stats64(x.double()).float()
    expected = F.silu(modulate_ln64(x.double(), shift.double(), scale.double()) @ w.double().T + b.double())
    for call in range(2):
        launched.clear()
        out = poisoned(rows, n)
        linear_ln_modulate_silu(x, stats, None, None, shift, scale, w, b, out)
        assert_close64(out, expected, rtol=1e-4, atol=1e-4)
        if call == 1:  # chosen and tuned: exactly the launches of the faster way
            two_pass = ["_ln_modulate_kernel", "_linear_fused_kernel"]
            assert launched == (two_pass if faster == "two_pass" else ["_linear_fused_kernel"])
    assert list(linear_fused._PROLOGUE_CHOICE.values()) == [faster]
    decisions = linear_fused.timed_choices()  # what profiles record: every timing, per call, and the winner
    prologue = [d for d in decisions if "prologue" in d["what"] and "GEMM" not in d["what"]]
    assert len(prologue) == 1 and prologue[0]["chosen"] == faster
    slower = ({"two_pass", "fused_prologue"} - {faster}).pop()
    repeats = linear_fused.TUNE_REPEATS
    assert prologue[0]["ms_per_call"] == {faster: 1.0 / repeats, slower: 2.0 / repeats}
    gemms = [d for d in decisions if d["what"].startswith("GEMM (")]
    assert gemms and all(d["chosen"] in d["ms_per_call"] and len(d["ms_per_call"]) > 1 for d in gemms)
    assert any("bias + SiLU epilogue" in d["what"] for d in gemms)
    monkeypatch.setattr(linear_fused, "_PROLOGUE_CHOICE", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="not timed before CUDA graph capture"):
        linear_ln_modulate_silu(x, stats, None, None, shift, scale, w, b, poisoned(rows, n))


@pytest.mark.parametrize("rows,k,width", [(7, 40, 72), (33, 72, 40)])
def test_linear_gated_residual_matches_float64(rows, k, width):
    torch.manual_seed(rows + k)
    h, w, b = torch.randn(rows, k), torch.randn(width, k), torch.randn(width)
    gate = torch.randn(rows, 2 * width).to(DEVICE)[:, width:]
    residual = torch.randn(rows, width)
    out, stats = poisoned(rows, width), poisoned(*stats_shape(rows, width))
    linear_gated_residual(*on_device(h, w, b, gate, residual), out, stats)
    expected = residual.double() + gate.double() * (h.double() @ w.double().T + b.double())
    assert_close64(out, expected, rtol=1e-5, atol=1e-4)
    assert_close64(stats, group_stats64(expected), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("faster", ["triton", "cublas"])
def test_block_gemms_time_cublas_against_triton_above_skinny_rows(faster, monkeypatch):
    """Above SKINNY_MAX_ROWS with the GPU configurations, both block launchers time their Triton
    GEMM against cuBLAS followed by the epilogue as its own pass, keep the faster for the shape,
    and compute the same function either way: LayerNorm statistics included, partial last
    statistics group (width 72), outputs poisoned. (Timings faked: the interpreter runs it.)"""
    launched = fake_gpu_timings(monkeypatch, ("_GEMM_WAY_CHOICE",), faster,
                                lambda names: "triton" if "_linear_fused_kernel" in names else "cublas")
    rows, k, width = 70, 40, 72
    torch.manual_seed(11)
    h, w, b = torch.randn(rows, k), torch.randn(width, k), torch.randn(width)
    gate, residual = torch.randn(rows, 2 * width)[:, width:], torch.randn(rows, width)
    expected_sum = residual.double() + gate.double() * (h.double() @ w.double().T + b.double())
    x = torch.randn(rows, k) * 2 + 1
    shift, scale = torch.randn(rows, k), torch.randn(rows, k)
    ln_w, ln_b = 1 + 0.1 * torch.randn(k), 0.1 * torch.randn(k)
    expected_silu = F.silu(modulate_ln64(x.double(), shift.double(), scale.double(), ln_w.double(), ln_b.double())
                           @ w.double().T + b.double())
    for call in range(2):
        launched.clear()
        out, stats = poisoned(rows, width), poisoned(*stats_shape(rows, width))
        linear_gated_residual(h, w, b, gate, residual, out, stats)
        assert_close64(out, expected_sum, rtol=1e-5, atol=1e-4)
        assert_close64(stats, group_stats64(expected_sum), rtol=1e-5, atol=1e-3)
        if call == 1:  # chosen and tuned: exactly the launches of the faster way
            assert launched == (["_linear_fused_kernel"] if faster == "triton" else ["_gated_residual_stats_kernel"])
        launched.clear()
        hidden = poisoned(rows, width)
        linear_ln_modulate_silu(x, group_stats64(x.double()).float(), ln_w, ln_b, shift, scale, w, b, hidden)
        assert_close64(hidden, expected_silu, rtol=1e-4, atol=1e-4)
        if call == 1:
            assert launched == ["_ln_modulate_kernel"] + (["_linear_fused_kernel"] if faster == "triton" else [])
    ways = {d["what"]: d["chosen"] for d in linear_fused.timed_choices() if "Triton or cuBLAS" in d["what"]}
    assert ways == {"linear_gated_residual's GEMM (Triton or cuBLAS)": {"triton": "fused_epilogue",
                                                                       "cublas": "cublas_gemm"}[faster],
                    "linear_ln_modulate_silu's GEMM (Triton or cuBLAS)": {"triton": "two_pass",
                                                                          "cublas": "two_pass_cublas"}[faster]}


def force_split_k(monkeypatch, block_m=16, block_n=32, block_k=16, split=3):
    """Make every GEMM launch, and every final-layer launch, that gets a SplitKWorkspace run this one
    K-split configuration."""
    def configs(configs, M, N, K, gpu, has_workspace):
        return [(block_m, block_n, block_k, 4, 1, split if has_workspace else 1)]

    def final_configs(rows, width, channels, gpu, has_workspace=False):
        return [(block_m, max(16, triton.next_power_of_2(channels)), block_k, 4, split if has_workspace else 1)]

    monkeypatch.setattr(linear_fused, "_with_split_k", configs)
    monkeypatch.setattr(ddpm_step, "_candidate_block_sizes", final_configs)


@pytest.mark.parametrize("rows,k,width,split", [(7, 72, 40, 3), (33, 40, 72, 2), (1, 72, 40, 5), (70, 72, 40, 3)])
def test_split_k_gemms_match_float64_and_are_deterministic(rows, k, width, split, monkeypatch):
    """K split over `split` programs per output tile (K = 72 in 16-deep steps: parts of 32, 32, 8
    for split 3); the last program to arrive sums the partial tiles in split order, so reruns are
    bitwise equal, and leaves every arrival counter at zero for the next launch."""
    force_split_k(monkeypatch, split=split)
    torch.manual_seed(rows + k + split)
    workspace = linear_fused.SplitKWorkspace(DEVICE)
    h, w, b = torch.randn(rows, k), torch.randn(width, k), torch.randn(width)
    gate, residual = torch.randn(rows, 2 * width).to(DEVICE)[:, width:], torch.randn(rows, width)
    outs = []
    for _ in range(2):
        out, stats = poisoned(rows, width), poisoned(*stats_shape(rows, width))
        linear_gated_residual(*on_device(h, w, b), gate, *on_device(residual), out, stats, workspace)
        outs.append(out)
    expected = residual.double() + gate.double() * (h.double() @ w.double().T + b.double())
    assert_close64(outs[0], expected, rtol=1e-5, atol=1e-4)
    assert_close64(stats, group_stats64(expected), rtol=1e-5, atol=1e-3)
    assert torch.equal(outs[0], outs[1])
    assert workspace.counters.numel() > 0 and not workspace.counters.any()

    x = torch.randn(rows, k) * 2 + 1
    modulation = torch.randn(rows, 2 * k).to(DEVICE)
    ln_w, ln_b = 1 + 0.1 * torch.randn(k), 0.1 * torch.randn(k)
    out = poisoned(rows, width)
    linear_ln_modulate_silu(*on_device(x, group_stats64(x.double()).float(), ln_w, ln_b), modulation[:, :k],
                            modulation[:, k:], *on_device(w, b), out, split_k=workspace)
    h64 = modulate_ln64(x.double(), modulation[:, :k].double().cpu(), modulation[:, k:].double().cpu(),
                        ln_w.double(), ln_b.double())
    assert_close64(out, F.silu(h64 @ w.double().T + b.double()), rtol=1e-4, atol=1e-4)
    assert not workspace.counters.any()


def test_split_k_candidates_follow_the_output_tile_count():
    """K splits are tried (on a GPU, with a workspace) wherever a GEMM has fewer than
    SPLIT_K_PROGRAMS output tiles, whatever its row count, for about that many programs."""
    def splits(M, N=1024, K=1024, gpu=True, workspace=True):
        configs = linear_fused._candidate_configs(M, N, K, 2, gpu)
        return {(c[0], c[1], c[5]) for c in linear_fused._with_split_k(configs, M, N, K, gpu, workspace) if c[5] > 1}

    assert splits(8) == {(16, 32, 4), (16, 64, 8)}  # 32 and 16 tiles, K steps of 128 and 64
    assert splits(128) == {(64, 64, 4), (64, 128, 8), (128, 128, 16)}  # 32, 16 and 8 tiles, 16 K steps
    assert splits(512) == {(64, 128, 2), (128, 128, 4)}  # 64 and 32 tiles; 128 tiles of 64 x 64 run unsplit
    assert splits(4096) == set() and splits(16, N=20480) == set()
    assert splits(8, gpu=False) == set() and splits(8, workspace=False) == set()


def test_fused_loop_with_split_k_gemms_matches_reference(monkeypatch):
    force_split_k(monkeypatch, block_k=16, split=2)
    net = make_net(40, 2, seed=9)
    fused, reference = run_both_packed(net, 3, 7, 2.0)
    assert relative_error(fused[:7], reference[:7]) < 1e-5


@needs_interpreter
def test_split_k_launches_with_concurrent_programs_equal_the_sequential_ones(monkeypatch):
    """The launch chain with K split in 3, each launch's programs in their own threads
    (tests/concurrent_programs.py), so any split of a tile may arrive last: bitwise the result of
    programs run one after another (the partials are summed in split order), every arrival counter
    back at zero."""
    force_split_k(monkeypatch, block_k=16, split=3)
    net = make_net(40, 2, seed=12)
    sequential, _ = run_both_packed(net, 2, 5, 2.0)
    program_counts = concurrent_programs(monkeypatch, linear_fused._linear_fused_kernel,
                                         ddpm_step._final_layer_ddpm_step_kernel)
    workspaces = []
    init = fused_head._Workspace.__init__
    monkeypatch.setattr(fused_head._Workspace, "__init__",
                        lambda self, *args: (init(self, *args), workspaces.append(self))[0])
    concurrent, _ = run_both_packed(net, 2, 5, 2.0)
    assert program_counts and max(program_counts) >= 6  # 2 column tiles x 3 K parts
    assert torch.equal(concurrent, sequential)
    assert len(workspaces) == 1 and not workspaces[0].split_k.counters.any()


def test_split_k_workspace_is_checked():
    x, w, b, gate, out = on_device(torch.randn(4, 40), torch.randn(40, 40), torch.randn(40), torch.randn(4, 40),
                                   torch.empty(4, 40))
    stats = torch.zeros(stats_shape(4, 40), device=DEVICE)
    with pytest.raises(ValueError, match="split_k must be a SplitKWorkspace"):
        linear_gated_residual(x, w, b, gate, out.clone(), out, stats, split_k=object())
    state = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="split_k must be a SplitKWorkspace"):
        final_layer_ddpm_step(x, stats, gate, gate, torch.randn(16, 40, device=DEVICE), torch.zeros(16, device=DEVICE),
                              state, state.clone(), state.clone(), torch.zeros(4, device=DEVICE),
                              step_coefficients(GaussianDiffusion(2), 0), use_cfg=False, split_k=object())


def test_programmatic_launch_setting(monkeypatch):
    """PDL is a CUDA sm_90+ launch option; MARFAST_PDL=0 turns it off before any device query, and
    any other value than 0 or 1 is an error."""
    assert linear_fused.programmatic_launch(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv(linear_fused.PDL_ENV, "0")
    assert linear_fused.programmatic_launch(torch.device("cuda")) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv(linear_fused.PDL_ENV, "yes")
    with pytest.raises(ValueError, match="MARFAST_PDL must be 0 or 1"):
        linear_fused.programmatic_launch(torch.device("cpu"))


def test_launchers_reject_bad_input():
    x, w, b, gate, out = on_device(torch.randn(4, 40), torch.randn(40, 40), torch.randn(40), torch.randn(4, 40),
                                   torch.empty(4, 40))
    stats = torch.zeros(stats_shape(4, 40), device=DEVICE)
    with pytest.raises(ValueError, match="must not alias"):
        linear_gated_residual(x, w, b, gate, x, x, stats)
    with pytest.raises(ValueError, match="stats_out must be float32 of shape"):
        linear_gated_residual(x, w, b, gate, x, out, torch.zeros(4, 3, 2, device=DEVICE))
    with pytest.raises(ValueError, match="a must have shape"):
        linear(x[:, :39], w, b, out)
    with pytest.raises(TypeError, match="weight dtype"):
        linear(x, w.double(), b, out)
    with pytest.raises(ValueError, match="unit column stride"):
        linear(torch.randn(40, 4, device=DEVICE).T, w, b, out)
    with pytest.raises(ValueError, match="out must have 4 rows"):
        linear_gelu(x, w, b, torch.empty(3, 40, device=DEVICE))
    with pytest.raises(ValueError, match="must not alias"):
        linear_gelu(x, w, b, x)


def final_layer_step64(h, shift, scale, w, b, x_t, noise, diffusion, step, temperature, cfg, uncond, clip):
    """float64 reference of the final layer + CFG mixing + one reverse DDPM step."""
    c = x_t.shape[1]
    out = modulate_ln64(h, shift, scale) @ w.T + b
    eps, v = out[:len(x_t), :c], out[:len(x_t), c:]
    if uncond is not None:
        eps_u = out[uncond:uncond + len(x_t), :c]
        eps = eps_u + cfg * (eps - eps_u)
    return diffusion.p_sample_step(eps, v, x_t, step, noise, temperature, clip)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("rows,use_cfg,step,clip", [(7, True, 3, None), (1, False, 0, None), (33, True, 0, (-1.0, 1.0)),
                                                    (7, False, 2, (-0.5, 0.5))])
def test_final_layer_ddpm_step_matches_float64(rows, use_cfg, step, clip, split, monkeypatch):
    """Against float64, unsplit and with the width split over 3 programs (16-column K steps over
    width 40: the last part is short); split, two runs agree bitwise and the arrival counters are
    left at zero."""
    torch.manual_seed(rows + step)
    width, channels = 40, 16
    diffusion = GaussianDiffusion(5)
    net_rows = 2 * rows + 3 if use_cfg else rows  # padded net rows, as in a row bucket
    uncond = rows + 3 if use_cfg else None
    h = torch.randn(net_rows, width) + 1
    modulation = 0.3 * torch.randn(net_rows, 2 * width)
    shift, scale = modulation[:, :width], modulation[:, width:]
    w, b = torch.randn(2 * channels, width) / math.sqrt(width), 0.1 * torch.randn(2 * channels)
    x_t, noise = torch.randn(rows, channels), torch.randn(rows, channels)
    cfg, temperature = 2.5, 0.7
    lo, hi = clip if clip is not None else (0.0, 0.0)
    scalars = torch.tensor([cfg, temperature, lo, hi])
    modulation_dev = modulation.to(DEVICE)
    workspace = None
    if split > 1:
        force_split_k(monkeypatch, split=split)
        workspace = linear_fused.SplitKWorkspace(DEVICE)
    outs = []
    for _ in range(2):
        out = poisoned(rows, channels)
        final_layer_ddpm_step(*on_device(h, group_stats64(h.double()).float()), modulation_dev[:, :width],
                              modulation_dev[:, width:], *on_device(w, b, x_t, noise), out, scalars.to(DEVICE),
                              step_coefficients(diffusion, step), use_cfg=use_cfg, uncond_row_offset=uncond or 0,
                              add_noise=step > 0, clip_x0=clip is not None, split_k=workspace)
        outs.append(out)
    expected = final_layer_step64(h.double(), shift.double(), scale.double(), w.double(), b.double(), x_t.double(),
                                  noise.double(), diffusion, step, temperature, cfg, uncond, clip)
    assert_close64(outs[0], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[0], outs[1])
    if workspace is not None:
        assert workspace.counters.numel() > 0 and not workspace.counters.any()


# ---------------------------------------------------------------------------------------------
# the whole loop

def make_net(width, depth, channels=16, z_channels=24, seed=0, dtype=torch.float32, device=DEVICE):
    torch.manual_seed(seed)
    net = SimpleMLPAdaLN(channels, width, 2 * channels, z_channels, depth)
    return randomize(net, seed).to(device=device, dtype=dtype)


def loop_inputs(steps, state_rows, cfg, channels, z_channels, seed=0):
    """(diffusion, z [R, Z], x [R, C], step noise [S, B, C], draw_noise for the reference), CPU fp32."""
    gen = torch.Generator().manual_seed(seed)
    use_cfg = cfg != 1.0
    rows = 2 * state_rows if use_cfg else state_rows
    z = torch.randn(rows, z_channels, generator=gen)
    x_t = torch.randn(state_rows, channels, generator=gen)
    noise = torch.randn(steps, state_rows, channels, generator=gen)
    x = torch.cat([x_t, x_t]) if use_cfg else x_t

    def draw_noise(step, like):
        n = noise[step].to(like)
        return torch.cat([n, torch.randn_like(n)]) if use_cfg else n

    return GaussianDiffusion(steps), z, x, noise, draw_noise


def run_both(net, steps, state_rows, cfg, temperature, clip, seed=0, net64=None, device=DEVICE):
    """(fused [R, C], float64 reference [R, C] on net64's device) with the same x_T and step noise."""
    diffusion, z, x, noise, draw_noise = loop_inputs(steps, state_rows, cfg, net.in_channels,
                                                     net.cond_embed.weight.shape[1], seed)
    fused = ddpm_sample_loop_fused(net, diffusion, z.to(device), x.to(device), temperature, cfg, noise.to(device), clip)
    net64 = net64 if net64 is not None else copy.deepcopy(net).double().cpu()
    like = net64.input_proj.weight
    reference = ddpm_sample_loop_reference(net64, diffusion, z.to(like), x.to(like), temperature, cfg,
                                           lambda step: draw_noise(step, like), clip)
    return fused, reference.cpu()


def run_both_packed(net, steps, state_rows, cfg, **pack_settings):
    """`run_both` (temperature 1, no clip) with these attributes set on the net's packed head
    (e.g. modulation_provider), which is released afterwards."""
    pack = packed_head(net)
    for name, value in pack_settings.items():
        setattr(pack, name, value)
    try:
        return run_both(net, steps, state_rows, cfg, 1.0, None)
    finally:
        release_fused_cache(net)


def relative_error(actual, expected):
    return ((actual.double().cpu() - expected).abs().max() / (expected.abs().max() + 1)).item()


@pytest.mark.parametrize("width,depth,state_rows,cfg,temperature,clip", [
    (40, 2, 7, 1.0, 1.0, None),
    (72, 3, 1, 3.0, 0.9, None),
    (40, 2, 33, 2.0, 0.0, None),
    (40, 2, 7, 1.5, 1.0, (-1.0, 1.0)),
    (72, 2, 7, 1.0, 0.0, (-2.0, 2.0)),
])
def test_fused_loop_matches_reference(width, depth, state_rows, cfg, temperature, clip):
    net = make_net(width, depth, seed=width + state_rows)
    fused, reference = run_both(net, 3, state_rows, cfg, temperature, clip)
    assert fused.dtype == torch.float32 and fused.shape == reference.shape
    assert relative_error(fused[:state_rows], reference[:state_rows]) < 1e-5
    if cfg != 1.0:
        assert torch.equal(fused[state_rows:], fused[:state_rows])


@pytest.mark.parametrize("provider", ["triton", "cublas"])
def test_fused_loop_matches_reference_with_either_modulation_gemm(provider):
    """The adaLN modulation GEMM through the Triton `linear` launcher or torch.addmm ("auto" picks
    by measured time on CUDA and torch.addmm elsewhere)."""
    net = make_net(40, 2, seed=11)
    fused, reference = run_both_packed(net, 3, 7, 2.0, modulation_provider=provider)
    assert relative_error(fused[:7], reference[:7]) < 1e-5
    packed_head(net).modulation_provider = "fastest"
    with pytest.raises(ValueError, match="modulation_provider must be one of"):
        run_both(net, 3, 7, 2.0, 1.0, None)
    release_fused_cache(net)


def test_fused_loop_handles_zero_rows_and_rejects_bad_input():
    net = make_net(40, 2)
    diffusion = GaussianDiffusion(3)
    z, x, noise = on_device(torch.randn(4, 24), torch.randn(4, 16), torch.randn(3, 2, 16))
    assert ddpm_sample_loop_fused(net, diffusion, z[:0], x[:0], 1.0, 1.0, noise[:, :0]).shape == (0, 16)
    with pytest.raises(ValueError, match="step_noise must be float32 of shape \\(3, 4, 16\\)"):
        ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 1.0, noise)
    with pytest.raises(ValueError, match="even number of rows"):
        ddpm_sample_loop_fused(net, diffusion, z[:3], x[:3], 1.0, 2.0, noise)
    with pytest.raises(TypeError, match="must be float32"):
        ddpm_sample_loop_fused(net, diffusion, z, x.double(), 1.0, 2.0, noise)
    with pytest.raises(TypeError, match="float64 z"):
        ddpm_sample_loop_fused(net, diffusion, z.double(), x, 1.0, 2.0, noise)
    with pytest.raises(ValueError, match="clip_x0"):
        ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 2.0, noise, clip_x0=(1.0, -1.0))
    with pytest.raises(ValueError, match="temperature"):
        ddpm_sample_loop_fused(net, diffusion, z, x, -1.0, 2.0, noise)


def test_packed_weights_follow_parameter_updates():
    net = make_net(40, 2)
    first = packed_head(net)
    assert packed_head(net) is first
    with torch.no_grad():
        net.res_blocks[1].adaLN_modulation[1].weight.mul_(-1.5)  # in-place update bumps the version counter
    assert packed_head(net) is not first
    fused, reference = run_both(net, 2, 5, 2.0, 1.0, None)
    assert relative_error(fused[:5], reference[:5]) < 1e-5
    release_fused_cache(net)
    assert packed_head(net) is not first


def test_packed_weights_follow_a_load_under_inference_mode():
    """A head built under inference_mode has inference-tensor parameters (no version counters):
    load_state_dict writes them in place, and the pack still follows (against float64)."""
    diffusion, z, x, noise, draw_noise = loop_inputs(3, 5, 2.0, 16, 24)
    with torch.inference_mode():
        net = make_net(40, 2)
    assert net.input_proj.weight.is_inference()
    for seed in (1, 2):
        net64 = make_net(40, 2, device="cpu").double()
        randomize(net64, seed)
        with torch.inference_mode():
            net.load_state_dict(net64.state_dict())
            z_on, x_on, noise_on = on_device(z, x, noise)
            fused = ddpm_sample_loop_fused(net, diffusion, z_on, x_on, 1.0, 2.0, noise_on)
        reference = ddpm_sample_loop_reference(net64, diffusion, z.double(), x.double(), 1.0, 2.0,
                                               lambda step: draw_noise(step, net64.input_proj.weight))
        assert relative_error(fused[:5], reference[:5]) < 1e-5
    release_fused_cache(net)


def test_fused_loop_computes_in_the_autocast_dtype(monkeypatch):
    """Under autocast (the official sampler runs under it) the loop computes with a cached cast copy
    of the weights in autocast's dtype, as the reference backend's Linear layers do; the parameters
    stay as they are. (The interpreter computes bf16 wrongly: the numbers are checked on the GPU.)"""
    bf16, device_type = torch.bfloat16, torch.device(DEVICE).type
    net = make_net(40, 1)
    with torch.autocast(device_type, dtype=bf16):
        assert fused_head.compute_dtype(net) == bf16
        assert fused_head.compute_dtype(copy.deepcopy(net).double()) is None  # autocast leaves float64 alone
    assert fused_head.compute_dtype(net) is None
    own, cast = packed_head(net), packed_head(net, bf16)
    assert own.dtype == torch.float32 and own.input_weight.data_ptr() == net.input_proj.weight.data_ptr()
    assert cast.dtype == bf16 and torch.equal(cast.input_weight, net.input_proj.weight.to(bf16))
    assert torch.equal(cast.ada_weight, own.ada_weight.to(bf16)) and cast.ada_weight.dtype == bf16
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert packed_head(net) is own and packed_head(net, bf16) is cast and packed_head(net, torch.float32) is own
    with torch.no_grad():
        net.input_proj.weight.mul_(2.0)
    fresh = packed_head(net, bf16)
    assert fresh is not cast and torch.equal(fresh.input_weight, net.input_proj.weight.to(bf16))
    assert packed_head(net) is not own
    chosen = []

    def recording(net, dtype=None):
        chosen.append(dtype)
        raise KeyboardInterrupt

    monkeypatch.setattr(fused_head, "packed_head", recording)
    z, x, noise = on_device(torch.randn(3, 24), torch.randn(3, 16), torch.randn(2, 3, 16))
    for autocast in (True, False):
        with torch.autocast(device_type, dtype=bf16, enabled=autocast), pytest.raises(KeyboardInterrupt):
            ddpm_sample_loop_fused(net, GaussianDiffusion(2), z, x, 1.0, 1.0, noise)
    assert chosen == [bf16, None]
    release_fused_cache(net)


def test_diffloss_sample_triton_backend_matches_torch_backend():
    torch.manual_seed(0)
    heads = {}
    for backend in ("torch", "triton"):
        heads[backend] = DiffLoss(16, 24, 2, 40, 4, backend=backend)
    randomize(heads["torch"].net, 3)
    heads["triton"].load_state_dict(heads["torch"].state_dict())
    assert list(heads["torch"].state_dict()) == list(heads["triton"].state_dict())
    for head in heads.values():
        head.to(DEVICE)
    z, noise = on_device(torch.randn(10, 24), torch.randn(5, 16))
    ref = heads["torch"].sample(z, temperature=0.0, cfg=2.0, noise=noise)
    out = heads["triton"].sample(z, temperature=0.0, cfg=torch.tensor([2.0]), noise=noise)
    assert out.shape == ref.shape == (10, 16) and out.dtype == torch.float32
    assert relative_error(out[:5], ref[:5].double().cpu()) < 1e-5
    drawn = heads["triton"].sample(z[:3], temperature=1.0, generator=torch.Generator(DEVICE).manual_seed(1))
    assert drawn.shape == (3, 16) and torch.isfinite(drawn).all()
    assert list(heads["triton"].state_dict()) == list(heads["torch"].state_dict())  # nothing registered by sampling
    with pytest.raises(TypeError, match="float64"):
        heads["triton"].sample(z.double())


def test_modulation_steps_per_gemm_and_chunks():
    assert modulation_steps_per_gemm(16, 100) == 50  # 1024 // 16 = 64 steps at most: two balanced GEMMs
    assert modulation_steps_per_gemm(32, 100) == 25
    assert modulation_steps_per_gemm(8, 100) == 100
    assert modulation_steps_per_gemm(8192, 100) == 1
    assert modulation_steps_per_gemm(14, 5, gemm_rows=28) == 2
    with pytest.raises(ValueError, match="modulation_gemm_rows"):
        modulation_steps_per_gemm(16, 100, gemm_rows=0)
    assert modulation_chunks(5, 2) == [(3, 4), (1, 2), (0, 0)]
    assert modulation_chunks(100, 50) == [(50, 99), (0, 49)]
    for steps, per in [(1, 1), (7, 3), (100, 25), (100, 100)]:
        covered = [s for lo, hi in modulation_chunks(steps, per) for s in range(hi, lo - 1, -1)]
        assert covered == list(range(steps - 1, -1, -1))


@pytest.mark.parametrize("gemm_rows,steps_per_gemm", [(14, 1), (28, 2), (1024, 5)])
def test_fused_loop_step_batched_modulations(gemm_rows, steps_per_gemm, monkeypatch):
    """The modulations of K steps come from one GEMM of K x R rows (ceil(S / K) GEMMs per call, the
    last chunk possibly shorter) and the loop still computes the reference's function."""
    calls = []
    original = fused_head.modulation_gemm

    def counting(pack, silu_cond, out):
        calls.append(silu_cond.shape[0])
        return original(pack, silu_cond, out)

    monkeypatch.setattr(fused_head, "modulation_gemm", counting)
    net = make_net(40, 2, seed=5)
    fused, reference = run_both_packed(net, 5, 7, 2.0, modulation_gemm_rows=gemm_rows)
    expected_rows = [14 * (hi - lo + 1) for lo, hi in modulation_chunks(5, steps_per_gemm)]
    assert calls == expected_rows and max(calls) == 14 * steps_per_gemm
    assert relative_error(fused[:7], reference[:7]) < 1e-5


def test_bucket_rows():
    rows = (1, 16, 17, 24, 25, 33, 48, 49, 65, 97, 4096, 4097, 6145, 16384)
    assert [bucket_rows(r) for r in rows] == [16, 16, 24, 24, 32, 48, 48, 64, 96, 128, 4096, 6144, 8192, 16384]
    for rows in range(1, 20000):  # padding is under a third of the bucket
        bucket = bucket_rows(rows)
        assert bucket >= rows and (bucket == MIN_BUCKET_ROWS or 3 * (bucket - rows) < bucket), rows


@pytest.mark.parametrize("num_iter", [16, 32, 64, 128, 256])
def test_mar_schedules_meet_few_buckets(num_iter):
    """Every row count of a MAR sampling call (batch x tokens per AR step of the cosine schedule)
    falls in at most MAX_GRAPHS_PER_HEAD buckets, so no call evicts a graph it replays later; the
    head computes at most 1.3x the real rows at these batches (powers of two alone: up to 1.55x)."""
    for batch in (1, 4, 16, 64, 100, 256):
        masked, rows = 256, []
        for step in range(num_iter):
            after = next_mask_len(256, step, num_iter, masked) if step < num_iter - 1 else 0
            rows.append(batch * (masked - after))
            masked = after
        buckets = [bucket_rows(r) for r in rows]
        assert len(set(buckets)) <= MAX_GRAPHS_PER_HEAD, (batch, num_iter, sorted(set(buckets)))
        if batch >= 16:
            assert sum(buckets) <= 1.3 * sum(rows), (batch, num_iter)


# ---------------------------------------------------------------------------------------------
# GPU: released head sizes, bf16/fp16/fp32, CUDA graph replay

RELEASED_HEADS = {"mar_base": (6, 1024, 768), "mar_large": (8, 1280, 1024), "mar_huge": (12, 1536, 1280)}
# max |fused - float64| / (max |float64| + 1) after the loop, per weight dtype; in bf16/fp16 the
# bound is also at most 2x the error of the reference loop run in that dtype (floored at fp32's).
GPU_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 8e-2, torch.float16: 2e-2}
GPU_CLIP = (-2.0, 2.0)  # random heads drive x0 far out otherwise (fp16 would overflow); still exercises every step


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("preset", sorted(RELEASED_HEADS))
@pytest.mark.parametrize("state_rows,cfg", [(37, 3.0), (300, 1.0)])
def test_gpu_fused_loop_parity_at_released_sizes(preset, dtype, state_rows, cfg):
    """fp32: the 20-step loop against float64. bf16/fp16: one step at t = 0 (every kernel of the
    loop runs once): a random head's multi-step trajectory is chaotic (the first step amplifies eps
    by sqrt(abar_prev / abar_999) ~ 600 before clipping), so in low precision the loop's maximum
    error measures luck, not the kernels; one step measures rounding, against the official eager
    loop in the same dtype as the yardstick."""
    check_released_parity(preset, dtype, state_rows, cfg)


def check_released_parity(preset, dtype, state_rows, cfg):
    depth, width, z_channels = RELEASED_HEADS[preset]
    net = make_net(width, depth, z_channels=z_channels, seed=depth, dtype=dtype, device="cuda")
    net64 = copy.deepcopy(net).double()  # same (rounded) weights, float64 math, on the GPU
    steps = 20 if dtype == torch.float32 else 1
    fused, reference = run_both(net, steps, state_rows, cfg, 1.0, GPU_CLIP, net64=net64, device="cuda")
    error = relative_error(fused[:state_rows], reference[:state_rows])
    bound = GPU_TOLERANCE[dtype]
    if dtype != torch.float32:
        diffusion, z, x, _, draw_noise = loop_inputs(steps, state_rows, cfg, 16, z_channels)
        x = x.cuda()
        eager = ddpm_sample_loop_reference(net, diffusion, z.cuda(), x, 1.0, cfg, lambda step: draw_noise(step, x),
                                           GPU_CLIP)
        yardstick = relative_error(eager[:state_rows], reference[:state_rows])
        bound = min(bound, max(2 * yardstick, GPU_TOLERANCE[torch.float32]))
    assert torch.isfinite(fused).all()
    assert error <= bound, f"{preset} {dtype}: relative error {error:.3g} > {bound:.3g}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_fused_loop_under_autocast_equals_a_cast_head(dtype):
    """An fp32 mar_base head sampled under autocast computes as the same head cast to autocast's dtype."""
    depth, width, z_channels = RELEASED_HEADS["mar_base"]
    net = make_net(width, depth, z_channels=z_channels, seed=2, device="cuda")
    cast = copy.deepcopy(net).to(dtype)
    diffusion, z, x, noise, _ = loop_inputs(1, 37, 3.0, 16, z_channels)
    z, x, noise = z.cuda(), x.cuda(), noise.cuda()
    with torch.autocast("cuda", dtype=dtype):
        under_autocast = ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 3.0, noise, GPU_CLIP)
    expected = ddpm_sample_loop_fused(cast, diffusion, z, x, 1.0, 3.0, noise, GPU_CLIP)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert relative_error(under_autocast.double().cpu(), expected.double().cpu()) < 1e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("way", ["triton", "cublas"])
def test_gpu_block_gemm_ways_match_at_released_size(way, monkeypatch):
    """mar_base in bf16 at 300 state rows with CFG (one step, as in the released-size parity test),
    the block GEMMs forced to the Triton GEMM with fused epilogues or to cuBLAS + the epilogue pass
    (the loop's eager run and its graph capture both take the forced way)."""
    forced = {"triton": ("fused_epilogue", "two_pass"), "cublas": ("cublas_gemm", "two_pass_cublas")}[way]
    monkeypatch.setattr(linear_fused, "fastest_way",
                        lambda choices, key, ways, what: next(w for w in forced if w in ways))
    check_released_parity("mar_base", torch.bfloat16, 300, 3.0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("state_rows", [5, 200])
def test_gpu_graph_replay_equals_eager_launch(dtype, state_rows):
    depth, width, z_channels = RELEASED_HEADS["mar_base"]
    net = make_net(width, depth, z_channels=z_channels, seed=1, dtype=dtype, device="cuda")
    diffusion = GaussianDiffusion(10)
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(2 * state_rows, z_channels, device="cuda", generator=gen)
    x_t = torch.randn(state_rows, 16, device="cuda", generator=gen)
    noise = torch.randn(10, state_rows, 16, device="cuda", generator=gen)
    x = torch.cat([x_t, x_t])

    def sample(cfg, temperature, **kwargs):
        return ddpm_sample_loop_fused(net, diffusion, z, x, temperature, cfg, noise, GPU_CLIP, **kwargs)

    release_fused_cache(net)
    first = sample(2.0, 1.0)  # eager launches on the bucket's buffers, then capture
    assert torch.equal(sample(2.0, 1.0), first)  # replay
    replayed = sample(3.5, 0.5)  # same graph: cfg and temperature are read on the device
    assert len(packed_head(net).graphs) == 1
    release_fused_cache(net)
    assert torch.equal(replayed, sample(3.5, 0.5))  # fresh eager run + capture with these values
    unbucketed = sample(3.5, 0.5, use_cuda_graph=False)  # exact row count: other tiles, same function
    assert relative_error(unbucketed, replayed.double().cpu()) <= GPU_TOLERANCE[dtype]


@gpu
@needs_cuda
@pytest.mark.parametrize("state_rows", [4, 300])
def test_gpu_modulation_gemm_providers_agree_and_auto_is_timed_before_capture(state_rows):
    """cuBLAS and the Triton launcher give the same modulations within bf16 rounding at the
    released 6x1024 size, and the auto choice made in the eager run holds in the captured graph."""
    from marfast.fused_head import _MODULATION_CHOICE, modulation_gemm

    depth, width, z_channels = RELEASED_HEADS["mar_base"]
    net = make_net(width, depth, z_channels=z_channels, seed=2, dtype=torch.bfloat16, device="cuda")
    pack = packed_head(net)
    silu = torch.randn(2 * state_rows, width, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for provider in ("cublas", "triton"):
        pack.modulation_provider = provider
        outs[provider] = modulation_gemm(pack, silu, torch.empty(2 * state_rows, pack.ada_weight.shape[0],
                                                                 device="cuda", dtype=torch.bfloat16))
    expected = silu.double() @ pack.ada_weight.double().t() + pack.ada_bias.double()
    for provider, out in outs.items():
        assert relative_error(out, expected.cpu()) <= 1e-2, provider
    pack.modulation_provider = "auto"
    release_fused_cache(net)
    diffusion = GaussianDiffusion(5)
    z = torch.randn(2 * state_rows, z_channels, device="cuda")
    x = torch.randn(state_rows, 16, device="cuda").repeat(2, 1)
    noise = torch.randn(5, state_rows, 16, device="cuda")
    first = ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 2.0, noise, GPU_CLIP)
    net_rows = bucket_rows(state_rows) * 2
    gemm_rows = net_rows * modulation_steps_per_gemm(net_rows, 5)
    assert any(key[0][0] == gemm_rows for key in _MODULATION_CHOICE)
    assert torch.equal(ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 2.0, noise, GPU_CLIP), first)


@gpu
@needs_cuda
def test_gpu_diffloss_sample_backends_agree_in_bf16():
    depth, width, z_channels = RELEASED_HEADS["mar_base"]
    heads = {b: DiffLoss(16, z_channels, depth, width, 100, backend=b) for b in ("torch", "triton")}
    randomize(heads["torch"].net, 5)
    heads["triton"].load_state_dict(heads["torch"].state_dict())
    head64 = copy.deepcopy(heads["torch"]).double().cuda()
    for head in heads.values():
        head.to(device="cuda", dtype=torch.bfloat16)
    z, noise = torch.randn(128, z_channels, device="cuda"), torch.randn(64, 16, device="cuda")
    reference = head64.sample(z.double(), temperature=0.0, cfg=2.9, noise=noise.double(), clip_x0=GPU_CLIP).cpu()
    fused = heads["triton"].sample(z, temperature=0.0, cfg=2.9, noise=noise, clip_x0=GPU_CLIP)
    eager = heads["torch"].sample(z, temperature=0.0, cfg=2.9, noise=noise, clip_x0=GPU_CLIP)
    assert fused.shape == (128, 16) and torch.equal(fused[64:], fused[:64])
    assert relative_error(fused[:64], reference[:64]) <= max(2 * relative_error(eager[:64], reference[:64]),
                                                              GPU_TOLERANCE[torch.float32])


@gpu
@needs_cuda
@pytest.mark.parametrize("split", [2, 4, 8])
def test_gpu_split_k_gemm_matches_unsplit_and_reruns_bitwise(split, monkeypatch):
    """mar_base's block GEMM at 32 rows in bf16 on the device: split along K, the gated-residual
    GEMM equals the unsplit one up to fp32 summation order, 50 reruns are bitwise equal (the
    release-acquire handoff of the partial tiles holds under real concurrency) and every arrival
    counter is back at zero."""
    rows, width = 32, 1024
    gen = torch.Generator(device="cuda").manual_seed(split)
    h = torch.randn(rows, width, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(width, width, device="cuda", generator=gen) / 32).bfloat16()
    b = torch.randn(width, device="cuda", generator=gen)
    gate = torch.randn(rows, 3 * width, device="cuda", generator=gen).bfloat16()[:, 2 * width:]
    residual = torch.randn(rows, width, device="cuda", generator=gen)

    def run(parts, workspace):
        monkeypatch.setattr(linear_fused, "_with_split_k",
                            lambda configs, M, N, K, gpu, has_workspace: [(32, 32, 128, 4, 4, parts)])
        out = torch.full((rows, width), float("nan"), device="cuda")
        stats = torch.full(stats_shape(rows, width), float("nan"), device="cuda")
        linear_gated_residual(h, w, b, gate, residual, out, stats, workspace)
        return out, stats

    workspace = linear_fused.SplitKWorkspace("cuda")
    unsplit, unsplit_stats = run(1, None)
    first, first_stats = run(split, workspace)
    torch.testing.assert_close(first, unsplit, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(first_stats, unsplit_stats, rtol=1e-4, atol=1e-3)
    for _ in range(50):
        again, again_stats = run(split, workspace)
        assert torch.equal(again, first) and torch.equal(again_stats, first_stats)
    assert not workspace.counters.any()


@gpu
@needs_cuda
@pytest.mark.parametrize("split", [4, 16])
def test_gpu_split_final_layer_matches_unsplit_and_reruns_bitwise(split, monkeypatch):
    """mar_base's final layer + DDPM step at 16 state rows with CFG, bf16 weights, on the device: the
    width split over `split` programs equals the unsplit kernel up to fp32 summation order, 50
    reruns are bitwise equal and every arrival counter is back at zero."""
    rows, width, channels = 16, 1024, 16
    gen = torch.Generator(device="cuda").manual_seed(split)
    h = torch.randn(2 * rows, width, device="cuda", generator=gen) + 1
    stats = group_stats64(h.double().cpu()).float().cuda()
    modulation = (0.3 * torch.randn(2 * rows, 2 * width, device="cuda", generator=gen)).bfloat16()
    w = (torch.randn(2 * channels, width, device="cuda", generator=gen) / 32).bfloat16()
    b = 0.1 * torch.randn(2 * channels, device="cuda", generator=gen)
    x_t, noise = (torch.randn(rows, channels, device="cuda", generator=gen) for _ in range(2))
    scalars = torch.tensor([2.5, 0.7, 0.0, 0.0], device="cuda")
    coefficients = step_coefficients(GaussianDiffusion(10), 4)

    def run(parts, workspace):
        monkeypatch.setattr(ddpm_step, "_candidate_block_sizes",
                            lambda rows, width, channels, gpu, has_workspace=False: [(16, 16, 64, 4, parts)])
        out = torch.full((rows, channels), float("nan"), device="cuda")
        final_layer_ddpm_step(h, stats, modulation[:, :width], modulation[:, width:], w, b, x_t, noise, out, scalars,
                              coefficients, use_cfg=True, uncond_row_offset=rows, split_k=workspace)
        return out

    workspace = linear_fused.SplitKWorkspace("cuda")
    unsplit = run(1, None)
    first = run(split, workspace)
    torch.testing.assert_close(first, unsplit, rtol=1e-4, atol=1e-4)
    for _ in range(50):
        assert torch.equal(run(split, workspace), first)
    assert not workspace.counters.any()


@gpu
@needs_cuda
@pytest.mark.parametrize("state_rows", [4, 300])
def test_gpu_programmatic_launch_changes_no_result(state_rows, monkeypatch):
    """mar_base's head in bf16: the loop launched with PDL (the default on sm_90+; at 4 rows its
    GEMMs also prefetch their weights into L2 before the wait) equals the loop without it bitwise,
    eagerly and in 20 graph replays (a kernel reading its predecessor's output before the grid
    dependency wait would show up as a difference)."""
    depth, width, z_channels = RELEASED_HEADS["mar_base"]
    net = make_net(width, depth, z_channels=z_channels, seed=3, dtype=torch.bfloat16, device="cuda")
    diffusion = GaussianDiffusion(20)
    gen = torch.Generator(device="cuda").manual_seed(state_rows)
    z = torch.randn(2 * state_rows, z_channels, device="cuda", generator=gen)
    x = torch.randn(state_rows, 16, device="cuda", generator=gen).repeat(2, 1)
    noise = torch.randn(20, state_rows, 16, device="cuda", generator=gen)

    def sample(pdl, **kwargs):
        monkeypatch.setenv(linear_fused.PDL_ENV, pdl)
        release_fused_cache(net)
        return ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 2.5, noise, GPU_CLIP, **kwargs)

    with_pdl = linear_fused.programmatic_launch(torch.device("cuda"))["PDL"]
    assert with_pdl == (torch.cuda.get_device_capability()[0] >= 9 and linear_fused.HAS_GRID_DEPENDENCY_CONTROL)
    assert torch.equal(sample("1", use_cuda_graph=False), sample("0", use_cuda_graph=False))
    without = sample("0")
    first = sample("1")
    assert torch.equal(first, without)
    for _ in range(20):
        assert torch.equal(ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 2.5, noise, GPU_CLIP), first)
