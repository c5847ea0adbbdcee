"""Accuracy benchmark: FedDifRC against FedAvg, FedProx, MOON and controls, through the real
Flower app.

Every run is a full Flower simulation of the project's ServerApp + ClientApp (10 SuperNodes; all
of them train each round in the CPU budget, 5 in the paper's) on the Fashion-MNIST PRIVATE split
(the half the offline teacher never saw), with the same partition, seeds and budget for every
method. Methods (`--methods`):

    fedavg, fedprox, moon                      baselines
    fedavg-kd                                  control: FedAvg + distillation toward the teacher's
                                               zero-shot diffusion classifier (its logits)
    feddifrc                                   CE + TDCL + NDCR
    feddifrc-tdcl, feddifrc-ndcr               ablations (lambda-ndcr = 0 / lambda-tdcl = 0)
    feddifrc-ssl, simclr                       self-supervised entry (`--ssl`): linear-probe accuracy;
                                               round 0 of a run is the randomly initialised encoder
    <method>+warm, feddifrc+no-head            variants (VARIANTS): warm start from the public half
                                               (control); FedDifRC aligning without the head

Every run also holds out 2,000 validation images of the test split (disjoint from the 2,000
test images); tables report the primary metric, the last-5 mean, and the test accuracy at the
round validation chose (accuracy_report.py).

    nice -n 5 .venv/bin/python benchmarks/accuracy.py --suite ten-seed --publish docs/results.md
                                      # the ten-seed table with the controls, in its run order
    nice -n 5 .venv/bin/python benchmarks/accuracy.py --seeds 7   # every method, one seed
    nice -n 5 .venv/bin/python benchmarks/accuracy.py --suite ssl-three-seed   # self-supervised
    .venv/bin/python benchmarks/accuracy.py --out benchmarks/results/accuracy/cpu-v2 \\
        --suite five-seed --report-only --publish docs/results.md   # redraw older records
    .venv/bin/python benchmarks/accuracy.py --paper --gpus-per-client 0.2   # paper budget, GPU
    .venv/bin/python benchmarks/accuracy.py --methods feddifrc --set tau=0.1 --tag tau0.1  # a knob

Resumable: each finished (method, alpha, seed) run is recorded in <out>/results.json and skipped on
a rerun; an interrupted run continues from its last checkpoint (the ServerApp's `resume`). The
FedDifRC variants of one (alpha, seed) share their clients' cached diffusion representations
(<out>/cache), and the runs of one seed at another alpha reuse the extracted rows per image (and
fedavg-kd its teacher logits per image); the warm start is trained once per seed and shared.
Outputs in <out>: results.json, table.md, accuracy.png, runs/<run>/ (run folders).

The pieces: accuracy_plan.py (what runs: methods, variants, budgets, suites, hashes),
accuracy_launch.py (one run in a child process), accuracy_store.py (records, results.json),
accuracy_report.py (tables, intervals, plots); this file is the command that strings them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import accuracy_report as report
from benchmarks.accuracy_launch import ENGINES, Launcher, launch
from benchmarks.accuracy_plan import (
    CONTROLS,
    CPU_BUDGET,
    CPU_FOLDER,
    FEDDIFRC_ARMS,
    LABEL_FREE,
    PAPER_BUDGET,
    RANDOM_INIT,
    SUITES,
    SUPERVISED,
    VARIANTS,
    algorithm,
    command_for,
    plan_runs,
    suite_specs,
)
from benchmarks.accuracy_store import ResultsStore, read_run, write_json
from feddifrc_core.checkpoint import atomic_write_text
from feddifrc_core.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "accuracy"


def _plots_line(plots: Sequence[Path], where: Path) -> str:
    return "Plots: " + ", ".join(f"`{os.path.relpath(p, where)}`" for p in plots) + ".\n"


def write_reports(store: ResultsStore, out: Path, command: str,
                  publish_to: Path | None = None, earlier: bool = False) -> str:
    """table.md (+ ssl_table.md), the plots and summary.json from every recorded run; with
    `publish_to`, the same tables replace the marked blocks `accuracy:<folder>` and
    `accuracy-ssl:<folder>` of that document (docs/results.md). `earlier`: the records were made
    with other settings than the command plans today (an older version), and the tables say so."""
    store.reload()
    records = list(store.records.values())
    sup = [r for r in records if r["method"] in SUPERVISED]
    ssl = [r for r in records if r["method"] in LABEL_FREE]
    text = ""
    summary: dict[str, Any] = {}
    for subset, name, is_ssl in ((sup, "table", False), (ssl, "ssl_table", True)):
        if not subset:
            continue
        baseline = LABEL_FREE[-1] if is_ssl else SUPERVISED[0]  # simclr / fedavg
        order = (*LABEL_FREE, *SUPERVISED) if is_ssl else (*SUPERVISED, *LABEL_FREE)
        table = report.table_markdown(
            subset, baseline, order, metric="linear-probe accuracy" if is_ssl else "test accuracy",
            initial_row_of=LABEL_FREE[0] if is_ssl else None)
        target = LABEL_FREE[0] if is_ssl else "feddifrc"
        rivals = [m for m in order if m != target and not algorithm(m).uses_diffusion]
        rivals += [c for c in CONTROLS if c not in rivals and not is_ssl]  # fedavg+warm
        # a tagged variant of the target (e.g. feddifrc+no-head) against the target itself
        variants = sorted({report.label_of(r) for r in subset if r["method"] == target and r.get("tag")})
        paired: list[report.Record] = list(subset)
        against, metric = rivals, ""
        knn = [v for v in (report.metric_view(r, "knn-accuracy") for r in subset) if v] if is_ssl else []
        if is_ssl:  # paired with the encoder the runs start from, too: does training improve it?
            paired = [*subset, *report.initial_runs(subset, target, RANDOM_INIT)]
            against, metric = [*rivals, RANDOM_INIT], "linear-probe accuracy"
        versus = [report.versus_markdown(paired, target, against, metric)]
        if knn:  # the encoder judged a second way: cosine 20-NN on the same features
            table += "\n" + report.table_markdown(
                knn, baseline, order, metric="kNN accuracy (20-NN, cosine)",
                initial_row_of=LABEL_FREE[0])
            versus.append(report.versus_markdown(
                knn + report.initial_runs(knn, target, RANDOM_INIT), target, against,
                "kNN accuracy"))
        controls = "" if is_ssl else report.controls_markdown(subset, FEDDIFRC_ARMS, CONTROLS)
        head_rule = "" if is_ssl else report.head_rule_markdown(subset)
        for extra_table in (*versus, controls,
                            *(report.versus_markdown(subset, v, [target]) for v in variants),
                            head_rule, report.losses_markdown(subset)):
            table += f"\n{extra_table}" if extra_table else ""
        plain = [r for r in subset if not r.get("tag")] or subset  # variants may change budget keys
        budget = {k: v for k, v in plain[0]["run-config"].items()
                  if k in ("num-rounds", "train-samples", "test-samples", "validation-samples",
                           "model", "model-width", "local-epochs", "lr", "batch-size",
                           "fraction-train", "torch-threads")}
        sampled = [r["machine-load"] for r in subset if r.get("machine-load")]
        loads = [m["load1-mean"] for m in sampled]
        load_line = (f"Machine load during the runs (1-min load average, each run's mean): "
                     f"{min(loads):.2f} to {max(loads):.2f} over {len(loads)} runs on "
                     f"{sampled[0]['cpus']} cores (results.json: `machine-load`)."
                     "\n" if loads else "")
        plot = out / f"{'ssl_' if is_ssl else ''}accuracy.png"
        plots = [plot, *([out / "ssl_knn_accuracy.png"] if knn else [])]
        made_by = command_for({r["key"] for r in subset}, command)
        when = (" at an earlier revision of this benchmark, with other settings than it plans "
                "today (results.json: `run-config`); redrawn from its records with "
                "--report-only" if earlier else "")
        head = (f"{table}\nBudget: {json.dumps(budget)}\n{load_line}Command: `{made_by}`{when}\n"
                "Per-run configs: results.json (`run-config`). ")
        body = head + _plots_line(plots, out)
        atomic_write_text(out / f"{name}.md", body)
        report.plot_accuracy(subset, plot, order,
                             "linear-probe accuracy (%)" if is_ssl else "global test accuracy (%)")
        if knn:
            report.plot_accuracy(knn, plots[1], order, "kNN accuracy (%)")
            summary[f"{name}_knn"] = report.summarize(knn, baseline)
        summary[name] = report.summarize(subset, baseline)
        if publish_to is not None:
            block = f"accuracy{'-ssl' if is_ssl else ''}:{out.name}"
            report.publish(publish_to, block, head + _plots_line(plots, publish_to.resolve().parent))
        text += body
    summary["primary-metric"] = (f"mean test accuracy of the last {report.LAST} rounds "
                                 "(docs/results.md, 'Primary metric')")
    write_json(out / "summary.json", summary)
    return text


# --- command line ---------------------------------------------------------------------------------
def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` -> typed run-config overrides (each key's own type and rule)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value with a run-config key, got {item!r}")
        try:
            out[key] = RunConfig.parse_text(key, text)
        except ConfigError as err:
            raise ValueError(f"--set {item!r}: {err}") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated (default: {','.join(SUPERVISED)}; with --ssl: "
                        f"{','.join(LABEL_FREE)})")
    p.add_argument("--alphas", default="0.1,0.5", help="Dirichlet alphas (default 0.1,0.5)")
    p.add_argument("--seeds", default=None, help="seeds (default 7, the reference seed; with "
                   "--suite the suite's seeds)")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="a whole benchmark in its run order (instead of --methods/--alphas/--tag)")
    p.add_argument("--rounds", type=int, default=None, help="override num-rounds of the budget")
    p.add_argument("--paper", action="store_true", help="paper budget (ResNet-10, 50 rounds, GPU)")
    p.add_argument("--ssl", action="store_true", help="self-supervised table (linear probe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override for every run (repeatable), e.g. tau=0.1")
    p.add_argument("--tag", default="", help="label of a variant (--set) in the table; "
                   f"a named one ({', '.join(VARIANTS)}) brings its settings")
    p.add_argument("--engine", choices=ENGINES, default="inprocess",
                   help="inprocess: flwr.simulation.run_simulation in a child process; "
                        "flwr-run: scripts/run_simulation.py (`flwr run` with its own SuperLink)")
    p.add_argument("--clients", type=int, default=10, help="SuperNodes (default 10)")
    p.add_argument("--cpus-per-client", type=float, default=float(os.cpu_count() or 1),
                   help="Ray CPUs per ClientApp (default: all cores = clients train one at a time)")
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--run-timeout", type=float, default=4 * 3600, help="seconds per run")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--report-only", action="store_true", help="rewrite table/plot from results.json")
    p.add_argument("--publish", type=Path, default=None, metavar="DOC",
                   help="also write the tables into DOC's marked blocks (e.g. docs/results.md)")
    args = p.parse_args(argv)

    # 1. what to run
    suite = SUITES[args.suite] if args.suite else None
    results_folder = ("paper" if args.paper else CPU_FOLDER) + (suite.folder_suffix if suite else "")
    out = (args.out or DEFAULT_OUT / results_folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = dict(PAPER_BUDGET if args.paper else CPU_BUDGET)
    if args.rounds:
        budget["num-rounds"] = args.rounds
    extra = parse_set(args.set)
    if suite:
        if args.methods or args.tag:
            raise SystemExit("--suite plans its own methods and tags: drop --methods/--tag")
        if suite.superseded_by and not args.report_only:
            raise SystemExit(f"--suite {args.suite} is superseded by --suite "
                             f"{suite.superseded_by}, which makes its runs; --report-only "
                             "redraws its older records (with --out)")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        specs = suite_specs(suite, seeds, budget, extra)
    else:
        methods = [m.strip() for m in (args.methods or ",".join(
            LABEL_FREE if args.ssl else SUPERVISED)).split(",") if m.strip()]
        alphas = [float(a) for a in args.alphas.split(",")]
        seeds = [int(s) for s in (args.seeds or "7").split(",")]
        # a named variant's tag brings its settings (--set still wins)
        specs = plan_runs(methods, alphas, seeds, budget, {**VARIANTS.get(args.tag, {}), **extra},
                          args.tag)
    store = ResultsStore(out / "results.json")
    # the command that makes the runs: --report-only only redraws what it recorded
    command = "nice -n 5 .venv/bin/python benchmarks/accuracy.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only")
    # --report-only reads what is recorded; it neither plans nor checks the runs
    todo = [] if args.report_only else [s for s in specs if not store.done(s)]
    earlier = any(store.records.get(s.key, {}).get("config-hash", s.config_hash) != s.config_hash
                  for s in specs)  # only possible with --report-only: done() refuses it
    print(f"{len(specs)} runs, {len(specs) - len(todo)} already recorded in {store.path}")
    if args.dry_run:
        for s in specs:
            print(f"  {'done' if s not in todo else 'todo'}  {s.key}  {s.run_name}")
        return 0

    # 2. run what is missing; a failed run is reported and the others go on
    how = Launcher(args.engine, args.clients, args.cpus_per_client, args.gpus_per_client,
                   args.run_timeout)
    failed = []
    for spec in todo:
        if store.done(spec):  # another harness process sharing this folder recorded it meanwhile
            continue
        folder = out / "runs" / spec.run_name
        if (folder / "summary.json").is_file():  # finished earlier but not recorded: read it back
            store.add(read_run(spec, folder))
            continue
        if not args.report_only:
            try:
                folder = launch(spec, out, how)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"ERROR: {err}", file=sys.stderr, flush=True)
                failed.append(spec.key)
                continue
            record = read_run(spec, folder)
            store.add(record)
            at_val = report.at_validation_round(record)
            print(f"[{time.strftime('%H:%M:%S')}] {spec.key}: last {report.LAST} "
                  f"{100 * report.last_mean(record):.2f}%, at the validation round "
                  f"{'n/a' if at_val is None else f'{100 * at_val:.2f}%'}, "
                  f"{record['wall-seconds']:.0f} s", flush=True)
            write_reports(store, out, command, args.publish)

    # 3. reports over everything recorded in this folder
    print(write_reports(store, out, command, args.publish, earlier))
    print(f"Results: {out}")
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
