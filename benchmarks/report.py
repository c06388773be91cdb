"""Turn benchmark result JSONs (pytest-benchmark with marfast's extra_info) into tables and plots.

    python -m benchmarks.report RESULTS.json [MORE.json | DIR ...] [--markdown OUT.md] [--plots DIR]
                                [--update-readme benchmarks/README.md] [--summary]

- The markdown table has one row per (case, provider): median time, throughput in the case's unit,
  achieved TFLOP/s, fraction of the measured roofline and speedup over the reference eager path
  measured in the same run; a header line gives device, date and versions. It is printed, written
  to --markdown, and/or placed between the `<!-- perf-table:start -->` and `<!-- perf-table:end -->`
  markers of --update-readme (which refuses CPU results unless --allow-cpu). --summary prints (and
  puts in the README) a shorter table instead: one row per case with every provider's median,
  speedup and fraction of the roofline.
- --plots writes PNGs: throughput against rows or batch, and the fraction of the roofline, one
  figure per case and configuration. Plotting needs matplotlib (not a marfast dependency); without
  it the tables are still written and a message says that the plots were skipped.
"""
import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

PROFILE_PREFIX = "profile-"  # benchmarks/profile_kernels.py's kernel profiles and traces share the results dir
START_MARKER = "<!-- perf-table:start -->"
END_MARKER = "<!-- perf-table:end -->"
PROVIDER_RANK = {"reference_eager": 0, "torch_compile": 1, "marfast_fused_head": 2, "marfast_fused": 3,
                 "marfast_fused_no_pdl": 3.5, "marfast_fused_graphs": 3.6, "marfast_fused_chain": 3.7,
                 "marfast_fused_one_launch": 3.8, "mlp_reference": 4, "mlp_fused": 5,
                 "transformer_reference": 6, "transformer_compile": 7}
# x axis and the parameters that make one line of a plot, per case (other cases: chosen from the data).
PLOT_AXES = {
    "head_sample": ("rows", ("head",)),
    "mar_sample": ("batch", ("model", "num_iter")),
    "demar_head_sample": ("batch", ("size", "tokens_per_image")),
    "demar_denoising_head": ("batch", ("size", "tokens_per_image")),
}
PARAM_LABELS = {"num_iter": "AR steps", "ddpm_steps": "DDPM steps"}


class ResultsError(ValueError):
    """A results file that is not a marfast benchmark JSON."""


def load_results(path):
    """One pytest-benchmark JSON -> {"path", "machine", "software", "datetime", "rows", "skipped", "roofline"}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ResultsError(f"{path} has no 'benchmarks' list: not a pytest-benchmark JSON")
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "provider" not in info or "median_s" not in info:
            continue
        rows.append({"name": bench.get("name", ""), **info})
    machine = data.get("machine_info", {})
    marfast = machine.get("marfast", {})
    session = data.get("marfast", {})
    return {
        "path": str(path),
        "machine": machine,
        "software": marfast.get("software", {}),
        "nvml": marfast.get("nvml_at_end", {}),
        "datetime": data.get("datetime", ""),
        "rows": rows,
        "skipped": session.get("skipped", []),
        "roofline": session.get("roofline"),
        "timed_choices": session.get("timed_choices") if isinstance(session.get("timed_choices"), list) else [],
    }


def collect_paths(inputs):
    """Files as given, and the *.json files (sorted) of any directory; kernel profiles (profile-*) are
    left out, with a note on stderr for those named explicitly."""
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(path for path in sorted(item.glob("*.json")) if not path.name.startswith(PROFILE_PREFIX))
        elif item.is_file() and item.name.startswith(PROFILE_PREFIX):
            print(f"note: {item} is a kernel profile (benchmarks/profile_kernels.py), not a benchmark JSON: skipped",
                  file=sys.stderr)
        elif item.is_file():
            paths.append(item)
        else:
            raise ResultsError(f"{item} does not exist")
    if not paths:
        raise ResultsError("no result JSON files found")
    return paths


# ---------------------------------------------------------------------------------------------
# formatting

def format_seconds(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_rate(value, unit):
    if value is None or not math.isfinite(value):
        return "-"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix} {unit}"
    return f"{value:.3g} {unit}"


def format_fraction(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def format_speedup(value):
    return "-" if value is None else f"{value:.2f}x"


def describe_timed_choice(decision):
    """One record of marfast's timed kernel choices (`machine.kernel_timings()`) as text: (what, key, the kept candidate with its time, the
    others with theirs, or 'did not run' for those that could not)."""
    def ms(value):
        return f"{value:.4f} ms" if isinstance(value, (int, float)) else "did not run"

    times = decision["ms_per_call"]
    others = ", ".join(f"{name} {ms(value)}" for name, value in times.items() if name != decision["chosen"])
    return decision["what"], ", ".join(decision["key"]), f"{decision['chosen']} {ms(times[decision['chosen']])}", others


def case_label(row):
    """Readable case description from its params, e.g. 'head 6x1024, 4096 rows' or 'mar_base b256, 64 AR steps'."""
    params = row.get("params", {})
    case = row.get("case", "")
    if case == "head_sample":
        return f"head {params.get('head')}, {params.get('rows')} rows"
    if case == "mar_sample":
        label = f"{params.get('model')} b{params.get('batch')}, {params.get('num_iter')} AR steps"
        stride = (row.get("timing") or {}).get("stride", 1)
        return label + (f" (every {stride}th step timed, images/s estimated)" if stride > 1 else "")
    if case == "demar_head_sample":
        return (f"{params.get('size')} heads b{params.get('batch')}, {params.get('tokens_per_image')} tokens/image "
                f"(MLP {params.get('mlp_head')} vs Transformer {params.get('transformer_head')})")
    if case == "demar_denoising_head":
        return (f"{params.get('size')} denoising head b{params.get('batch')}, "
                f"{params.get('known_rows')} known tokens")
    simple = [f"{PARAM_LABELS.get(k, k)}={v}" for k, v in params.items() if isinstance(v, (int, float, str))]
    return f"{case}: " + ", ".join(simple) if simple else case


def sort_key(row):
    params = row.get("params", {})
    numeric = tuple(v for v in params.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return (row.get("case", ""), str(params.get("head", params.get("model", ""))), params.get("num_iter", 0),
            numeric, PROVIDER_RANK.get(row["provider"], 99), row["provider"])


def header_line(results):
    software = results["software"]
    device = (results["nvml"].get("gpu_name") if isinstance(results["nvml"], dict) else None) \
        or software.get("cuda_device_name") or (results["rows"][0]["device"] if results["rows"] else "unknown device")
    parts = [f"**{device}**", results["datetime"][:10] or "undated"]
    if isinstance(results["nvml"], dict) and "driver_version" in results["nvml"]:
        parts.append(f"driver {results['nvml']['driver_version']}")
    for key in ("torch", "triton", "flash_attn"):
        if key in software:
            parts.append(f"{key.replace('_', '-')} {software[key]}")
    attention = software.get("attention_backend")
    if isinstance(attention, dict):
        attention = ", ".join(f"{k}: {v}" for k, v in attention.items())
    if attention:
        parts.append(f"attention {attention}")
    if "programmatic_dependent_launch" in software:
        parts.append(f"PDL {software['programmatic_dependent_launch']}")
    roof = results["roofline"]
    if roof:
        parts.append(f"measured roofline {roof['matmul_tflops']:.4g} TFLOP/s {roof['matmul_dtype']} matmul, "
                     f"{roof['copy_gbps']:.4g} GB/s copy")
    return " | ".join(parts)


def markdown_table(results):
    """Markdown for one results file: header line, table, and the skipped cases."""
    lines = [header_line(results), "",
             "| case | provider | median | throughput | TFLOP/s | % roofline | speedup vs reference |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(results["rows"], key=sort_key):
        speedup = row.get("speedup_vs_reference")
        lines.append("| " + " | ".join([
            case_label(row),
            row["provider"],
            format_seconds(row["median_s"]) + (f" (±{row['spread_pct']:.0f}%)" if row.get("spread_pct") else ""),
            format_rate(row.get("throughput"), row.get("throughput_unit", "")),
            f"{row['tflops_per_s']:.3g}" if row.get("tflops_per_s") is not None else "-",
            format_fraction(row.get("roofline_fraction")) + (f" ({row['bound']})" if row.get("bound") else ""),
            format_speedup(speedup),
        ]) + " |")
    if not results["rows"]:
        lines.append("| (no benchmark results in this file) | | | | | | |")
    if results["skipped"]:
        lines += ["", f"Skipped in this run ({len(results['skipped'])}):", ""]
        reasons = defaultdict(list)
        for item in results["skipped"]:
            reasons[item["reason"].removeprefix("Skipped: ")].append(item["nodeid"].split("::")[-1])
        for reason, names in reasons.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"- {reason}: {shown}")
    if results["timed_choices"]:
        lines += ["", f"Kernel configurations and ways timed in this run ({len(results['timed_choices'])}; "
                      "ms per call; Triton against cuBLAS where a launcher times both):", "",
                  "| what | key | kept | others |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(describe_timed_choice(decision)) + " |" for decision in results["timed_choices"]]
    return "\n".join(lines) + "\n"


def summary_table(results):
    """Short markdown summary: one row per case with each provider's median and the speedups."""
    by_case = defaultdict(dict)
    for row in results["rows"]:
        by_case[row["case_key"]][row["provider"]] = row
    providers = sorted({row["provider"] for row in results["rows"]}, key=lambda p: PROVIDER_RANK.get(p, 99))
    references = {row.get("reference_provider", "reference_eager") for row in results["rows"]}
    others = [p for p in providers if p not in references]
    head = ["case"] + providers + [f"{p} speedup" for p in others] + [f"{p} % roofline" for p in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case_key in sorted(by_case, key=lambda k: sort_key(next(iter(by_case[k].values())))):
        rows = by_case[case_key]
        cells = [case_label(next(iter(rows.values())))]
        cells += [format_seconds(rows[p]["median_s"]) if p in rows else "-" for p in providers]
        cells += [format_speedup(rows[p].get("speedup_vs_reference")) if p in rows else "-" for p in others]
        cells += [format_fraction(rows[p].get("roofline_fraction")) if p in rows else "-" for p in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(readme, table):
    """Replace the text between the perf-table markers of `readme` with `table`."""
    text = Path(readme).read_text()
    if START_MARKER not in text or END_MARKER not in text:
        raise ResultsError(f"{readme} has no {START_MARKER} ... {END_MARKER} section")
    head, rest = text.split(START_MARKER, 1)
    _, tail = rest.split(END_MARKER, 1)
    Path(readme).write_text(f"{head}{START_MARKER}\n{table.rstrip()}\n{END_MARKER}{tail}")


# ---------------------------------------------------------------------------------------------
# plots

def plot_axes(case, rows):
    """(x parameter, parameters that identify a line group) for a case's rows."""
    if case in PLOT_AXES:
        return PLOT_AXES[case]
    varying = {}
    for key in rows[0].get("params", {}):
        values = {row["params"].get(key) for row in rows}
        if len(values) > 1 and all(isinstance(v, (int, float)) for v in values):
            varying[key] = len(values)
    if not varying:
        return None, ()
    x = max(varying, key=varying.get)
    others = tuple(k for k in rows[0]["params"] if k != x and len({str(r["params"].get(k)) for r in rows}) > 1)
    return x, others


def plot_series(results):
    """{(case, group label): {provider: [(x, throughput, roofline_fraction, unit)]}} for plotting."""
    by_case = defaultdict(list)
    for row in results["rows"]:
        by_case[row.get("case", "")].append(row)
    series = {}
    for case, rows in by_case.items():
        x_key, group_keys = plot_axes(case, rows)
        if x_key is None:
            continue
        for row in rows:
            params = row["params"]
            group = ", ".join(f"{PARAM_LABELS.get(k, k)} {params.get(k)}" for k in group_keys)
            lines = series.setdefault((case, x_key, group), defaultdict(list))
            lines[row["provider"]].append((params[x_key], row["throughput"], row.get("roofline_fraction"),
                                           row.get("throughput_unit", "")))
    for lines in series.values():
        for points in lines.values():
            points.sort()
    return series


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_plots(results, out_dir):
    """Write PNG plots into out_dir; returns their paths, or raises ImportError without matplotlib."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    device = slug(results["rows"][0]["device"]) if results["rows"] else "device"
    for (case, x_key, group), lines in sorted(plot_series(results).items()):
        fig, (speed_ax, roof_ax) = plt.subplots(1, 2, figsize=(11, 4))
        unit = ""
        for provider in sorted(lines, key=lambda p: PROVIDER_RANK.get(p, 99)):
            points = lines[provider]
            xs = [p[0] for p in points]
            unit = points[0][3]
            speed_ax.plot(xs, [p[1] for p in points], marker="o", label=provider)
            fractions = [(p[0], 100 * p[2]) for p in points if p[2] is not None]
            if fractions:
                roof_ax.plot([f[0] for f in fractions], [f[1] for f in fractions], marker="o", label=provider)
        for ax in (speed_ax, roof_ax):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel(PARAM_LABELS.get(x_key, x_key))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        speed_ax.set_yscale("log")
        speed_ax.set_ylabel(unit)
        speed_ax.set_title(f"{case} {group}: throughput")
        roof_ax.set_ylabel("% of measured roofline")
        roof_ax.set_title(f"{case} {group}: fraction of roofline")
        fig.tight_layout()
        path = out_dir / f"{device}-{slug(case)}-{slug(group) or 'all'}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="result JSON files or directories holding them")
    parser.add_argument("--markdown", help="write the markdown tables to this file")
    parser.add_argument("--plots", help="write PNG plots into this directory (needs matplotlib)")
    parser.add_argument("--update-readme", help="replace the perf-table section of this markdown file")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    parser.add_argument("--summary", action="store_true",
                        help="print (and put in --update-readme) a short table instead: one row per case with "
                             "medians, speedups and % roofline")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="let --update-readme publish CPU results (for testing; they are not performance results)")
    args = parser.parse_args(argv)
    try:
        all_results = [load_results(path) for path in collect_paths(args.inputs)]
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tables = "\n".join(markdown_table(results) for results in all_results)
    summaries = "\n".join(header_line(results) + "\n\n" + summary_table(results) for results in all_results)
    if not args.quiet:
        print(summaries if args.summary else tables)
    if args.markdown:
        Path(args.markdown).write_text(tables)
    if args.update_readme:
        cpu_files = [r["path"] for r in all_results if any(row.get("device") == "cpu" for row in r["rows"])]
        if cpu_files and not args.allow_cpu:
            print(f"error: refusing to publish CPU timings in {args.update_readme} ({', '.join(cpu_files)}); "
                  "--allow-cpu overrides this for testing", file=sys.stderr)
            return 2
        try:
            update_readme(args.update_readme, summaries if args.summary else tables)
        except ResultsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.plots:
        try:
            for results in all_results:
                for path in write_plots(results, args.plots):
                    print(f"wrote {path}")
        except ImportError:
            print("matplotlib is not installed: the plots were skipped (pip install matplotlib); "
                  "the tables were written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
