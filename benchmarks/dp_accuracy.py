"""Differential privacy: test accuracy against the noise multiplier, with each run's epsilon.

One Flower simulation per setting (the project's launcher, `benchmarks/inprocess.py`: pyproject
defaults + the overrides below, Ray in a child process): no DP, then Flower's client-side fixed
clipping (the pairing with secure aggregation) at each noise multiplier z (0: the clipping
alone). A small federation on a budget that a shared 2-core CPU finishes in about 20 minutes:
FedAvg, 10 clients that all train every round (m = 10: the noise std per coordinate is
z * C / 10), Fashion-MNIST's private split (6,000 images, Dirichlet alpha 0.5), a width-16 small
CNN (33,242 floating values per update), 2 local epochs, 12 rounds. Every run shares the seed,
so the partition, the initial model and the clients' seeds are the same; only the clipping and
the noise differ.

    nice -n 10 .venv/bin/python -m benchmarks.dp_accuracy [--noise-multipliers 0 0.01 0.1 1.0]
        [--clipping-norm 1.0] [--rounds 12] [--out benchmarks/results/dp]

Resumable: a setting whose record is in `<out>/results.json` is not run again (delete the
record to rerun it). Outputs: `results.json` (per run: the settings, the accuracy curve, the
final and best accuracy, (epsilon, delta), wall time, the machine's load) and `table.md`.
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

from benchmarks import inprocess
from benchmarks.accuracy_launch import LoadSampler
from feddifrc_core import differential_privacy as dp
from feddifrc_core.checkpoint import atomic_write_text
from feddifrc_core.config import RunConfig
from feddifrc_core.provenance import git_revision

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dp"
CLIENTS = 10
# The federation and budget every setting shares (keys of pyproject [tool.flwr.app.config]).
BUDGET: dict[str, Any] = {
    "algorithm": "fedavg", "seed": 7, "fraction-train": 1.0, "min-train-nodes": 10,
    "min-available-nodes": 10, "dataset": "fashion-mnist", "data-subset": "private",
    "train-samples": 6000, "test-samples": 2000, "partition": "dirichlet-reference",
    "dirichlet-alpha": 0.5, "model": "small-cnn", "model-width": 16, "local-epochs": 2,
    "device": "cpu", "torch-threads": 1}


def settings(noise_multipliers: Sequence[float], clipping_norm: float, rounds: int
             ) -> dict[str, dict[str, Any]]:
    """Run name -> the run-config overrides of that setting."""
    runs = {"no-dp": {**BUDGET, "num-rounds": rounds}}
    for z in noise_multipliers:
        runs[f"z{z:g}"] = {**BUDGET, "num-rounds": rounds,
                           "differential-privacy": dp.CLIENT_FIXED,
                           "dp-noise-multiplier": float(z), "dp-clipping-norm": clipping_norm}
    for overrides in runs.values():
        RunConfig.from_flower(overrides)  # every setting is valid before the first run starts
    return runs


def run(name: str, overrides: dict[str, Any], out: Path) -> dict[str, Any]:
    """One simulation in a child process; its record. Run folders, logs and configs go under
    `<out>/runs/` (git ignores it); an interrupted run resumes from its last checkpoint."""
    work = out / "runs"
    folder = work / name
    config = {**overrides, "output-dir": str(work), "run-name": name,
              "cache-dir": str(work / "cache"), "resume": (folder / "checkpoints").is_dir()}
    config_path = work / "pending" / f"{name}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1))
    log_path = work / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
           "FEDDIFRC_GIT_SHA": os.environ.get("FEDDIFRC_GIT_SHA") or git_revision()}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: running (log {log_path})", flush=True)
    started = time.time()
    with open(log_path, "a", encoding="utf-8") as log, LoadSampler() as load:
        proc = subprocess.run(inprocess.command(config_path, CLIENTS, cpus_per_client=1.0),
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (folder / "summary.json").is_file():
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log_path}")
    config_path.unlink()
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "overrides": overrides,
            "accuracy-per-round": [r.get("test-accuracy") for r in rows],
            "final-accuracy": summary["final-accuracy"], "best-accuracy": summary["best-accuracy"],
            **{k: summary[k] for k in dp.REPORT_KEYS if k in summary},
            "wall-seconds": round(time.time() - started, 1), "machine-load": load.summary(),
            "git": env["FEDDIFRC_GIT_SHA"]}


def table(records: Sequence[dict[str, Any]]) -> str:
    lines = ["| setting | z | C | final accuracy | best accuracy | epsilon (delta) | noised rounds | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    def order(r: dict[str, Any]) -> tuple[bool, float]:
        return "dp-noise-multiplier" in r["overrides"], r["overrides"].get("dp-noise-multiplier", 0)

    for r in sorted(records, key=order):
        o = r["overrides"]
        private = o.get("differential-privacy", dp.NONE) != dp.NONE
        eps = (f"{r[dp.EPSILON]:.4g} ({r[dp.DELTA]:g})" if dp.EPSILON in r
               else ("no noise" if private else "-"))
        lines.append(
            f"| {o.get('differential-privacy', dp.NONE)} | "
            f"{o['dp-noise-multiplier'] if private else '-'} | "
            f"{o['dp-clipping-norm'] if private else '-'} | {100 * r['final-accuracy']:.2f} % | "
            f"{100 * r['best-accuracy']:.2f} % | {eps} | {r.get(dp.RELEASES, '-')} | "
            f"{r['wall-seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # 0: clipping alone (no guarantee), to tell the cost of the clipping from that of the noise
    p.add_argument("--noise-multipliers", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    p.add_argument("--clipping-norm", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    records = json.loads(results_path.read_text()) if results_path.is_file() else []
    for name, overrides in settings(args.noise_multipliers, args.clipping_norm,
                                    args.rounds).items():
        if any(r["name"] == name and r["overrides"] == overrides for r in records):
            continue
        records = [r for r in records if r["name"] != name] + [run(name, overrides, out)]
        atomic_write_text(results_path, json.dumps(records, indent=1) + "\n")
        atomic_write_text(out / "table.md", table(records))
        print(table(records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
