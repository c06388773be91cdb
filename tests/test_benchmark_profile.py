"""benchmarks.profile_kernels on the CPU: the tiny head, MAR and training cases end to end through
main(), the JSON they write, the refusal of GPU-only options, and the fused MAR and training paths'
wiring under the Triton interpreter (the paths the GPU profile runs)."""
import json

import pytest
import torch

from benchmarks import harness, profile_kernels
from benchmarks.models import TINY_HEAD, build_head
from benchmarks.test_bench_training import training_work

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of profile_kernels")

TOP_LEVEL_KEYS = ("device", "torch", "triton", "date", "case", "label", "params", "cuda_graphs", "profiled_calls",
                  "wall_us_per_call", "wall_us_per_call_unprofiled", "device_time_us_per_call",
                  "device_busy_us_per_call", "gap_us_per_call", "per_step", "kernels", "warnings")
KERNEL_KEYS = ("name", "calls_per_call", "us_per_call", "avg_us", "share")


def run_main(tmp_path, *options):
    assert profile_kernels.main([*options, "--calls", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    written = sorted(tmp_path.glob("profile-cpu-*.json"))
    assert len(written) == 1, written
    return json.loads(written[0].read_text())


def check_report(report, case, steps):
    for key in TOP_LEVEL_KEYS:
        assert key in report, key
    assert report["device"] == "cpu" and report["case"] == case and report["profiled_calls"] == 1
    assert report["torch"] == torch.__version__
    assert report["cuda_graphs"]["used"] is False
    assert report["wall_us_per_call"] > 0 and report["wall_us_per_call_unprofiled"]["median"] > 0
    assert 0 < report["device_time_us_per_call"] <= report["wall_us_per_call"]
    assert report["gap_us_per_call"] == pytest.approx(report["wall_us_per_call"] - report["device_busy_us_per_call"])
    assert report["steps_per_call"] == steps
    assert report["per_step"]["wall_us"] == pytest.approx(report["wall_us_per_call"] / steps)
    kernels = report["kernels"]
    assert kernels
    for row in kernels:
        for key in KERNEL_KEYS:
            assert key in row, key
        assert row["us_per_call"] >= 0 and row["calls_per_call"] > 0 and 0 <= row["share"] <= 1
    assert sum(row["share"] for row in kernels) <= 1 + 1e-9
    assert [row["us_per_call"] for row in kernels] == sorted((row["us_per_call"] for row in kernels), reverse=True)
    assert report["unassigned_activities"] == 0 and report["warnings"] == []


def test_head_case_writes_the_profile_and_the_weight_streaming_floor(tmp_path, capsys):
    report = run_main(tmp_path, "--case", "head", "--head", "tiny", "--rows", "4", "--hbm-gbps", "1000")
    check_report(report, "head", steps=100)
    assert report["params"]["rows"] == 4 and report["params"]["head"] == "tiny2x64"
    assert any(row["name"] == "aten::addmm" for row in report["kernels"])
    floor = report["weight_streaming_floor"]
    head = build_head(TINY_HEAD, "cpu", torch.float32, backend="torch")
    per_step, per_call = harness.head_weight_split(head.net)
    assert floor["weight_bytes_per_step"] == 4 * per_step and per_call > 0
    assert floor["bytes_min_per_step"] > floor["weight_bytes_per_step"]
    assert floor["hbm_gbps"] == 1000
    assert floor["floor_us_per_step"] == pytest.approx(floor["bytes_min_per_step"] / 1e9 * 1e6 / 1000)
    assert floor["wall_over_floor"] == pytest.approx(report["per_step"]["wall_us_unprofiled"]
                                                     / floor["floor_us_per_step"])
    out = capsys.readouterr().out
    assert "top 15 operators" in out and "weight-streaming floor" in out and "aten::addmm" in out


def test_mar_case_writes_the_profile_and_the_head_split(tmp_path):
    report = run_main(tmp_path, "--case", "mar", "--head", "tiny", "--num-iter", "2", "--init-profiler-early")
    check_report(report, "mar", steps=2)
    assert report["cuda_graphs"]["profiler_session_before_capture"] is True
    assert report["params"]["model"] == "tiny_mar" and report["params"]["num_iter"] == 2
    split = report["head_time_split"]
    assert split["measured"] and 0 < split["head_share"] < 1
    assert report["weight_streaming_floor"]["floor_s_per_call"] > 0


@pytest.mark.parametrize("options", [
    ("--case", "head", "--provider", "fused"),
    ("--case", "head", "--head", "6x1024", "--provider", "reference"),
    ("--case", "mar", "--cuda-graphs"),
])
def test_gpu_only_options_are_refused_on_the_cpu(tmp_path, capsys, options):
    with pytest.raises(SystemExit) as exit_info:
        profile_kernels.main([*options, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "cannot be profiled on the CPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_impossible_ar_step_count_exits_with_2(tmp_path, capsys):
    assert profile_kernels.main(["--case", "mar", "--head", "tiny", "--num-iter", "17", "--out", str(tmp_path)]) == 2
    assert "--num-iter must be in 1..16" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_fused_mar_case_runs_under_the_interpreter(tmp_path, monkeypatch):
    """The GPU-only fused MAR path, built and analysed as main() does on CUDA, under TRITON_INTERPRET=1
    (main refuses it on the CPU; this checks the wiring the GPU profile relies on)."""
    monkeypatch.setenv("MARFAST_CUDA_GRAPHS", "0")
    args = profile_kernels.parse_args(["--case", "mar", "--head", "tiny", "--num-iter", "1", "--calls", "1",
                                       "--warmup", "0", "--out", str(tmp_path)])
    args.provider = "fused"
    device = torch.device("cpu")
    case = profile_kernels.build_mar_case(args, device)
    assert case.params["call"] == "MAR.sample_tokens_fast, DiffLoss backend 'triton', norm backend 'auto'"
    unprofiled, profiled, events, extra = profile_kernels.run_profile(case, device, calls=1)
    analysis = profile_kernels.analyse(events, 1, on_gpu=False)
    report = profile_kernels.build_report(case, device, 1, unprofiled, profiled, analysis, extra)
    assert report["head_time_split"]["measured"]
    assert report["label"] == "mar-tiny_mar-b1-iters1-fused"
    assert report["kernels"]


def test_loop_kernels_option_sets_the_fused_head_and_is_refused_elsewhere(tmp_path, monkeypatch, capsys):
    """--loop-kernels one_launch: the fused MAR case's head runs its DDPM steps in one launch (the
    label and parameters say so; built and run under the interpreter, as above); the option is an
    error for the reference provider and the training case."""
    from marfast import fused_head

    launches = []
    one_launch = fused_head.ddpm_sample_loop
    monkeypatch.setattr(fused_head, "ddpm_sample_loop", lambda *a, **k: (launches.append(1), one_launch(*a, **k))[1])
    monkeypatch.setenv("MARFAST_CUDA_GRAPHS", "0")
    args = profile_kernels.parse_args(["--case", "mar", "--head", "tiny", "--num-iter", "1", "--calls", "1",
                                       "--warmup", "0", "--out", str(tmp_path)])
    args.provider, args.loop_kernels = "fused", "one_launch"
    case = profile_kernels.build_mar_case(args, torch.device("cpu"))
    assert case.label.endswith("-fused-one_launch") and case.params["loop_kernels"] == "one_launch"
    case.call()
    assert launches
    for options in (("--case", "head", "--head", "tiny"), ("--case", "training", "--head", "tiny")):
        with pytest.raises(SystemExit) as exit_info:
            profile_kernels.parse_args([*options, "--loop-kernels", "chain", "--out", str(tmp_path)])
        assert exit_info.value.code == 2
    assert "--loop-kernels applies to the fused head and mar cases" in capsys.readouterr().err


def test_report_leaves_kernel_profiles_out(tmp_path, capsys):
    from benchmarks import report

    profile_json = tmp_path / "profile-cpu-head-tiny2x64-rows8-reference-20260101-000000.json"
    profile_json.write_text(json.dumps({"kind": "marfast kernel profile"}))
    results_json = tmp_path / "marfast-bench-cpu-20260101-000000.json"
    results_json.write_text(json.dumps({"benchmarks": []}))
    assert report.collect_paths([tmp_path]) == [results_json]
    assert report.collect_paths([profile_json, results_json]) == [results_json]
    assert "is a kernel profile" in capsys.readouterr().err


def test_training_case_writes_the_profile_and_the_matmul_floor(tmp_path, capsys):
    report = run_main(tmp_path, "--case", "training", "--head", "tiny", "--rows", "64", "--matmul-tflops", "2")
    check_report(report, "training", steps=1)
    assert report["params"]["rows"] == 64 and report["params"]["provider"] == "reference"
    assert report["label"] == "training-tiny2x64-rows64-reference"
    assert any(row["name"] == "aten::addmm" for row in report["kernels"])
    assert any("backward" in row["name"].lower() for row in report["kernels"])  # the backward was profiled too
    floor = report["matmul_floor"]
    flops, _ = training_work(TINY_HEAD, 64, 4)
    assert floor["flops_per_call"] == flops and floor["matmul_tflops"] == 2
    assert floor["floor_us_per_call"] == pytest.approx(flops / 2e12 * 1e6)
    assert floor["wall_over_floor"] == pytest.approx(report["wall_us_per_call_unprofiled"]["median"]
                                                     / floor["floor_us_per_call"])
    assert report["peak_memory_gib"] is None  # measured on CUDA only
    assert isinstance(report["timed_choices"], list)
    assert "matmul floor" in capsys.readouterr().out


def test_training_rows_default_and_compile_only_for_training(tmp_path, capsys):
    args = profile_kernels.parse_args(["--case", "training", "--out", str(tmp_path)])
    assert args.rows == profile_kernels.TRAINING_ROWS["cpu"] and args.head == "tiny"
    assert profile_kernels.parse_args(["--case", "head", "--out", str(tmp_path)]).rows == 8
    with pytest.raises(SystemExit) as exit_info:
        profile_kernels.parse_args(["--case", "head", "--provider", "compile", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--provider compile applies to --case training" in capsys.readouterr().err


def test_fused_training_case_runs_under_the_interpreter(tmp_path):
    """The GPU-only fused training case (main refuses it on the CPU), built and analysed as main() does:
    the fused path really runs (the case refuses to profile a silent fallback to the plain forward)."""
    args = profile_kernels.parse_args(["--case", "training", "--rows", "33", "--calls", "1", "--warmup", "0",
                                       "--out", str(tmp_path)])
    args.provider = "fused"
    device = torch.device("cpu")
    case = profile_kernels.build_training_case(args, device)
    unprofiled, profiled, events, extra = profile_kernels.run_profile(case, device, calls=1)
    analysis = profile_kernels.analyse(events, 1, on_gpu=False)
    report = profile_kernels.build_report(case, device, 1, unprofiled, profiled, analysis, extra)
    assert report["label"] == "training-tiny2x64-rows33-fused"
    assert report["params"]["call"].startswith("DiffLoss(backend='triton')")
    assert report["kernels"] and report["matmul_floor"]["floor_us_per_call"] > 0


def test_print_table_lists_the_timed_choices(tmp_path, capsys):
    report = run_main(tmp_path, "--case", "head", "--head", "tiny", "--rows", "4")
    capsys.readouterr()
    report["timed_choices"] = [
        {"what": "GEMM (bias + SiLU epilogue)", "key": ["16", "1024"],
         "ms_per_call": {"(16, 32, 128, 4, 4)": 0.011, "(16, 64, 64, 4, 4)": 0.013, "(64, 64, 32, 4, 2)": "out of resources"},
         "chosen": "(16, 32, 128, 4, 4)"},
        {"what": "the modulation GEMM", "key": ["(1024, 1024)"], "ms_per_call": {"cublas": 0.02, "triton": 0.03},
         "chosen": "cublas"}]
    profile_kernels.print_table(report)
    out = capsys.readouterr().out
    assert "timed choices (2)" in out
    assert "GEMM (bias + SiLU epilogue) [16, 1024]: (16, 32, 128, 4, 4) 0.0110 ms; (16, 64, 64, 4, 4) 0.0130 ms, " \
           "(64, 64, 32, 4, 2) did not run" in out
    assert "the modulation GEMM [(1024, 1024)]: cublas 0.0200 ms; triton 0.0300 ms" in out


def test_phase_times_tool_summarises_work_and_barriers_and_needs_cuda(tmp_path, capsys):
    """benchmarks.phase_times: per phase kind the work and barrier medians and means, and their
    per-step sums (one block: one fc1 and one fc2 per step); on the CPU it exits with status 3
    (no global timer), and odd or too many rows are refused."""
    from benchmarks import phase_times

    times = torch.tensor([[0, 0]] + [[1000 * p + 600, 1000 * p + 1000] for p in range(1, 9)])  # two steps, depth 1
    phases, step = phase_times.summarise([(1, 0, times)], depth=1)
    assert phases["fc1"] == {"count": 2, "work_us": {"median": 0.6, "mean": 0.6},
                             "barrier_us": {"median": 0.4, "mean": 0.4}}
    assert phases["input_projection"]["work_us"]["median"] == pytest.approx(1.1)  # 1.6 us from the start, then 0.6
    assert step == {"work_us": pytest.approx(1.1 + 3 * 0.6), "barrier_us": pytest.approx(4 * 0.4)}
    if not torch.cuda.is_available():
        assert phase_times.main(["--out", str(tmp_path)]) == 3
        assert "global timer" in capsys.readouterr().err
    for rows in ("7", "66"):
        with pytest.raises(SystemExit):
            phase_times.parse_args(["--rows", rows, "--out", str(tmp_path)])
