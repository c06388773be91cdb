#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (no network needed): check the environment, make
# `marfast` and `marfast.kernels` importable from this checkout, run the GPU parity tests
# (pytest -m gpu tests/), run the benchmarks into a JSON named after the device and the date, and
# print a short summary table last. The whole call stays within a wall-clock limit (default 530 s).
#
# usage: benchmarks/gpu_suite.sh [--quick] [--no-tests | --tests-only] [--profile | --profile-only]
#                                [--out DIR] [--seconds N] [-k EXPR] [--tests-k EXPR]
#                                [-- EXTRA PYTEST ARGS FOR THE BENCHMARKS]
#   --quick       the quick benchmark subset (--bench-quick): head 6x1024 at 8 and 4096 rows and
#                 12x1536 at 4096 rows, mar_base at batch 1 and 256 with 64 AR steps, De-MAR heads
#                 of demar_base at batch 1 and 256 and demar_huge at batch 256 (4 tokens per image)
#   --no-tests    skip the GPU parity tests; --tests-only: run only them
#   --out DIR     where results go (default: $OUT if set, else benchmarks/results/)
#   --seconds N   wall-clock limit of the whole call (default 530; env MARFAST_SUITE_SECONDS)
#   -k EXPR       select benchmark cases, e.g. -k "head and 12x1536" or -k "mar_huge and iters256"
#   --tests-k EXPR  select GPU tests, e.g. --tests-k one_launch (to rerun failures in the next call)
#   --allow-cpu   run without a GPU (to test this script; CPU timings, file names say "cpu")
#   --profile     after the tests, kernel profiles (benchmarks/profile_kernels.py, up to 240 s of the
#                 limit): head 6x1024 at 8 rows fused (with its Chrome trace; also with the launch
#                 chain forced, --loop-kernels chain), the one-launch DDPM
#                 loop's per-phase work and barrier times at 8 and 64 rows (benchmarks/phase_times.py,
#                 profile-phase-times-*.json), head 6x1024 at 4096 rows, the
#                 6x1024 training call at 65,536 rows fused and reference, mar_base batch 256 with
#                 16 AR steps fused (where the transformer's time goes), mar_base batch 1 with
#                 64 AR steps fused, without and with CUDA graphs of the transformer steps; writes
#                 profile-*.json and profile-<tag>.log into the out dir
#   --profile-only  only those profiles (no tests, no benchmarks), with the whole limit
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)
LIMIT_S="${MARFAST_SUITE_SECONDS:-530}"
OUT_DIR="${OUT:-$REPO/benchmarks/results}"
QUICK=0
ALLOW_CPU=0
PROFILE=0
PROFILE_RESERVE_S=0
RUN_TESTS=1
RUN_BENCH=1
K_EXPR=""
TESTS_K=()
EXTRA=()

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --no-tests) RUN_TESTS=0 ;;
    --tests-only) RUN_BENCH=0 ;;
    --profile) PROFILE=1 ;;
    --profile-only) PROFILE=1; RUN_TESTS=0; RUN_BENCH=0 ;;
    --out) OUT_DIR="$2"; shift ;;
    --seconds) LIMIT_S="$2"; shift ;;
    -k) K_EXPR="$2"; shift ;;
    --tests-k) TESTS_K=(-k "$2"); shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

DEADLINE=$((START + LIMIT_S))
# with --profile, the tests leave this much of the limit to the profiles
[ "$PROFILE" = 1 ] && PROFILE_RESERVE_S=240
seconds_left() { echo $((DEADLINE - $(date +%s))); }
say() { echo "[gpu_suite $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

mkdir -p "$OUT_DIR"
cd "$REPO"

# ------------------------------------------------------------------------------------------------
say "environment"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active \
    --format=csv || nvidia-smi
  DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr -cs 'A-Za-z0-9.' '-' | sed 's/-*$//')"
  TAG="${DEVICE:-gpu}-${STAMP}"
  nvidia-smi -q > "$OUT_DIR/nvidia-smi-$TAG.txt" 2>&1 || true
elif [ "$ALLOW_CPU" = 1 ]; then
  TAG="cpu-${STAMP}"
else
  echo "gpu_suite.sh: nvidia-smi not found: this script needs a machine with an NVIDIA GPU (--allow-cpu to test it)" >&2
  exit 3
fi

ALLOW_CPU="$ALLOW_CPU" python3 - <<'EOF' || { echo "gpu_suite.sh: the Python environment is not usable" >&2; exit 3; }
import importlib, importlib.metadata, os, shutil, sys
import torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
elif os.environ["ALLOW_CPU"] != "1":
    sys.exit("torch sees no CUDA device")
for dist in ("triton", "pytest", "pytest-benchmark", "nvidia-ml-py", "matplotlib", "flash-attn", "flash-attn-4"):
    try:
        print(f"{dist}: {importlib.metadata.version(dist)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{dist}: not installed")
for mod in ("pytest", "pytest_benchmark", "pynvml", "triton"):
    importlib.import_module(mod)
compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
print(f"C compiler for Triton's launcher stubs: {compiler or 'NOT FOUND (Triton kernels will fail to launch)'}")
EOF

# ------------------------------------------------------------------------------------------------
say "making marfast and marfast.kernels importable from $REPO"
check_import() {
  # pytest puts the repository root first on sys.path, so check with it there.
  python3 - "$REPO" <<'EOF'
import os, sys
repo = os.path.realpath(sys.argv[1])
sys.path.insert(0, repo)
import marfast, marfast.kernels
package = os.path.realpath(os.path.dirname(marfast.__file__))
kernels = os.path.realpath(os.path.dirname(marfast.kernels.__file__))
ok = package == os.path.join(repo, "marfast") and kernels == os.path.join(repo, "kernels")
print(f"marfast -> {package}; marfast.kernels -> {kernels}: {'ok' if ok else 'WRONG'}")
sys.exit(0 if ok else 1)
EOF
}
KERNELS_LINK=""
if ! check_import; then
  say "installing the checkout in editable mode (no dependencies, no build isolation)"
  python3 -m pip install --no-deps --no-build-isolation -q -e "$REPO" || say "editable install failed"
  if ! check_import; then
    # Last resort: a symlink marfast/kernels -> ../kernels in this working tree, removed on exit.
    if [ ! -e "$REPO/marfast/kernels" ]; then
      ln -s ../kernels "$REPO/marfast/kernels" && KERNELS_LINK="$REPO/marfast/kernels"
      trap '[ -n "$KERNELS_LINK" ] && rm -f "$KERNELS_LINK"' EXIT
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    check_import || { echo "gpu_suite.sh: cannot make marfast.kernels import from $REPO/kernels" >&2; exit 4; }
  fi
fi

# ------------------------------------------------------------------------------------------------
TESTS_RC="not run"
if [ "$RUN_TESTS" = 1 ]; then
  LEFT=$(( $(seconds_left) - PROFILE_RESERVE_S ))
  if [ "$RUN_BENCH" = 1 ]; then TESTS_S=$(( LEFT * 2 / 5 < 240 ? LEFT * 2 / 5 : 240 )); else TESTS_S=$((LEFT - 10)); fi
  say "GPU parity tests: pytest -m gpu tests/ (limit ${TESTS_S}s)"
  timeout -s INT -k 15 "$TESTS_S" python3 -m pytest -m gpu tests/ "${TESTS_K[@]}" -q -ra -p no:cacheprovider \
    --junitxml="$OUT_DIR/gpu-tests-$TAG.xml" 2>&1 | tee "$OUT_DIR/gpu-tests-$TAG.log"
  TESTS_RC=${PIPESTATUS[0]}
  say "GPU parity tests finished with exit code $TESTS_RC (5: no test is marked gpu; 124/130: stopped at the time limit)"
  [ "$TESTS_RC" = 5 ] && TESTS_RC="none marked gpu"
fi

# ------------------------------------------------------------------------------------------------
PROFILE_RC="not run"
PROFILE_NOTE=""
if [ "$PROFILE" = 1 ]; then
  LEFT=$(seconds_left)
  if [ "$RUN_BENCH" = 1 ]; then PROFILE_S=$(( LEFT - 60 < PROFILE_RESERVE_S ? LEFT - 60 : PROFILE_RESERVE_S )); else PROFILE_S=$((LEFT - 10)); fi
  PROFILE_END=$(( $(date +%s) + PROFILE_S ))
  PROFILE_LOG="$OUT_DIR/profile-$TAG.log"
  PROFILE_RC=0
  profile_case() {  # NAME ARGS...: one python -m $PROFILE_MODULE call (default benchmarks.profile_kernels)
    local name="$1" left=$((PROFILE_END - $(date +%s))) module="${PROFILE_MODULE:-benchmarks.profile_kernels}"
    shift
    if [ "$left" -lt 30 ]; then
      say "profile $name: not run, ${left}s left of the profile step" | tee -a "$PROFILE_LOG"
      PROFILE_RC=1
      return
    fi
    say "profile $name: python -m $module $* --out $OUT_DIR (limit ${left}s)" | tee -a "$PROFILE_LOG"
    timeout -s INT -k 15 "$left" python3 -m "$module" "$@" --out "$OUT_DIR" 2>&1 | tee -a "$PROFILE_LOG"
    local rc=${PIPESTATUS[0]}
    say "profile $name finished with exit code $rc" | tee -a "$PROFILE_LOG"
    left=$((PROFILE_END - $(date +%s)))
    case "$rc" in
      0|2|3|124|130|137) ;;  # done, bad options, fused path missing, time limit
      *) if [ "$left" -ge 30 ] && [ "$module" = benchmarks.profile_kernels ]; then  # a crash: retry once with the
           # profiler initialised before graph capture
           say "profile $name: retrying with --init-profiler-early (limit ${left}s)" | tee -a "$PROFILE_LOG"
           timeout -s INT -k 15 "$left" python3 -m benchmarks.profile_kernels "$@" --init-profiler-early \
             --out "$OUT_DIR" 2>&1 | tee -a "$PROFILE_LOG"
           rc=${PIPESTATUS[0]}
           say "profile $name (retry) finished with exit code $rc" | tee -a "$PROFILE_LOG"
         fi ;;
    esac
    [ "$rc" = 0 ] || PROFILE_RC=1
  }
  if [ "${TAG#cpu-}" != "$TAG" ]; then  # --allow-cpu without a GPU: the tiny reference cases exercise this step
    profile_case head --case head --head tiny --rows 8 --provider reference --calls 1
    profile_case mar --case mar --head tiny --batch 1 --num-iter 4 --provider reference --calls 1
    profile_case training --case training --head tiny --provider reference --calls 1
  else  # most telling first: the few-row head loop, the many-row one, training, then MAR at batch 1
    profile_case head --case head --head 6x1024 --rows 8 --provider fused --trace
    profile_case head-chain --case head --head 6x1024 --rows 8 --provider fused --loop-kernels chain
    PROFILE_MODULE=benchmarks.phase_times profile_case phase-times --head 6x1024 --rows 8
    PROFILE_MODULE=benchmarks.phase_times profile_case phase-times-64 --head 6x1024 --rows 64
    profile_case head-4096 --case head --head 6x1024 --rows 4096 --provider fused
    profile_case training --case training --head 6x1024 --provider fused
    profile_case training-reference --case training --head 6x1024 --provider reference
    profile_case mar-b256 --case mar --head 6x1024 --batch 256 --num-iter 16 --provider fused --calls 1
    MARFAST_CUDA_GRAPHS=0 profile_case mar --case mar --head 6x1024 --batch 1 --num-iter 64 --provider fused --calls 2
    profile_case mar-graphs --case mar --head 6x1024 --batch 1 --num-iter 64 --provider fused --calls 2 --cuda-graphs
  fi
  PROFILE_NOTE="; profiles: exit code $PROFILE_RC"
fi

# ------------------------------------------------------------------------------------------------
BENCH_RC="not run"
JSON=""
if [ "$RUN_BENCH" = 1 ]; then
  SUFFIX=""
  [ "$QUICK" = 1 ] && SUFFIX="-quick"
  [ -n "$K_EXPR" ] && SUFFIX="$SUFFIX-$(echo "$K_EXPR" | tr -cs 'A-Za-z0-9' '_' | cut -c1-40 | sed 's/_*$//')"
  JSON="$OUT_DIR/marfast-bench-$TAG$SUFFIX.json"
  LEFT=$(seconds_left)
  PYTEST_S=$((LEFT - 20))          # room for the summary
  BUDGET_S=$((PYTEST_S - 30))      # room for start-up, a case overrunning its estimate, and saving
  if [ "$BUDGET_S" -lt 30 ]; then
    say "only ${LEFT}s left: not enough for the benchmarks (raise --seconds or use --no-tests)"
  else
    ARGS=(benchmarks/ --benchmark-only --benchmark-json="$JSON" -q -ra -p no:cacheprovider --bench-budget-s "$BUDGET_S")
    [ "$QUICK" = 1 ] && ARGS+=(--bench-quick)
    [ -n "$K_EXPR" ] && ARGS+=(-k "$K_EXPR")
    ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
    say "benchmarks: pytest ${ARGS[*]} (limit ${PYTEST_S}s)"
    timeout -s INT -k 15 "$PYTEST_S" python3 -m pytest "${ARGS[@]}" 2>&1 | tee "$OUT_DIR/marfast-bench-$TAG$SUFFIX.log"
    BENCH_RC=${PIPESTATUS[0]}
    say "benchmarks finished with exit code $BENCH_RC"
  fi
fi

# ------------------------------------------------------------------------------------------------
say "results in $OUT_DIR"
ls -l "$OUT_DIR" | sed -n '1,40p'
if [ -n "$JSON" ] && [ -s "$JSON" ]; then
  python3 -m benchmarks.report "$JSON" --quiet --markdown "${JSON%.json}.md" --plots "$OUT_DIR/plots-$TAG$SUFFIX" \
    || say "report.py failed"
  echo
  echo "GPU parity tests: exit code $TESTS_RC$PROFILE_NOTE; benchmarks: exit code $BENCH_RC; JSON: $JSON"
  echo
  python3 -m benchmarks.report "$JSON" --summary
else
  echo "GPU parity tests: exit code $TESTS_RC$PROFILE_NOTE; benchmarks: exit code $BENCH_RC; no benchmark JSON was written"
fi

for rc in "$TESTS_RC" "$PROFILE_RC" "$BENCH_RC"; do
  case "$rc" in "not run"|"none marked gpu"|0) ;; *) exit 1 ;; esac
done
exit 0
