#!/usr/bin/env python3
"""The demo: FedAvg and FedDifRC on the same partition, seed and budget, side by side.

    .venv/bin/python scripts/demo.py [--supernodes 10] [--cpus-per-client 1] [-c "key=value ..."]

Each method is one complete Flower simulation through `scripts/run_simulation.py` (its own run
folder, metrics, plot and summary, a non-zero exit when the Flower run fails), with the project's
defaults (pyproject.toml: the offline teacher with the settings the benchmarks use, a scaled-down
benchmark budget) plus the same `-c` settings for both; only `algorithm` differs. Then it writes
`<runs>/demo-<time>/comparison.{png,md,json}` (both test curves in one plot) and prints a table:
the test accuracy at the round validation chose, the mean of the last 5 rounds, the final round,
and the difference, beside the multi-seed result of the accuracy benchmark (one seed is not proof).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from feddifrc_core.checkpoint import atomic_write_text
from feddifrc_core.comparison import (
    MethodRun,
    comparison_table,
    multi_seed_result,
    plot_comparison,
)

ROOT = Path(__file__).resolve().parents[1]
# The accuracy benchmark's generated summaries, newest suite first (docs/results.md); the demo
# quotes the one with the most seeds.
BENCHMARK_SUMMARIES = (ROOT / "benchmarks/results/accuracy/cpu-v3/summary.json",
                       ROOT / "benchmarks/results/accuracy/cpu-v2/summary.json")
RESULTS_LINE = re.compile(r"^Results: (.+)$", re.MULTILINE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="fedavg,feddifrc",
                        help="algorithms to compare; the first is the baseline (default fedavg,feddifrc)")
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("-c", "--run-config", action="append", default=[],
                        help="settings for every method, 'k=v k2=v2' or a TOML file (repeatable)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if len(methods) < 2 or len(set(methods)) != len(methods):
        parser.error(f"--methods needs two or more distinct algorithms, got {args.methods!r}")
    if any(re.search(r"(^|\s)algorithm\s*=", c) for c in args.run_config):
        parser.error("the demo sets `algorithm` itself; choose the methods with --methods")

    started = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: list[MethodRun] = []
    for method in methods:
        print(f"\n=== {method} ({len(runs) + 1} of {len(methods)}) ===", flush=True)
        folder = run_method(method, f"demo-{stamp}-{method}", args)
        if folder is None:
            print(f"ERROR: the {method} run failed (see above); no comparison is written.",
                  file=sys.stderr)
            return 1
        runs.append(MethodRun.read(method, folder))

    out = runs[0].folder.parent / f"demo-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    alpha = float(_config_value(runs[0], "dirichlet-alpha"))  # type: ignore[arg-type]
    table = comparison_table(runs, baseline=methods[0])
    evidence = [line for m in methods[1:]
                if (line := multi_seed_result(BENCHMARK_SUMMARIES, m, methods[0], alpha))]
    plot_comparison(runs, out / "comparison.png",
                    title=f"{' vs '.join(methods)}: same partition (alpha {alpha:g}), seed, budget")
    text = "\n".join([
        f"Same partition, seed and budget ({runs[0].summary.get('rounds')} rounds); "
        "accuracies on the test set:", "", table, "",
        "One seed is not proof. The accuracy benchmark (docs/results.md, 'Accuracy benchmark'):",
        *(f"  {line}" for line in evidence or ["  (no multi-seed result recorded yet)"]),
    ])
    atomic_write_text(out / "comparison.md", text + "\n")
    atomic_write_text(out / "comparison.json", json.dumps({
        "methods": methods, "runs": {r.label: str(r.folder) for r in runs},
        "numbers": {r.label: r.numbers() for r in runs}, "multi-seed": evidence,
        "seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
    print(f"\n{text}\n\nComparison: {out / 'comparison.png'}\n            {out / 'comparison.md'}"
          f"\nRun folders: {', '.join(str(r.folder) for r in runs)}"
          f"\nDemo time: {time.monotonic() - started:.0f} s", flush=True)
    return 0


def run_method(method: str, run_name: str, args: argparse.Namespace) -> Path | None:
    """One Flower simulation through run_simulation.py (streamed); its run folder, or None."""
    command = [sys.executable, str(ROOT / "scripts" / "run_simulation.py"),
               "--supernodes", str(args.supernodes), "--cpus-per-client", str(args.cpus_per_client)]
    for item in args.run_config:
        command += ["-c", item]
    command += ["-c", f"algorithm='{method}' run-name='{run_name}'"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait() != 0:
        return None
    found = RESULTS_LINE.search("".join(lines))
    return Path(found.group(1).strip()) if found else None


def _config_value(run: MethodRun, key: str) -> object:
    return json.loads((run.folder / "config.json").read_text())["run-config"][key]


if __name__ == "__main__":
    sys.exit(main())
