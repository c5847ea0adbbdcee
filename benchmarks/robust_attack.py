"""Robust aggregation under attack: test accuracy of each aggregator with one Byzantine client.

10 clients of Fashion-MNIST (the demo's data: 4,000 training images, Dirichlet alpha 0.5; a small
CNN of width 16, one local epoch in batches of 16 at lr 0.02, so that ten rounds learn and one run
takes about two minutes on a shared 2-core machine), every client in every round, FedAvg's client
objective (the aggregator acts on the model, whatever objective trained it).
Client 0 trains honestly and then uploads g - scale * (w - g): its update sign-flipped and
scaled (tests/attacks.py, a ClientApp mod; the attack is a test helper, not a product setting).
Each aggregator runs attacked and clean on the same seed; the robust rules are told
num-malicious-nodes = 1 (FedAvg tolerates none). The apps are the real ServerApp and ClientApp
over the tests' in-process grid (tests/loopback_grid.py: real Messages, no Ray; clients run one
after another), so the numbers depend on no transport.

    nice -n 10 .venv/bin/python -m benchmarks.robust_attack [--rounds 10] [--scale 10] [--out DIR]

Writes <out>/robust_attack.json (every round's accuracy of every run) and <out>/robust_attack.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from feddifrc_core.provenance import git_revision
from feddifrc_core.robust_aggregation import AGGREGATORS
from scripts.run_config import app_defaults

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "robust_attack"
ATTACKER = 0  # the partition that attacks

# The demo's data (pyproject), FedAvg's objective, all clients every round (the attacker is in
# every round), no diffusion; a narrower model and smaller batches than the demo's (width 32,
# batch 64, lr 0.01 reach 41 % after 10 clean rounds here, width 16 / batch 16 / lr 0.02 64 %, in
# less time). What the command line does not set.
BUDGET: dict[str, Any] = {
    "algorithm": "fedavg", "fraction-train": 1.0, "partition": "dirichlet-reference",
    "model-width": 16, "batch-size": 16, "lr": 0.02, "local-epochs": 1,
    "validation-samples": 0, "device": "cpu", "torch-threads": 1, "eval-every": 1}


def run_config(aggregator: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The run config of one run (flat kebab-case keys, as `flwr run` takes them)."""
    return {**app_defaults(), **BUDGET, "aggregator": aggregator,
            "num-malicious-nodes": 0 if aggregator == "fedavg" else 1,
            "num-rounds": args.rounds, "min-train-nodes": args.clients,
            "min-available-nodes": args.clients, "dirichlet-alpha": args.alpha, "seed": args.seed,
            "dataset": args.dataset, "train-samples": args.train_samples,
            "test-samples": args.test_samples, "output-dir": str(folder / "runs"),
            "run-name": "run", "cache-dir": str(folder / "cache")}


def one_run(aggregator: str, attacked: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One federation, start to end; the test accuracy after every round. A run whose model turns
    NaN/inf stops there (the ServerApp's divergence check): recorded as diverged, with the
    accuracy of the rounds before."""
    from client_app.app import make_client_app
    from feddifrc_core.config import RunConfig
    from feddifrc_core.divergence import DivergedError
    from server_app.app import run_server
    from tests.attacks import sign_flip_attack
    from tests.loopback_grid import LoopbackGrid

    diverged = ""
    with tempfile.TemporaryDirectory(prefix="robust-attack-") as tmp:
        cfg = RunConfig.from_flower(run_config(aggregator, args, Path(tmp)))
        mods = [sign_flip_attack(ATTACKER, args.scale)] if attacked else []
        grid = LoopbackGrid(make_client_app(mods=mods), args.clients, cfg.to_flower())
        t0 = time.perf_counter()
        try:
            run_server(grid, cfg)
        except DivergedError as err:
            diverged = str(err).split(":")[0]  # "round k"
        seconds = time.perf_counter() - t0
        metrics = Path(tmp) / "runs" / "run" / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
    rows = [json.loads(line) for line in lines]
    accuracy = [float(r["test-accuracy"]) for r in rows]  # round 0 = the initial model
    return {"aggregator": aggregator, "attacked": attacked, "accuracy": accuracy,
            "final": None if diverged else accuracy[-1],
            "best": max(accuracy[1:], default=None), "diverged": diverged,
            "failures": sum(int(r.get("failures", 0)) for r in rows[1:]),
            "seconds": round(seconds, 1)}


def report(record: dict[str, Any]) -> str:
    """The markdown table: per aggregator, clean and attacked final / best accuracy."""
    s = record["settings"]
    runs = {(r["aggregator"], r["attacked"]): r for r in record["runs"]}
    lines = [
        f"One attacker of {s['clients']} clients (partition {ATTACKER}, update x -{s['scale']}), "
        f"{s['dataset']}, {s['train-samples']} training images, Dirichlet alpha {s['alpha']}, "
        f"{s['rounds']} rounds, seed {s['seed']}; test accuracy in % (final / best round; a run "
        "whose model turns NaN stops, its best is over the rounds before).",
        "",
        "| aggregator | clean final | clean best | attacked final | attacked best |",
        "|---|---|---|---|---|"]
    for name in s["aggregators"]:
        cells = []
        for attacked in (False, True):
            run = runs.get((name, attacked))
            cells += [_cell(run, "final"), _cell(run, "best")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(run: dict[str, Any] | None, key: str) -> str:
    if run is None:
        return "-"
    if key == "final" and run["diverged"]:
        return f"diverged ({run['diverged']}: NaN)"
    return "-" if run[key] is None else f"{100 * run[key]:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=AGGREGATORS)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--scale", type=float, default=10.0, help="the attacker's update x -scale")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--attacked-only", action="store_true", help="skip the clean runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    settings = {k.replace("_", "-"): v for k, v in vars(args).items() if k != "out"}
    record: dict[str, Any] = {"settings": settings, "git": git_revision(),
                              "load-average-start": os.getloadavg()[0], "runs": []}
    for name in args.aggregators:
        for attacked in ((True,) if args.attacked_only else (False, True)):
            run = one_run(name, attacked, args)
            record["runs"].append(run)
            print(f"{name:14s} {'attacked' if attacked else 'clean':8s} final "
                  f"{_cell(run, 'final')} best {_cell(run, 'best')} ({run['seconds']:.0f} s)",
                  flush=True)
    record["load-average-end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robust_attack.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "robust_attack.md").write_text(report(record))
    print(report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
