"""The benchmark harness's work models, round selection, NVML decoding and device-clock timing (CPU)."""
import math
import statistics

import pytest
import torch

from benchmarks import harness, machine
from marfast.mar import PRESETS

RELEASED = {"mar_base": (6, 1024), "mar_large": (8, 1280), "mar_huge": (12, 1536)}
BASE_CONFIG = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, buffer_size=64, mlp_ratio=4.0,
                   num_sampling_steps="100")


def released_config(name):
    depth, width = RELEASED[name]
    return {**BASE_CONFIG, **PRESETS[name], "diffloss_d": depth, "diffloss_w": width}


@pytest.mark.parametrize("name, encoder, decoder, head, total", [
    ("mar_base", 3.5, 7.4, 3.4, 14.4),
    ("mar_large", 8.3, 17.4, 7.1, 32.7),
    ("mar_huge", 16.1, 33.6, 15.0, 64.6),
])
def test_mar_flops_match_the_performance_floors_note(name, encoder, decoder, head, total):
    """TFLOP per image at 64 AR steps with CFG, as tabulated in shared/notes/performance-floors.md."""
    parts = harness.mar_sampling_flops_per_image(released_config(name), 64, cfg_on=True)
    for part, expected in (("encoder", encoder), ("decoder", decoder), ("head", head), ("total", total)):
        assert parts[part] / 1e12 == pytest.approx(expected, abs=0.051), part


def test_mar_flops_scale_with_cfg_and_steps():
    config = released_config("mar_base")
    with_cfg = harness.mar_sampling_flops_per_image(config, 64, cfg_on=True)
    without = harness.mar_sampling_flops_per_image(config, 64, cfg_on=False)
    for part in with_cfg:
        assert with_cfg[part] == pytest.approx(2 * without[part])
    longer = harness.mar_sampling_flops_per_image(config, 256, cfg_on=True)
    assert longer["head"] == with_cfg["head"]  # the head denoises every token once, whatever num_iter is
    assert longer["decoder"] == pytest.approx(4 * with_cfg["decoder"])
    assert longer["encoder"] > 4 * with_cfg["encoder"]


def test_head_work_counts_flops_and_weight_traffic():
    from marfast.diffloss import SimpleMLPAdaLN

    net = SimpleMLPAdaLN(in_channels=16, model_channels=48, out_channels=32, z_channels=24, num_res_blocks=3)
    flops, bytes_min = harness.head_sampling_work(net, rows=10, steps=7, weight_bytes_per_param=2)
    per_row_step = 2 * ((5 * 3 + 2) * 48**2 + 3 * 48 * 16)
    assert flops == 10 * (7 * per_row_step + 2 * 48 * 24)
    adaln = 3 * (3 * 48 * 48 + 3 * 48) + (2 * 48 * 48 + 2 * 48)  # three blocks' shift/scale/gate, final shift/scale
    per_call = adaln + (256 * 48 + 48 + 48 * 48 + 48) + (24 * 48 + 48)  # + time_embed, cond_embed
    per_step = sum(p.numel() for p in net.parameters()) - per_call  # input_proj, the MLPs and LNs, final linear
    assert harness.head_weight_split(net) == (per_step, per_call)
    assert per_step == (16 * 48 + 48) + 3 * (2 * (48 * 48 + 48) + 2 * 48) + (48 * 32 + 32)
    assert bytes_min == 7 * (per_step * 2 + 2 * 10 * 16 * 4) + (per_call + 10 * 24) * 2


def test_transformer_head_work_matches_a_hand_count_and_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from marfast.demar import TransformerDenoiser

    channels, width, z_channels, depth, hidden, freq = 4, 32, 24, 2, 128, 256
    groups, per_image, context_len, steps = 2, 3, 5, 7
    net = TransformerDenoiser(channels, width, 2 * channels, z_channels, depth, num_heads=2, mlp_ratio=4.0)
    flops, bytes_min = harness.transformer_head_sampling_work(net, groups, per_image, context_len, steps,
                                                              weight_bytes_per_param=2)
    # per row and step: time embedding, cond_embed, adaLN, input_proj, per block q + proj + FFN, final linear,
    # attention over L context tokens; per image and call: each block's key/value projection
    per_row_step = (2 * (freq * width + width * width + z_channels * width + width * 4 * width + channels * width
                         + depth * (2 * width * width + 2 * width * hidden) + width * 2 * channels)
                    + depth * 4 * context_len * width)
    assert per_row_step == 71168
    per_image_call = depth * 2 * context_len * z_channels * 2 * width
    rows = groups * per_image
    assert flops == steps * rows * per_row_step + groups * per_image_call

    kv_params = depth * (z_channels * 2 * width + 2 * width)
    step_params = sum(p.numel() for p in net.parameters()) - kv_params
    kv_elements = depth * groups * context_len * 2 * width
    assert bytes_min == steps * (2 * step_params + 2 * kv_elements + 2 * rows * channels * 4) \
        + 2 * (kv_params + groups * context_len * z_channels + kv_elements + rows * z_channels)

    # one sampling call with one DDPM step: the keys/values once and the net once, as counted by torch
    x = torch.randn(groups, per_image, channels)
    z = torch.randn(groups, per_image, z_channels)
    context = torch.randn(groups, context_len, z_channels)
    t = torch.randint(0, 1000, (groups, per_image))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t, z, net.context_keys_values(context))
    one_step, _ = harness.transformer_head_sampling_work(net, groups, per_image, context_len, 1, 2)
    assert counter.get_total_flops() == one_step


def test_denoising_head_work_matches_a_hand_count_and_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from marfast.demar import DenoisingHead

    head = DenoisingHead(token_channels=4, z_channels=6, width=8)
    flops, bytes_min = harness.denoising_head_work(head, rows=10, bytes_per_element=2)
    assert flops == 10 * 2 * ((4 + 6) * 8 + 8 * 4 + (2 * 4 + 6) * 8 + 8 * 2)
    params = (10 * 8 + 8) + (8 * 4 + 4) + (14 * 8 + 8) + (8 * 2 + 2)
    assert bytes_min == (params + 10 * (4 + 6 + 4)) * 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(torch.randn(10, 4), torch.randn(10, 6))
    assert counter.get_total_flops() == flops


def test_roofline_floor_takes_the_binding_resource():
    roof = harness.Roofline("cuda:0", 800.0, "bfloat16", 8192, 3000.0, 2**30, 20, "synthetic")
    assert roof.floor_s(800e12, 3e9) == pytest.approx(1.0)          # compute-bound
    assert roof.floor_s(8e12, 6000e9) == pytest.approx(2.0)         # memory-bound


@pytest.mark.parametrize("estimate, target, budget, expected", [
    (0.01, 1.0, math.inf, 20),   # cheap: capped at max_rounds
    (0.2, 1.0, math.inf, 5),     # fills the target
    (0.4, 1.0, math.inf, 2),     # 3 rounds would overshoot the target: as many as fit, at least 1
    (5.0, 1.0, math.inf, 1),
    (0.2, 1.0, 0.5, 2),          # the budget allows 80% of 0.5 s
    (1.0, 1.0, 0.5, 0),          # not even one round fits
])
def test_choose_rounds(estimate, target, budget, expected):
    assert harness.choose_rounds(estimate, target, 20, budget) == expected


def test_summarize_reports_median_and_spread():
    stats = harness.summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats["median_s"] == 3.0 and stats["min_s"] == 1.0 and stats["max_s"] == 10.0
    assert stats["iqr_s"] == pytest.approx(2.0) and stats["rounds"] == 5
    assert stats["spread_pct"] == pytest.approx(100 * 2.0 / 3.0)
    single = harness.summarize([0.5])
    assert single["stddev_s"] == 0.0 and single["iqr_s"] == 0.0


def test_budget_skips_what_does_not_fit():
    harness.Budget(None).require(1e9, "anything")  # unlimited
    with pytest.raises(pytest.skip.Exception, match="needs about 100 s"):
        harness.Budget(10.0).require(100.0, "a case")


def test_throttle_reasons_are_decoded():
    assert machine.decode_throttle_reasons(0) == ["none"]
    assert machine.decode_throttle_reasons(0x1 | 0x4 | 0x40) == ["gpu_idle", "hw_thermal_slowdown", "sw_power_cap"]
    assert machine.decode_throttle_reasons(0x1000) == ["other_bits_0x1000"]


def test_metadata_without_a_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only metadata path")
    assert machine.nvml_state() == {"nvml": "unavailable: no CUDA device"}
    info = machine.software_info()
    assert info["cuda_available"] is False and info["torch"] == torch.__version__
    assert machine.device_label() == "cpu"


def test_attention_backend_is_reported_or_its_absence_named(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def without_attention(name, *args, **kwargs):
        if name == "marfast.attention":
            raise ModuleNotFoundError("No module named 'marfast.attention'", name="marfast.attention")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(machine.importlib, "import_module", without_attention)
    assert machine.attention_backend() == machine.ATTENTION_MODULE_ABSENT


def matmul_case_session(max_rounds):
    """(CPU BenchSession with a synthetic roofline, a [64, 64] matrix, the Work of a @ a)."""
    session = harness.BenchSession(torch.device("cpu"), harness.Budget(None), target_s=60.0, max_rounds=max_rounds,
                                   quick=False)
    session._roofline = harness.Roofline("cpu", 1.0, "float32", 64, 1.0, 64, 1, "synthetic")
    work = harness.Work(flops=2 * 64**3, bytes_min=3 * 64 * 64 * 4, items=1, unit="calls/s")
    return session, torch.randn(64, 64), work


@pytest.mark.benchmark(timer=harness.device_clock)
def test_pytest_benchmark_records_device_clock_times(benchmark):
    """The stats pytest-benchmark keeps are the times DeviceClock measured, round by round."""
    session, a, work = matmul_case_session(max_rounds=4)
    info = session.run_case(benchmark, case="matmul", case_key="matmul/64", provider=harness.REFERENCE,
                            fn=lambda: a @ a, work=work, params={"n": 64}, warmup_calls=1)
    rounds = 4 if benchmark.enabled else 1  # --benchmark-disable runs the target once
    assert info["rounds"] == rounds and session.last_samples_s == session.clock.samples_s[-rounds:]
    assert info["median_s"] == pytest.approx(statistics.median(session.last_samples_s))
    assert info["speedup_vs_reference"] == 1.0 and info["throughput"] == pytest.approx(1 / info["median_s"])
    assert info["tflops_per_s"] == pytest.approx(2 * 64**3 / info["median_s"] / 1e12)
    assert benchmark.extra_info["case_key"] == "matmul/64"
    if benchmark.stats is not None:  # None under --benchmark-disable
        assert benchmark.stats.stats.data == pytest.approx(session.last_samples_s)


@pytest.mark.benchmark(timer=harness.device_clock)
def test_a_case_can_name_its_own_reference_provider(benchmark):
    """Speedups divide the named provider's median; timed within the case, it is kept under that name."""
    session, a, work = matmul_case_session(max_rounds=3)
    info = session.run_case(benchmark, case="pair", case_key="pair/64", provider="transformer_reference",
                            fn=lambda: a @ a @ a, work=work, params={"n": 64}, warmup_calls=1,
                            reference_fn=lambda: a @ a, reference_warmup_calls=1, reference_provider="mlp_reference")
    reference = session.medians[("pair/64", "mlp_reference")]
    assert ("pair/64", harness.REFERENCE) not in session.medians
    assert info["reference_provider"] == "mlp_reference" and info["reference_median_s"] == reference
    assert info["speedup_vs_reference"] == pytest.approx(reference / info["median_s"])
    assert info["reference_source"].startswith("timed within this case")


@pytest.fixture
def one_thread():
    """Tiny models run ~30x faster on one thread than on two busy cores (thread contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mar_model():
    from benchmarks.models import TINY_MAR_CONFIG, randomize_
    from marfast import MAR

    torch.manual_seed(0)
    return randomize_(MAR(**TINY_MAR_CONFIG), seed=1).eval()


def test_reference_ar_steps_over_all_steps_reproduce_sample_tokens(one_thread):
    """The step-by-step replica used for stratified timing runs the reference loop's work exactly."""
    from benchmarks.models import reference_ar_steps

    model = tiny_mar_model()
    labels = torch.tensor([1, 7])
    torch.manual_seed(3)
    expected = model.sample_tokens(bsz=2, num_iter=5, cfg=2.5, labels=labels, temperature=1.0)
    torch.manual_seed(3)
    tokens = reference_ar_steps(model, 2, 5, 2.5, "linear", labels, 1.0, range(5))
    assert torch.equal(model.unpatchify(tokens), expected)


def test_fast_ar_steps_over_all_steps_reproduce_the_fast_loop(one_thread):
    from benchmarks.models import fast_ar_steps

    model = tiny_mar_model()
    labels = torch.tensor([4, 2, 9])
    torch.manual_seed(5)
    expected = model.sample_tokens_fast(bsz=3, num_iter=4, cfg=3.0, cfg_schedule="linear", labels=labels,
                                        temperature=1.0)
    torch.manual_seed(5)
    tokens = fast_ar_steps(model, 3, 4, 3.0, "linear", labels, 1.0, range(4))
    assert torch.equal(model.unpatchify(tokens), expected)


def test_stratified_steps_count_exactly_their_share_of_the_work():
    config = released_config("mar_base")
    full = harness.mar_sampling_flops_per_image(config, 64, cfg_on=True)
    strata = [harness.mar_sampling_flops_per_image(config, 64, cfg_on=True, steps=range(offset, 64, 8))
              for offset in range(8)]
    for part in full:
        assert sum(s[part] for s in strata) == pytest.approx(full[part])
    known_and_predicted = harness.mar_schedule(256, 64)
    assert sum(predicted for _, predicted in known_and_predicted) == 256
    assert known_and_predicted[0] == (0, known_and_predicted[1][0])


@pytest.mark.parametrize("before", [None, "1"])
def test_no_pdl_provider_sets_and_restores_the_pdl_switch(before, monkeypatch):
    """The head benchmark's marfast_fused_no_pdl provider runs its call with MARFAST_PDL=0 and
    leaves the variable as it found it (unset or set), even when the call raises."""
    import os

    from benchmarks.test_bench_head_sampling import _pdl_off
    from marfast.kernels.linear_fused import PDL_ENV, programmatic_launch

    if before is None:
        monkeypatch.delenv(PDL_ENV, raising=False)
    else:
        monkeypatch.setenv(PDL_ENV, before)
    with pytest.raises(RuntimeError, match="inside"):
        with _pdl_off():
            assert os.environ[PDL_ENV] == "0"
            assert programmatic_launch(torch.device("cuda")) == {"PDL": False, "launch_pdl": False}
            raise RuntimeError("inside")
    assert os.environ.get(PDL_ENV) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")  # bench_extended: registered by benchmarks/
def test_loop_kernel_providers_force_the_setting_at_few_rows_and_restore_it(monkeypatch):
    """marfast_fused_chain / marfast_fused_one_launch run their call with the packed head's
    loop_kernels forced and restore it, even when the call raises; on a GPU they are timed at 64
    rows or fewer only."""
    from benchmarks import test_bench_head_sampling as head_bench
    from marfast.diffloss import SimpleMLPAdaLN
    from marfast.fused_head import packed_head, release_fused_cache

    net = SimpleMLPAdaLN(4, 8, 8, 4, 1)
    with pytest.raises(RuntimeError, match="inside"):
        with head_bench._loop_kernels(net, "one_launch"):
            assert packed_head(net).loop_kernels == "one_launch"
            raise RuntimeError("inside")
    assert packed_head(net).loop_kernels == "auto"
    release_fused_cache(net)
    monkeypatch.setattr(head_bench, "ON_GPU", True)
    ids = {case.id for case in head_bench._cases()}
    for provider in head_bench.LOOP_KERNEL_PROVIDERS:
        assert {f"6x1024-rows8-{provider}", f"12x1536-rows64-{provider}"} <= ids
        assert not any(case_id.endswith(f"rows512-{provider}") for case_id in ids)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")  # bench_extended: registered by benchmarks/
def test_mar_sampling_cases_time_cuda_graphs_at_small_batch_on_gpu(monkeypatch):
    """On a GPU the MAR sampling matrix also times the fast loop with CUDA-graph transformer steps,
    at batch 16 or less only; the CPU matrix (no CUDA graphs) does not."""
    from benchmarks import test_bench_mar_sampling as mar_bench

    def ids():
        return {case.id for case in mar_bench._cases()}

    assert not any(mar_bench.FUSED_GRAPHS in case_id for case_id in ids())
    monkeypatch.setattr(mar_bench, "ON_GPU", True)
    graphs = {case_id for case_id in ids() if case_id.endswith(mar_bench.FUSED_GRAPHS)}
    assert {"mar_base-b1-iters64-marfast_fused_graphs", "mar_huge-b16-iters256-marfast_fused_graphs"} <= graphs
    assert not any("-b256-" in case_id for case_id in graphs)
