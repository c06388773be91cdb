"""benchmarks/report.py on a synthetic results JSON: tables, README update, plots, bad input."""
import builtins
import json

import pytest

from benchmarks import report

ROOFLINE = {"device": "cuda:0", "matmul_tflops": 800.0, "matmul_dtype": "bfloat16", "matmul_size": 8192,
            "copy_gbps": 3000.0, "copy_bytes": 2**30, "reps": 20, "method": "synthetic"}


def head_row(rows, provider, median_s, speedup):
    flops = rows * 100 * 2 * 32 * 1024**2
    return {
        "case": "head_sample", "case_key": f"head_sample/6x1024/rows={rows}", "provider": provider,
        "params": {"head": "6x1024", "rows": rows, "ddpm_steps": 100, "cfg": 3.0},
        "device": "NVIDIA H100 80GB HBM3", "median_s": median_s, "spread_pct": 2.0, "rounds": 5,
        "throughput": rows * 100 / median_s, "throughput_unit": "rows*steps/s",
        "tflops_per_s": flops / median_s / 1e12, "roofline_fraction": flops / 800e12 / median_s,
        "bound": "compute", "speedup_vs_reference": speedup,
    }


def mar_row(batch, provider, median_s, speedup):
    return {
        "case": "mar_sample", "case_key": f"mar_sample/mar_base/b{batch}/iters64", "provider": provider,
        "params": {"model": "mar_base", "batch": batch, "num_iter": 64},
        "device": "NVIDIA H100 80GB HBM3", "median_s": median_s, "rounds": 1,
        "throughput": batch / median_s, "throughput_unit": "images/s", "tflops_per_s": 14.4 * batch / median_s,
        "roofline_fraction": 0.018 * batch / median_s, "bound": "compute", "speedup_vs_reference": speedup,
    }


@pytest.fixture
def results_json(tmp_path):
    rows = [
        head_row(8, "reference_eager", 0.150, 1.0),
        head_row(8, "torch_compile", 0.060, 2.5),
        head_row(8, "marfast_fused", 0.010, 15.0),
        head_row(4096, "reference_eager", 0.400, 1.0),
        head_row(4096, "marfast_fused", 0.125, 3.2),
        mar_row(1, "reference_eager", 6.0, 1.0),
        mar_row(1, "marfast_fused", 0.5, 12.0),
        mar_row(256, "reference_eager", 12.0, 1.0),
        {**mar_row(256, "marfast_fused", 1.0, 3.5), "case_key": "mar_sample/mar_base/b256/iters256",
         "params": {"model": "mar_base", "batch": 256, "num_iter": 256}, "timing": {"stride": 8}},
    ]
    data = {
        "machine_info": {"marfast": {
            "software": {"torch": "2.11.0", "triton": "3.6.0", "flash_attn": "not installed",
                         "attention_backend": {"requested": "auto", "cuda_bf16_head_dim64": "sdpa_flash"},
                         "programmatic_dependent_launch": "on"},
            "nvml_at_end": {"gpu_name": "NVIDIA H100 80GB HBM3", "driver_version": "570.1"},
        }},
        "datetime": "2026-11-23T10:00:00+00:00",
        "benchmarks": [{"name": f"test_{i}", "extra_info": row} for i, row in enumerate(rows)]
        + [{"name": "test_without_marfast_info", "extra_info": {}}],
        "marfast": {"roofline": ROOFLINE, "skipped": [
            {"nodeid": "benchmarks/test_bench_mar_sampling.py::test_mar_sample_tokens[mar_base-b256-iters64-marfast_fused]",
             "reason": "Skipped: needs about 30 s but 5 s are left"}]},
    }
    path = tmp_path / "marfast-bench-NVIDIA-H100-20261123.json"
    path.write_text(json.dumps(data))
    return path


def table_rows(markdown):
    return [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| case")]


def test_markdown_table_lists_every_result_with_its_numbers(results_json):
    results = report.load_results(results_json)
    markdown = report.markdown_table(results)
    header = markdown.splitlines()[0]
    for part in ("NVIDIA H100 80GB HBM3", "2026-11-23", "driver 570.1", "torch 2.11.0", "triton 3.6.0",
                 "sdpa_flash", "PDL on", "800 TFLOP/s bfloat16 matmul", "3000 GB/s copy"):
        assert part in header, part
    rows = table_rows(markdown)
    assert len(rows) == 9  # the benchmark without marfast extra_info is left out
    assert rows[0].startswith("| head 6x1024, 8 rows | reference_eager | 150 ms (±2%) |")
    fused_8 = next(r for r in rows if "8 rows" in r and "marfast_fused" in r)
    cells = [c.strip() for c in fused_8.strip("|").split("|")]
    assert cells[2] == "10 ms (±2%)"
    assert cells[3] == "80k rows*steps/s"
    assert cells[4] == f"{8 * 100 * 2 * 32 * 1024**2 / 0.010 / 1e12:.3g}"
    assert cells[5].endswith("(compute)")
    assert cells[6] == "15.00x"
    mar_rows = [r for r in rows if "mar_base" in r and "64 AR steps" in r]
    assert [r.split("|")[2].strip() for r in mar_rows] == ["reference_eager", "marfast_fused", "reference_eager"]
    assert "12.00x" in mar_rows[1] and "2 images/s" in mar_rows[1]
    assert "| mar_base b256, 256 AR steps (every 8th step timed, images/s estimated) | marfast_fused |" in markdown
    assert "Skipped in this run (1)" in markdown and "needs about 30 s" in markdown


def test_markdown_lists_the_timed_kernel_choices(results_json, tmp_path):
    data = json.loads(results_json.read_text())
    data["marfast"]["timed_choices"] = [
        {"what": "linear_gated_residual's GEMM (Triton or cuBLAS)", "key": ["4096", "1024"],
         "ms_per_call": {"fused_epilogue": 0.031, "cublas_gemm": 0.024}, "chosen": "cublas_gemm"},
        {"what": "GEMM (bias + SiLU epilogue)", "key": ["32", "1024", "1024"],
         "ms_per_call": {"(32, 32, 128, 4, 4, 1)": 0.0071, "(32, 64, 64, 4, 4, 1)": "out of resources: smem"},
         "chosen": "(32, 32, 128, 4, 4, 1)"}]
    path = tmp_path / "with-choices.json"
    path.write_text(json.dumps(data))
    markdown = report.markdown_table(report.load_results(path))
    assert "Kernel configurations and ways timed in this run (2;" in markdown
    assert ("| linear_gated_residual's GEMM (Triton or cuBLAS) | 4096, 1024 | cublas_gemm 0.0240 ms | "
            "fused_epilogue 0.0310 ms |") in markdown
    assert ("| GEMM (bias + SiLU epilogue) | 32, 1024, 1024 | (32, 32, 128, 4, 4, 1) 0.0071 ms | "
            "(32, 64, 64, 4, 4, 1) did not run |") in markdown
    data["marfast"]["timed_choices"] = "unknown (No module named 'marfast')"  # what a run without marfast records
    path.write_text(json.dumps(data))
    assert "timed in this run" not in report.markdown_table(report.load_results(path))


def test_summary_has_one_row_per_case_with_speedups(results_json):
    summary = report.summary_table(report.load_results(results_json))
    lines = summary.splitlines()
    assert lines[0] == ("| case | reference_eager | torch_compile | marfast_fused | torch_compile speedup | "
                        "marfast_fused speedup | torch_compile % roofline | marfast_fused % roofline |")
    body = lines[2:]
    assert len(body) == 5
    assert body[0].startswith("| head 6x1024, 8 rows | 150 ms | 60 ms | 10 ms | 2.50x | 15.00x |")
    assert body[3].startswith("| mar_base b256, 64 AR steps | 12 s | - | - | - | - |")
    assert body[4].startswith("| mar_base b256, 256 AR steps (every 8th step timed, images/s estimated) | - | - | 1 s |")


def test_update_readme_replaces_only_the_marked_section(results_json, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START_MARKER}\nold table\n{report.END_MARKER}\noutro\n")
    assert report.main([str(results_json), "--quiet", "--update-readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n" + report.START_MARKER + "\n**NVIDIA H100 80GB HBM3**")
    assert "old table" not in text and text.endswith(report.END_MARKER + "\noutro\n")
    assert text.count("| head 6x1024, 8 rows | marfast_fused |") == 1


def test_update_readme_refuses_cpu_results(results_json, tmp_path, capsys):
    data = json.loads(results_json.read_text())
    for bench in data["benchmarks"]:
        if bench["extra_info"]:
            bench["extra_info"]["device"] = "cpu"
    cpu_json = tmp_path / "cpu.json"
    cpu_json.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    original = f"{report.START_MARKER}\nkeep\n{report.END_MARKER}\n"
    readme.write_text(original)
    assert report.main([str(cpu_json), "--quiet", "--update-readme", str(readme)]) == 2
    assert "refusing to publish CPU timings" in capsys.readouterr().err
    assert readme.read_text() == original
    assert report.main([str(cpu_json), "--quiet", "--summary", "--allow-cpu", "--update-readme", str(readme)]) == 0
    assert "| head 6x1024, 8 rows | 150 ms |" in readme.read_text()


def test_update_readme_without_markers_is_an_error(results_json, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert report.main([str(results_json), "--quiet", "--update-readme", str(readme)]) == 2
    assert "perf-table:start" in capsys.readouterr().err
    assert readme.read_text() == "no markers here\n"


def test_plots_are_written_per_configuration(results_json, tmp_path):
    pytest.importorskip("matplotlib", reason="plotting is optional; matplotlib is not installed here")
    written = report.write_plots(report.load_results(results_json), tmp_path / "plots")
    names = sorted(path.name for path in written)
    assert names == ["nvidia-h100-80gb-hbm3-head-sample-head-6x1024.png",
                     "nvidia-h100-80gb-hbm3-mar-sample-model-mar-base-ar-steps-256.png",
                     "nvidia-h100-80gb-hbm3-mar-sample-model-mar-base-ar-steps-64.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_skips_plots_with_a_message(results_json, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def import_without_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_matplotlib)
    markdown = tmp_path / "table.md"
    assert report.main([str(results_json), "--quiet", "--markdown", str(markdown), "--plots", str(tmp_path / "p")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert "| head 6x1024, 4096 rows | marfast_fused |" in markdown.read_text()
    assert not (tmp_path / "p").exists()


def test_directories_are_expanded_and_bad_files_rejected(results_json, tmp_path, capsys):
    assert report.collect_paths([tmp_path]) == [results_json]
    bad = tmp_path / "not-results.json"
    bad.write_text(json.dumps({"something": 1}))
    assert report.main([str(bad)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.json")]) == 2


@pytest.mark.parametrize("seconds, text", [(2.5, "2.5 s"), (0.0123, "12.3 ms"), (4.2e-5, "42 us"), (None, "-")])
def test_format_seconds(seconds, text):
    assert report.format_seconds(seconds) == text


@pytest.mark.parametrize("value, text", [(1.5e9, "1.5G x/s"), (2500, "2.5k x/s"), (12.0, "12 x/s"), (None, "-")])
def test_format_rate(value, text):
    assert report.format_rate(value, "x/s") == text


def test_demar_heads_cases_are_labelled_and_compared_with_their_named_reference():
    params = {"size": "demar_base", "batch": 16, "tokens_per_image": 4, "mlp_head": "6x1024",
              "transformer_head": "4x1024"}
    rows = [{"case": "demar_head_sample", "case_key": "demar_head_sample/demar_base/b=16/p=4", "provider": provider,
             "reference_provider": "mlp_reference", "params": params, "median_s": median,
             "speedup_vs_reference": speedup, "roofline_fraction": 0.1}
            for provider, median, speedup in (("transformer_reference", 0.5, 0.4), ("mlp_reference", 0.2, 1.0))]
    rows.append({"case": "demar_denoising_head", "case_key": "demar_denoising_head/demar_base/b=16/p=4",
                 "provider": "reference_eager", "params": {"size": "demar_base", "batch": 16, "known_rows": 4032},
                 "median_s": 0.001, "speedup_vs_reference": 1.0})
    lines = report.summary_table({"rows": rows}).splitlines()
    assert lines[0] == ("| case | reference_eager | mlp_reference | transformer_reference | "
                        "transformer_reference speedup | transformer_reference % roofline |")
    assert lines[2] == "| demar_base denoising head b16, 4032 known tokens | 1 ms | - | - | - | - |"
    assert lines[3] == ("| demar_base heads b16, 4 tokens/image (MLP 6x1024 vs Transformer 4x1024) | - | 200 ms | "
                        "500 ms | 0.40x | 10.0% |")
