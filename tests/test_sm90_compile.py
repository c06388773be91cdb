"""Every Triton kernel variant the fused paths launch at mar_base's head size compiles for an H100
(sm_90) with the block configurations used there, within the device's shared memory and without
register spills; checked on the CPU machine (see tests/sm90.py), so a CPU-only session learns
about a kernel that would not build or would spill on the GPU before a GPU session runs it.
"""
import inspect

import pytest
import torch

from marfast import DiffLoss
from marfast.diffusion import GaussianDiffusion
from marfast.fused_head import ddpm_sample_loop_fused, packed_head, release_fused_cache
from marfast.kernels import ddpm_sample_loop
from marfast.kernels.add_layernorm import add_layernorm
from marfast.kernels.linear_fused import interpreting, linear_gelu

from sm90 import H100_REGISTERS_PER_SM, H100_SHARED_BYTES, compile_for_h100, record_launches

pytestmark = pytest.mark.skipif(not interpreting(), reason="records launches through the Triton CPU interpreter "
                                                            "(TRITON_INTERPRET=1); on a GPU the kernels run for real")

WIDTH, DEPTH, Z_CHANNELS, CHANNELS = 1024, 6, 768, 16  # mar_base's head


def base_head(backend="triton"):
    torch.manual_seed(0)
    return DiffLoss(CHANNELS, Z_CHANNELS, DEPTH, WIDTH, num_sampling_steps="2", backend=backend).to(torch.bfloat16)


def record_sampling_launches(monkeypatch, state_rows, steps, **pack_settings):
    """The launches of the bf16 head's sampling loop with CFG at `state_rows`, these attributes set
    on its packed head (see `record_launches`)."""
    head = base_head()
    pack = packed_head(head.net)
    for name, value in pack_settings.items():
        setattr(pack, name, value)
    z = torch.randn(2 * state_rows, Z_CHANNELS, dtype=torch.bfloat16)
    x = torch.randn(state_rows, CHANNELS).repeat(2, 1)
    noise = torch.randn(steps, state_rows, CHANNELS)
    with record_launches(monkeypatch) as launches:
        ddpm_sample_loop_fused(head.net, GaussianDiffusion(steps), z, x, 1.0, 3.0, noise)
    release_fused_cache(head.net)
    return launches


def check_compiles(launches):
    compiled = compile_for_h100(launches)
    for kernel in compiled:
        where = f"{kernel['name']} {kernel['constants']} warps={kernel['num_warps']} stages={kernel['num_stages']}"
        assert kernel["shared_bytes"] <= H100_SHARED_BYTES, f"{where}: {kernel['shared_bytes']} bytes of shared memory"
        assert kernel["local_bytes"] == 0, f"{where}: {kernel['local_bytes']} bytes of local memory (register spills)"
        assert 0 < kernel["registers"] <= 255, where
    return compiled


def check_waits_for_previous_grid(compiled):
    """Programmatic dependent launch: every kernel is launched with it and touches no global memory
    before its grid dependency wait."""
    for kernel in compiled:
        where = f"{kernel['name']} {kernel['constants']}"
        assert kernel["launch_pdl"] and kernel["constants"]["PDL"], where
        assert kernel["grid_dependency_waits"] >= 1 and kernel["launch_dependents"] >= 1, where
        assert not kernel["memory_before_wait"], f"{where}: global memory accessed before griddepcontrol.wait"


def check_memory_ordering(kernel):
    """A kernel whose programs hand data to each other: in its sm_90 machine code every
    release-acquire atomic is fenced before (MEMBAR at GPU scope: this program's writes are out)
    and invalidates L1 after (CCTL.IVALL: its later plain loads, which read through L1, see the
    other programs' writes), every acquire load invalidates L1 too, and no load takes the
    non-coherent path."""
    where = f"{kernel['name']} {kernel['constants']}"
    assert kernel["non_coherent_loads"] == 0, where
    assert kernel["fenced_atomics"] >= kernel["release_acquire_atomics"] > 0, where
    assert kernel["invalidating_acquire_loads"] >= kernel["acquire_loads"], where


@pytest.mark.parametrize("state_rows", [4, 100, 2048], ids=["few_rows", "mid_rows", "many_rows"])
def test_fused_sampling_kernels_compile_for_h100(state_rows, monkeypatch):
    """The sampling loop with CFG: condition embedding, adaLN input, the Triton modulation GEMM,
    input projection, both block GEMMs (LN-modulate written once, and at few rows also fused
    into the GEMM prologue; also split along K where they have few output tiles, at few and mid
    rows; above 64 rows also the gated-residual pass after a cuBLAS GEMM), the final layer with the
    DDPM step (its width split over several programs at few rows); every tuning candidate of each
    GEMM. Each is launched with PDL and waits for the previous kernel before its first global
    memory access. The final layer, and at few rows the GEMMs, load their epilogue operands before
    the K loop (no global load but the split-K partials follows the last matrix multiply)."""
    launches = record_sampling_launches(monkeypatch, state_rows, 2, modulation_provider="triton")
    names = {launch["name"] for launch in launches}
    assert {"_linear_fused_kernel", "_ln_modulate_kernel", "_adaln_input_kernel", "_final_layer_ddpm_step_kernel"} <= names
    compiled = check_compiles(launches)
    gemms = [k for k in compiled if k["name"] == "_linear_fused_kernel"]
    assert gemms and all(k["async_copies"] > 0 for k in gemms), "GEMM weight loads must be pipelined (cp.async)"
    split = [k for k in gemms if k["constants"]["SPLIT_K"] > 1]
    few, many = state_rows == 4, state_rows == 2048
    assert bool(split) == (not many), "K-split candidates are tried for GEMMs of few output tiles only"
    for kernel in split:  # the partial tiles are published with a release-acquire atomic and read from L2
        assert kernel["release_acquire_atomics"] == 1 and kernel["l2_loads"] > 0, kernel["constants"]
        check_memory_ordering(kernel)
    check_waits_for_previous_grid(compiled)
    for kernel in gemms:  # with PDL, skinny GEMMs ask L2 for their weights before waiting
        prefetching = kernel["constants"]["PREFETCH_K"] > 0
        assert (kernel["l2_prefetches_before_wait"] > 0) == prefetching, kernel["constants"]
        assert (kernel["l2_prefetches"] > 0) == prefetching, kernel["constants"]
    assert any(k["constants"]["PREFETCH_K"] > 0 for k in gemms) == few
    for kernel in gemms:  # skinny GEMMs load their epilogue operands before the K loop, larger ones after it
        assert kernel["constants"]["PRELOAD_EPILOGUE"] == few, kernel["constants"]
        assert (kernel["loads_after_last_mma"] == 0) == few, kernel["constants"]
    final = [k for k in compiled if k["name"] == "_final_layer_ddpm_step_kernel"]
    split_final = [k for k in final if k["constants"]["SPLIT_K"] > 1]
    assert bool(split_final) == few, "the final layer splits the width at few rows only"
    for kernel in split_final:  # one arrival per program, partials read from L2
        assert kernel["release_acquire_atomics"] == 1 and kernel["l2_loads"] > 0, kernel["constants"]
        check_memory_ordering(kernel)
    assert all(k["loads_after_last_mma"] == 0 for k in final), "the DDPM update's inputs are loaded before the K loop"
    final_blocks = {k["constants"]["BLOCK_M"] for k in final}
    if many:  # narrower row blocks are tried: 64-row programs would occupy 32 SMs
        assert {16, 32, 64} <= final_blocks, final_blocks
    # above 64 rows the gated residual is also timed as a cuBLAS GEMM + this epilogue pass
    assert ("_gated_residual_stats_kernel" in names) == (not few)


def test_fused_training_kernels_compile_for_h100(monkeypatch):
    """DiffLoss.forward and backward with the Triton backend (LayerNorm-modulate, gated residual,
    SiLU backward kernels). Each backward program walks many row tiles: its registers must let two
    programs share an SM (one's loads in flight while the other computes)."""
    head = base_head()
    rows = 64
    target = torch.randn(rows, CHANNELS, dtype=torch.bfloat16)
    z = torch.randn(rows, Z_CHANNELS, dtype=torch.bfloat16, requires_grad=True)
    with record_launches(monkeypatch) as launches:
        head(target, z).backward()
    names = {launch["name"] for launch in launches}
    assert any("bwd" in name or "backward" in name for name in names), names
    compiled = check_compiles(launches)
    backward = [k for k in compiled if "bwd" in k["name"] or "backward" in k["name"]]
    assert len(backward) == 4
    for kernel in backward:
        threads = 32 * kernel["num_warps"]
        assert kernel["registers"] * threads <= H100_REGISTERS_PER_SM // 2, \
            f"{kernel['name']} {kernel['constants']}: {kernel['registers']} registers x {threads} threads"


def test_transformer_inference_kernels_compile_for_h100(monkeypatch):
    """The blocks' fused LayerNorms at the MAR transformer widths (768, 1024, 1280) writing bf16,
    with and without the residual add; the MLP's fc1 + GELU GEMM at mar_base's width (every
    tuning candidate at a mid and a large row count)."""
    with record_launches(monkeypatch) as launches:
        for width in (768, 1024, 1280):
            x, update = torch.randn(5, width), torch.randn(5, width, dtype=torch.bfloat16)
            weight, bias = torch.ones(width), torch.zeros(width)
            for branch in (update, None):
                add_layernorm(x, branch, weight, bias, 1e-6, torch.bfloat16)
        for rows in (256, 640):
            linear_gelu(torch.randn(rows, 768, dtype=torch.bfloat16), torch.randn(3072, 768, dtype=torch.bfloat16),
                        torch.randn(3072), torch.empty(rows, 3072, dtype=torch.bfloat16))
    names = [launch["name"] for launch in launches]
    assert names.count("_add_layernorm_kernel") == 6 and "_linear_fused_kernel" in names
    compiled = check_compiles(launches)
    check_waits_for_previous_grid(compiled)
    gelu = [k for k in compiled if k["name"] == "_linear_fused_kernel"]
    assert gelu and all(k["constants"]["EPILOGUE"] == 3 for k in gelu)
    assert any(k["warpgroup_mmas"] > 0 for k in gelu), "the large-row GEMM configurations use wgmma"


@pytest.mark.parametrize("state_rows", [4, 32])
def test_one_launch_loop_compiles_for_h100(state_rows, monkeypatch):
    """The reverse DDPM steps in one launch (loop_kernels='one_launch') at mar_base's head with CFG,
    8 and 64 net rows, every tuning candidate: one compiled kernel per candidate whatever the step
    range (no step argument is specialised), no spills, PDL's wait before any memory
    access, release-acquire atomics (barrier arrivals and split-K arrivals), L2 prefetches of the
    next phase's weights, and 16-byte weight copies: the alignment hint on the per-block weight
    pointers (read from a table) is what keeps them 16 bytes wide. The grid barriers' and split-K
    arrivals' memory ordering is in the machine code (`check_memory_ordering`). The variant
    recording phase times (profiling only) compiles without spills too."""
    launches = record_sampling_launches(monkeypatch, state_rows, 3, loop_kernels="one_launch")
    loops = [launch for launch in launches if launch["name"] == "_ddpm_sample_loop_kernel"]
    assert not any(launch["kwargs"]["TIMESTAMPS"] for launch in loops)
    unaligned = {**loops[0], "kwargs": {**loops[0]["kwargs"], "WEIGHT_ALIGN": 1}}
    timed = {**loops[0], "kwargs": {**loops[0]["kwargs"], "TIMESTAMPS": True,
                                    "times_ptr": {"tensor": "int64", "aligned": True}}}
    *compiled, _ = check_compiles(loops + [unaligned, timed])  # the phase_times variant: compiled and checked only
    assert len({(k["constants"]["BLOCK_K"], k["constants"]["SPLIT_K"]) for k in compiled}) >= 2
    steps = {"step_hi", "step_lo", "modulation_step", "first_state"}
    assert not any(steps & set(k["constants"]) for k in compiled)
    check_waits_for_previous_grid(compiled)
    barrier_sites = inspect.getsource(ddpm_sample_loop._ddpm_sample_loop_kernel.fn).count("_grid_barrier(")
    assert barrier_sites == 4
    for kernel in compiled:
        assert kernel["constants"]["BLOCK_M"] == max(16, 2 * state_rows)
        assert kernel["release_acquire_atomics"] >= 2 and kernel["l2_prefetches"] > 0, kernel["constants"]
        assert kernel["acquire_loads"] >= barrier_sites, kernel["constants"]  # every barrier polls with acquire loads
        check_memory_ordering(kernel)
    aligned = next(k for k in compiled if k["constants"] == {**compiled[-1]["constants"], "WEIGHT_ALIGN": 8})
    assert aligned["async_copies_16_bytes"] > compiled[-1]["async_copies_16_bytes"]
