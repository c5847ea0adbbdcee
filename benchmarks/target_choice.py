"""Which diffusion targets should FedDifRC align to? Chosen by training, not by argument.

FedAvg against FedDifRC with each candidate target setting (reduction x alignment head), on the
same partitions, seeds and budget (Fashion-MNIST private half, 10 clients, 5 per round, Dirichlet
alpha 0.1, the offline teacher), through the real Flower apps (benchmarks/accuracy.py runs each).

    A = mean-pool + shared PCA (signed targets)         B = the authors' spatial-norm (>= 0)
    Bc = spatial-norm minus the federated mean target   heads: none | linear | mlp

    nice -n 5 .venv/bin/python benchmarks/target_choice.py            # 3 seeds, ~1 h on 2 cores
    nice -n 5 .venv/bin/python benchmarks/target_choice.py --seeds 7  # one seed first

Resumable (finished runs are recorded in <out>/results.json). Writes <out>/choice.md and
<out>/choice.json: best / mean test accuracy over rounds (mean +/- sd over seeds), the per-seed
paired difference to FedAvg, and the last round's TDCL / NDCR losses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import accuracy_plan
from benchmarks.accuracy_launch import Launcher, launch
from benchmarks.accuracy_store import ResultsStore, read_run
from benchmarks.stats import fmt_interval as _ci
from benchmarks.stats import fmt_mean_sd as _fmt
from benchmarks.stats import mean_sd as _mean_sd
from benchmarks.stats import t_interval

ROOT = Path(__file__).resolve().parents[1]


# tag -> (method, run-config overrides); the order is the table's.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "A-none": ("feddifrc", {"reduction": "mean-pool", "align-head": "none"}),
    "A-linear": ("feddifrc", {"reduction": "mean-pool", "align-head": "linear"}),
    "A-mlp": ("feddifrc", {"reduction": "mean-pool", "align-head": "mlp"}),
    "B-none": ("feddifrc", {"reduction": "spatial-norm", "align-head": "none"}),
    "B-mlp": ("feddifrc", {"reduction": "spatial-norm", "align-head": "mlp"}),
    "Bc-mlp": ("feddifrc", {"reduction": "spatial-norm-centred", "align-head": "mlp"}),
}
# The accuracy benchmark's first CPU budget (15 rounds of 2 local epochs on 4,000 private images,
# 5 of 10 clients per round), pinned here so that the recorded choice stays readable after that
# benchmark moved on: clients train one at a time with both cores (torch-threads 2). ~2 min per
# run on an idle machine, plus each seed's first extraction of the clients' representations
# (mean-pool one pass, spatial-norm two, shared by the variants). Its records were hashed before
# the run hash took in torch-threads and the methods' own settings (accuracy_plan.FREE_KEYS): redraw
# them with --report-only; a rerun makes new runs under new hashes.
BUDGET: dict[str, Any] = {
    **accuracy_plan.COMMON, "num-rounds": 15, "train-samples": 4000, "test-samples": 2000,
    "model": "small-cnn", "model-width": 32, "local-epochs": 2, "device": "cpu",
    "torch-threads": 2, "eval-batch-size": 1000, "probe-train-samples": 2000}
ALPHA = 0.1


def plan(seeds: Sequence[int], variants: Sequence[str]) -> list[accuracy_plan.RunSpec]:
    """Seeds outermost: a partial table holds whole seeds."""
    specs = []
    for seed in seeds:
        for tag in variants:
            method, overrides = VARIANTS[tag]
            specs += accuracy_plan.plan_runs([method], [ALPHA], [seed], BUDGET, overrides,
                                             "" if tag == "fedavg" else tag)
    return specs


def summarize(records: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
    by_tag: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in records:
        by_tag.setdefault(r.get("tag") or "fedavg", {})[int(r["seed"])] = r
    base = by_tag.get("fedavg", {})
    out: dict[str, Any] = {}
    for tag in variants:
        runs = by_tag.get(tag, {})
        if not runs:
            continue
        seeds = sorted(runs)
        row: dict[str, Any] = {"seeds": seeds}
        for key in ("best", "mean"):
            values = [100 * runs[s][key] for s in seeds]
            row[key] = _mean_sd(values)
            row[f"{key}-per-seed"] = values
            paired = [100 * (runs[s][key] - base[s][key]) for s in seeds if s in base]
            row[f"{key}-vs-fedavg"] = _mean_sd(paired) if tag != "fedavg" and paired else None
            row[f"{key}-vs-fedavg-ci95"] = (
                t_interval(paired) if tag != "fedavg" and len(paired) > 1 else None)
        for loss in ("train-tdcl", "train-ndcr"):
            last = [runs[s].get("last-round", {}).get(loss) for s in seeds]
            last = [v for v in last if isinstance(v, (int, float))]
            row[loss] = sum(last) / len(last) if last else None
        out[tag] = row
    return out


def markdown(summary: Mapping[str, Any]) -> str:
    lines = [
        f"FedAvg vs FedDifRC target settings, Fashion-MNIST private half, alpha {ALPHA:g}, "
        f"budget {json.dumps({k: BUDGET[k] for k in ('train-samples', 'local-epochs', 'num-rounds', 'model')})}.",
        "Test accuracy (%) over rounds: mean ± sd over seeds; Δ = paired difference to FedAvg "
        "(same seed), mean ± sd and its 95 % t-interval; last-round TDCL (chance 2.30) and NDCR "
        "(2 - 2 cos).",
        "",
        "| setting | best | mean | Δ best | Δ best 95 % CI | Δ mean | Δ mean 95 % CI "
        "| best per seed | TDCL | NDCR | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tag, r in summary.items():
        per_seed = " / ".join(f"{v:.1f}" for v in r["best-per-seed"])
        cells = [_fmt(r["best"]), _fmt(r["mean"]), _fmt(r["best-vs-fedavg"], signed=True),
                 _ci(r.get("best-vs-fedavg-ci95")), _fmt(r["mean-vs-fedavg"], signed=True),
                 _ci(r.get("mean-vs-fedavg-ci95")), per_seed,
                 "-" if r["train-tdcl"] is None else f"{r['train-tdcl']:.2f}",
                 "-" if r["train-ndcr"] is None else f"{r['train-ndcr']:.2f}",
                 ",".join(map(str, r["seeds"]))]
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "target_choice")
    p.add_argument("--seeds", default="7,8,9")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated tags")
    p.add_argument("--cpus-per-client", type=float, default=2.0)
    p.add_argument("--run-timeout", type=float, default=3600.0)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(out / "results.json")
    how = Launcher(clients=10, cpus_per_client=args.cpus_per_client, run_timeout=args.run_timeout)
    failed = []
    for spec in plan([int(s) for s in args.seeds.split(",")], variants):
        if args.report_only or store.done(spec):
            continue
        try:
            folder = launch(spec, out, how)
        except Exception as err:  # one failed run must not stop the others
            print(f"ERROR: {err}", file=sys.stderr, flush=True)
            failed.append(spec.key)
            continue
        store.add(read_run(spec, folder))
        _report(store, out, variants)
    print(_report(store, out, variants))
    return 1 if failed else 0


def _report(store: ResultsStore, out: Path, variants: Sequence[str]) -> str:
    store.reload()
    summary = summarize(list(store.records.values()), variants)
    (out / "choice.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary)
    (out / "choice.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
