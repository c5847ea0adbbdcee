"""SecAgg+ on the demo's FedDifRC run: cost per round (time, bytes up and down) at 10 clients and
the accuracy on the same seed, against the same run in plaintext.

    nice -n 10 .venv/bin/python -m benchmarks.secagg_demo [--rounds 25] [--bytes-rounds 2]
        [--parts time,bytes] [--cache-dir DIR] [--out benchmarks/results/secagg-demo]

1. time and accuracy (`time`): two complete Flower simulations through
   `scripts/run_simulation.py` (Ray, 10 SuperNodes, one CPU each), FedDifRC with the demo's
   settings (pyproject defaults, seed 7), `secure-aggregation` "none" then "secaggplus". They
   share one feature cache, so the second run extracts nothing: the set-up is not compared, the
   rounds are (`round-seconds`, the ServerApp's wall time from sending a round to its checkpoint).
2. bytes (`bytes`): the real ServerApp and ClientApp on the tests' serializing grid
   (tests/secure_grid.py: every message crosses as Flower's protobuf bytes, what gRPC carries
   without its framing), `--bytes-rounds` rounds of each mode from the same cache, the bytes of
   each stage counted per direction. Clients run one after another there: its times are not
   the federation's.
Writes `secagg_demo.json` and `secagg_demo.md` into `--out`, plus each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from flwr.app import Message

from feddifrc_core.checkpoint import atomic_write_text
from feddifrc_core.config import RunConfig
from scripts.run_config import app_defaults
from tests.secure_grid import SecureLoopbackGrid  # the tests' serializing grid
from wire import protocol

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "secagg-demo"
MODES = ("none", "secaggplus")
CLIENTS = 10
RESULTS_LINE = re.compile(r"^Results: (.+)$", re.MULTILINE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=int(app_defaults()["num-rounds"]))
    parser.add_argument("--bytes-rounds", type=int, default=2)
    parser.add_argument("--parts", default="time,bytes")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "feddifrc"))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "secagg_demo.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    parts = {p.strip() for p in args.parts.split(",")}
    if "time" in parts:
        result["time"] = {mode: simulate(mode, args.rounds, Path(args.cache_dir), out)
                          for mode in MODES}
    if "bytes" in parts:
        result["bytes"] = {mode: count_bytes(mode, args.bytes_rounds, Path(args.cache_dir))
                           for mode in MODES}
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "secagg_demo.md", report(result) + "\n")
    print(report(result))
    return 0


def simulate(mode: str, rounds: int, cache: Path, out: Path) -> dict[str, Any]:
    """One demo run on Ray: per-round wall times, accuracy and the load it ran under."""
    with tempfile.TemporaryDirectory(prefix="secagg-demo-") as runs:
        env = {**os.environ, "FEDDIFRC_RUNS_DIR": runs, "FEDDIFRC_CACHE_DIR": str(cache)}
        command = [sys.executable, str(ROOT / "scripts" / "run_simulation.py"), "--supernodes",
                   str(CLIENTS), "--cpus-per-client", "1", "-c",
                   f"algorithm='feddifrc' num-rounds={rounds} secure-aggregation='{mode}' "
                   f"run-name='secagg-demo-{mode}'"]
        load, t0 = os.getloadavg()[0], time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        seconds = time.monotonic() - t0
        found = RESULTS_LINE.search(done.stdout)
        if done.returncode != 0 or not found:
            raise SystemExit(f"the {mode} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        folder = Path(found.group(1).strip())
        shutil.copy(folder / "metrics.jsonl", out / f"metrics-{mode}.jsonl")
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((folder / "summary.json").read_text())
    per_round = [r["round-seconds"] for r in rows if r["round"] >= 1]
    return {"round-seconds": per_round, "median-round-seconds": statistics.median(per_round),
            "run-seconds": round(seconds, 1), "load-average": [round(load, 2),
                                                              round(os.getloadavg()[0], 2)],
            **{k: summary.get(k) for k in ("accuracy-at-validation-round", "validation-round",
                                           "last-5-mean-accuracy", "final-accuracy",
                                           "best-accuracy", "mean-accuracy")}}


class CountingGrid(SecureLoopbackGrid):
    """Bytes per stage kind ("node discovery", "set-up", "rounds") and direction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stages: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})

    def deliver(self, msg: Message, silent: bool = False, fail: bool = False) -> Message | None:
        up, down = sum(self.bytes_up.values()), sum(self.bytes_down.values())
        reply = super().deliver(msg, silent, fail)
        stage = self.stages[_kind(msg)]
        stage["up"] += sum(self.bytes_up.values()) - up
        stage["down"] += sum(self.bytes_down.values()) - down
        return reply


def _kind(msg: Message) -> str:
    if msg.metadata.message_type == protocol.NODE_INFO:
        return "node discovery"
    if msg.metadata.message_type == protocol.SETUP or msg.metadata.group_id.startswith("setup-"):
        return "set-up"
    return "rounds"


def count_bytes(mode: str, rounds: int, cache: Path) -> dict[str, Any]:
    """The demo's FedDifRC in one process on the counting grid: bytes per client and round."""
    from client_app.app import make_client_app
    from server_app.app import run_server

    with tempfile.TemporaryDirectory(prefix="secagg-bytes-") as runs:
        cfg = RunConfig.from_flower({**app_defaults(), "algorithm": "feddifrc",
                                     "num-rounds": rounds, "secure-aggregation": mode,
                                     "output-dir": runs, "run-name": f"bytes-{mode}",
                                     "cache-dir": str(cache)})
        grid = CountingGrid(make_client_app(), CLIENTS, cfg.to_flower())
        run_server(grid, cfg)
    per_client = {kind: {d: v[d] / CLIENTS / (rounds if kind == "rounds" else 1) for d in v}
                  for kind, v in grid.stages.items()}
    return {"rounds": rounds, "bytes-per-client": per_client}


def report(result: dict[str, Any]) -> str:
    lines = ["SecAgg+ on the demo's FedDifRC run (10 clients, all training every round, pyproject "
             "defaults, seed 7) against plaintext.", ""]
    if "time" in result:
        t = result["time"]
        lines += ["| mode | median s per round (Ray, 10 x 1 CPU) | mean s per round | test acc. at the "
                  "round validation chose | mean of last 5 | final | best (on test) | load average "
                  "(start, end) |", "|---|---|---|---|---|---|---|---|"]
        for mode, r in t.items():
            lines.append(
                f"| {mode} | {r['median-round-seconds']:.2f} | "
                f"{statistics.mean(r['round-seconds']):.2f} | "
                f"{_pct(r['accuracy-at-validation-round'])} (round {r['validation-round']}) | "
                f"{_pct(r['last-5-mean-accuracy'])} | {_pct(r['final-accuracy'])} | "
                f"{_pct(r['best-accuracy'])} | {r['load-average'][0]}, {r['load-average'][1]} |")
        lines.append("")
    if "bytes" in result:
        lines += ["| mode | stage | up per client (B) | down per client (B) |", "|---|---|---|---|"]
        for mode, r in result["bytes"].items():
            for kind, v in r["bytes-per-client"].items():
                what = f"{kind} (per round, mean of {r['rounds']})" if kind == "rounds" else kind
                lines.append(f"| {mode} | {what} | {v['up']:,.0f} | {v['down']:,.0f} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


if __name__ == "__main__":
    sys.exit(main())
