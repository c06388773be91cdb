"""The reverse DDPM steps in one launch (kernels/ddpm_sample_loop.py): against float64 and the
launch chain, with its scratch buffers and the state it writes poisoned first.

Under the CPU interpreter the launch is one program, which runs every work item of every phase
(the grid barriers pass at once), except in the tests that run a grid of several programs, each
in its own thread (tests/concurrent_programs.py): they check the work dealing, the barriers' and
split-K arrivals' logic and the counters' resets between programs that interleave. The GPU tests
(marked `gpu`) run the real grid of one program per SM, under the GPU's memory model.
"""
import types

import pytest
import torch
from triton.runtime.interpreter import InterpreterBuilder

from marfast.diffusion import GaussianDiffusion
from marfast.fused_head import (_Workspace, _uses_one_launch, bucket_rows, ddpm_sample_loop_fused, packed_head,
                                release_fused_cache)
from marfast import fused_head
from marfast.kernels import ddpm_sample_loop as one_launch
from marfast.kernels.ddpm_sample_loop import MAX_BARRIER_SPINS, LoopWeights, barrier_timed_out, ddpm_sample_loop
from marfast.kernels.linear_fused import SplitKWorkspace

from concurrent_programs import concurrent_programs, needs_interpreter
from test_fused_head import (CUDA, GPU_CLIP, GPU_TOLERANCE, RELEASED_HEADS, check_released_parity, fake_gpu_timings,
                             loop_inputs, make_net, relative_error, run_both)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def poisoned_workspaces(monkeypatch):
    """Every loop workspace starts with NaN in its scratch buffers and in the state buffer the first
    step writes."""
    init = _Workspace.__init__

    def poisoning_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for t in (self.residual_pair, self.hidden, self.stats, self.state_pair[1]):
            t.fill_(float("nan"))

    monkeypatch.setattr(_Workspace, "__init__", poisoning_init)


def run_loop(net, steps, state_rows, cfg, temperature, clip, **pack_settings):
    """`run_both` with these attributes set on the net's packed head, released afterwards."""
    pack = packed_head(net)
    for name, value in pack_settings.items():
        setattr(pack, name, value)
    try:
        return run_both(net, steps, state_rows, cfg, temperature, clip, device=DEVICE)
    finally:
        release_fused_cache(net)


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(name), original(*a, **k))[1])
    return calls


@pytest.mark.parametrize("width,depth,state_rows,cfg,temperature,clip,gemm_rows,launches", [
    (40, 2, 7, 2.0, 1.0, None, 1024, 1),  # every step in one launch
    (72, 3, 1, 3.0, 0.9, None, 2, 4),  # one step per launch: the state buffers alternate between launches
    (200, 2, 33, 1.0, 0.0, (-1.0, 1.0), 70, 2),  # no CFG, 33 rows, two steps per launch
    (40, 1, 5, 1.5, 1.0, (-2.0, 2.0), 30, 2),  # one block, CFG 1.5, two steps per launch
])
def test_one_launch_loop_matches_float64(width, depth, state_rows, cfg, temperature, clip, gemm_rows, launches,
                                         poisoned_workspaces, monkeypatch):
    """Four steps of the loop with loop_kernels='one_launch', the modulation GEMM making a chunk of
    steps at a time (`modulation_gemm_rows`): one launch per chunk and no launch of the chain's
    kernels; the result equals the float64 reference and, within rounding, the launch chain."""
    net = make_net(width, depth, seed=width + state_rows)
    launched = count_calls(monkeypatch, fused_head, "ddpm_sample_loop")
    chain_launches = count_calls(monkeypatch, fused_head, "input_projection")
    fused, reference = run_loop(net, 4, state_rows, cfg, temperature, clip, loop_kernels="one_launch",
                                modulation_gemm_rows=gemm_rows)
    assert len(launched) == launches
    assert not chain_launches
    assert fused.dtype == torch.float32 and fused.shape == reference.shape
    assert relative_error(fused[:state_rows], reference[:state_rows]) < 1e-5
    if cfg != 1.0:
        assert torch.equal(fused[state_rows:], fused[:state_rows])
    chain, _ = run_loop(net, 4, state_rows, cfg, temperature, clip, loop_kernels="chain",
                        modulation_gemm_rows=gemm_rows)
    assert len(launched) == launches  # none more
    assert chain_launches
    assert relative_error(fused, chain.double()) < 1e-5


@pytest.mark.parametrize("config", [(32, 16, 1, 4, 16, 1), (64, 16, 3, 4, 32, 2)], ids=["unsplit", "split3"])
def test_one_launch_loop_block_configurations(config, poisoned_workspaces, monkeypatch):
    """The GPU's unsplit configuration (the block GEMMs and the final layer each over the whole
    width) and a three-part split with 64-column tiles, against float64."""
    monkeypatch.setattr(one_launch, "_candidates", lambda *args: [config])
    net = make_net(72, 2, seed=10)
    fused, reference = run_loop(net, 3, 5, 2.0, 1.0, None, loop_kernels="one_launch")
    assert relative_error(fused[:5], reference[:5]) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("programs,config,state_rows,cfg,gemm_rows,launches", [
    (3, (32, 16, 2, 4, 16, 2), 5, 2.0, 1024, 1),  # 4 GEMM items and 2 final-layer items over 3 programs
    (5, (32, 16, 3, 4, 32, 2), 7, 1.0, 14, 2),  # 6 GEMM items over 5; two launches reuse the barrier state
    (2, (32, 16, 1, 4, 16, 1), 3, 2.0, 6, 4),  # unsplit, one step per launch
], ids=["3_programs", "5_programs", "2_programs_unsplit"])
def test_one_launch_loop_with_concurrent_programs(programs, config, state_rows, cfg, gemm_rows, launches,
                                                  poisoned_workspaces, monkeypatch):
    """Four steps with a grid of several programs, each in its own thread: the result is bitwise
    that of the one-program launch with the same configuration (an item's code and every
    reduction's order do not depend on which program runs it), the float64 reference's within
    rounding, and every launch leaves its barrier and split-K counters at zero."""
    monkeypatch.setattr(one_launch, "_candidates", lambda *args: [config])
    net = make_net(40, 2, seed=11)
    one_program, reference = run_loop(net, 4, state_rows, cfg, 1.0, None, loop_kernels="one_launch",
                                      modulation_gemm_rows=gemm_rows)
    program_counts = concurrent_programs(monkeypatch, one_launch._ddpm_sample_loop_kernel)
    monkeypatch.setattr(one_launch, "resident_programs", lambda device: programs)
    fused, _ = run_loop(net, 4, state_rows, cfg, 1.0, None, loop_kernels="one_launch",
                        modulation_gemm_rows=gemm_rows)
    assert program_counts == [programs] * launches
    assert torch.equal(fused, one_program)
    assert relative_error(fused[:state_rows], reference[:state_rows]) < 1e-5

    pack, ws, diffusion = loop_workspace(net, state_rows, cfg, 3)
    assert launch(pack, ws, diffusion, hi=2, lo=1, modulation_step=0) == 0
    assert launch(pack, ws, diffusion, hi=0, lo=0, modulation_step=0) == 1
    assert torch.isfinite(ws.state_pair[1]).all()
    assert ws.sync.tolist() == [0, 0, 0]
    assert not ws.split_k.counters.any()
    release_fused_cache(net)


def test_gpu_candidates_give_every_sm_an_item_and_cap_the_k_step_at_64_rows():
    """mar_base's width on 132 SMs: 32 column tiles x 4 K parts (and one unsplit candidate); 64-row
    tiles take 8 warps and K steps of at most 64; fp32 weights take K steps of 32 and 16; the final
    layer splits the width in 16. The last candidate is the fallback."""
    final = (64, 16)
    assert one_launch._candidates(8, 1024, 2, True, 132) == [
        (32, 128, 4, 4) + final, (32, 128, 1, 4) + final, (32, 64, 4, 4) + final, (32, 32, 4, 4) + final]
    assert one_launch._candidates(64, 1024, 2, True, 132) == [
        (32, 64, 4, 8) + final, (32, 64, 1, 8) + final, (32, 32, 4, 8) + final, (32, 16, 4, 8) + final]
    assert [c[1] for c in one_launch._candidates(8, 1024, 4, True, 132)] == [32, 32, 16]
    assert one_launch._candidates(8, 40, 4, False, 1) == [(32, 64, 1, 4, 64, 1)]


def loop_workspace(net, state_rows, cfg, steps, seed=0):
    """(pack, workspace, diffusion) with the inputs loaded and every step's modulations made, and
    NaN in the scratch buffers and the state buffer the first step writes."""
    diffusion, z, x, noise, _ = loop_inputs(steps, state_rows, cfg, net.in_channels, net.cond_embed.weight.shape[1],
                                            seed)
    pack = packed_head(net)
    pack.modulation_gemm_rows = 4096
    ws = _Workspace(pack, state_rows, cfg != 1.0, steps)
    ws.load(z.to(DEVICE), x.to(DEVICE), noise.to(DEVICE), cfg, 1.0, None)
    fused_head.linear(ws.z, pack.cond_weight, pack.cond_bias, ws.cond)
    ws.modulate_steps(pack, pack.time_embeddings(diffusion), 0, steps - 1)
    for t in (ws.residual_pair, ws.hidden, ws.stats, ws.state_pair[1]):
        t.fill_(float("nan"))
    return pack, ws, diffusion


def launch(pack, ws, diffusion, first_state=0, hi=None, lo=0, **kwargs):
    hi = diffusion.num_timesteps - 1 if hi is None else hi
    return ddpm_sample_loop(pack.loop_weights(), ws.state_pair, first_state, hi, lo, ws.noise, ws.scalars,
                            pack.coefficient_table(diffusion), ws.residual_pair, ws.hidden, ws.stats, ws.modulation,
                            ws.sync, ws.split_k, use_cfg=ws.use_cfg, **kwargs)


def test_launch_returns_the_state_buffer_it_wrote_and_leaves_its_counters_at_zero():
    net = make_net(40, 2, seed=5)
    pack, ws, diffusion = loop_workspace(net, 3, 2.0, 3)
    x_t = ws.state_pair[0].clone()
    assert launch(pack, ws, diffusion, hi=2, lo=2, modulation_step=0) == 1  # one step: buffer 0 -> buffer 1
    assert torch.equal(ws.state_pair[0], x_t)
    assert torch.isfinite(ws.state_pair[1]).all()
    assert launch(pack, ws, diffusion, first_state=1, hi=1, lo=0, modulation_step=0) == 1  # two steps: 1 -> 0 -> 1
    assert ws.sync.tolist() == [0, 0, 0]
    assert torch.equal(ws.split_k.counters, torch.zeros_like(ws.split_k.counters))
    stepped = ws.state_pair[1].clone()
    pack2, ws2, _ = loop_workspace(net, 3, 2.0, 3)  # the same three steps in one launch
    assert launch(pack2, ws2, diffusion) == 1
    assert torch.equal(ws2.state_pair[1], stepped)


@pytest.mark.parametrize("programs", [1, pytest.param(3, marks=needs_interpreter)])
def test_barrier_timeout_gives_nan_and_a_flag_instead_of_a_hang(programs, monkeypatch):
    """A barrier whose arrivals never complete (the counter starts far below zero) stops waiting
    after MAX_BARRIER_SPINS polls: the launch's result is NaN, the flag stays set (later launches on
    the same sync give NaN too) and the arrival counters are back at zero; the fused loop raises.
    With 3 programs (concurrent threads) every program gives up and the last one out cleans up."""
    monkeypatch.setattr(one_launch, "MAX_BARRIER_SPINS", 3)
    if programs > 1:
        concurrent_programs(monkeypatch, one_launch._ddpm_sample_loop_kernel)
        monkeypatch.setattr(one_launch, "resident_programs", lambda device: programs)
    net = make_net(40, 1, seed=6)
    pack, ws, diffusion = loop_workspace(net, 2, 1.0, 2)
    ws.sync[0] = -1000
    result = launch(pack, ws, diffusion)
    assert torch.isnan(ws.state_pair[result]).all()
    assert barrier_timed_out(ws.sync)
    assert ws.sync[:2].tolist() == [0, 0]
    monkeypatch.setattr(one_launch, "MAX_BARRIER_SPINS", MAX_BARRIER_SPINS)  # 3 polls: too few for real waits
    ws.state_pair[0].normal_()  # two steps: from buffer 0 back to buffer 0
    launch(pack, ws, diffusion)  # every barrier completes now, but the flag is sticky
    assert torch.isnan(ws.state_pair[result]).all()
    ws.sync.zero_()
    ws.state_pair[0].normal_()
    launch(pack, ws, diffusion)
    assert torch.isfinite(ws.state_pair[result]).all()

    poisoned_sync = lambda device: torch.tensor([0, 0, 1], dtype=torch.int32, device=device)  # noqa: E731
    monkeypatch.setattr(fused_head, "new_sync", poisoned_sync)
    pack.loop_kernels = "one_launch"
    with pytest.raises(RuntimeError, match="timed out at a grid barrier"):
        run_both(net, 2, 2, 1.0, 1.0, None, device=DEVICE)
    release_fused_cache(net)


def test_a_program_that_gave_up_waits_at_no_later_barrier(monkeypatch):
    """After one barrier's MAX_BARRIER_SPINS polls a program stops waiting for the rest of the
    launch: two steps of a one-block head (8 barriers, all of them impossible) cost one barrier's
    polls, not eight (counted at the interpreter's atomics)."""
    monkeypatch.setattr(one_launch, "MAX_BARRIER_SPINS", 50)
    net = make_net(40, 1, seed=6)
    pack, ws, diffusion = loop_workspace(net, 2, 1.0, 2)
    atomics = []  # arrivals, polls and the departure's atomics (read-modify-writes in the interpreter)
    rmw = InterpreterBuilder.create_atomic_rmw
    monkeypatch.setattr(InterpreterBuilder, "create_atomic_rmw",
                        lambda self, *a, **k: (atomics.append(1), rmw(self, *a, **k))[1])
    ws.sync[0] = -1000
    launch(pack, ws, diffusion)
    assert barrier_timed_out(ws.sync)
    assert 50 < len(atomics) < 100
    release_fused_cache(net)


def test_launcher_rejects_bad_input():
    net = make_net(40, 2, seed=7)
    pack, ws, diffusion = loop_workspace(net, 3, 2.0, 3)
    weights = pack.loop_weights()
    good = dict(weights=weights, states=ws.state_pair, first_state=0, step_hi=2, step_lo=0, noise=ws.noise,
                scalars=ws.scalars, coefficients=pack.coefficient_table(diffusion), residuals=ws.residual_pair,
                hidden=ws.hidden, stats=ws.stats, modulation=ws.modulation, sync=ws.sync, split_k=ws.split_k,
                use_cfg=True)
    bad = [
        (dict(weights=pack), TypeError, "LoopWeights"),
        (dict(states=ws.state_pair[0]), ValueError, r"states must be a \[2, S, C\]"),
        (dict(states=torch.zeros(2, 40, 16), residuals=torch.zeros(2, 80, 40)), ValueError, "1 to 64 net rows"),
        (dict(first_state=2), ValueError, "first_state"),
        (dict(step_lo=3), ValueError, "step_lo <= step_hi"),
        (dict(step_hi=3), ValueError, "coefficients must be"),
        (dict(step_lo=1, modulation_step=2), ValueError, "modulation_step"),
        (dict(modulation=ws.modulation[:2]), ValueError, "modulation must be"),
        (dict(hidden=ws.hidden.double()), TypeError, "hidden"),
        (dict(residuals=ws.residual_pair.half()), TypeError, "residuals"),
        (dict(sync=ws.sync.long()), ValueError, "sync must be"),
        (dict(split_k=None), ValueError, "SplitKWorkspace"),
        (dict(split_k=SplitKWorkspace("meta")), ValueError, "split_k must be"),
        (dict(scalars=ws.scalars[:3]), ValueError, "scalars"),
        (dict(phase_times=torch.zeros(19, 2, dtype=torch.int64)), ValueError, "needs a CUDA device"),
    ]
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            ddpm_sample_loop(**{**good, **change})
    blocks = [(b.ln_weight, b.ln_bias, b.fc1_weight, b.fc1_bias, b.fc2_weight, b.fc2_bias, b.ln_eps)
              for b in pack.blocks]
    args = (pack.input_weight, pack.input_bias)
    tail = (pack.final_weight, pack.final_bias, 1e-6)
    with pytest.raises(ValueError, match="every block's LayerNorm must be affine, or none"):
        LoopWeights(*args, [blocks[0], (None, None) + blocks[1][2:]], *tail)
    with pytest.raises(ValueError, match="share one eps"):
        LoopWeights(*args, [blocks[0], blocks[1][:6] + (1e-5,)], *tail)
    with pytest.raises(TypeError, match="fc2 weight"):
        LoopWeights(*args, [blocks[0][:4] + (blocks[0][4].double(),) + blocks[0][5:]], *tail)
    with pytest.raises(ValueError, match="at least one block"):
        LoopWeights(*args, [], *tail)
    release_fused_cache(net)


def test_phase_spans_split_each_phase_into_work_and_barrier():
    """Depth 1 (4 phases per step), two steps: row 0 is the start, row p the last arrival at phase
    p's barrier and program 0's departure from it."""
    times = torch.tensor([[0, 90]] + [[100 + 10 * p + 7, 100 + 10 * p + 10] for p in range(1, 9)])
    spans = one_launch.phase_spans(times, 1)
    assert spans == {"input_projection": [(27, 3), (7, 3)], "fc1": [(7, 3)] * 2, "fc2": [(7, 3)] * 2,
                     "final_layer": [(7, 3)] * 2}
    assert one_launch.phases_per_step(6) == 14


def test_loop_kernels_setting(monkeypatch):
    """'one_launch' beyond 64 net rows and unknown settings are errors; 'auto' runs the chain under
    the interpreter (no GPU to time the two ways on)."""
    net = make_net(40, 1, seed=8)
    pack = packed_head(net)
    pack.loop_kernels = "one_launch"
    with pytest.raises(ValueError, match="at most 64 net rows"):
        run_both(net, 2, 33, 2.0, 1.0, None, device=DEVICE)
    pack.loop_kernels = "persistent"
    with pytest.raises(ValueError, match="loop_kernels must be one of"):
        run_both(net, 2, 3, 2.0, 1.0, None, device=DEVICE)
    pack.loop_kernels = "auto"
    launched = count_calls(monkeypatch, fused_head, "ddpm_sample_loop")
    run_both(net, 2, 3, 2.0, 1.0, None, device=DEVICE)
    assert not launched
    release_fused_cache(net)


@pytest.mark.parametrize("faster", ["chain", "one_launch"])
def test_auto_times_both_ways_once_and_runs_the_faster(faster, monkeypatch, poisoned_workspaces):
    """With the GPU configurations (timings faked under the interpreter), 'auto' times one step of
    each way once per shape and runs the faster one for every chunk of steps; the loop's result
    stays the reference's."""
    launched = fake_gpu_timings(monkeypatch, ("_PROLOGUE_CHOICE", "_GEMM_WAY_CHOICE"), faster,
                                lambda names: "one_launch" if "_ddpm_sample_loop_kernel" in names else "chain")
    monkeypatch.setattr(fused_head, "_LOOP_CHOICE", {})
    for module in (fused_head, one_launch):
        monkeypatch.setattr(module, "gpu_configs", lambda device: True)
    net = make_net(40, 2, seed=9)
    fused, reference = run_loop(net, 3, 3, 2.0, 1.0, None, modulation_gemm_rows=12)  # two chunks
    assert relative_error(fused[:3], reference[:3]) < 1e-5
    assert list(fused_head._LOOP_CHOICE.values()) == [faster]
    launched.clear()
    run_loop(net, 3, 3, 2.0, 1.0, None, modulation_gemm_rows=12)
    expected = {"one_launch": (2, 0), "chain": (0, 3)}[faster]  # one launch per chunk, or one final layer per step
    assert (launched.count("_ddpm_sample_loop_kernel"), launched.count("_final_layer_ddpm_step_kernel")) == expected


def test_uses_one_launch_only_within_its_row_limit():
    pack = types.SimpleNamespace(loop_kernels="auto", device=torch.device("cpu"))
    few, many = types.SimpleNamespace(net_rows=64), types.SimpleNamespace(net_rows=65)
    assert not _uses_one_launch(pack, few, False, None, None, None)  # no GPU
    pack.loop_kernels = "one_launch"
    assert _uses_one_launch(pack, few, False, None, None, None)
    with pytest.raises(ValueError, match="at most 64 net rows"):
        _uses_one_launch(pack, many, False, None, None, None)
    pack.loop_kernels = "chain"
    assert not _uses_one_launch(pack, few, False, None, None, None)


def test_auto_refuses_a_one_launch_step_that_disagrees_with_the_chain(monkeypatch):
    """Before timing the two ways, 'auto' runs one step of each from the same state: a one-launch
    result off by more than rounding (here its state buffer is corrupted after the launch, as a
    barrier fault would leave it) raises instead of reaching a sample."""
    fake_gpu_timings(monkeypatch, ("_PROLOGUE_CHOICE", "_GEMM_WAY_CHOICE"), "one_launch",
                     lambda names: "one_launch" if "_ddpm_sample_loop_kernel" in names else "chain")
    monkeypatch.setattr(fused_head, "_LOOP_CHOICE", {})
    for module in (fused_head, one_launch):
        monkeypatch.setattr(module, "gpu_configs", lambda device: True)
    launch_steps = fused_head._one_launch_steps

    def corrupted(pack, ws, *args, **kwargs):
        result = launch_steps(pack, ws, *args, **kwargs)
        ws.states[result][0, 0] += 0.5 * (ws.states[result].abs().max() + 1)
        return result

    monkeypatch.setattr(fused_head, "_one_launch_steps", corrupted)
    net = make_net(40, 1, seed=12)
    with pytest.raises(RuntimeError, match="disagrees with the launch chain"):
        run_loop(net, 2, 3, 2.0, 1.0, None)
    assert not fused_head._LOOP_CHOICE


# GPU: the real grid (one program per SM) and its barriers

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("preset", sorted(RELEASED_HEADS))
@pytest.mark.parametrize("state_rows,cfg", [(4, 3.0), (50, 1.0)])
def test_gpu_one_launch_parity_at_released_sizes(preset, dtype, state_rows, cfg, monkeypatch):
    """The released-size parity test of the fused loop (fp32: 20 steps against float64; bf16/fp16:
    one step against the eager loop's rounding) with every step in one launch per chunk, at 8 net
    rows with CFG (16-row tiles, 4 warps) and 50 without (64-row tiles, 8 warps)."""
    original = packed_head

    def forcing(net):
        pack = original(net)
        pack.loop_kernels = "one_launch"
        return pack

    monkeypatch.setattr(fused_head, "packed_head", forcing)
    check_released_parity(preset, dtype, state_rows, cfg)


@gpu
@needs_cuda
@pytest.mark.parametrize("state_rows", [1, 5, 32])
def test_gpu_one_launch_equals_chain_and_replays_exactly(state_rows):
    """mar_base in bf16, 10 steps with CFG, four steps per launch: the one-launch loop (eager and
    replayed from its CUDA graph, 20 replays: a program reading another's output before a barrier
    completes would show here as a difference) agrees with the launch chain within bf16 rounding
    (as the eager launch and the replay of test_fused_head do), and no barrier timed out."""
    depth, width, z_channels = RELEASED_HEADS["mar_base"]
    net = make_net(width, depth, z_channels=z_channels, seed=3, dtype=torch.bfloat16, device="cuda")
    diffusion = GaussianDiffusion(10)
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(2 * state_rows, z_channels, device="cuda", generator=gen)
    x = torch.randn(state_rows, 16, device="cuda", generator=gen).repeat(2, 1)
    noise = torch.randn(10, state_rows, 16, device="cuda", generator=gen)
    results = {}
    for kernels in ("chain", "one_launch"):
        release_fused_cache(net)
        pack = packed_head(net)
        pack.loop_kernels = kernels
        pack.modulation_gemm_rows = 4 * 2 * bucket_rows(state_rows)  # four steps per modulation GEMM (and launch)
        results[kernels] = [ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 3.0, noise, GPU_CLIP,
                                                   use_cuda_graph=graph) for graph in (False, True)]
    eager, first = results["one_launch"]
    for _ in range(20):
        assert torch.equal(ddpm_sample_loop_fused(net, diffusion, z, x, 1.0, 3.0, noise, GPU_CLIP), first)
    graphs = packed_head(net).graphs
    assert all(not barrier_timed_out(captured.workspace.sync) for captured in graphs.values())
    assert relative_error(eager, first.double().cpu()) <= GPU_TOLERANCE[torch.bfloat16]
    assert relative_error(first, results["chain"][1].double().cpu()) <= GPU_TOLERANCE[torch.bfloat16]
    release_fused_cache(net)


@gpu
@needs_cuda
def test_gpu_phase_times_are_ordered_and_change_no_result():
    """mar_base in bf16 at 4 state rows with CFG, three steps in one launch with phase_times: every
    barrier's last arrival comes after program 0 left the previous one and before it leaves this
    one; the result is bitwise the launch's without timestamps."""
    depth, width, z_channels = RELEASED_HEADS["mar_base"]
    net = make_net(width, depth, z_channels=z_channels, seed=4, dtype=torch.bfloat16, device="cuda")
    outs = []
    for record in (False, True):
        pack, ws, diffusion = loop_workspace(net, 4, 3.0, 3)
        times = torch.zeros(3 * one_launch.phases_per_step(depth) + 1, 2, dtype=torch.int64, device="cuda")
        result = launch(pack, ws, diffusion, phase_times=times if record else None)
        outs.append(ws.state_pair[result].clone())
        assert not barrier_timed_out(ws.sync)
    rows = times.tolist()
    assert all(rows[p - 1][1] <= rows[p][0] <= rows[p][1] for p in range(1, len(rows)))
    assert torch.equal(outs[0], outs[1])
    release_fused_cache(net)


@gpu
@needs_cuda
def test_gpu_barrier_timeout_returns_nan_quickly(monkeypatch):
    """On the real grid, barriers that can never complete (the arrival counter starts far below
    zero) end the launch after one bounded wait per program: NaN result, flag set, no hang."""
    monkeypatch.setattr(one_launch, "MAX_BARRIER_SPINS", 10_000)
    depth, width, z_channels = RELEASED_HEADS["mar_base"]
    net = make_net(width, depth, z_channels=z_channels, seed=5, dtype=torch.bfloat16, device="cuda")
    pack, ws, diffusion = loop_workspace(net, 4, 3.0, 3)
    ws.sync[0] = -(1 << 30)
    result = launch(pack, ws, diffusion)
    assert barrier_timed_out(ws.sync) and torch.isnan(ws.state_pair[result]).all()
    assert ws.sync[:2].tolist() == [0, 0]
    release_fused_cache(net)
