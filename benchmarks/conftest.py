"""pytest configuration of the benchmark suite (`pytest benchmarks/ --benchmark-only`).

- Every benchmark is timed on the device clock (see harness.py): the `benchmark(timer=...)` marker
  is added to each collected benchmark here.
- Options: --bench-quick (a small GPU subset), --bench-budget-s (wall-clock budget of the whole
  session; cases that would not fit are skipped with their estimated cost), --bench-target-s and
  --bench-max-rounds (how long each provider of a case is timed), --bench-mar-full-max-s and
  --bench-mar-stride (when MAR cases are timed on a stratified subset of AR steps).
- Machine metadata (pytest_benchmark_update_machine_info): NVML clocks, power, temperature and
  throttle reasons at the start and the end of the session, software versions and the attention
  backend; the measured roofline and the skipped cases go into the JSON's "marfast" entry.
"""
import os
import time
from pathlib import Path

import pytest
import torch

from .harness import BenchSession, Budget, device_clock
from .machine import kernel_timings, nvml_state, software_info

BENCH_DIR = Path(__file__).resolve().parent
SESSION = {"bench": None, "budget": None, "nvml_at_start": None, "skipped": [], "started": None}


def _env_float(name):
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else None


def pytest_addoption(parser):
    group = parser.getgroup("marfast benchmarks")
    group.addoption("--bench-quick", action="store_true", default=os.environ.get("MARFAST_BENCH_QUICK") == "1",
                    help="run only the quick subset of the GPU matrix (env MARFAST_BENCH_QUICK=1)")
    group.addoption("--bench-budget-s", type=float, default=_env_float("MARFAST_BENCH_BUDGET_S"),
                    help="wall-clock budget in seconds for all benchmark cases; cases that would not fit are "
                         "skipped with a reason (env MARFAST_BENCH_BUDGET_S; default unlimited)")
    group.addoption("--bench-target-s", type=float, default=_env_float("MARFAST_BENCH_TARGET_S"),
                    help="timed seconds per provider and case (default 1.0 on GPU, 1.2 on CPU)")
    group.addoption("--bench-max-rounds", type=int, default=None,
                    help="most timed rounds per provider and case (default 20 on GPU, 5 on CPU)")
    group.addoption("--bench-mar-full-max-s", type=float, default=10.0,
                    help="MAR cases whose eager reference is expected to take longer are timed on a stratified "
                         "subset of AR steps (default 10)")
    group.addoption("--bench-mar-stride", type=int, default=None,
                    help="force the AR-step stride of the MAR cases (1: complete runs; default: from "
                         "--bench-mar-full-max-s on GPU, 1 on CPU)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_extended: part of the full GPU matrix, left out by --bench-quick")


def _is_benchmark_item(item):
    return BENCH_DIR in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config, items):
    quick = config.getoption("--bench-quick")
    kept, dropped = [], []
    for item in items:
        if not _is_benchmark_item(item):
            kept.append(item)
            continue
        if quick and item.get_closest_marker("bench_extended"):
            dropped.append(item)
            continue
        item.add_marker(pytest.mark.benchmark(timer=device_clock))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_sessionstart(session):
    SESSION["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    SESSION["budget"] = Budget(session.config.getoption("--bench-budget-s", default=None))
    SESSION["nvml_at_start"] = nvml_state()


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call") and BENCH_DIR.name in report.nodeid.split("/")[0]:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        SESSION["skipped"].append({"nodeid": report.nodeid, "reason": reason})


@pytest.fixture(scope="session")
def bench(request):
    """The session's BenchSession: device, device clock, roofline (measured on first use), budget.

    On the CPU the session uses MARFAST_BENCH_CPU_THREADS threads (default 1): the CPU cases only
    exercise the harness, and one thread keeps them fast and steady on a shared CI machine.
    """
    config = request.config
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    target_s = config.getoption("--bench-target-s") or (1.0 if on_gpu else 1.2)
    max_rounds = config.getoption("--bench-max-rounds") or (20 if on_gpu else 5)
    if SESSION["budget"] is None:  # this conftest was loaded after the session started
        SESSION["budget"] = Budget(config.getoption("--bench-budget-s"))
    session = BenchSession(device, SESSION["budget"], target_s, max_rounds, quick=config.getoption("--bench-quick"))
    session.options.update(mar_full_max_s=config.getoption("--bench-mar-full-max-s"),
                           mar_stride=config.getoption("--bench-mar-stride"))
    SESSION["bench"] = session
    threads = torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(int(os.environ.get("MARFAST_BENCH_CPU_THREADS", "1")))
    SESSION["torch_threads"] = torch.get_num_threads()
    yield session
    torch.set_num_threads(threads)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["marfast"] = {
        "software": software_info(),
        "nvml_at_start": SESSION["nvml_at_start"],
        "nvml_at_end": nvml_state(),
        "session_started": SESSION["started"],
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    session = SESSION["bench"]
    output_json["marfast"] = {
        "roofline": None if session is None or session._roofline is None else vars(session._roofline),
        "quick": config.getoption("--bench-quick"),
        "budget_s": config.getoption("--bench-budget-s"),
        "skipped": SESSION["skipped"],
        "torch_threads_during_benchmarks": SESSION.get("torch_threads"),
        "timed_choices": kernel_timings(),
    }
